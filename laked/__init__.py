"""laked: the lake daemon. Serves lake.ko's GPU requests and owns the GPU."""

__version__ = "0.1.0"
