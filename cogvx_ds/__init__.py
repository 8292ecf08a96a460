"""cogvx_ds: CogVideoX-style text-to-video diffusion training (Megatron-core TP, DeepSpeed ZeRO-3, Ulysses SP)."""

import warnings

# Megatron-core warns at import time that the optional CUDA fused kernels (Transformer Engine, Apex) are absent;
# we do not use them, so the warning is noise on every CPU run.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

__version__ = "0.1.0"
