"""encode_latents resume: a worker killed with SIGKILL mid-shard, then re-run, ends with exactly the shards of an
uninterrupted run (same files, same keys, same latent bytes): nothing lost, nothing written twice."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_encode_latents import BUCKETS, encode, make_vae

from cogvx_ds.data.shards import iter_shard

ROOT = Path(__file__).resolve().parents[1]


def _state(out: Path) -> tuple[list[str], list[str]]:
    return sorted(p.name for p in out.glob("shard-*.tar")), sorted(p.name for p in out.glob(".shard-*tmp-*"))


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    from data_tools.make_synthetic import generate

    vae = make_vae(tmp_path / "vae")
    generate(tmp_path / "data", num_videos=20, num_images=4, num_heldout=0, frames=17, height=48, width=48,
             progress=False)
    manifest, out = tmp_path / "data" / "manifest.jsonl", tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_tools.encode_latents", "--input", str(manifest), "--out", str(out),
           "--vae", str(vae), "--buckets", BUCKETS, "--samples-per-shard", "2", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done, temps = _state(out)
            if len(done) >= 2 and temps:  # some shards finished and one half written: kill now
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-way (rc {proc.returncode}): {err[-2000:]}"
    done, temps = _state(out)
    assert 2 <= len(done) < 12 and not (out / "index.json").exists()

    resumed = encode(manifest, out, vae, "--samples-per-shard", 2)
    assert resumed["shards_skipped"] == len(done) and resumed["shards_written"] == 12 - len(done)
    reference = encode(manifest, tmp_path / "clean", vae, "--samples-per-shard", 2)
    assert reference["shards_written"] == 12

    assert _state(out) == (_state(tmp_path / "clean")[0], [])  # all shards, no temp file left behind
    keys = []
    for name in _state(out)[0]:
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
        keys += [s.key for s in iter_shard(out / name)]
    assert len(keys) == len(set(keys)) == 24  # every input once
    assert (out / "index.json").read_text() == (tmp_path / "clean" / "index.json").read_text()
