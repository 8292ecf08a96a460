"""3D causal VAE (CogVideoX): model, diffusers I/O, and the pieces used to train it."""

from .autoencoder import CogVideoXVAE, CogVideoXVAEConfig, DiagonalGaussian

__all__ = ["CogVideoXVAE", "CogVideoXVAEConfig", "DiagonalGaussian"]
