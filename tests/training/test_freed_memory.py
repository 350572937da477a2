"""The monitor gives the CPU heap's freed pages back when the resident set grows past step 1's and past the
plan's estimate, so the measured peak stays what is live."""

from __future__ import annotations

import json

import torch
from conftest import tiny_overrides

from tunewise.config import load_config
from tunewise.training import monitor
from tunewise.training.monitor import FreedMemory, resident_bytes
from tunewise.training.run import train


def test_freed_heap_blocks_leave_the_resident_set() -> None:
    freed = FreedMemory()
    freed.baseline = 1  # far below: the trim is due (the growth line, a share of the process, is below)
    before = resident_bytes()
    blocks = [torch.ones(25_000) for _ in range(2000)]  # 100 KB each: heap blocks, not mmaps
    keep = blocks[9::10]  # every tenth stays alive, so the freed ones cannot merge into the heap's top
    del blocks
    held = resident_bytes() - before
    freed.give_back()
    released = before + held - resident_bytes()
    assert len(keep) == 200 and held > 150 * 2**20 and freed.trims == 1
    assert released > 0.6 * held, (held, released)


def test_it_trims_only_past_the_growth_line_and_not_right_after_a_trim(monkeypatch) -> None:
    calls: list[int] = []
    rss = [1000]
    monkeypatch.setattr(monitor, "_malloc_trim", lambda: calls.append(1) or True)
    monkeypatch.setattr(monitor, "resident_bytes", lambda: rss[0])
    freed = FreedMemory()
    freed.give_back()  # baseline 1000
    rss[0] = 1100  # +10%: not past the line
    freed.give_back()
    assert calls == [] and freed.baseline == 1000
    rss[0] = 1101
    freed.give_back()
    assert calls == [1]
    freed.next_at += 60.0  # as if that trim had taken 3 s: the next waits
    freed.give_back()
    assert calls == [1]
    freed.next_at = 0.0
    freed.give_back()
    assert calls == [1, 1]
    monkeypatch.setattr(monitor, "_malloc_trim", lambda: False)  # no glibc: never tried again
    freed.next_at = 0.0
    freed.give_back()
    assert not freed.enabled


def test_it_does_not_trim_under_the_plans_estimate(monkeypatch) -> None:
    calls: list[int] = []
    rss = [1000]
    monkeypatch.setattr(monitor, "_malloc_trim", lambda: calls.append(1) or True)
    monkeypatch.setattr(monitor, "resident_bytes", lambda: rss[0])
    freed = FreedMemory(floor=1500)
    freed.give_back()  # baseline 1000, a short first step
    rss[0] = 1500  # 50% past step 1's, but within what the plan promised
    freed.give_back()
    assert calls == []
    rss[0] = 1501
    freed.give_back()
    assert calls == [1]
    small = FreedMemory(floor=500)  # an estimate under step 1's: the growth line decides
    rss[0] = 1000
    small.give_back()
    rss[0] = 1101
    small.give_back()
    assert calls == [1, 1]


def test_training_asks_after_every_step(tiny_model_dir, small_data, tmp_path, monkeypatch) -> None:
    asked: list[int] = []
    real = FreedMemory.give_back
    monkeypatch.setattr(FreedMemory, "give_back", lambda self: asked.append(1) or real(self))
    floors: list[int] = []
    made = FreedMemory.__init__
    monkeypatch.setattr(
        FreedMemory, "__init__", lambda self, floor=None: floors.append(floor) or made(self, floor)
    )
    result = train(load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs")))
    assert result.status == "completed"
    plan = json.loads((result.run_dir / "plan.json").read_text())
    assert floors == [plan["memory"]["peak"]] and floors[0] > 0  # the plan's estimate is the floor
    assert len(asked) >= 6 + 2, asked  # 6 steps and 2 evaluations
