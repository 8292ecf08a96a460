"""Process groups: world = DP x SP x TP, TP innermost (neighbouring ranks), then SP (Ulysses), then DP.

Megatron-core's `parallel_state` owns the groups: its tensor-parallel group is our TP group and its
context-parallel group serves as the Ulysses SP group. Every accessor here works in a plain process with no
torch.distributed at all (sizes 1, ranks 0, groups None), so the model runs as TP=1/SP=1 there.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from cogvx_ds.parallel.cpu_shim import install_cpu_shim
from cogvx_ds.utils import local_gpu


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized()


def init_distributed(tensor_parallel: int = 1, sequence_parallel: int = 1, backend: str = "auto",
                     timeout_minutes: int = 30) -> None:
    """Start torch.distributed from the launcher's env (torchrun/srun/deepspeed) and build the DP x SP x TP groups.

    backend "auto" means NCCL when CUDA is available, else gloo (the CPU tests and the demo).
    """
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    # Megatron's async TP gradient all-reduce needs one CUDA work queue to overlap correctly.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if not dist.is_initialized():
        _env_from_slurm()
        if backend == "nccl":
            torch.cuda.set_device(local_gpu())
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    # DeepSpeed keeps its own communication backend (used by ZeRO); it adopts the
    # process group started above.
    import deepspeed

    if backend == "gloo":
        skip_deepspeed_cpu_shm_kernel()
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    world = dist.get_world_size()
    if world % (tensor_parallel * sequence_parallel) != 0:
        raise ValueError(f"world size {world} is not divisible by parallel.tensor_parallel x "
                         f"parallel.sequence_parallel = {tensor_parallel} x {sequence_parallel}")
    if backend == "gloo" and not torch.cuda.is_available():
        install_cpu_shim()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        context_parallel_size=sequence_parallel,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=False,
    )


def skip_deepspeed_cpu_shm_kernel() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel (C++: about a minute per fresh
    environment, and it needs a compiler) when its comm backend starts, for inference all-reduces we never call;
    plain gloo collectives do everything here. Call before deepspeed.init_distributed on gloo."""
    import importlib

    # (attribute access would find deepspeed.comm's `torch` import, not the submodule)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _env_from_slurm() -> None:
    """Under plain `srun python ...` (no torchrun) derive torch.distributed's env from SLURM's. (A single Slurm task,
    e.g. a batch script's own shell, is a single process: `cogvx_ds.utils.single_process_env` fills that in.)"""
    from cogvx_ds.utils import slurm_step_task

    task = slurm_step_task()
    if "RANK" in os.environ or task is None:
        return
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(task[0]), str(task[1])
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    # the same port as launch/_train_common.sh derives: jobs sharing a node do not collide on a fixed one
    os.environ.setdefault("MASTER_PORT", str(10000 + int(os.environ.get("SLURM_JOB_ID", 19500)) % 20000))
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("running under srun without torchrun: export MASTER_ADDR (the first node's host name)")


def destroy_distributed() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def host_tensor_device() -> torch.device:
    """Where a small host tensor (a metric, a flag) must be for a collective on the default group: this rank's GPU
    under NCCL, which reduces device memory only ("No backend type associated with device type cpu"), else the
    CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_host(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """all_reduce of a host tensor over the default group, through this rank's GPU under NCCL; returns the reduced
    tensor on the host (t itself on gloo)."""
    device = host_tensor_device()
    if device.type == "cpu":
        dist.all_reduce(t, op=op)
        return t
    on_device = t.to(device)
    dist.all_reduce(on_device, op=op)
    return on_device.cpu()


def tp_group():
    return ps.get_tensor_model_parallel_group() if is_initialized() else None


def tp_size() -> int:
    return ps.get_tensor_model_parallel_world_size() if is_initialized() else 1


def tp_rank() -> int:
    return ps.get_tensor_model_parallel_rank() if is_initialized() else 0


def sp_group():
    return ps.get_context_parallel_group() if is_initialized() else None


def sp_size() -> int:
    return ps.get_context_parallel_world_size() if is_initialized() else 1


def sp_rank() -> int:
    return ps.get_context_parallel_rank() if is_initialized() else 0


def dp_group():
    """Pure data parallel: ranks holding different samples with the same TP and SP coordinates."""
    return ps.get_data_parallel_group() if is_initialized() else None


def dp_size() -> int:
    return ps.get_data_parallel_world_size() if is_initialized() else 1


def dp_rank() -> int:
    return ps.get_data_parallel_rank() if is_initialized() else 0


def dp_sp_group():
    """DP x SP: the group ZeRO partitions over (ranks with the same TP coordinate)."""
    return ps.get_data_parallel_group(with_context_parallel=True) if is_initialized() else None


def dp_sp_size() -> int:
    return ps.get_data_parallel_world_size(with_context_parallel=True) if is_initialized() else 1


def dp_sp_rank() -> int:
    return ps.get_data_parallel_rank(with_context_parallel=True) if is_initialized() else 0
