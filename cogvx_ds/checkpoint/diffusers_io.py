"""diffusers-format transformer folders: config.json + safetensors (single file or sharded with an index)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from cogvx_ds.checkpoint.layout import full_state_dict, load_full_state_dict
from cogvx_ds.config import ModelConfig
from cogvx_ds.utils import atomic_write

DIFFUSERS_CLASS = "CogVideoXTransformer3DModel"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# diffusers config fields that CogVideoX 1.0 checkpoints fix; any other value is a model we do not implement.
_FIXED = {"activation_fn": "gelu-approximate", "timestep_activation_fn": "silu", "patch_size_t": None,
          "ofs_embed_dim": None, "use_learned_positional_embeddings": False, "patch_bias": True}
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "dropout"}


class LazySafetensors(Mapping):
    """Read-on-demand view of every tensor in a folder's safetensors file(s); `shape_of` reads no data."""

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            self._where = {k: folder / f for k, f in weight_map.items()}
            missing = sorted({str(p) for p in self._where.values() if not p.is_file()})
            if missing:
                raise FileNotFoundError(f"{indexes[0]} lists shard files that do not exist: {', '.join(missing)}")
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors or *.safetensors.index.json in {folder}")
            self._where = {}
            for f in files:
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        if k in self._where:  # e.g. a .fp16 variant beside the weights: which one is meant?
                            raise ValueError(f"{folder}: {k!r} is in both {self._where[k].name} and {f.name}; "
                                             f"keep one set of weights per folder (or an index.json naming them)")
                        self._where[k] = f

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(str(self._where[key]), framework="pt") as sf:
            return sf.get_tensor(key)

    def shape_of(self, key: str) -> tuple:
        with safe_open(str(self._where[key]), framework="pt") as sf:
            return tuple(sf.get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _model_folder(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"diffusers model path does not exist: {path}")
    if (path / "transformer" / "config.json").is_file() and not (path / "config.json").is_file():
        return path / "transformer"  # a pipeline folder
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json (expected a diffusers {DIFFUSERS_CLASS} folder "
                                f"or a pipeline folder with transformer/)")
    return path


def config_from_diffusers(raw: dict, source: str = "config.json") -> ModelConfig:
    cls = raw.get("_class_name", DIFFUSERS_CLASS)
    if cls != DIFFUSERS_CLASS:
        raise ValueError(f"{source}: _class_name is {cls!r}, expected {DIFFUSERS_CLASS!r}")
    for key, value in _FIXED.items():
        if raw.get(key, value) != value:
            raise ValueError(f"{source}: {key} = {raw[key]!r} is not supported (CogVideoX 1.0 uses {value!r})")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - names - set(_FIXED) - _IGNORED)
    if unknown:
        raise ValueError(f"{source}: unknown fields {unknown}")
    kwargs = {k: v for k, v in raw.items() if k in names}
    if kwargs.get("out_channels") is None:
        kwargs["out_channels"] = kwargs.get("in_channels", 16)
    return ModelConfig(**kwargs)


def config_to_diffusers(cfg: ModelConfig) -> dict:
    out = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": "0.32.0"}
    keep = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift",
            "time_embed_dim", "text_embed_dim", "num_layers", "attention_bias", "sample_width", "sample_height",
            "sample_frames", "patch_size", "temporal_compression_ratio", "max_text_seq_length",
            "norm_elementwise_affine", "norm_eps", "spatial_interpolation_scale", "temporal_interpolation_scale",
            "use_rotary_positional_embeddings")
    out.update({k: getattr(cfg, k) for k in keep})
    if cfg.rope_theta != 10000.0:  # not a diffusers field (its pipeline uses 10000): kept for our own reload
        out["rope_theta"] = cfg.rope_theta
    out.update(_FIXED)
    out["dropout"] = 0.0
    return out


def load_transformer(cls, path, dtype: torch.dtype | None = None, **config_overrides):
    folder = _model_folder(path)
    cfg = config_from_diffusers(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
    cfg = dataclasses.replace(cfg, **config_overrides)
    model = cls(cfg)
    if dtype is not None:
        model.to(dtype)
    load_full_state_dict(model, LazySafetensors(folder), source_name=str(folder))
    return model


def _shards(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for key, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    return shards + [current] if current else shards


def save_transformer(model, path, max_shard_size: int = 5 * 1024**3, dtype: torch.dtype | None = None) -> None:
    """Every rank must call (TP shards are gathered); rank 0 keeps the gathered weights and writes. Each file
    appears atomically (temp + rename); an earlier save's weight files that the new one does not overwrite are
    removed after it is complete (an index would be read, extra shards merged, with the new weights)."""
    writer = not dist.is_initialized() or dist.get_rank() == 0
    sd = {k: v.contiguous() for k, v in full_state_dict(model, dtype, keep=writer).items()}
    if not writer:
        dist.barrier()
        return
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    stale = set(folder.glob("diffusion_pytorch_model*.safetensors*"))
    shards = _shards(sd, max_shard_size)
    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        atomic_write(folder / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        atomic_write(folder / f"{WEIGHTS_NAME}.index.json", lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config_to_diffusers(model.config), indent=2)))
    written = set(names) | ({f"{WEIGHTS_NAME}.index.json"} if len(shards) > 1 else set())
    for old in stale:
        if old.name not in written:
            old.unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()
