"""Distributed helpers: which process this is, and how many there are (torchrun sets RANK and WORLD_SIZE).

Only the main process writes the run directory and prints; every process trains.
"""

import os


def is_main_process() -> bool:
    """Rank 0, or a run without torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """The number of data-parallel processes (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
