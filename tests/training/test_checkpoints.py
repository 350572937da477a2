"""Crash-safe checkpoints (#13): complete or not counted, torn ones named, retention that never deletes
the best, the newest or anything tunewise did not write, room checked before training, and a failed
save that stops the run with the last good checkpoint intact."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from conftest import read_jsonl, tiny_overrides

from tunewise.config import load_config
from tunewise.errors import CheckpointError, ConfigError
from tunewise.rundir import MANIFEST, STAGING, checkpoint_problem, drop_records_after, resumable
from tunewise.training.checkpoints import prune, room_problem, write_manifest
from tunewise.training.recovery import restart_checkpoint


def _checkpoint(run_dir: Path, step: int, manifest: bool = True) -> Path:
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    (folder / "optimizer.pt").write_bytes(b"o" * 100)
    (folder / "adapter_model.safetensors").write_bytes(b"w" * 200)
    if manifest:
        write_manifest(folder, step)
    return folder


def test_the_manifest_lists_every_file_with_its_size_and_step(tmp_path):
    folder = _checkpoint(tmp_path, 4)
    data = json.loads((folder / MANIFEST).read_text())
    assert data == {
        "step": 4,
        "files": {
            "adapter_model.safetensors": 200,
            "optimizer.pt": 100,
            "trainer_state.json": (folder / "trainer_state.json").stat().st_size,
        },
    }
    assert checkpoint_problem(folder) is None


def test_resume_takes_the_newest_complete_checkpoint_and_names_each_torn_one(tmp_path):
    for step in (2, 4, 6, 8, 10):
        _checkpoint(tmp_path, step, manifest=step != 10)
    state = tmp_path / "checkpoint-8" / "trainer_state.json"
    state.write_text(state.read_text()[:5])  # truncated
    (tmp_path / "checkpoint-6" / "optimizer.pt").unlink()
    (tmp_path / STAGING / "checkpoint-12").mkdir(parents=True)
    checkpoint, skipped = resumable(tmp_path)
    assert checkpoint == tmp_path / "checkpoint-4"
    assert skipped[0] == f"{STAGING}/checkpoint-12 ignored: a save that was interrupted"
    assert skipped[1].startswith("checkpoint-10 skipped: it has no manifest")
    assert skipped[2].startswith("checkpoint-8 skipped: trainer_state.json is 5 bytes, not the")
    assert skipped[3] == "checkpoint-6 skipped: optimizer.pt is missing"
    assert len(skipped) == 4


def test_recovery_and_sweeps_restart_only_from_complete_checkpoints_before_the_trouble(tmp_path):
    """A recovery restarts from before the climb; a torn checkpoint there is skipped like on --resume."""
    for step in (2, 4, 6, 8):
        _checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-4" / "optimizer.pt").write_bytes(b"o" * 10)  # truncated by a kill
    assert restart_checkpoint(tmp_path, trouble_began=7) == tmp_path / "checkpoint-2"  # 6 gave step 7's loss
    assert restart_checkpoint(tmp_path, trouble_began=8) == tmp_path / "checkpoint-6"
    assert restart_checkpoint(tmp_path, trouble_began=3) is None  # from the initial weights
    assert resumable(tmp_path, before=6) == (
        tmp_path / "checkpoint-2",
        ["checkpoint-4 skipped: optimizer.pt is 10 bytes, not the 100 it was saved with (truncated)"],
    )


def test_retention_never_deletes_the_best_the_newest_or_foreign_checkpoints(tmp_path):
    for step in (2, 4, 6, 8):
        _checkpoint(tmp_path, step)
    foreign = _checkpoint(tmp_path, 1, manifest=False)  # not written by tunewise
    torn = _checkpoint(tmp_path, 9, manifest=False)
    deleted = prune(tmp_path, keep=2, best=tmp_path / "checkpoint-2")
    assert [p.name for p in deleted] == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-8",
        "checkpoint-9",
    ]
    assert foreign.is_dir() and torn.is_dir()
    assert prune(tmp_path, keep=1, best=tmp_path / "checkpoint-2") == []  # best and newest: both kept


def test_resuming_drops_the_log_lines_of_the_steps_that_run_again(tmp_path):
    lines = [{"type": "train", "step": s, "loss": 1.0} for s in range(1, 6)] + [{"type": "eval", "step": 4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"type": "tra')
    (tmp_path / "findings.jsonl").write_text(json.dumps({"step": 5, "code": "x"}) + "\n")
    assert drop_records_after(tmp_path, 4) == 3  # step 5, the cut-off line, the finding at step 5
    kept = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["type"], r["step"]) for r in kept] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("train", 4),
        ("eval", 4),
    ]
    assert (tmp_path / "findings.jsonl").read_text() == ""


def test_room_is_checked_with_the_numbers(tmp_path, monkeypatch):
    assert room_problem(tmp_path, per_checkpoint=2**20, kept=3) is None
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    assert "cannot write in" in room_problem(blocked / "run", 2**20, 3)
    import shutil

    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2**30, 9 * 2**30, 2**30)
    )
    problem = room_problem(tmp_path, per_checkpoint=2**30, kept=3)
    assert "has 1.00 GiB free but 3 checkpoint(s) of 1.00 GiB plus one being written need 4.00 GiB" in problem
    assert "lower `training.save_total_limit`" in problem


def _tiny(tiny_model_dir: Path, small_data: dict, tmp_path: Path, name: str, **extra: object) -> tuple:
    settings = {"name": name, "training.save_steps": 2, "training.eval_steps": 2, **extra}
    cfg = load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", settings))
    return cfg, tmp_path / "runs" / name


@pytest.mark.model
def test_a_failed_save_stops_the_run_with_a_clear_error_and_the_last_good_checkpoint_intact(
    tiny_model_dir, small_data, tmp_path, monkeypatch
):
    from transformers import Trainer

    from tunewise.training.run import train

    original = Trainer._save_rng_state

    def disk_full_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", disk_full_at_step_4)
    cfg, run_dir = _tiny(tiny_model_dir, small_data, tmp_path, "disk-full")
    with pytest.raises(CheckpointError) as info:
        train(cfg)
    message = str(info.value)
    assert (
        f"could not save checkpoint-4 in {run_dir} (OSError: [Errno 28] No space left on device)" in message
    )
    assert "the last good checkpoint, checkpoint-2, is intact" in message and "--resume" in message
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "failed" and "could not save checkpoint-4" in result["error"]
    assert checkpoint_problem(run_dir / "checkpoint-2") is None
    assert not (run_dir / "checkpoint-4").exists() and not (run_dir / STAGING).exists()
    assert max(r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "train") == 4


@pytest.mark.model
def test_a_run_without_room_for_its_checkpoints_refuses_to_start_with_the_numbers(
    tiny_model_dir, small_data, tmp_path, monkeypatch
):
    import shutil

    from tunewise.training.run import train

    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30 - 2**20, 2**20)
    )
    cfg, run_dir = _tiny(tiny_model_dir, small_data, tmp_path, "no-room")
    with pytest.raises(ConfigError, match=r"`output_dir`: .* has 0.00 GiB free but \d+ checkpoint\(s\) of"):
        train(cfg)
    metrics = run_dir / "metrics.jsonl"
    assert not metrics.exists() or not [r for r in read_jsonl(metrics) if r.get("type") == "train"]
    assert not list(run_dir.glob("checkpoint-*"))


@pytest.mark.model
def test_checkpoints_of_a_real_run_are_complete_and_retention_holds(tiny_model_dir, small_data, tmp_path):
    from tunewise.training.run import train

    keep_two = {"training.save_total_limit": 2}
    cfg, run_dir = _tiny(tiny_model_dir, small_data, tmp_path, "retention", **keep_two)
    result = train(cfg)
    assert result.status == "completed", result.error
    saved = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert 1 <= len(saved) <= 2 and saved[-1].name == "checkpoint-6"
    assert all(checkpoint_problem(p) is None for p in saved)
    best = result.numbers["best_checkpoint"]
    assert best and (run_dir / best).is_dir()  # the best one is never pruned
    assert not (run_dir / STAGING).exists()


def test_a_watched_trainers_checkpoints_count_without_a_manifest(tmp_path):
    """tunewise.watch recovers from a plain Trainer's checkpoints: trainer_state.json makes one count."""
    for step in (2, 4):
        _checkpoint(tmp_path, step, manifest=False)
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()  # a Trainer killed before it wrote it
    assert resumable(tmp_path)[0] is None  # a tunewise run takes only what its manifest vouches for
    assert resumable(tmp_path, foreign=True) == (
        tmp_path / "checkpoint-2",
        ["checkpoint-4 skipped: it has no trainer_state.json"],
    )
    assert restart_checkpoint(tmp_path, trouble_began=9, foreign=True) == tmp_path / "checkpoint-2"
