"""`python -m cogvx_ds.train_vae`: loss goes down with the GAN on, SIGKILL + resume continues the same curve, export.

Each run is a fresh subprocess (DeepSpeed ZeRO-2, gloo, no launcher), as a user would start it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_vae_losses import write_random_lpips

from cogvx_ds.train_vae import build_config, main

REPO = Path(__file__).resolve().parents[1]
STEPS, DISC_START, KILL_AT, RESUME_TO = 100, 30, 40, 60


def cli(run_dir: Path, lpips_dir: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cogvx_ds.train_vae", "--run-dir", str(run_dir), "--steps", str(steps),
            "--lpips-path", str(lpips_dir), f"disc_start={DISC_START}", "ckpt_every=20", "video_every=50",
            "lpips_frames=1", "lpips_weight=0.1", "recon=l2",
            # Narrower first levels than the default tiny VAE: full-resolution 3D convs dominate the CPU time.
            "model.block_out_channels=[8,16,32,32]", *extra]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=400)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(proc.args)} exited {proc.returncode}\n{err[-6000:]}")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lpips_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    write_random_lpips(d)
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory, lpips_dir):
    """(uninterrupted run dir, killed-then-resumed run dir). The two runs go in parallel to halve wall time.

    The second run is SIGKILLed as soon as its step-40 checkpoint is complete (`latest` names it), possibly a
    few steps later, then resumed up to step 60.
    """
    full_dir, kill_dir = tmp_path_factory.mktemp("vae_full"), tmp_path_factory.mktemp("vae_killed")
    full = start(cli(full_dir, lpips_dir, STEPS))
    killed = start(cli(kill_dir, lpips_dir, STEPS))
    latest, deadline = kill_dir / "checkpoints" / "latest", time.time() + 300
    while not (latest.is_file() and latest.read_text().strip() == f"step_{KILL_AT:07d}"):
        if killed.poll() is not None or time.time() > deadline:
            full.kill()
            pytest.fail(f"training exited or stalled before its step-{KILL_AT} checkpoint: {killed.stderr.read()[-4000:]}")
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate()
    finish(start(cli(kill_dir, lpips_dir, RESUME_TO)))
    finish(full)
    return full_dir, kill_dir


@pytest.mark.slow
def test_training_reduces_reconstruction_loss_with_gan_on(runs):
    full_run = runs[0]
    m = read_metrics(full_run)
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    first = sum(r["rec_loss"] for r in m[:10]) / 10
    last = sum(r["rec_loss"] for r in m[-20:]) / 20
    # Stated margin: mean L2 of steps 81-100 at least 30% below steps 1-10 (measured: 45% lower, 0.40 -> 0.22).
    assert last < 0.7 * first, (first, last)
    gan = [r for r in m if r["step"] > DISC_START]
    assert all(r["d_weight"] > 0 and r["d_loss"] > 0 for r in gan)
    assert all(r["d_weight"] == 0 and r["d_loss"] == 0 for r in m if r["step"] <= DISC_START)
    assert all(r["lpips"] > 0 for r in m)
    assert list((full_run / "tensorboard").glob("events.out.tfevents.*"))  # the DiT trainer's folder name


@pytest.mark.slow
def test_export_loads_in_diffusers(runs):
    diffusers = pytest.importorskip("diffusers")
    from cogvx_ds.models.vae import CogVideoXVAE

    export = runs[0] / "export"
    ref = diffusers.AutoencoderKLCogVideoX.from_pretrained(export).eval()
    ours = CogVideoXVAE.from_diffusers(export).eval()
    assert ref.config.scaling_factor == pytest.approx(ours.scaling_factor) and ours.scaling_factor != 1.0
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x)[0], ref.encode(x).latent_dist.mean, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sigkill_and_resume_continue_the_same_curve(runs):
    full_run, resumed_run = runs
    resumed, reference = read_metrics(resumed_run), read_metrics(full_run)[:RESUME_TO]
    assert [r["step"] for r in resumed] == list(range(1, RESUME_TO + 1))  # lines after the checkpoint were dropped
    for got, want in zip(resumed, reference):
        for key in ("loss", "rec_loss", "lpips", "kl", "g_loss", "d_loss", "d_weight"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (got["step"], key)
    assert (resumed_run / "export" / "config.json").is_file()
    # TensorBoard shows one curve: the events the killed run logged after its checkpoint are purged on resume
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(resumed_run / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("vae/rec_loss")]
    assert steps == list(range(1, RESUME_TO + 1)), steps


@pytest.mark.slow
def test_export_only_writes_the_checkpoints_vae(runs, lpips_dir, tmp_path):
    """--export-only on a copy of the resumed run (its last checkpoint is its last step) writes the export that the
    end of training wrote: the same weights and scaling factor."""
    import shutil

    from safetensors.torch import load_file

    resumed_run = runs[1]
    copy = tmp_path / "run"
    shutil.copytree(resumed_run, copy, ignore=shutil.ignore_patterns("export"))
    finish(start(cli(copy, lpips_dir, RESUME_TO, "--export-only")))
    got, want = copy / "export", resumed_run / "export"
    assert (json.loads((got / "config.json").read_text())["scaling_factor"]
            == json.loads((want / "config.json").read_text())["scaling_factor"])
    a, b = (load_file(str(d / "diffusion_pytorch_model.safetensors")) for d in (got, want))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_help_and_config_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "disc_start" in out and "lpips_path" in out and "--export-only" in out
    # every field is explained under its default (a new field without a line in FIELD_HELP fails --help)
    import dataclasses

    from cogvx_ds.train.vae_trainer import VAETrainConfig
    from cogvx_ds.train_vae import FIELD_HELP

    assert set(FIELD_HELP) == {f.name for f in dataclasses.fields(VAETrainConfig)}
    assert "step from which the GAN term" in out and "in_channels must equal latent_channels" in out
    cfg = build_config(None, ["model.latent_channels=4", "recon=l2", "betas=[0.9, 0.99]"])
    assert cfg.model["latent_channels"] == 4 and cfg.recon == "l2" and cfg.betas == (0.9, 0.99)
    with pytest.raises(ValueError, match="unknown VAE training config field"):
        build_config(None, ["no_such_field=1"])
    with pytest.raises(ValueError, match="the VAE's own fields are model.\\*: model.latent_channels"):
        build_config(None, ["latent_channels=16"])
    (tmp_path / "c.yaml").write_text("frames: 13\n")
    with pytest.raises(ValueError, match="8j\\+1"):
        build_config(str(tmp_path / "c.yaml"), []).validate()
    with pytest.raises(ValueError, match="data_cache_mb must be >= 0"):
        build_config(None, ["data_cache_mb=-1"]).validate()
    # the README's order: an option after key=value overrides is still an option (the data path is checked next)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--run-dir", str(tmp_path / "r"), "--steps", "2", "recon=l2", "--lpips-path", str(tmp_path / "lpips"),
              f"data={tmp_path / 'videos.txt'}", "height=64", "width=64", "frames=9"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized arguments" not in err and "videos.txt does not exist" in err, err
    with pytest.raises(SystemExit) as e:  # a missing LPIPS folder is an argument error, before DeepSpeed starts
        main(["--run-dir", str(tmp_path / "r"), "--steps", "2", "--lpips-path", str(tmp_path / "lpips")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "lpips_path" in err and "does not exist" in err, err
    assert not (tmp_path / "r").exists()


def _frame_code_video(n_frames: int) -> np.ndarray:
    """Frame k is flat grey at level 20 + 10k: the frame index can be read back after lossy coding."""
    return np.stack([np.full((24, 40, 3), 20 + 10 * k, np.uint8) for k in range(n_frames)])


def test_video_file_stream_reads_windows_of_real_files_and_skips_broken_ones(tmp_path):
    from cogvx_ds.train.vae_data import VideoFileStream
    from data_tools._video_io import write_mp4

    for name, n in (("a.mp4", 20), ("b.mp4", 12), ("short.mp4", 5)):
        write_mp4(tmp_path / name, _frame_code_video(n))
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    (tmp_path / "videos.txt").write_text("a.mp4\nb.mp4\nshort.mp4\nbroken.mp4\n")  # no prompts.txt needed
    stream = VideoFileStream(str(tmp_path / "videos.txt"), batch_size=4, num_frames=9, height=16, width=16, seed=3)
    batches = [stream.next_batch() for _ in range(6)]
    assert all(b.shape == (4, 3, 9, 16, 16) for b in batches)
    # Each clip is 9 consecutive frames of one file: grey levels step by 10 (1/12.75 in [-1, 1]).
    levels = torch.cat(batches).mean(dim=(1, 3, 4)) * 127.5 + 127.5  # [24, 9]
    steps = levels.diff(dim=1)
    assert (steps - 10).abs().max() < 2.5, steps
    starts = ((levels[:, 0] - 20) / 10).round()
    assert starts.min() >= 0 and starts.max() <= 11 and len(set(starts.tolist())) > 3  # random windows
    assert set(stream.skipped) == {str(tmp_path / "short.mp4"), str(tmp_path / "broken.mp4")}
    assert "too_few_frames" in stream.skipped[str(tmp_path / "short.mp4")]
    # Sample i is a pure function of (seed, i): a stream resumed at a position continues identically.
    resumed = VideoFileStream(str(tmp_path), batch_size=4, num_frames=9, height=16, width=16, seed=3, position=12)
    assert torch.equal(resumed.next_batch(), batches[3])
    # The decoded-video cache changes nothing but the decoding work: same clips, same skipped files.
    cached = VideoFileStream(str(tmp_path / "videos.txt"), batch_size=4, num_frames=9, height=16, width=16, seed=3,
                             cache_mb=1)
    assert all(torch.equal(cached.next_batch(), b) for b in batches)
    assert set(cached.skipped) == set(stream.skipped) and 0 < cached._cached_bytes <= 2**20
    tiny = VideoFileStream(str(tmp_path / "videos.txt"), 4, 9, 16, 16, seed=3, cache_mb=20 * 768 / 2**20)
    assert all(torch.equal(tiny.next_batch(), b) for b in batches)  # room for one video: evicts, same clips
    assert list(tiny._cache) and tiny._cached_bytes <= 20 * 768
    # The CLI trains on them (data=...), counting the skipped files in its metrics.
    run = tmp_path / "run"
    finish(start([sys.executable, "-m", "cogvx_ds.train_vae", "--run-dir", str(run), "--steps", "2",
                  f"data={tmp_path / 'videos.txt'}", "batch_size=2", "model.block_out_channels=[8,16,32,32]",
                  "disc_start=100", "export=false"]))
    assert [m["skipped_files"] for m in read_metrics(run)][-1] in (1, 2)  # the draws decide which were met
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="lists no video files"):
        VideoFileStream(str(tmp_path / "empty"), 1, 9, 16, 16)
    with pytest.raises(ValueError, match="data: .* does not exist"):
        build_config(None, [f"data={tmp_path / 'missing.txt'}"]).validate()


def test_video_file_stream_resumes_exactly_past_files_that_fail_after_the_window_is_drawn(tmp_path, monkeypatch):
    """A decoder that asks for the window more than once before failing (decord, then PyAV, then PyAV's retry of a
    truncated file), or that asks again on a good file, must not shift later draws: a resumed stream, which has not
    seen the earlier failures, gives the same samples as the uninterrupted one (it drew again for the failed file
    only when the failure happened in its own process). Same with the cache."""
    from types import SimpleNamespace

    import data_tools.video_decode as vd
    from cogvx_ds.train.vae_data import VideoFileStream

    names = ["good0.mp4", "good1.mp4", "fails.mp4", "asks_twice.mp4"]
    for name in names:
        (tmp_path / name).write_bytes(b"stub")
    (tmp_path / "videos.txt").write_text("\n".join(names) + "\n")

    def read_clips(path, choose, transform=None):  # stands in for the real decoders
        info = SimpleNamespace(num_frames=30 + len(path.name), fps=8.0)
        plans = choose(info)
        if path.name == "fails.mp4":
            choose(info)  # a fallback reader tried again
            raise vd.BadInput("decode_error", "stub")
        if path.name == "asks_twice.mp4":
            plans = choose(info)
        code = names.index(path.name)
        frames = torch.stack([torch.full((3, 4, 4), 10 * code + i, dtype=torch.uint8) for i in plans[0].indices])
        return None, None, [frames], None

    monkeypatch.setattr(vd, "read_clips", read_clips)

    def stream(cache, position=0):
        return VideoFileStream(str(tmp_path / "videos.txt"), batch_size=2, num_frames=5, height=4, width=4, seed=7,
                               position=position, cache_mb=cache)

    runs = {}
    for cache in (0.0, 1.0):
        full = stream(cache)
        runs[cache] = batches = [full.next_batch() for _ in range(20)]
        assert str(tmp_path / "fails.mp4") in full.skipped
        for at in (6, 10, 16):
            resumed = stream(cache, position=2 * at)
            for i in range(at, 20):
                assert torch.equal(resumed.next_batch(), batches[i]), (cache, at, i)
    assert all(torch.equal(a, b) for a, b in zip(runs[0.0], runs[1.0]))


def test_a_yaml_model_section_goes_over_the_default_model(tmp_path):
    """`model:` in a YAML file changes the fields it names, like model.* overrides: a file saying only
    latent_channels: 16 built a 216M-parameter VAE from CogVideoXVAEConfig's defaults instead of the tiny one."""
    from cogvx_ds.train.vae_trainer import TINY_VAE

    (tmp_path / "c.yaml").write_text("model:\n  latent_channels: 16\n")
    cfg = build_config(str(tmp_path / "c.yaml"), ["model.layers_per_block=2"])
    assert cfg.model == {**TINY_VAE, "latent_channels": 16, "layers_per_block": 2}
    (tmp_path / "bad.yaml").write_text("model: 3\n")
    with pytest.raises(ValueError, match="model: expected a mapping"):
        build_config(str(tmp_path / "bad.yaml"), [])


def test_unknown_model_fields_are_refused():
    with pytest.raises(ValueError, match=r"unknown VAE model field\(s\) \['model.bogus'\]"):
        build_config(None, ["model.bogus=3"])


def test_the_default_deepspeed_config_is_built_in(tmp_path):
    """Without ds_config= the VAE trainer uses its built-in ZeRO-2 config (an installed package has no ds_configs/
    folder), the same as ds_configs/vae_zero2_cpu.json and hashed as that file was, so runs started with the file
    as default still resume; a missing or malformed file is a config error, raised before any process group."""
    from cogvx_ds.train.vae_trainer import VAETrainConfig, load_ds_config

    cfg = VAETrainConfig(batch_size=3)
    assert load_ds_config(cfg) == {**json.loads((REPO / "ds_configs" / "vae_zero2_cpu.json").read_text()),
                                   "train_micro_batch_size_per_gpu": 3}
    assert cfg.hash() == VAETrainConfig(batch_size=3, ds_config="ds_configs/vae_zero2_cpu.json").hash()
    with pytest.raises(ValueError, match="ds_config: /nope.json does not exist"):
        build_config(None, ["ds_config=/nope.json"]).validate()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        build_config(None, [f"ds_config={tmp_path / 'bad.json'}"]).validate()


def test_number_fields_given_without_a_dot_are_numbers():
    """lr=2e-3 and kl_weight=1e-6 (as YAML files and overrides write them) were the strings '2e-3' and '1e-6':
    validate() passed them and training broke on the optimizer. Now numbers, and text that is no number is an error
    naming the field."""
    cfg = build_config(None, ["lr=2e-3", "kl_weight=1e-6", "steps=5", "model.scaling_factor=1e-1"])
    assert (cfg.lr, cfg.kl_weight, cfg.steps, cfg.model["scaling_factor"]) == (0.002, 1e-6, 5, 0.1)
    with pytest.raises(ValueError, match="lr must be a number, got 'fast'"):
        build_config(None, ["lr=fast"])
    with pytest.raises(ValueError, match="model.latent_channels must be a whole number"):
        build_config(None, ["model.latent_channels=1e1"])
    cfg = build_config(None, ["betas=[5e-1, 9e-1]", "lpips_frames=None", "model.latents_std=[1e-1, 2e-1]"])
    assert cfg.betas == (0.5, 0.9) and cfg.lpips_frames is None and cfg.model["latents_std"] == [0.1, 0.2]


def test_a_refused_resume_names_what_changed_and_old_event_folders_move(tmp_path):
    """The same YAML can give another config after an upgrade (a model: section used to replace the default
    model): the refusal lists the fields that differ from the last start's config.json. A run that logged to tb/
    (before the DiT trainer's name, tensorboard/, was used) has it moved, so a resume keeps one event folder."""
    import dataclasses
    import types

    from cogvx_ds.train.vae_trainer import VAETrainConfig, VAETrainer, adopt_old_tensorboard

    before = VAETrainConfig(model={"latent_channels": 16}, lr=2e-3, data_cache_mb=5.0)  # not hashed: not listed
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(before), default=str))
    now = build_config(None, ["model.latent_channels=16", "lr=2e-3", "steps=7"])
    assert now.lr == 0.002  # YAML reads 2e-3 as text (its floats need a dot): taken as the number the field is
    changes = VAETrainer._config_changes(types.SimpleNamespace(run_dir=tmp_path, cfg=now))
    assert "model.block_out_channels: None -> [16, 32, 32, 32]" in changes and "lr" not in changes
    assert "steps" not in changes and "latent_channels" not in changes and "data_cache_mb" not in changes
    assert "ds_config" not in changes
    assert VAETrainer._config_changes(types.SimpleNamespace(run_dir=tmp_path / "none", cfg=now)) == ""
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.1").write_bytes(b"x")
    adopt_old_tensorboard(tmp_path)
    assert (tmp_path / "tensorboard" / "events.out.tfevents.1").is_file() and not (tmp_path / "tb").exists()
