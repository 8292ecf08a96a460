"""inspect_shards (summary and integrity check that catches damaged shards) and decode_latents (latents -> mp4)."""

import json
import shutil

import numpy as np
import pytest
import torch
from test_encode_latents import encode, make_vae

from cogvx_ds.data.shards import ShardWriter, iter_shard
from cogvx_ds.models.vae import CogVideoXVAE
from data_tools import decode_latents, inspect_shards
from data_tools._video_io import read_video


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    from data_tools.make_synthetic import generate

    tmp = tmp_path_factory.mktemp("inspect")
    vae = make_vae(tmp / "vae")
    generate(tmp / "data", num_videos=5, num_images=2, num_heldout=0, frames=17, height=32, width=48, fps=10.0,
             progress=False)
    encode(tmp / "data" / "manifest.jsonl", tmp / "out", vae, "--samples-per-shard", 3)
    return tmp, vae


def test_inspect_summary_and_check(encoded, capsys):
    tmp, _ = encoded
    assert inspect_shards.main([str(tmp / "out"), "--check"]) == 0
    text = capsys.readouterr().out
    assert "3 shards, 7 samples, 0 rejected inputs" in text
    assert "32x64x1: 2, 32x64x9: 5" in text  # 5 videos, 2 images
    first = next(iter_shard(tmp / "out" / "shard-000000.tar"))
    assert f"caption {first.meta['caption']!r}" in text and "mean [4, 3, 4, 8] bfloat16" in text
    assert "checked 3 shards, 7 samples" in text and "integrity: OK" in text


def test_inspect_check_finds_damage(encoded, tmp_path, capsys):
    src, _ = encoded
    out = tmp_path / "out"
    shutil.copytree(src / "out", out)
    data = (out / "shard-000001.tar").read_bytes()
    (out / "shard-000001.tar").write_bytes(data[:1200])  # truncated inside its first member
    with ShardWriter(out / "shard-000002.tar") as w:  # a sample whose json disagrees with its latent shape
        mean = torch.zeros(4, 3, 4, 8)
        w.add("000000099_000", mean, mean, {"caption": "c", "frames": 17, "height": 32, "width": 48,
                                            "source": "x.mp4", "bucket": "32x48x17"})
        w.add("000000000_000", mean.fill_(float("nan")), mean, {"caption": "dup", "frames": 9, "height": 32,
                                                                "width": 64, "source": "y", "bucket": "32x64x9"})
    assert inspect_shards.main([str(out), "--check"]) == 1
    text = capsys.readouterr().out
    assert "shard-000001.tar: truncated or corrupt tar" in text
    assert "000000099_000: latent [C,F,H,W] (4, 3, 4, 8) does not match frames/height/width 17/32/48" in text
    assert "mean has non-finite values" in text and "key 000000000_000 also in shard-000000.tar" in text
    assert "integrity: " in text and "integrity: OK" not in text
    assert inspect_shards.main([str(tmp_path / "nothing.tar")]) == 1


def test_decode_latents_writes_viewable_videos(encoded, tmp_path):
    src, vae_dir = encoded
    assert decode_latents.main([str(src / "out"), "--vae", str(vae_dir), "--out", str(tmp_path), "--num", "0"]) == 0
    records = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert len(records) == 7 and sum(r["file"].endswith(".png") for r in records) == 2
    vae = CogVideoXVAE.from_diffusers(vae_dir).eval()
    samples = {s.key: s for p in sorted((src / "out").glob("*.tar")) for s in iter_shard(p)}
    videos = [r for r in records if r["file"].endswith(".mp4")]
    with torch.no_grad():
        expect = {r["key"]: decode_latents.to_uint8(vae.decode(samples[r["key"]].mean[None].float())[0])
                  for r in videos}
    for n, r in enumerate(videos):
        frames, fps = read_video(tmp_path / r["file"])
        assert frames.shape == (9, 32, 64, 3) and fps == pytest.approx(samples[r["key"]].meta["fps"]) == 10.0
        # the mp4 holds the VAE's decoding of this sample's mean, up to H.264/yuv420p loss on random-VAE noise
        own = np.abs(frames.astype(float) - expect[r["key"]]).mean()
        other = np.abs(frames.astype(float) - expect[videos[n - 1]["key"]]).mean()
        assert own < 12 and own < other / 2, (own, other)
    assert decode_latents.main([str(src / "out"), "--vae", str(vae_dir), "--out", str(tmp_path / "k"),
                                "--keys", records[0]["key"]]) == 0
    assert len(list((tmp_path / "k").glob("*.*"))) == 2  # the one file + captions.jsonl


def test_decode_latents_keeps_samples_whose_keys_repeat_across_folders(encoded, tmp_path):
    """Keys are unique within one encode folder only (two folders both start at 000000000_000): decoding both
    writes one file per sample, the second under its folder and shard name, and captions.jsonl names each."""
    src, vae_dir = encoded
    for run in ("a", "b"):  # folders named alike (every encode's folder is latents/)
        shutil.copytree(src / "out", tmp_path / run / "latents")
    first = next(iter_shard(sorted((src / "out").glob("*.tar"))[0])).key
    assert decode_latents.main([str(src / "out"), str(tmp_path / "a" / "latents"), str(tmp_path / "b" / "latents"),
                                "--vae", str(vae_dir), "--out", str(tmp_path / "d"), "--keys", first]) == 0
    records = [json.loads(line) for line in (tmp_path / "d" / "captions.jsonl").read_text().splitlines()]
    files = [r["file"] for r in records]
    assert len(files) == 3 and len(set(files)) == 3 and all((tmp_path / "d" / f).is_file() for f in files), files
    assert files[1].startswith("latents_") and files[1].endswith(f"{first}.mp4") and files[2].endswith("_2.mp4")
