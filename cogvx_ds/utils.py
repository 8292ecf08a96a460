"""Small helpers shared by the CLIs: atomic file writes and the single-process launch environment."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a hidden temp file beside `path`, then rename it into place: readers see the old
    file or the whole new one, never a partial write (what resume logic relies on)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def single_process_env() -> None:
    """Without a launcher (no torchrun/deepspeed/srun env), set what one process needs to start torch.distributed."""
    if "WORLD_SIZE" in os.environ or "SLURM_PROCID" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
