"""samples.json at the end of a run, and what result.json says when the generations cannot be made."""

from __future__ import annotations

import json

from conftest import tiny_overrides

from tunewise import rundir
from tunewise.config import load_config
from tunewise.training import run
from tunewise.training.run import train


def _short_run(tiny_model_dir, small_data, tmp_path, name: str):
    extra = {"name": name, "training.max_steps": 2, "training.eval_steps": 2, "training.save_steps": 2}
    return train(load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", extra)))


def test_a_completed_run_writes_base_and_tuned_samples(tiny_model_dir, small_data, tmp_path):
    result = _short_run(tiny_model_dir, small_data, tmp_path, "samples")
    assert result.status == "completed", result.error
    samples = json.loads((result.run_dir / rundir.SAMPLES).read_text())
    assert len(samples) == 3 and all({"prompt", "reference", "base", "tuned"} <= set(s) for s in samples)
    assert "samples_error" not in json.loads((result.run_dir / rundir.RESULT).read_text())


def test_a_sample_failure_is_recorded_and_the_run_still_completes(
    tiny_model_dir, small_data, tmp_path, monkeypatch
):
    def broken(*args, **kwargs):
        raise RuntimeError("generation broke")

    monkeypatch.setattr(run, "write_samples", broken)
    result = _short_run(tiny_model_dir, small_data, tmp_path, "no-samples")
    assert result.status == "completed", result.error
    assert (result.run_dir / rundir.ADAPTER).is_dir() and not (result.run_dir / rundir.SAMPLES).exists()
    saved = json.loads((result.run_dir / rundir.RESULT).read_text())
    assert saved["status"] == "completed" and saved["samples_error"] == "RuntimeError: generation broke"
    assert result.numbers["samples_error"] == "RuntimeError: generation broke"
