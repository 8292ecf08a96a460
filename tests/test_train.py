"""Trainer behaviour in one process: exact resume after SIGKILL, SIGTERM requeue, image/video mixing, the three
stages, explicit uniform sampling, non-finite losses, and errors before training."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import make_shards, read_metrics, train_args

from cogvx_ds.checkpoint.diffusers_io import LazySafetensors
from cogvx_ds.diffusion.timesteps import explicit_uniform_interval
from cogvx_ds.train.trainer import REQUEUE_EXIT_CODE

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def train(*args, check=True, env=None, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "cogvx_ds.train", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"train exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "cogvx_ds.train", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for(cond, proc, timeout=240):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data") / "shards", n_video=24, n_image=12)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_curve(shards, tmp_path):
    common = ["train.lr_schedule=constant", "train.save_every=3", "train.micro_batch_size=2", "train.ema_decay=0.9"]
    train(*train_args(tmp_path / "full", shards, *common, "train.max_steps=9"))
    full = read_metrics(tmp_path / "full")

    run = tmp_path / "killed"
    proc = start(*train_args(run, shards, *common, "train.max_steps=1000"))
    latest = run / "checkpoints" / "latest"
    wait_for(lambda: latest.is_file() and latest.read_text() == "step00000006", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = read_metrics(run)
    assert len(logged) >= 6  # it may have logged steps past the checkpoint: those are replayed
    train(*train_args(run, shards, *common, "train.max_steps=9"))
    resumed = read_metrics(run)
    assert [m["step"] for m in resumed] == list(range(1, 10))
    for a, b in zip(resumed, full):
        assert a["loss"] == b["loss"] and a["data_position"] == b["data_position"], (a["step"], a, b)
    order_full = (tmp_path / "full" / "sample_order.jsonl").read_text()
    assert (run / "sample_order.jsonl").read_text() == order_full  # the same samples, none lost or repeated
    ema_full, ema_resumed = (LazySafetensors(r / "final_model_ema") for r in (tmp_path / "full", run))
    assert all(torch.equal(ema_full[k], ema_resumed[k]) for k in ema_full)  # the EMA state resumed too


@pytest.mark.slow
def test_sigterm_writes_checkpoint_and_exits_for_requeue(shards, tmp_path):
    proc = start(*train_args(tmp_path, shards, "train.max_steps=1000", "train.save_every=1000"))
    wait_for(lambda: (tmp_path / "metrics.jsonl").is_file() and len(read_metrics(tmp_path)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    last = read_metrics(tmp_path)[-1]["step"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step{last:08d}"
    st = json.loads((tmp_path / "checkpoints" / f"step{last:08d}" / "trainer_state.json").read_text())
    assert st["step"] == last and st["data_position"] == last
    assert "exiting with 75" in out
    assert json.loads((tmp_path / "REQUEUE").read_text())["step"] == last  # what launch/*.sbatch requeues on


@pytest.mark.slow
def test_stop_file_from_the_launcher_stops_like_a_signal(shards, tmp_path):
    proc = start(*train_args(tmp_path, shards, "train.max_steps=1000", "train.save_every=1000"))
    wait_for(lambda: (tmp_path / "metrics.jsonl").is_file() and len(read_metrics(tmp_path)) >= 1, proc)
    (tmp_path / "STOP").touch()  # launch/_train_common.sh does this on slurm's SIGUSR1
    proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE
    last = read_metrics(tmp_path)[-1]["step"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step{last:08d}"
    train(*train_args(tmp_path, shards, f"train.max_steps={last + 1}"))  # the requeued job resumes
    assert not (tmp_path / "STOP").exists() and not (tmp_path / "REQUEUE").exists()
    assert read_metrics(tmp_path)[-1]["step"] == last + 1
    # a STOP that the launcher's trap writes after its job began, while the trainer is still starting up, is kept:
    # the run stops at its first step instead of erasing the request and training on (launch/_train_common.sh
    # exports COGVX_JOB_START; the trainer's own process start, later than the STOP here, erased it)
    (tmp_path / "STOP").touch()
    time.sleep(1.1)
    proc = train(*train_args(tmp_path, shards, f"train.max_steps={last + 10}"), check=False,
                 env=dict(ENV, COGVX_JOB_START=str(time.time() - 5)))
    assert proc.returncode == REQUEUE_EXIT_CODE, proc.stderr[-3000:]
    assert read_metrics(tmp_path)[-1]["step"] == last + 2


@pytest.mark.slow
def test_a_resume_needs_neither_the_previous_stage_nor_an_ema_in_its_checkpoint(shards, tmp_path):
    """train.init_from is read by a fresh run only: a resume takes every weight from its checkpoint, so the previous
    stage's run dir may be gone. Turning train.ema_decay on for a resumed run starts the EMA from its weights
    (it crashed on the missing EMA file)."""
    train(*train_args(tmp_path / "a", shards, "train.max_steps=1"))
    b = tmp_path / "b"
    train(*train_args(b, shards, "train.max_steps=2", f"train.init_from={tmp_path / 'a'}"))
    shutil.rmtree(tmp_path / "a")
    proc = train(*train_args(b, shards, "train.max_steps=3", f"train.init_from={tmp_path / 'a'}",
                             "train.ema_decay=0.5"))
    assert "has no EMA" in proc.stderr
    assert read_metrics(b)[-1]["step"] == 3 and (b / "final_model_ema" / "config.json").is_file()
    # a fresh run with a missing init_from fails before any process group starts, naming the field
    proc = train(*train_args(tmp_path / "c", shards, f"train.init_from={tmp_path / 'a'}"), check=False)
    assert proc.returncode != 0 and "train.init_from" in proc.stderr and "does not exist" in proc.stderr


@pytest.mark.slow
def test_images_and_videos_mixed_at_random_positions(shards, tmp_path):
    kinds = {}
    for seed in (0, 1):
        run = tmp_path / f"seed{seed}"
        train(*train_args(run, shards, "train.max_steps=12", "train.save_every=100", "data.image_ratio=0.35",
                          f"data.seed={seed}"))
        order = [json.loads(line) for line in (run / "sample_order.jsonl").read_text().splitlines()]
        kinds[seed] = [o["kind"] for o in order]
        for o in order:  # each batch lies in one bucket: all images or all videos
            assert all(k.startswith("i" if o["kind"] == "image" else "v") for k in o["keys"])
    for seq in kinds.values():
        assert 0 < seq.count("image") < len(seq)
    assert kinds[0] != kinds[1]  # positions come from the seeded shuffle, not from fixed slots


@pytest.mark.slow
def test_three_stages_chain_weights(tmp_path):
    lq = make_shards(tmp_path / "lq", n_video=8, size=(4, 4))
    hq = make_shards(tmp_path / "hq", n_video=8, size=(8, 8), seed=1)
    base = ["--config", "model/tiny", "--config"]
    common = ["train.max_steps=3", "train.micro_batch_size=2", "train.precision=fp32", "parallel.backend=gloo",
              "data.num_frames=9"]
    train(*base, "stages/lq_pretrain", f"train.run_dir={tmp_path / 'lq_run'}", f"data.shards=[{lq}]", *common,
          "data.height=32", "data.width=32", "train.warmup_steps=1", "data.image_ratio=null")
    # Stage 2 at a negligible learning rate: its result must be stage 1's weights, proving it started there.
    train(*base, "stages/hq_finetune", f"train.run_dir={tmp_path / 'hq_run'}", f"data.shards=[{hq}]", *common,
          f"train.init_from={tmp_path / 'lq_run'}", "train.lr=1e-12", "train.warmup_steps=1", "data.image_ratio=null",
          "data.height=64", "data.width=64")
    train(*base, "stages/caption_finetune", f"train.run_dir={tmp_path / 'cap_run'}", f"data.shards=[{hq}]", *common,
          f"train.init_from={tmp_path / 'hq_run'}", "train.warmup_steps=1", "data.image_ratio=null", "train.lr=1e-3",
          "data.height=64", "data.width=64")
    w1, w2, w3 = (LazySafetensors(tmp_path / r / "final_model") for r in ("lq_run", "hq_run", "cap_run"))
    assert max((w2[k] - w1[k]).abs().max().item() for k in w1) < 1e-6
    assert max((w3[k] - w2[k]).abs().max().item() for k in w1) > 1e-4
    for r, stage in (("lq_run", "lq_pretrain"), ("hq_run", "hq_finetune"), ("cap_run", "caption_finetune")):
        assert f"stage: {stage}" in (tmp_path / r / "config.yaml").read_text()


@pytest.mark.slow
def test_ema_weights_follow_the_decay(shards, tmp_path):
    """decay -> 0: the EMA is the final weights; decay -> 1: it stays at the initial weights."""
    for decay in ("0.000001", "0.999999"):
        train(*train_args(tmp_path / decay, shards, "train.max_steps=3", f"train.ema_decay={decay}",
                          "train.save_every=100"))
    fast, slow = LazySafetensors(tmp_path / "0.000001" / "final_model"), LazySafetensors(tmp_path / "0.999999" / "final_model")
    fast_ema = LazySafetensors(tmp_path / "0.000001" / "final_model_ema")
    slow_ema = LazySafetensors(tmp_path / "0.999999" / "final_model_ema")
    from cogvx_ds.config import load_config
    from cogvx_ds.models import CogVideoXTransformer

    init = CogVideoXTransformer.from_config(load_config("tiny").model)  # the seeded init both runs started from
    init.save_diffusers(tmp_path / "init")
    init_w = LazySafetensors(tmp_path / "init")
    assert max((fast_ema[k] - fast[k]).abs().max().item() for k in fast) < 1e-5
    assert max((slow_ema[k] - init_w[k]).abs().max().item() for k in init_w) < 1e-5
    assert max((slow[k] - init_w[k]).abs().max().item() for k in init_w) > 1e-4  # training did move the weights


def test_profile_steps_write_a_trace_and_change_nothing(shards, tmp_path):
    """train.profile_steps=[2,3]: rank 0 writes a Chrome/Perfetto trace with one range per step and the op table;
    those steps are flagged in metrics.jsonl; losses are bit-identical to the run without the profiler."""
    plain, traced = tmp_path / "plain", tmp_path / "traced"
    train(*train_args(plain, shards, "train.max_steps=4", "train.save_every=100"))
    proc = train(*train_args(traced, shards, "train.max_steps=4", "train.save_every=100", "train.profile_steps=[2,3]",
                             "train.peak_tflops=0.001"))
    folder = traced / "profile" / "steps_2-3"
    assert f"profile of steps 2-3 written to {folder}" in proc.stderr + proc.stdout
    events = json.loads((folder / "rank0.pt.trace.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"train_step_2", "train_step_3"} <= names and "train_step_1" not in names and "train_step_4" not in names
    assert any(n and n.startswith("aten::") for n in names)
    ops = (folder / "rank0_ops.txt").read_text()
    assert "steps 2-3, rank 0" in ops and ("mkldnn::_linear_pointwise" in ops or "aten::mm" in ops)
    a, b = read_metrics(plain), read_metrics(traced)
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert [m.get("profiled", 0) for m in b] == [0, 1, 1, 0] and all("profiled" not in m for m in a)
    assert all(0 <= m["data_wait_s"] <= 2 / m["samples_per_s"] for m in a)
    # model TFLOP/s per GPU from perf_model's FLOPs of the step's samples (one process: 2 samples a step, both of
    # the batch's kind), and the MFU against train.peak_tflops
    from cogvx_ds.config import load_config
    from cogvx_ds.perf_model import flops_per_sample

    model = load_config("tiny").model
    kinds = [json.loads(line)["kind"] for line in (plain / "sample_order.jsonl").read_text().splitlines()]
    assert set(kinds) == {"image", "video"}  # the shards mix both: two token counts
    for m, kind in zip(a, kinds):
        n_video = (3 if kind == "video" else 1) * 4 * 4  # latent frames x (8 / patch 2)^2
        want = flops_per_sample(model, model.max_text_seq_length, n_video)["total"] * m["samples_per_s"] / 1e12
        assert m["tflops_per_gpu"] == pytest.approx(want, rel=1e-9) and "mfu" not in m
    assert all(m["mfu"] == pytest.approx(m["tflops_per_gpu"] / 0.001, rel=1e-12) for m in b)


def test_data_wait_shows_a_slow_loader(shards, tmp_path):
    """metrics.jsonl's data_wait_s is the time a step stood waiting for the loader: with reads slowed to 0.5 s a
    sample (1 s for the 2-sample step, several times the tiny model's compute) most of each step is waiting."""
    env = dict(ENV, COGVX_FAULT_LOAD_DELAY_S="0.5")
    train(*train_args(tmp_path, shards, "train.max_steps=3", "train.save_every=100", "data.prefetch=1"), env=env)
    metrics = read_metrics(tmp_path)
    for m in metrics:
        step_s = 2 / m["samples_per_s"]
        assert 0 <= m["data_wait_s"] <= step_s
    assert all(m["data_wait_s"] >= 0.3 for m in metrics[1:]), [m["data_wait_s"] for m in metrics]


def test_explicit_uniform_sampling_per_rank_and_global():
    T = 1000
    for dp, micro in ((1, 4), (2, 2), (3, 5), (8, 1), (7, 3)):
        g = dp * micro
        for rank in range(dp):
            lo_r, hi_r = explicit_uniform_interval(rank, dp, T)
            for j in range(rank * micro, (rank + 1) * micro):  # the rank's contiguous block of the global batch
                lo, hi = explicit_uniform_interval(j, g, T)
                assert lo_r <= lo and hi <= hi_r
        widths = [explicit_uniform_interval(j, g, T)[1] - explicit_uniform_interval(j, g, T)[0] for j in range(g)]
        assert sum(widths) == T and max(widths) - min(widths) <= 1


@pytest.mark.slow
def test_nonfinite_losses_skip_then_abort(shards, tmp_path):
    env = dict(ENV, COGVX_FAULT_NAN_STEPS="2")
    train(*train_args(tmp_path / "a", shards), env=env)
    m = read_metrics(tmp_path / "a")
    assert [x["nonfinite_skipped"] for x in m] == [0, 1, 1, 1]
    env = dict(ENV, COGVX_FAULT_NAN_STEPS="2,3")
    proc = train(*train_args(tmp_path / "b", shards, "train.max_consecutive_nonfinite=2"), env=env, check=False)
    assert proc.returncode != 0
    assert "2 non-finite steps in a row" in proc.stderr and "step 3, rank 0 (local loss nan)" in proc.stderr
    assert "bucket" in proc.stderr
    env = dict(ENV, COGVX_FAULT_NAN_GRAD_STEPS="2,3")
    proc = train(*train_args(tmp_path / "c", shards, "train.max_consecutive_nonfinite=2"), env=env, check=False)
    assert proc.returncode != 0 and "finite losses everywhere, non-finite gradient" in proc.stderr


def _final_weights(run_dir):
    return dict(LazySafetensors(run_dir / "final_model"))


@pytest.mark.slow
@pytest.mark.parametrize("ds_config,precision", [("zero3_bf16", "bf16"), ("zero2", "fp32")])
@pytest.mark.parametrize("fault", ["COGVX_FAULT_NAN_STEPS", "COGVX_FAULT_NAN_GRAD_STEPS"])
def test_a_nonfinite_micro_batch_skips_the_whole_step(shards, tmp_path, fault, ds_config, precision):
    """Gradient accumulation 2; step 2's first micro-batch gets a NaN loss, or a finite loss with a NaN gradient.
    The whole step must be skipped (weights, Adam moments and LR schedule untouched), not just that micro-batch:
    the weights after it equal a clean one-step run's bit for bit, training goes on finite afterwards (NaN moments
    would poison it), and the warm-up does not advance over the skipped step (step 3 runs at step 2's rate)."""
    common = ["train.lr_schedule=constant", "train.warmup_steps=10", "train.gradient_accumulation_steps=2",
              f"train.precision={precision}",
              f"train.ds_config=ds_configs/{ds_config}.json", f"train.zero_stage={2 if ds_config == 'zero2' else 3}"]
    train(*train_args(tmp_path / "one", shards, *common, "train.max_steps=1"))
    train(*train_args(tmp_path / "skip", shards, *common, "train.max_steps=2"), env=dict(ENV, **{fault: "2"}))
    one, skip = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "skip")
    assert all(torch.equal(one[k], skip[k]) for k in one)
    m = read_metrics(tmp_path / "skip")
    assert [x["nonfinite_skipped"] for x in m] == [0, 1]
    assert m[1]["grad_norm"] is None or not torch.isfinite(torch.tensor(m[1]["grad_norm"]))
    train(*train_args(tmp_path / "after", shards, *common, "train.max_steps=3"), env=dict(ENV, **{fault: "2"}))
    after = _final_weights(tmp_path / "after")
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[k], one[k]) for k in one)  # step 3 was applied
    m = read_metrics(tmp_path / "after")
    assert [x["nonfinite_skipped"] for x in m] == [0, 1, 1]
    lr = [x["lr"] for x in m]  # warm-up rates 0.1, 0.2, 0.3 ... of train.lr, one per step taken
    assert lr[1] == pytest.approx(2 * lr[0]) and lr[2] == pytest.approx(lr[1]), lr


def test_bad_config_and_missing_shards_fail_before_training(shards, tmp_path):
    proc = train(*train_args(tmp_path, shards, "model.attention_head_dim=24"), check=False)
    assert proc.returncode == 2 and "model.attention_head_dim = 24" in proc.stderr
    proc = train(*train_args(tmp_path, shards, "train.lr=-1"), check=False)
    assert proc.returncode == 2 and "train.lr" in proc.stderr
    proc = train(*train_args(tmp_path, tmp_path / "nowhere"), check=False)
    assert proc.returncode == 2 and "shard files not found" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


class _SideEffect:
    def __reduce__(self):  # unpickling this creates a file
        return (open, (str(MARKER), "w"))


MARKER = __import__("pathlib").Path("/tmp/cogvx_ds_train_pickle_marker")


@pytest.mark.slow
def test_corrupt_shard_is_skipped_and_counted_and_pickles_never_load(tmp_path):
    import io
    import pickle
    import tarfile

    data = make_shards(tmp_path / "d", n_video=16)
    shard, intact = sorted(data.glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:3000])  # truncated mid-member
    MARKER.unlink(missing_ok=True)
    payload = pickle.dumps(_SideEffect())
    with tarfile.open(intact, "a") as tar:  # a webdataset-style pickle member next to a good sample
        info = tarfile.TarInfo("v00008.pyd")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    proc = train(*train_args(tmp_path / "run", data, "train.max_steps=2"))
    assert not MARKER.exists()
    m = read_metrics(tmp_path / "run")
    assert m[-1]["bad_shards"] == 1 and "skipping shard" in proc.stderr and shard.name in proc.stderr
    keys = {k for line in (tmp_path / "run" / "sample_order.jsonl").read_text().splitlines()
            for k in json.loads(line)["keys"]}
    assert keys and all(int(k[1:]) >= 8 for k in keys)  # only the intact shard's samples


def test_help_explains():
    out = subprocess.run([sys.executable, "-m", "cogvx_ds.train", "--help"], capture_output=True, text=True).stdout
    assert "--config" in out and "SIGTERM" in out and "run dir" in out.lower()
    out = " ".join(out.split())  # argparse wraps the help to the terminal's width ($COLUMNS)
    assert "WORLD_SIZE" in out and "every key with its default" in out  # --print-config's two uses


@pytest.mark.slow
def test_shipped_deepspeed_configs_train_the_same(shards, tmp_path):
    losses = {}
    for name, stage in (("zero3_bf16", 3), ("zero3_offload", 3), ("zero2", 2), ("cpu", 3)):
        run = tmp_path / name
        proc = train(*train_args(run, shards, "train.max_steps=2", f"train.ds_config=ds_configs/{name}.json",
                                 f"train.zero_stage={stage}"))
        losses[name] = [m["loss"] for m in read_metrics(run)]
        # one process: a hint that ZeRO-3 partitions nothing here, unless it offloads the parameters
        assert ("ZeRO-3 over a single data x sequence parallel rank" in proc.stderr) == (name in ("zero3_bf16", "cpu"))
    ref = losses.pop("cpu")
    for name, got in losses.items():  # fp32 (train.precision from the config): only summation order differs
        assert got == pytest.approx(ref, rel=1e-6), name
    proc = train(*train_args(tmp_path / "x", shards, "train.ds_config=ds_configs/zero2.json"), check=False)
    assert proc.returncode != 0 and "sets ZeRO stage 2 but train.zero_stage = 3" in proc.stderr


@pytest.mark.slow
def test_resume_under_another_layout_fails_early_and_names_it(shards, tmp_path):
    """A run dir resumed with another ZeRO stage: a clear error before the engine is built, not DeepSpeed's
    assertion deep in its loader; also for checkpoints written before the stage was recorded (told from
    DeepSpeed's file names). ZeRO-1 <-> 2 resumes (the same partitioned optimizer states)."""
    train(*train_args(tmp_path, shards, "train.zero_stage=3", "train.max_steps=2"))
    state_file = tmp_path / "checkpoints" / "step00000002" / "trainer_state.json"
    st = json.loads(state_file.read_text())
    assert st["zero_stage"] == 3 and st["world_size"] == 1
    for old_format in (False, True):
        if old_format:
            st.pop("zero_stage")
            state_file.write_text(json.dumps(st))
        proc = train(*train_args(tmp_path, shards, "train.zero_stage=2", "train.max_steps=3"), check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "zero_stage=3; this run has zero_stage=2" in proc.stderr and "train.init_from" in proc.stderr
        assert "Traceback" not in proc.stderr and len(read_metrics(tmp_path)) == 2

    stage1 = tmp_path / "stage1"
    train(*train_args(stage1, shards, "train.zero_stage=1", "train.max_steps=2"))
    train(*train_args(stage1, shards, "train.zero_stage=2", "train.max_steps=3"))
    assert [m["step"] for m in read_metrics(stage1)] == [1, 2, 3]


def test_host_metrics_reduce_through_the_gpu_under_nccl(monkeypatch):
    """NCCL reduces device memory only: the trainer's per-step metrics and flags (host tensors) go through this
    rank's GPU there, and stay on the CPU under gloo."""
    import torch.distributed as dist

    from cogvx_ds.parallel import state

    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: calls.append((t.device.type, op)) or t.mul_(2))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    t = torch.ones(3)
    assert state.host_tensor_device() == torch.device("cpu")
    assert state.all_reduce_host(t, op=dist.ReduceOp.MAX) is t and t.tolist() == [2.0] * 3
    assert calls == [("cpu", dist.ReduceOp.MAX)]
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert state.host_tensor_device() == torch.device("cuda", 3)


def test_ema_resumes_onto_the_parameters_device(tmp_path):
    """A resumed EMA is loaded from the host file onto the device its parameters live on (here 'meta', standing in
    for a GPU, which this machine lacks): before, it stayed on the host and the next update failed with a device
    mismatch. A file from another layout (other shard shapes) is refused by name."""
    from cogvx_ds.train.ema import EMA

    src = EMA(torch.nn.Linear(4, 3), decay=0.9)
    src.save(tmp_path / "ema.safetensors")
    on_device = EMA(torch.nn.Linear(4, 3, device="meta"), decay=0.9)
    on_device.load(tmp_path / "ema.safetensors")
    assert {t.device.type for t in on_device.shadow.values()} == {"meta"}
    on_device.update()  # same device: no mismatch
    with pytest.raises(ValueError, match="weight has shape"):
        EMA(torch.nn.Linear(5, 3), decay=0.9).load(tmp_path / "ema.safetensors")


@pytest.mark.slow
def test_resume_refuses_a_changed_data_plan_and_names_the_change(tmp_path):
    """The checkpoint's data position indexes its plan's sequence of batches: a resume after shards were added
    (or another seed / global batch) is refused, naming what changed, unless train.resume_with_new_data."""
    data = make_shards(tmp_path / "d", n_video=8, per_shard=8)
    run = tmp_path / "run"
    train(*train_args(run, data, "train.max_steps=2"))
    state = json.loads((run / "checkpoints" / "step00000002" / "trainer_state.json").read_text())
    assert state["data_plan"]["samples"] == 8 and state["data_plan"]["global_batch"] == 2
    data = make_shards(tmp_path / "d2", n_video=16, per_shard=8)  # the same first shard and one more
    proc = train(*train_args(run, data, "train.max_steps=3"), check=False)
    assert proc.returncode == 2 and "data plan changed" in proc.stderr and "samples 8 -> 16" in proc.stderr
    assert "train.resume_with_new_data=true" in proc.stderr
    assert [m["step"] for m in read_metrics(run)] == [1, 2]
    proc = train(*train_args(run, data, "train.max_steps=3", "train.resume_with_new_data=true"))
    assert "continuing on the new plan" in proc.stderr
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_with_a_missing_file(tmp_path):
    """DeepSpeed only warns when a rank's optimizer state is missing and trains on from the bf16 weights; the
    trainer checks the checkpoint's files against what it wrote and stops, naming them."""
    data = make_shards(tmp_path / "d", n_video=8, per_shard=8)
    run = tmp_path / "run"
    train(*train_args(run, data, "train.max_steps=2"))
    tag = run / "checkpoints" / "step00000002"
    written = json.loads((tag / "trainer_state.json").read_text())["files"]
    optim = [name for name in written if name.endswith("optim_states.pt")]
    assert optim and all((tag / name).stat().st_size == size for name, size in written.items())
    (tag / optim[0]).unlink()
    proc = train(*train_args(run, data, "train.max_steps=3"), check=False)
    assert proc.returncode == 2 and "1 file(s) missing" in proc.stderr and optim[0] in proc.stderr, proc.stderr[-2000:]
    assert [m["step"] for m in read_metrics(run)] == [1, 2]


def test_zero3_without_reduce_scatter_under_sp_is_refused(tmp_path):
    from cogvx_ds.config import load_config
    from cogvx_ds.train.trainer import build_ds_config

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_scatter": False}}))
    cfg = load_config("tiny", [f"train.ds_config={ds}", "train.zero_stage=3", "parallel.sequence_parallel=2"])
    with pytest.raises(ValueError, match="reduce_scatter = false with ZeRO-3"):
        build_ds_config(cfg)
    build_ds_config(load_config("tiny", [f"train.ds_config={ds}", "train.zero_stage=3"]))  # fine without SP


@pytest.mark.slow
def test_shards_that_cannot_train_the_model_fail_before_the_engine_is_built(shards, tmp_path):
    """Latent channels, text width and text presence are checked against the model at start-up (they failed at the
    first step: oneDNN's "could not create a primitive descriptor", or the trainer's own error after minutes of
    start-up at scale); a global batch larger than every bucket fails there too, not in the loader thread."""
    from cogvx_ds.data.shards import ShardWriter

    for override, message in (("model.in_channels=8 model.out_channels=8", "latents have 4 channels"),
                              ("model.text_embed_dim=64", "text embeddings are 32-wide"),
                              ("model.max_text_seq_length=16", "text embeddings are 8 tokens long"),
                              ("train.micro_batch_size=40", "not one global batch of 40 samples")):
        proc = train(*train_args(tmp_path / override.split("=")[0], shards, *override.split()), check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    no_text = tmp_path / "no_text"
    no_text.mkdir()
    with ShardWriter(no_text / "shard-00000.tar") as w:
        for i in range(4):
            w.add(f"v{i}", torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 8), {"bucket": "3x8x8", "latent_frames": 3})
    proc = train(*train_args(tmp_path / "run_no_text", no_text), check=False)
    assert proc.returncode == 2 and "4 of 4 samples carry no text embedding" in proc.stderr, proc.stderr[-2000:]
    # data.height/width only feed the export's sample size: a size the shards do not have gets a note
    proc = train(*train_args(tmp_path / "size", shards, "train.max_steps=1", "data.height=32"))
    assert "first sample is 64x64 pixels" in proc.stderr and "data.height x data.width = 32x64" in proc.stderr


@pytest.mark.slow
def test_log_every_thins_the_metrics_not_the_sample_order(shards, tmp_path):
    """train.log_every was accepted and never read: every step was logged whatever it said."""
    train(*train_args(tmp_path, shards, "train.max_steps=5", "train.log_every=2", "data.num_workers=4"))
    assert [m["step"] for m in read_metrics(tmp_path)] == [2, 4, 5]  # and the last step
    order = [json.loads(line)["step"] for line in (tmp_path / "sample_order.jsonl").read_text().splitlines()]
    assert order == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_a_resume_refuses_another_seed_or_latent_scale_and_a_damaged_state(shards, tmp_path):
    seed = "train.seed=1234567890"  # large: a relative tolerance would take the next seed for the same
    train(*train_args(tmp_path, shards, "train.max_steps=2", seed))
    for override, name in (("train.seed=1234567891", "train.seed 1234567890 -> 1234567891"),
                           ("data.latent_scale=0.7", "data.latent_scale")):
        proc = train(*train_args(tmp_path, shards, "train.max_steps=3", seed, override), check=False)
        assert proc.returncode == 2 and name in proc.stderr, proc.stderr[-2000:]
    state = tmp_path / "checkpoints" / "step00000002" / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # cut short by a crash
    proc = train(*train_args(tmp_path, shards, "train.max_steps=3", seed), check=False)
    assert proc.returncode == 2 and "trainer_state.json is damaged" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_rolled_back_run_rewrites_later_checkpoints_whole_and_names_the_old_mix(shards, tmp_path):
    """latest pointed back at step 2 (as the trainer's errors advise): reaching step 4 again replaces that folder
    instead of writing into it (a stale EMA file there was recorded and would be loaded). A checkpoint planned with
    the old image/video mix is named as such on resume."""
    args = train_args(tmp_path, shards, "train.max_steps=4", "data.image_ratio=0.3")
    train(*args)
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step00000004" / "ema_rank00000.safetensors").write_bytes(b"stale")
    (ckpt / "latest").write_text("step00000002")
    state_file = ckpt / "step00000002" / "trainer_state.json"
    st = json.loads(state_file.read_text())
    del st["data_plan"]["mix"]  # as written before the mix was fixed
    state_file.write_text(json.dumps(st))
    proc = train(*args, check=False)
    assert proc.returncode == 2 and "before the image/video mix was fixed" in proc.stderr, proc.stderr[-2000:]
    train(*args, "train.resume_with_new_data=true")
    assert (ckpt / "latest").read_text() == "step00000004"
    assert not (ckpt / "step00000004" / "ema_rank00000.safetensors").exists()
    assert "ema_rank00000.safetensors" not in json.loads((ckpt / "step00000004" / "trainer_state.json").read_text())["files"]


_BATCH = {"meta": [{"bucket": "1x4x4"}], "keys": ["k0"]}


def _skip_counter(tmp_path, dynamic_loss_scale: bool, limit: int = 3):
    """Trainer._skipped on a stand-in trainer, in a one-process gloo group (it all-reduces whether any rank's loss
    was non-finite)."""
    import types

    import torch.distributed as dist

    from cogvx_ds.train.trainer import Trainer

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    fake = types.SimpleNamespace(nonfinite_total=0, nonfinite_in_a_row=0, dynamic_loss_scale=dynamic_loss_scale,
                                 rank=0, cfg=types.SimpleNamespace(train=types.SimpleNamespace(
                                     max_consecutive_nonfinite=limit)))
    return fake, (lambda step, bad: Trainer._skipped(fake, step, bad, _BATCH))


def test_fp16_loss_scale_overflows_do_not_abort_but_nonfinite_losses_do(tmp_path):
    """Under fp16's dynamic loss scale, the steps DeepSpeed skips while it lowers the scale (finite losses on every
    rank) are counted but never abort the run, however many in a row; a non-finite loss still aborts after
    train.max_consecutive_nonfinite. Without a dynamic scale (bf16, fp32) a skip with finite losses is a
    non-finite gradient and counts towards the limit."""
    import torch.distributed as dist

    try:
        fake, skipped = _skip_counter(tmp_path, dynamic_loss_scale=True)
        for step in range(10):  # a long loss-scale warm-up
            skipped(step, None)
        assert fake.nonfinite_total == 10 and fake.nonfinite_in_a_row == 0
        nan = (torch.tensor(float("nan")), _BATCH)
        skipped(10, nan)
        skipped(11, None)  # an overflow between two NaN losses neither counts nor resets the run of NaN losses
        skipped(12, nan)
        with pytest.raises(FloatingPointError, match=r"3 non-finite steps in a row.*step 14, rank 0 \(local loss nan\)"):
            skipped(13, nan)
        fake, skipped = _skip_counter(tmp_path, dynamic_loss_scale=False)
        skipped(0, None)
        skipped(1, None)
        with pytest.raises(FloatingPointError, match="finite losses everywhere, non-finite gradient"):
            skipped(2, None)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
