"""Process groups (DP x SP x TP), the DeepSpeed mpu adapter, Ulysses attention and the CPU shim."""

from cogvx_ds.parallel.mpu import MegatronMPU
from cogvx_ds.parallel.state import destroy_distributed, init_distributed, is_initialized

__all__ = ["MegatronMPU", "destroy_distributed", "init_distributed", "is_initialized"]
