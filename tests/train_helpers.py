"""Tiny latent shards and runs for the trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from cogvx_ds.data.shards import ShardWriter, write_index

TEXT_LEN, TEXT_DIM, CHANNELS = 8, 32, 4  # match cogvx_ds/configs/model/tiny.yaml


def make_shards(folder: Path, n_video: int = 16, n_image: int = 0, per_shard: int = 8, frames: int = 3,
                size: tuple[int, int] = (8, 8), seed: int = 0) -> Path:
    """Latent shards of smooth random 'videos' (+ one-frame images), with text embeddings and empty_text."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = [("v", frames)] * n_video + [("i", 1)] * n_image
    entries, writer = [], None
    for i, (kind, f) in enumerate(items):
        if i % per_shard == 0:
            if writer:
                entries.append(writer.close())
            writer = ShardWriter(folder / f"shard-{i // per_shard:05d}.tar")
        mean = torch.randn(CHANNELS, f, *size, generator=g).cumsum(-1) / 3
        logvar = torch.full_like(mean, -4.0)
        text = torch.randn(TEXT_LEN, TEXT_DIM, generator=g)
        writer.add(f"{kind}{i:05d}", mean, logvar, {"caption": f"sample {i}", "bucket": f"{f}x{size[0]}x{size[1]}",
                                                     "latent_frames": f}, text_embedding=text)
    entries.append(writer.close())
    write_index(folder, entries)
    save_file({"embedding": torch.zeros(TEXT_LEN, TEXT_DIM)}, str(folder / "empty_text.safetensors"))
    return folder


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_args(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return ["--config", "tiny", f"train.run_dir={run_dir}", f"data.shards=[{shards}]", "train.save_every=2",
            "train.max_steps=4", "train.warmup_steps=1", "train.lr=1e-3", *extra]
