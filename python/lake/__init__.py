"""lake: the user-space library for work submitted to laked.

``lake.Client`` connects to a running laked as a tenant (cu* sessions,
hosted models and jobs); ``lake.standin.StandIn`` plays lake.ko's side of
the data plane in-process, for tests and benchmarks without the module.
"""

__version__ = "0.1.0"

from .client import Client, ClientError, NotRunning  # noqa: E402
from .ring import CallError, HeapExhausted, Launch, PeerGone, RingFull, Session  # noqa: E402

__all__ = ["CallError", "Client", "ClientError", "HeapExhausted", "Launch", "NotRunning",
           "PeerGone", "RingFull", "Session", "__version__"]
