"""lake: the user-space library for work submitted to laked."""

__version__ = "0.1.0"
