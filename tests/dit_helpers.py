"""Shared pieces of the DiT tests: tiny diffusers-style configs, the diffusers oracle, error measures."""

from __future__ import annotations

import torch

# Tiny stand-ins for the two released model families: 2B (3D sin-cos positions) and 5B (3D RoPE).
BASE = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
            text_embed_dim=24, num_layers=2, sample_width=12, sample_height=8, sample_frames=9, max_text_seq_length=7)
CONFIGS = {
    "2b": dict(BASE, use_rotary_positional_embeddings=False),
    "5b": dict(BASE, use_rotary_positional_embeddings=True),
}
# (latent frames, latent height, latent width): non-square, two sizes (the first equals the sample size).
SIZES = [(3, 8, 12), (2, 6, 10)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_reference(kind: str, seed: int = 0):
    """diffusers' CogVideoXTransformer3DModel with every parameter randomised (none left at 0 or 1)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    ref = CogVideoXTransformer3DModel(**CONFIGS[kind]).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


def reference_rope(cfg: dict, frames: int, height: int, width: int):
    """The RoPE tables the diffusers pipeline passes in, on integer grid positions (crop = the whole grid)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    gh, gw = height // cfg["patch_size"] if "patch_size" in cfg else height // 2, width // 2
    return get_3d_rotary_pos_embed(embed_dim=cfg["attention_head_dim"], crops_coords=((0, 0), (gh, gw)),
                                   grid_size=(gh, gw), temporal_size=frames, use_real=True)


def make_inputs(kind: str, size, batch: int = 2, seed: int = 1):
    cfg = CONFIGS[kind]
    g = torch.Generator().manual_seed(seed)
    f, h, w = size
    x = torch.randn(batch, f, cfg["in_channels"], h, w, generator=g)
    text = torch.randn(batch, cfg["max_text_seq_length"], cfg["text_embed_dim"], generator=g)
    t = torch.tensor([37.0, 901.0][:batch])
    probe = torch.randn(batch, f, cfg["out_channels"], h, w, generator=g)  # random cotangent for backward
    return x, text, t, probe


def reference_forward_backward(ref, kind: str, x, text, t, probe):
    x, text = x.clone().requires_grad_(True), text.clone().requires_grad_(True)
    rope = reference_rope(CONFIGS[kind], x.shape[1], x.shape[3], x.shape[4]) if kind == "5b" else None
    out = ref(x, text, t, image_rotary_emb=rope, return_dict=False)[0]
    (out * probe).sum().backward()
    return out.detach(), x.grad, text.grad


def forward_backward(model, x, text, t, probe):
    x, text = x.clone().requires_grad_(True), text.clone().requires_grad_(True)
    out = model(x, text, t)
    (out * probe).sum().backward()
    return out.detach(), x.grad, text.grad
