"""How each entry point finds its rank, world and GPU under the launchers: the deepspeed launcher's --local_rank
argument, plain `srun` tasks without torchrun (several, or a single one such as a batch script's own shell), and
Slurm binding one GPU per task."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogvx_ds.parallel.state import _env_from_slurm
from cogvx_ds.utils import local_gpu, single_process_env

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; the whole environment is put back afterwards (the code under test sets variables
    that monkeypatch never saw, and later tests start launchers and trainers from this environment)."""
    saved = dict(os.environ)
    for name in LAUNCH_VARS:
        os.environ.pop(name, None)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_the_clis_accept_the_deepspeed_launchers_local_rank(tmp_path):
    """`deepspeed --module cogvx_ds.train ...` runs `python -u -m cogvx_ds.train --local_rank=N ...`."""
    train = subprocess.run(
        [sys.executable, "-u", "-m", "cogvx_ds.train", "--local_rank=3", "--config", "model/tiny", "--config",
         "stages/caption_finetune", f"train.run_dir={tmp_path / 'run'}", "--print-config"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert train.returncode == 0, train.stderr
    assert "stage: caption_finetune" in train.stdout
    export = subprocess.run(
        [sys.executable, "-m", "cogvx_ds.export", "--local_rank=3", "--run-dir", str(tmp_path / "none"), "--out",
         str(tmp_path / "out"), "--vae", "v", "--text-encoder", "t"], capture_output=True, text=True, cwd=ROOT,
        timeout=120)
    assert export.returncode == 2 and "is not a training run dir" in export.stderr, export.stderr
    assert "unrecognized arguments" not in export.stderr


def test_one_slurm_task_is_a_single_process(clean_env):
    """A batch script's own shell (or `srun -n 1`) has SLURM_PROCID=0 and one task: no MASTER_ADDR is needed."""
    os.environ["SLURM_PROCID"] = "0"
    os.environ["SLURM_NTASKS"] = "1"
    single_process_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    _env_from_slurm()  # nothing left to do
    assert os.environ["WORLD_SIZE"] == "1"


def test_a_batch_scripts_own_shell_is_a_single_process(clean_env, capsys):
    """The batch shell of a 4-node job has SLURM_PROCID=0 and SLURM_NTASKS=4 but no srun step: one process (it
    used to take world size 4 and wait for peers that never came)."""
    os.environ.update(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_JOB_ID="4242")
    single_process_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "1")
    assert "running as one process" in capsys.readouterr().err
    _env_from_slurm()
    assert os.environ["WORLD_SIZE"] == "1"


def test_several_slurm_tasks_take_their_env_from_slurm(clean_env):
    os.environ.update(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_ID="4242", SLURM_STEP_ID="0",
                      SLURM_STEP_NUM_TASKS="8")
    single_process_env()
    assert "RANK" not in os.environ
    with pytest.raises(RuntimeError, match="export MASTER_ADDR"):
        _env_from_slurm()
    del os.environ["RANK"]
    os.environ["MASTER_ADDR"] = "node001"
    _env_from_slurm()
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")] == ["5", "8", "1"]
    assert os.environ["MASTER_PORT"] == "14242"  # as launch/_train_common.sh derives it from the job id


@pytest.mark.parametrize("local_rank, visible, gpu", [(5, 8, 5), (5, 1, 0), (3, 2, 1), (0, 1, 0)])
def test_local_gpu_is_the_local_rank_among_the_visible_gpus(clean_env, local_rank, visible, gpu):
    os.environ["LOCAL_RANK"] = str(local_rank)
    clean_env.setattr(torch.cuda, "device_count", lambda: visible)
    assert local_gpu() == gpu


WORKER = """
import sys
import torch
import torch.distributed as dist
if sys.argv[1] == "vae":
    from cogvx_ds.train.vae_trainer import init_distributed
    init_distributed()
else:
    from cogvx_ds.parallel import destroy_distributed, init_distributed
    from cogvx_ds.utils import single_process_env
    single_process_env()  # as `python -m cogvx_ds.train` does
    init_distributed()
t = torch.ones(1)
dist.all_reduce(t)
print("rank", dist.get_rank(), "world", dist.get_world_size(), "sum", int(t.item()), flush=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("trainer", ["vae", "dit"])
@pytest.mark.parametrize("tasks", [1, 2])
def test_trainers_start_under_plain_srun(trainer, tasks):
    """What `srun --ntasks=N python -m cogvx_ds.train_vae / cogvx_ds.train` gives each task (no torchrun): the VAE
    trainer used to leave RANK unset and fall into DeepSpeed's MPI discovery ("No module named 'mpi4py'")."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    base.update(SLURM_NTASKS=str(tasks), SLURM_STEP_NUM_TASKS=str(tasks), SLURM_STEP_ID="0", OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT))
    if tasks > 1:
        base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, trainer], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(base, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)))
             for r in range(tasks)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    lines = sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("rank"))
    assert lines == [f"rank {r} world {tasks} sum {tasks}" for r in range(tasks)]


@pytest.mark.slow
def test_sigterm_still_stops_a_trainer_that_is_waiting_for_its_peers(tmp_path):
    """Only SIGUSR1 is caught during start-up: a SIGTERM handler there only set a flag, and a process blocked in
    the rendezvous (here: rank 0 of 2, whose peer never comes) lived on until SIGKILL or the collective timeout."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    sys.path.insert(0, str(Path(__file__).parent))
    from train_helpers import make_shards, train_args

    shards = make_shards(tmp_path / "shards", n_video=4)
    proc = subprocess.Popen([sys.executable, "-m", "cogvx_ds.train", *train_args(tmp_path / "run", shards)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # well into init_process_group's wait
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the trainer ignored SIGTERM while waiting for its peer")
    assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM)
