"""The CLI keeps the CPU's resident set near what is live (cli._steady_cpu_memory): oneDNN's kernel cache is
capped and glibc's mmap threshold fixed before torch starts, and a user's own setting wins. What it saves
(the demo's resident set over its run) is measured in the README, not asserted here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).parents[1] / "fixtures" / "trainer_states" / "healthy_lora.json"
PROBE = """
import os, sys
from tunewise.cli import main
code = main(["doctor", sys.argv[1]])
print(code, os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"), "torch" in sys.modules)
"""


def run_probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(FIXTURE)],
        capture_output=True,
        text=True,
        env={**clean, **env},
        check=True,
    )
    return out.stdout.split()[-3:]


def test_a_command_caps_the_kernel_cache_before_torch_starts() -> None:
    assert run_probe() == ["0", "64", "False"]  # set, and no torch imported yet to have read it


def test_the_users_own_kernel_cache_size_wins() -> None:
    assert run_probe(ONEDNN_PRIMITIVE_CACHE_CAPACITY="512") == ["0", "512", "False"]
