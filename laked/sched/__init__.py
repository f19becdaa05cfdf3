"""laked's GPU arbiter (LithOS-style): tenants, partitions, gates, atoms.

- ``base``: the arbiter interface and the CPU arbiter (no GPU needed);
- ``arbiter``: the GPU arbiter (torch, cuda-python), with ``gate`` (GPU-side
  gates), ``pacer``, ``opmode`` and ``plan`` (BE atoms: their size, and
  when to hold), ``knobs`` (the [scheduler] table), ``partition`` (green
  contexts), ``rightsize`` (l(t) = m/t + b), ``power`` (advise-only DVFS),
  ``tenancy`` (the executor's raw-stream launches as a tenant's work),
  ``atoms``/``kernel_atoms`` (row ops, NVRTC block ranges), ``hostfirst``
  (BE's Python held while LC's runs), ``fast``.
Nothing here is imported by laked's control plane unless a GPU is used, so
laked still starts on machines without one.
"""
