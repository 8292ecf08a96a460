from cogvx_ds.models.dit.transformer import CogVideoXTransformer

__all__ = ["CogVideoXTransformer"]
