"""The CPU miniature end to end (quick preset): every stage runs and leaves its artefacts in one run dir."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path):
    run = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "cogvx_ds.demo", "--preset", "quick", "--run-dir", str(run)],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    score = json.loads((run / "score.json").read_text())
    assert score["num_prompts"] == 6 and set(score["accuracy"]) == {"color", "shape", "motion"}
    assert all(0 <= v <= 1 for v in score["accuracy"].values())
    assert set(score["vae_ceiling"]) == {"color", "shape", "motion"}  # the held-out clips after a VAE round trip
    assert "VAE round trip" in proc.stdout
    assert (run / "vae" / "config.json").is_file() and '"batch_size": 4' in (run / "vae" / "config.json").read_text()
    for stage in ("lq_pretrain", "hq_finetune", "caption_finetune"):
        assert (run / stage / "final_model" / "config.json").is_file()
        assert list((run / stage / "tensorboard").iterdir())
        assert (run / stage / "checkpoints" / "latest").is_file()
    assert (run / "hq_finetune" / "config.yaml").read_text().count("sequence_parallel: 2") == 1
    # ZeRO-3 where it partitions (HQ: SP=2 on 2 processes), ZeRO-2 in the one-process stages
    for stage, zero in (("lq_pretrain", 2), ("hq_finetune", 3), ("caption_finetune", 2)):
        assert f"zero_stage: {zero}\n" in (run / stage / "config.yaml").read_text(), stage
    assert len(list((run / "samples").glob("*.mp4"))) == 6
    assert (run / "vae" / "export" / "config.json").is_file() and (run / "shards_hq" / "index.json").is_file()
    for line in ("color", "shape", "motion", "chance"):
        assert line in proc.stdout
