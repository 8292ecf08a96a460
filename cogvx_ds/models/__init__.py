"""Models: the expert transformer (DiT) and the 3D causal VAE."""

from cogvx_ds.models.dit import CogVideoXTransformer

__all__ = ["CogVideoXTransformer", "CogVideoXVAE"]


def __getattr__(name):
    if name == "CogVideoXVAE":  # imported on demand: the VAE pulls in its own modules
        from cogvx_ds.models.vae import CogVideoXVAE

        return CogVideoXVAE
    raise AttributeError(name)
