"""Small helpers shared by the CLIs: atomic file writes and the single-process launch environment."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path


def temp_path(path: str | os.PathLike) -> Path:
    """A hidden temp file beside `path`, unique to this host and process (PIDs repeat across the nodes of a
    cluster, and within containers), for writing `path` atomically."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def out_dir_problem(path: str | os.PathLike, flag: str) -> str | None:
    """Why `path` cannot be (or become) an output folder: it, or the nearest existing folder above it, is a file or
    not writable; else None. Creates nothing (a refused command leaves nothing behind): for a one-line error
    before any work starts, not a traceback after."""
    path = Path(path).absolute()
    for p in (path, *path.parents):
        try:
            if not p.exists():
                continue
            if not p.is_dir():
                return f"{flag}: {p} is a file, not a folder"
        except OSError as e:  # e.g. a folder above it that we may not enter
            return f"{flag}: cannot use {path}: {e.strerror or e} ({p})"
        if not os.access(p, os.W_OK | os.X_OK):
            return f"{flag}: cannot write in {p}" + ("" if p == path else f" (to create {path})")
        return None
    return None


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to the storage device: os.replace alone orders nothing
    against a machine crash, after which a renamed file can be there with no data in it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; the data itself was flushed
        if not Path(path).is_dir():
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under `folder`, and the folders: a checkpoint that DeepSpeed wrote (with plain writes) is on
    the disk before `latest` names it. Files written by other machines of a shared filesystem cost little here; a
    file renamed away meanwhile (another process's temp file) is skipped."""
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                fsync_path(Path(root) / name)
            except FileNotFoundError:
                continue
        fsync_path(root)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a hidden temp file beside `path`, then rename it into place: readers see the old
    file or the whole new one, never a partial write (what resume logic relies on), also after a machine crash
    (the data is flushed before the rename, the rename before returning)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    write(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def local_gpu() -> int:
    """This process's GPU: LOCAL_RANK among the GPUs it can see. When Slurm binds one GPU per task
    (--gpus-per-task, --gpu-bind) every task sees only cuda:0 while SLURM_LOCALID still counts 0..7."""
    import torch

    return int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count())


# step ids of a batch script's own shell, the extern and interactive steps: names, or Slurm's reserved numbers
# (above SLURM_MAX_NORMAL_STEP_ID = 0xfffffff0: batch is 0xfffffffb since 20.11, 0xfffffffe before)
_NOT_A_TASK_STEP = {"batch", "extern", "interactive"}
_MAX_NORMAL_STEP_ID = 0xFFFFFFF0


def _is_task_step(step: str | None) -> bool:
    if step is None or step in _NOT_A_TASK_STEP:
        return False
    return not (step.isdigit() and int(step) > _MAX_NORMAL_STEP_ID)


def slurm_step_task(env=None) -> tuple[int, int] | None:
    """(SLURM_PROCID, task count) when this process is a task of an `srun` job step, else None: outside Slurm, and
    in a batch script's own shell, which has SLURM_PROCID=0 and the job's SLURM_NTASKS too but is one process
    (srun sets SLURM_STEP_ID / SLURM_STEP_NUM_TASKS for the tasks it starts)."""
    env = os.environ if env is None else env
    if "SLURM_PROCID" not in env or not _is_task_step(env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))):
        return None
    return int(env["SLURM_PROCID"]), int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)


def single_process_env() -> None:
    """Without a launcher (no torchrun/deepspeed env, and not one of several srun tasks), set what one process needs
    to start torch.distributed. A single Slurm task counts as one process, and so does a batch script's own shell
    (see `slurm_step_task`): it used to wait for SLURM_NTASKS peers that never came."""
    task = slurm_step_task()
    if "WORLD_SIZE" in os.environ or (task is not None and task[1] > 1):
        return
    if task is None and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        print(f"note: not a task of an srun step (a batch script's own shell: SLURM_NTASKS="
              f"{os.environ['SLURM_NTASKS']} is the job's); running as one process (launch with srun or torchrun "
              f"for more)", file=sys.stderr, flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def is_glibc() -> bool:
    """Linux with glibc (where mallopt and its tunables exist)."""
    import platform

    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


# what tune_malloc sets, and the glibc settings that decide the same thing: a user's own value of any wins
_MALLOC_SETTINGS = ("trim_threshold", "mmap_threshold", "top_pad", "mmap_max")


def _user_malloc_settings() -> bool:
    """Whether the environment sets what tune_malloc would: MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_,
    MALLOC_TOP_PAD_ or MALLOC_MMAP_MAX_, or their glibc.malloc.* entries in GLIBC_TUNABLES. Other malloc settings
    (MALLOC_ARENA_MAX, hugetlb, tcache, jemalloc's MALLOC_CONF) do not conflict and leave it on."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(f"MALLOC_{name.upper()}_" in os.environ or f"glibc.malloc.{name}=" in tunables
               for name in _MALLOC_SETTINGS)


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc only): training allocates the same activation sizes every step, and
    by default glibc returns much of it to the OS and page-faults it back in. Measured on the dit_step benchmark's
    float32 model: 5-31k minor faults and 20-70 ms of kernel CPU time per step by default, 0.1-0.4k and under
    1 ms tuned (tests/test_malloc.py checks a smaller model). Sets a fixed 32 MiB mmap threshold (glibc's
    largest; bigger blocks are still mapped and unmapped) and no trimming of the heap top, keeping the memory as
    jemalloc/tcmalloc would. The process's resident memory then stays at its peak. Skipped when the environment
    sets any of these itself (`_user_malloc_settings`: yours win) or COGVX_DS_MALLOC=default. Returns whether it
    changed anything."""
    import ctypes

    if os.environ.get("COGVX_DS_MALLOC") == "default" or _user_malloc_settings():
        return False
    if not is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
