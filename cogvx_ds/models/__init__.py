"""Models: the expert transformer (DiT) and the 3D causal VAE.

Both are imported on first use, so a process that needs only the VAE (latent encoding) does not pay for
importing Megatron-core and DeepSpeed.
"""

__all__ = ["CogVideoXTransformer", "CogVideoXVAE"]


def __getattr__(name):
    if name == "CogVideoXTransformer":
        from cogvx_ds.models.dit import CogVideoXTransformer

        return CogVideoXTransformer
    if name == "CogVideoXVAE":
        from cogvx_ds.models.vae import CogVideoXVAE

        return CogVideoXVAE
    raise AttributeError(f"module 'cogvx_ds.models' has no attribute {name!r}")
