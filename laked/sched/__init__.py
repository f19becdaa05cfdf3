"""laked's GPU arbiter (LithOS-style): partitions, tenants, atoms, scheduling.

Runs where the GPU is (cuda-python; torch for the op-level atomizer).
Nothing here is imported by laked's control plane, so laked still starts
on machines without a GPU.
"""
