"""The monitor gives the CPU heap's freed pages back after steps, so the measured peak is what is live."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_overrides

from tunewise.config import load_config
from tunewise.training import monitor
from tunewise.training.monitor import FreedMemory
from tunewise.training.run import train

STATUS = Path("/proc/self/status")


def _rss() -> int:
    line = next(x for x in STATUS.read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_freed_heap_blocks_leave_the_resident_set() -> None:
    before = _rss()
    blocks = [torch.ones(25_000) for _ in range(2000)]  # 100 KB each: heap blocks, not mmaps
    keep = blocks[9::10]  # every tenth stays alive, so the freed ones cannot merge into the heap's top
    del blocks
    held = _rss() - before
    FreedMemory().give_back()
    released = before + held - _rss()
    assert len(keep) == 200 and held > 150 * 2**20
    assert released > 0.6 * held, (held, released)


def test_a_trim_waits_twenty_times_its_own_cost(monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(monitor, "_malloc_trim", lambda: calls.append(1) or True)
    freed = FreedMemory()
    freed.give_back()
    freed.next_at += 60.0  # as if that trim had taken 3 s
    freed.give_back()
    assert calls == [1]
    freed.next_at = 0.0
    freed.give_back()
    assert calls == [1, 1]
    monkeypatch.setattr(monitor, "_malloc_trim", lambda: False)  # no glibc: never tried again
    freed.next_at = 0.0
    freed.give_back()
    assert not freed.enabled


def test_training_trims_after_its_steps(tiny_model_dir, small_data, tmp_path, monkeypatch) -> None:
    calls: list[int] = []
    real = monitor._malloc_trim
    monkeypatch.setattr(monitor, "_malloc_trim", lambda: calls.append(1) or real())
    result = train(load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs")))
    assert result.status == "completed"
    assert len(calls) >= 2, calls  # the reset before training, then at least one step's
