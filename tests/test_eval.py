"""`tunewise eval`: greedy generation on the test split, exact match for the base model and a run."""

from __future__ import annotations

import json

import yaml
from conftest import tiny_overrides

from tunewise.cli import main
from tunewise.config import load_config
from tunewise.evaluate import score
from tunewise.train import train


def test_score_uses_json_fields_when_references_are_json():
    ref = '{"name": "Ana Ruiz", "age": 30, "city": "Lima", "job": "nurse"}'
    out = score([ref, '{"name": "Ana Ruiz", "age": 31, "city": "Lima", "job": "nurse"}'], [ref, ref])
    assert out["exact_match"] == 0.5 and out["field_accuracy"] == 0.875
    assert score(["yes", "no "], ["yes", "no"])["exact_match"] == 1.0


def test_eval_of_a_run_and_of_the_base(tiny_model_dir, small_data, tmp_path, capsys):
    overrides = tiny_overrides(
        tiny_model_dir,
        small_data,
        tmp_path / "runs",
        {"name": "ev", "training.max_steps": 2, "training.eval_steps": 2, "training.save_steps": 2},
    )
    result = train(load_config(None, overrides))
    assert main(["eval", str(result.run_dir), "--limit", "4", "--json"]) == 0
    tuned = json.loads((result.run_dir / "eval.json").read_text())
    assert tuned["which"] == "tuned" and tuned["n"] == 4 and 0.0 <= tuned["exact_match"] <= 1.0
    assert len(tuned["examples"]) == 4 and all("prediction" in e for e in tuned["examples"])
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(load_config(None, overrides).to_dict()))
    capsys.readouterr()
    assert main(["eval", "--base", "--config", str(config), "--limit", "2", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["which"] == "base" and base["n"] == 2
