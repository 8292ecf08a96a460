"""`train.profile_steps`: a torch.profiler trace of a few optimizer steps, written by the ranks in
`train.profile_ranks`, for finding where a step's time goes on your own cluster (data wait, forward, backward,
ZeRO-3 gathers and reduce-scatters, the Ulysses all-to-alls, the optimizer).

For steps [first, last] (1-based, as in metrics.jsonl) each chosen rank records CPU ops, and CUDA kernels on GPUs,
with their input shapes and matmul FLOPs, every step inside a `train_step_N` range. After the last one it writes

    <run_dir>/profile/steps_<first>-<last>/rank<R>.pt.trace.json   open in https://ui.perfetto.dev or chrome://tracing
                                                                   (TensorBoard's torch-tb-profiler reads it too)
    <run_dir>/profile/steps_<first>-<last>/rank<R>_ops.txt         the ops by self time (CUDA time on GPUs)

Profiled steps run slower (the profiler's own cost): their tokens_per_s in metrics.jsonl is not the run's speed,
and those steps are logged with `profiled: 1`. A run resumed inside the window traces the steps it still runs; one
resumed past it traces nothing. The trace does not change the training: losses and weights are the same.
"""

from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, steps: list[int] | None, ranks: list[int] | None, rank: int, run_dir: Path,
                 device: torch.device):
        self.window = tuple(steps) if steps else None
        self.enabled = self.window is not None and (ranks is None or rank in ranks)
        self.rank, self.run_dir, self.device = rank, Path(run_dir), device
        self._prof = None
        self._range = None
        self._started_at: int | None = None

    def profiling(self, step: int) -> bool:
        """Whether 1-based `step` falls in the window (the same answer on every rank: the metrics' flag)."""
        return self.window is not None and self.window[0] <= step <= self.window[1]

    def begin(self, step: int) -> None:
        """Before 1-based optimizer step `step` (its first micro-batch)."""
        if not (self.enabled and self.profiling(step)):
            return
        if self._prof is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._prof = profile(activities=activities, record_shapes=True, with_flops=True)
            self._prof.__enter__()
            self._started_at = step
        self._range = torch.profiler.record_function(f"train_step_{step}")
        self._range.__enter__()

    def end(self, step: int) -> Path | None:
        """After 1-based step `step`; after the window's last step, writes the trace and returns its folder."""
        self._end_range()
        if self._prof is None or step < self.window[1]:
            return None
        return self._write(step)

    def close(self, step: int) -> Path | None:
        """The run ends inside the window (a stop signal, an error): write what was recorded up to `step`."""
        self._end_range()
        return self._write(step) if self._prof is not None else None

    def _end_range(self) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def _write(self, last: int) -> Path:
        prof, self._prof = self._prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof.__exit__(None, None, None)
        out = self.run_dir / "profile" / f"steps_{self._started_at}-{last}"
        out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out / f"rank{self.rank}.pt.trace.json"))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=70)
        (out / f"rank{self.rank}_ops.txt").write_text(
            f"steps {self._started_at}-{last}, rank {self.rank}, sorted by {sort}\n{table}\n")
        return out
