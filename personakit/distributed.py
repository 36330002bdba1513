"""Which process this is under `accelerate launch` / `torchrun` (one process per device; the main one writes).

Read from the launcher's environment, so it works before any process group exists.
"""
from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's device index on its machine (0 when not launched)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    """print on the main process only, flushed (several processes share one terminal)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)
