"""slurm launchers: syntax, and real runs of each script with stand-in srun / scontrol / deepspeed / torchrun
that record their arguments (the config check before launch uses the real cogvx_ds)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "launch").glob("*.sh")) + sorted((ROOT / "launch").glob("*.sbatch"))

STUB_SRUN = r"""#!/usr/bin/env bash
echo "srun $*" >> "$STUB_LOG"
echo "env-srun SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-}" >> "$STUB_LOG"
run_dir=""
for a in "$@"; do case "$a" in train.run_dir=*) run_dir=${a#train.run_dir=};; esac; done
if [ -n "${STUB_WAIT_STOP:-}" ]; then   # behave like a trainer that checkpoints when asked to stop
    for _ in $(seq 200); do
        if [ -f "$run_dir/STOP" ]; then echo '{"step": 7}' > "$run_dir/REQUEUE"; exit 75; fi
        sleep 0.05
    done
    exit 1
fi
exit "${STUB_RC:-0}"
"""
STUB_SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$STUB_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'node001\nnode002\n'; fi
if [ "$1" = requeue ] && [ -n "${STUB_REQUEUE_FAIL:-}" ]; then exit 1; fi
"""
STUB_LOGGER = r"""#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
if [ -n "${DS_ENV_FILE:-}" ]; then
    { echo "DS_ENV_FILE=$DS_ENV_FILE $(stat -c %a "$(dirname "$DS_ENV_FILE")")"; sed 's/^/DS_ENV: /' "$DS_ENV_FILE"; } >> "$STUB_LOG"
fi
"""
STUB_PYTHON = r"""#!/usr/bin/env bash
if [ "$1 $2" = "-m torch.distributed.run" ]; then echo "python $*" >> "$STUB_LOG"; exit 0; fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.fixture
def env(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("deepspeed", STUB_LOGGER),
                       ("python", STUB_PYTHON)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    (tmp_path / "data").mkdir()
    return dict(os.environ, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(tmp_path / "log"),
                REAL_PYTHON=sys.executable, PYTHON=str(stubs / "python"), REPO=str(ROOT), SLURM_JOB_ID="4242",
                SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[001-002]", GPUS_PER_NODE="4", MODEL="model/tiny",
                DATA=str(tmp_path / "data"), RUN_DIR=str(tmp_path / "run"), SLURM_SUBMIT_DIR=str(ROOT))


def log(env) -> list[str]:
    path = Path(env["STUB_LOG"])
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def _sbatch(script, env, **extra):
    return subprocess.run(["bash", str(ROOT / "launch" / script)], env=dict(env, **extra), capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_torchrun_launch_counts_rendezvous_and_config(env):
    proc = _sbatch("train_lq.sbatch", env)
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in log(env) if x.startswith("srun")]
    # one agent per node, on NODES nodes (a smaller NODES than the allocation must not start extra agents)
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1" in line
    assert "-m torch.distributed.run --nnodes=2 --nproc_per_node=4" in line
    assert "--rdzv_backend=c10d --rdzv_endpoint=node001:14242 --rdzv_id=4242 -m cogvx_ds.train" in line
    assert f"--config model/tiny --config stages/lq_pretrain train.run_dir={env['RUN_DIR']}" in line
    assert f"data.shards=[{env['DATA']}]" in line
    assert "stage: lq_pretrain" in (Path(env["RUN_DIR"]) / "resolved_config.yaml").read_text()


def test_srun_and_deepspeed_launchers(env):
    assert _sbatch("train_hq.sbatch", env, LAUNCHER="srun", EXTRA_ARGS="train.lr=5e-5").returncode == 0
    (line,) = [x for x in log(env) if x.startswith("srun")]
    # 2 nodes x 4: --ntasks as well, or the job's own SLURM_NTASKS (one per node) would win over --ntasks-per-node
    assert "srun --nodes=2 --ntasks=8 --ntasks-per-node=4 --kill-on-bad-exit=1" in line and "stages/hq_finetune" in line
    assert line.endswith("train.lr=5e-5")
    home = Path(env["RUN_DIR"]).parent / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text("NCCL_IB_HCA=mlx5\n\nFOO=bar baz")  # a blank line, no final newline
    assert _sbatch("train_caption.sbatch", env, LAUNCHER="deepspeed", HOME=str(home)).returncode == 0
    (line,) = [x for x in log(env) if x.startswith("deepspeed")]
    assert "--master_addr node001" in line and "--module cogvx_ds.train" in line and "stages/caption_finetune" in line
    assert (Path(env["RUN_DIR"]) / "hostfile").read_text() == "node001 slots=4\nnode002 slots=4\n"
    # the other nodes' ranks get COGVX_JOB_START through deepspeed's env file, with the user's own variables; the
    # file is given by absolute path, in a folder only the user can read, gone after the launch
    (ds_env,) = [x.split("=", 1)[1] for x in log(env) if x.startswith("DS_ENV_FILE=")]
    path, mode = ds_env.split()
    assert Path(path).is_absolute() and mode == "700" and not Path(path).exists()
    lines = [x[len("DS_ENV: "):] for x in log(env) if x.startswith("DS_ENV: ")]
    assert lines[:2] == ["NCCL_IB_HCA=mlx5", "FOO=bar baz"] and re.fullmatch(r"COGVX_JOB_START=\d+", lines[2]), lines
    assert not (Path(env["RUN_DIR"]) / "deepspeed_env").exists()


def test_preemption_signal_checkpoints_and_requeues(env):
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "train_lq.sbatch")], env=dict(env, STUB_WAIT_STOP="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    t0 = time.time()
    while not any(x.startswith("srun") for x in log(env)):
        assert time.time() - t0 < 90 and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what slurm's --signal=B:USR1@300 does before the time limit
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "scontrol requeue 4242" in log(env)
    assert "preemption signal" in out and "requeueing job 4242" in out


def test_a_refused_requeue_is_not_a_success(env):
    """exit 0 after a failed `scontrol requeue` would let an `afterok` dependency start the next stage on a run
    that has no final_model/."""
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "train_lq.sbatch")],
                            env=dict(env, STUB_WAIT_STOP="1", STUB_REQUEUE_FAIL="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    t0 = time.time()
    while not any(x.startswith("srun") for x in log(env)):
        assert time.time() - t0 < 90 and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75 and "scontrol requeue failed" in err


def test_finished_run_is_not_requeued_and_failures_propagate(env):
    assert _sbatch("train_lq.sbatch", env, STUB_RC="3").returncode == 3
    assert not any("requeue" in x for x in log(env))


def test_markers_of_an_earlier_job_neither_stop_nor_requeue_this_one(env):
    """A requeued job that fails before the trainer starts (a bad node, a moved data folder) must fail, not find
    the previous job's REQUEUE and requeue itself forever; an old STOP must not stop it at once."""
    run = Path(env["RUN_DIR"])
    run.mkdir(parents=True)
    (run / "REQUEUE").write_text('{"step": 7}')
    (run / "STOP").write_text("")
    assert _sbatch("train_lq.sbatch", env, STUB_RC="1").returncode == 1
    assert not any("requeue" in x for x in log(env))
    assert not (run / "STOP").exists() and not (run / "REQUEUE").exists()


def test_steps_get_the_jobs_cpus_per_task(env):
    """srun (Slurm >= 22.05) does not pass the job's --cpus-per-task on to its steps: the scripts do."""
    assert _sbatch("train_lq.sbatch", env, SLURM_CPUS_PER_TASK="64").returncode == 0
    assert "env-srun SRUN_CPUS_PER_TASK=64" in log(env)  # torchrun: one agent per node takes them all
    Path(env["STUB_LOG"]).unlink()
    assert _sbatch("train_lq.sbatch", env, SLURM_CPUS_PER_TASK="64", LAUNCHER="srun").returncode == 0
    assert "env-srun SRUN_CPUS_PER_TASK=16" in log(env)  # srun: a task per GPU, 4 per node share the 64


def test_bad_config_launches_nothing(env):
    proc = _sbatch("train_lq.sbatch", env, EXTRA_ARGS="parallel.tensor_parallel=3")
    assert proc.returncode == 2
    assert "parallel.tensor_parallel" in proc.stderr and "nothing was launched" in proc.stderr
    assert not any(x.startswith("srun") for x in log(env))
    proc = _sbatch("train_lq.sbatch", {k: v for k, v in env.items() if k != "DATA"})
    assert proc.returncode != 0 and "set DATA to the latent shard folder" in proc.stderr


def test_run_dir_belongs_to_one_job(env):
    """The preemption trap writes $RUN_DIR/STOP: a train.run_dir in EXTRA_ARGS (the trainer would use it, the trap
    not) and array tasks (sharing one run dir) are refused before anything starts."""
    proc = _sbatch("train_lq.sbatch", env, EXTRA_ARGS="train.lr=1e-4 train.run_dir=/elsewhere")
    assert proc.returncode == 2 and "set RUN_DIR instead" in proc.stderr
    proc = _sbatch("train_lq.sbatch", env, SLURM_ARRAY_TASK_ID="3")
    assert proc.returncode == 2 and "not array jobs" in proc.stderr
    assert not any(x.startswith("srun") for x in log(env))


def test_encode_array_job(env, tmp_path):
    proc = _sbatch("encode_array.sbatch", env, INPUT="/data/raw/manifest.jsonl", VAE="/m/vae", OUT="/data/lat",
                   TEXT_ENCODER="/m/t5", SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_TASK_COUNT="16")
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in log(env) if x.startswith("srun")]
    assert line.startswith("srun --ntasks=1") and "-m data_tools.encode_latents --input /data/raw/manifest.jsonl" in line
    assert "--vae /m/vae --out /data/lat --buckets 480x720x49 --fps 8 --text-encoder /m/t5" in line
    assert "array task 3 of 16" in proc.stdout
    proc = _sbatch("encode_array.sbatch", env)  # INPUT/VAE/OUT are required
    assert proc.returncode != 0 and "INPUT" in proc.stderr


def test_local_launcher(env):
    proc = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "--config", "tiny", "data.shards=[x]"],
                          env=dict(env, NPROC="2"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (line,) = log(env)
    assert "-m torch.distributed.run --standalone --nproc_per_node=2 -m cogvx_ds.train --config tiny" in line
