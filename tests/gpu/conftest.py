"""GPU tests: the environment laked itself sets before CUDA starts."""
import os

# Like laked: every stream its own hardware queue where possible, so a BE
# stream waiting at a gate never holds up an LC stream that shares its queue.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
