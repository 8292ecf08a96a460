"""metrics.jsonl (one JSON object per optimizer step), sample_order.jsonl and TensorBoard, written by rank 0."""

from __future__ import annotations

import json
from pathlib import Path


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines past the resumed step: a killed run may have logged steps its checkpoint does not hold, and a
    last line cut short by the kill. The lines are in step order, so the file is cut at the first such line in
    place (one truncate, no rewrite of what may be gigabytes of sample order)."""
    if not path.is_file():
        return
    with open(path, "r+b") as f:
        offset = 0
        for line in f:
            try:
                past = json.loads(line)["step"] > last_step if line.strip() else False
            except (ValueError, KeyError, TypeError):  # a partial line from a kill mid-write
                past = True
            if past or not line.endswith(b"\n"):
                f.truncate(offset)
                return
            offset += len(line)


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path, self.order_path = run_dir / "metrics.jsonl", run_dir / "sample_order.jsonl"
        for p in (self.metrics_path, self.order_path):
            _truncate_jsonl(p, resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        self.metrics = open(self.metrics_path, "a")
        self.order = open(self.order_path, "a")

    def log(self, step: int, values: dict | None, sample_order: dict | None = None) -> None:
        """values: this step's metrics (None: a step between train.log_every's); sample_order: its samples."""
        if not self.enabled:
            return
        if sample_order is not None:
            self.order.write(json.dumps({"step": step, **sample_order}) + "\n")
            self.order.flush()
        if values is None:
            return
        self.metrics.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)) and value is not None:
                tag = f"loss_by_t/{key}" if key.startswith("loss_t") else f"train/{key}"
                self.tb.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            self.order.close()
            self.tb.close()
