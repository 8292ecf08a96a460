"""CogVideoX 1.0 SAT checkpoints (the original training code's format) <-> diffusers-format state dicts.

SAT fuses q/k/v into one `query_key_value` linear, keeps the per-head QK LayerNorms and the expert AdaLN in
mixins, and uses one 12-chunk AdaLN linear per layer ordered: (shift, scale, gate) for attention then for the
MLP on vision tokens, then the same six for text tokens. diffusers splits that into norm1 (attention: vision
then text) and norm2 (MLP: vision then text).
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
from pathlib import Path

import torch

from cogvx_ds.checkpoint.layout import load_full_state_dict
from cogvx_ds.config import ModelConfig

PREFIX = "model.diffusion_model."
# (SAT name, diffusers name) below PREFIX / the model root; {i} is the layer index
_RENAMES = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("mixins.patch_embed.", "patch_embed."),
    ("mixins.final_layer.norm_final.", "norm_out.norm."),
    ("mixins.final_layer.linear.", "proj_out."),
    ("mixins.final_layer.adaLN_modulation.1.", "norm_out.linear."),
    ("transformer.final_layernorm.", "norm_final."),
    ("transformer.layers.{i}.input_layernorm.", "transformer_blocks.{i}.norm1.norm."),
    ("transformer.layers.{i}.post_attention_layernorm.", "transformer_blocks.{i}.norm2.norm."),
    ("transformer.layers.{i}.attention.dense.", "transformer_blocks.{i}.attn1.to_out.0."),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.", "transformer_blocks.{i}.ff.net.0.proj."),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.", "transformer_blocks.{i}.ff.net.2."),
    ("mixins.adaln_layer.query_layernorm_list.{i}.", "transformer_blocks.{i}.attn1.norm_q."),
    ("mixins.adaln_layer.key_layernorm_list.{i}.", "transformer_blocks.{i}.attn1.norm_k."),
]


def _rename(key: str, reverse: bool = False) -> str | None:
    for sat, diff in _RENAMES:
        src, dst = (diff, sat) if reverse else (sat, diff)
        m = re.match(re.escape(src).replace(r"\{i\}", r"(\d+)"), key)
        if m:
            return dst.format(i=m.group(1) if m.groups() else None) + key[m.end():]
    return None


_QKV = re.compile(r"^transformer\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)$")
_ADALN = re.compile(r"^mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.(weight|bias)$")
_DROPPED = ("embed_tokens", "freqs_sin", "freqs_cos", "position_embedding", "pos_embedding")


class UnsafeCheckpointError(RuntimeError):
    pass


def _sat_model_file(folder: Path) -> Path:
    """The model file of a SAT save folder: the iteration its `latest` file names, else the highest iteration
    (by number: sorting the paths as text took 500/ over 1500/)."""
    latest = folder / "latest"
    if latest.is_file():
        named = folder / latest.read_text().strip() / "mp_rank_00_model_states.pt"
        if named.is_file():
            return named
    found = list(folder.rglob("mp_rank_00_model_states.pt"))
    if not found:
        raise FileNotFoundError(f"no mp_rank_00_model_states.pt under {folder}")
    return max(found, key=lambda f: (f.parent.name.isdigit(), int(f.parent.name) if f.parent.name.isdigit() else 0,
                                     str(f)))


def read_sat_file(path: str | Path, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a SAT `.pt` with weights_only=True (tensors, containers, argparse.Namespace); return the model dict."""
    path = Path(path)
    if path.is_dir():  # SAT saves <dir>/<iteration>/mp_rank_00_model_states.pt
        path = _sat_model_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAT checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if not allow_unsafe_pickle:
            raise UnsafeCheckpointError(
                f"{path} holds Python objects beyond tensors, so loading it would run arbitrary code from the file "
                f"({str(e).splitlines()[0]}). Pass allow_unsafe_pickle=True (training: train.allow_unsafe_pickle=true) only if "
                f"you trust where the file came from.") from e
        obj = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("module", "model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def sat_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, t in sd.items():
        if not key.startswith(PREFIX):
            if any(d in key for d in _DROPPED) or key.startswith(("first_stage_model.", "conditioner.")):
                continue  # the VAE / text encoder live in other files or are skipped here
            unknown.append(key)
            continue
        k = key[len(PREFIX):]
        if any(d in k for d in _DROPPED):
            continue
        if m := _QKV.match(k):
            for name, part in zip("qkv", t.chunk(3, 0)):
                out[f"transformer_blocks.{m[1]}.attn1.to_{name}.{m[2]}"] = part
            continue
        if m := _ADALN.match(k):
            c = t.chunk(12, 0)
            out[f"transformer_blocks.{m[1]}.norm1.linear.{m[2]}"] = torch.cat(c[0:3] + c[6:9])
            out[f"transformer_blocks.{m[1]}.norm2.linear.{m[2]}"] = torch.cat(c[3:6] + c[9:12])
            continue
        new = _rename(k)
        if new is None:
            unknown.append(key)
        else:
            out[new] = t
    if unknown:
        raise ValueError(f"SAT checkpoint has keys with no diffusers counterpart ({len(unknown)}): "
                         + ", ".join(unknown[:20]))
    return out


def diffusers_to_sat(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of sat_to_diffusers (used to test it, and to hand weights back to SAT tooling)."""
    out, used = {}, set()
    layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in layers:
        b = f"transformer_blocks.{i}."
        for wb in ("weight", "bias"):
            qkv = [f"{b}attn1.to_{n}.{wb}" for n in "qkv"]
            if all(k in sd for k in qkv):
                out[f"{PREFIX}transformer.layers.{i}.attention.query_key_value.{wb}"] = torch.cat([sd[k] for k in qkv])
                used.update(qkv)
            n1, n2 = f"{b}norm1.linear.{wb}", f"{b}norm2.linear.{wb}"
            c1, c2 = sd[n1].chunk(6, 0), sd[n2].chunk(6, 0)
            out[f"{PREFIX}mixins.adaln_layer.adaLN_modulations.{i}.1.{wb}"] = torch.cat(c1[:3] + c2[:3] + c1[3:] + c2[3:])
            used.update((n1, n2))
    for key, t in sd.items():
        if key in used:
            continue
        new = _rename(key, reverse=True)
        if new is None:
            raise ValueError(f"no SAT name for {key}")
        out[PREFIX + new] = t
    return out


def infer_config(sd: dict[str, torch.Tensor], base: ModelConfig | None = None) -> ModelConfig:
    """Model sizes read off the diffusers-format tensors; position type from what the SAT file carried."""
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    head_dim = sd["transformer_blocks.0.attn1.norm_q.weight"].shape[0]
    dim = sd["transformer_blocks.0.attn1.to_q.weight"].shape[0]
    conv = sd["patch_embed.proj.weight"]
    base = base or ModelConfig()
    return dataclasses.replace(
        base, num_layers=layers, attention_head_dim=head_dim, num_attention_heads=dim // head_dim,
        in_channels=conv.shape[1], patch_size=conv.shape[2], text_embed_dim=sd["patch_embed.text_proj.weight"].shape[1],
        time_embed_dim=sd["time_embedding.linear_1.weight"].shape[0],
        out_channels=sd["proj_out.weight"].shape[0] // conv.shape[2] ** 2)


def sat_uses_rope(raw: dict, where: str) -> bool:
    """Whether a SAT checkpoint's model uses RoPE (True) or a sin-cos position table (False), from what it stores:
    the 2B model its fixed sin-cos `pos_embedding`, the 5B model no table or only RoPE's `freqs_sin/cos` buffers.
    Both at once is RoPE plus a trained position table (CogVideoX-5B-I2V's learned positional embeddings), which
    this model does not implement: refused (loading it as either would drop the table or the rotation)."""
    table = any(k.endswith("pos_embedding") for k in raw)
    rope = any(k.endswith(("freqs_sin", "freqs_cos")) for k in raw)
    if table and rope:
        raise ValueError(f"{where}: RoPE with a trained position table (learned positional embeddings, as in "
                         f"CogVideoX-5B-I2V) is not supported")
    return not table


def check_sat_positions(raw: dict, config: ModelConfig, where: str) -> None:
    """The position type the SAT checkpoint was trained with is the config's (both have the same tensor shapes, so
    a mismatch would load without a word and compute other positions)."""
    rope = sat_uses_rope(raw, where)
    if rope != config.use_rotary_positional_embeddings:
        raise ValueError(f"{where}: the checkpoint uses {'RoPE' if rope else 'a sin-cos position table'}, but "
                         f"use_rotary_positional_embeddings = {config.use_rotary_positional_embeddings} here; use "
                         f"the matching model config (model/2b for CogVideoX-2b, model/5b for -5b)")


def load_sat_transformer(cls, path, config: ModelConfig | None = None, allow_unsafe_pickle: bool = False,
                         dtype: torch.dtype | None = None):
    raw = read_sat_file(path, allow_unsafe_pickle)
    where = f"SAT checkpoint {path}"
    sd = sat_to_diffusers(raw)
    if config is None:
        config = infer_config(sd, ModelConfig(use_rotary_positional_embeddings=sat_uses_rope(raw, where)))
    else:
        check_sat_positions(raw, config, where)
    model = cls(config)
    if dtype is not None:
        model.to(dtype)
    load_full_state_dict(model, sd, source_name=f"SAT checkpoint {path}")
    return model
