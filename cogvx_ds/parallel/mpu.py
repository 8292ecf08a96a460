"""DeepSpeed's `mpu` interface over Megatron-core parallel_state.

DeepSpeed asks the mpu for the model-parallel group (TP: its ranks hold different shards of one model),
the data-parallel group (ZeRO partitions over it), and the sequence / sequence-data groups (Ulysses).
ZeRO must partition over DP x SP, because SP ranks hold identical parameters, so the data-parallel group
reported here is DP x SP, and the sequence-data group is the same DP x SP group.
"""

from __future__ import annotations

import torch.distributed as dist

from cogvx_ds.parallel import state


class MegatronMPU:
    # tensor / model parallel
    def get_model_parallel_group(self):
        return state.tp_group()

    def get_model_parallel_world_size(self) -> int:
        return state.tp_size()

    def get_model_parallel_rank(self) -> int:
        return state.tp_rank()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_process_group_ranks(state.tp_group())[0] if state.is_initialized() else 0

    # data parallel as ZeRO sees it: DP x SP
    def get_data_parallel_group(self):
        return state.dp_sp_group()

    def get_data_parallel_world_size(self) -> int:
        return state.dp_sp_size()

    def get_data_parallel_rank(self) -> int:
        return state.dp_sp_rank()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(state.dp_sp_group()) if state.is_initialized() else [0]

    # Ulysses
    def get_sequence_parallel_group(self):
        return state.sp_group()

    def get_sequence_parallel_world_size(self) -> int:
        return state.sp_size()

    def get_sequence_parallel_rank(self) -> int:
        return state.sp_rank()

    def get_sequence_data_parallel_group(self):
        return state.dp_sp_group()

    def get_sequence_data_parallel_world_size(self) -> int:
        return state.dp_sp_size()

    def get_sequence_data_parallel_rank(self) -> int:
        return state.dp_sp_rank()

    # no pipeline parallelism
    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_group(self):
        return None
