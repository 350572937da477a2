"""The curve reader on LLaMA-Factory and Axolotl output, beside the formats it read before.

Fixtures: tests/fixtures/doctor_formats/ (made from the documented formats by make_formats.py), and any
real LLaMA-Factory / Axolotl runs the corpus holds (tests/fixtures/real_runs/*/manifest.jsonl).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tunewise.doctor.curve import load_curve, read_context
from tunewise.doctor.diagnose import diagnose_path
from tunewise.errors import DoctorError

FORMATS = Path(__file__).parents[1] / "fixtures" / "doctor_formats"
CORPUS = Path(__file__).parents[1] / "fixtures" / "real_runs"


def test_llamafactory_trainer_log_jsonl() -> None:
    curve = load_curve(FORMATS / "llamafactory" / "trainer_log.jsonl")
    assert [p.step for p in curve.train][:3] == [5, 10, 15] and curve.train[-1].step == 120
    assert len(curve.train) == 24 and [e.step for e in curve.eval] == [40, 80, 120]
    assert curve.total_steps == 120
    first = curve.train[0]
    assert first.loss == pytest.approx(2.1415) and first.lr == pytest.approx(9.957224306869053e-05)
    assert first.epoch == pytest.approx(0.12) and first.grad_norm is None
    assert curve.eval[0].eval_loss == pytest.approx(curve.train[7].loss + 0.08, abs=1e-3)


def test_llamafactory_output_dir_reads_the_log_and_its_training_args() -> None:
    d = diagnose_path(FORMATS / "llamafactory")
    assert d.verdict == "healthy", d.summary
    context = read_context(FORMATS / "llamafactory")
    assert context["method"] == "lora" and context["learning_rate"] == pytest.approx(1e-4)


def test_llamafactory_resumed_log_drops_the_abandoned_steps(tmp_path: Path) -> None:
    lines = (FORMATS / "llamafactory" / "trainer_log.jsonl").read_text().splitlines()
    resumed = [json.loads(x) for x in lines[:10]]  # up to step 45 (one eval line in between)
    resumed += [
        {"current_steps": s, "total_steps": 120, "loss": 1.5, "lr": 5e-5, "epoch": s / 40}
        for s in (35, 40, 45, 50)
    ]  # resumed from checkpoint-30
    (tmp_path / "trainer_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in resumed))
    curve = load_curve(tmp_path / "trainer_log.jsonl")
    assert [p.step for p in curve.train] == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    assert curve.train[-2].loss == 1.5 and curve.eval == []  # the eval at 40 belonged to the first attempt


def test_llamafactory_log_with_nan_and_grad_norm(tmp_path: Path) -> None:
    lines = [
        {
            "current_steps": s,
            "total_steps": 60,
            "loss": 2.0 - 0.01 * s,
            "grad_norm": 0.8,
            "lr": 2e-4,
            "epoch": s / 60,
        }
        for s in range(5, 35, 5)
    ]
    lines += [
        {
            "current_steps": s,
            "total_steps": 60,
            "loss": 0.0,
            "grad_norm": math.nan,
            "lr": 2e-4,
            "epoch": s / 60,
        }
        for s in range(35, 65, 5)
    ]
    (tmp_path / "trainer_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    d = diagnose_path(tmp_path)
    assert d.verdict == "diverged" and d.findings[0].step == 35


def test_llamafactory_log_of_newer_releases_with_null_keys_and_a_final_eval_pass(tmp_path: Path) -> None:
    """Newer LLaMA-Factory writes every key on every line (null where it does not apply), the rate as
    `learning_rate`, and ends with an evaluation pass that counts its own batches ("current_steps": 8 of
    "total_steps": 8; as in CoderJzy/llm's output/lora/trainer_log.jsonl). That pass is no resume: its eval
    belongs at the last training step, and every train line is read."""
    keys = {"eval_loss": None, "predict_loss": None, "reward": None, "accuracy": None}
    lines = [
        {
            "current_steps": s,
            "total_steps": 100,
            "loss": round(2.0 * 0.97**s, 4),
            **keys,
            "learning_rate": 1e-4,
        }
        for s in range(10, 101, 10)
    ]
    lines.insert(5, {"current_steps": 50, "total_steps": 100, **keys, "loss": None, "eval_loss": 1.1})
    lines.append({"current_steps": 100, "total_steps": 100, **keys, "loss": None, "learning_rate": None})
    lines.append({"current_steps": 8, "total_steps": 8, **keys, "loss": None, "eval_loss": 0.9})
    (tmp_path / "trainer_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    curve = load_curve(tmp_path / "trainer_log.jsonl")
    assert [p.step for p in curve.train] == list(range(10, 101, 10))
    assert curve.train[0].lr == pytest.approx(1e-4)
    assert [(e.step, e.eval_loss) for e in curve.eval] == [(50, 1.1), (100, 0.9)]
    assert diagnose_path(tmp_path).verdict == "healthy"
    # With load_best_model_at_end the final pass evaluates the best checkpoint again: the same loss as that
    # eval, not the end of the run, so it is not read as the eval coming back.
    lines[-1]["eval_loss"] = 1.1
    (tmp_path / "trainer_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert [(e.step, e.eval_loss) for e in load_curve(tmp_path / "trainer_log.jsonl").eval] == [(50, 1.1)]


def test_real_axolotl_dir_gives_method_rate_and_vocabulary() -> None:
    (path,) = corpus_entries("axolotl")[:1]
    context = read_context(path)
    assert context["method"] in ("lora", "qlora", "full") and context["learning_rate"] > 0
    assert context["vocab_size"] > 1000  # from the model's config.json
    assert load_curve(path).checkpoints


def test_axolotl_output_dir_reads_the_newest_checkpoint_and_the_config_in_the_card() -> None:
    curve = load_curve(FORMATS / "axolotl")
    assert curve.train[-1].step == 40 and len(curve.train) == 40 and curve.checkpoints == [20, 40]
    assert [e.step for e in curve.eval] == [1, 10, 20, 30, 40]
    context = read_context(FORMATS / "axolotl")
    assert context["method"] == "qlora" and context["learning_rate"] == pytest.approx(2e-4)
    assert context["warmup_steps"] == 4 and context["max_grad_norm"] == 1.0
    d = diagnose_path(FORMATS / "axolotl")
    assert d.verdict == "healthy" and d.best_checkpoint == "checkpoint-40", d.summary


def test_axolotl_model_card_alone_gives_the_results_table() -> None:
    curve = load_curve(FORMATS / "axolotl_card_only")
    assert [p.step for p in curve.train] == [10, 20, 30, 40]  # "No log" at step 1 is no train point
    assert [e.step for e in curve.eval] == [1, 10, 20, 30, 40]
    assert curve.eval[0].eval_loss == pytest.approx(1.656) and curve.train[0].loss == pytest.approx(1.1214)
    assert read_context(FORMATS / "axolotl_card_only")["method"] == "qlora"


def test_a_readme_without_results_is_not_a_log(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# my model\n\nsome text\n")
    with pytest.raises(DoctorError, match="found no logs"):
        load_curve(tmp_path)


def test_config_json_gives_the_vocabulary_size(tmp_path: Path) -> None:
    shutil.copytree(FORMATS / "axolotl", tmp_path / "run")
    (tmp_path / "run" / "checkpoint-40" / "config.json").write_text(json.dumps({"vocab_size": 32000}))
    assert read_context(tmp_path / "run")["vocab_size"] == 32000


def corpus_entries(kind: str) -> list[Path]:
    out = []
    for manifest in sorted(CORPUS.glob("*/manifest.jsonl")):
        for line in manifest.read_text(encoding="utf-8").splitlines():
            if line.strip():
                path = manifest.parent / json.loads(line)["file"]
                is_lf = path.name.endswith("trainer_log.jsonl") or (path / "trainer_log.jsonl").is_file()
                is_ax = path.is_dir() and "axolotl" in (
                    (path / "README.md").read_text(errors="replace") if (path / "README.md").is_file() else ""
                )
                if (kind == "llamafactory" and is_lf) or (kind == "axolotl" and is_ax):
                    out.append(path)
    return out


@pytest.mark.parametrize("kind", ["llamafactory", "axolotl"])
def test_real_corpus_runs_of_each_format_are_read(kind: str) -> None:
    paths = corpus_entries(kind)
    assert paths, f"the corpus holds no {kind} run (tests/fixtures/real_runs/*/manifest.jsonl)"
    for path in paths:
        curve = load_curve(path)
        assert len(curve.train) >= 5 and all(p.step > 0 for p in curve.train), path
        context = read_context(path)
        assert context.get("method") in ("lora", "qlora", "full", "freeze", None), (path, context)


def test_train_logs_that_carry_train_runtime_are_steps_and_the_summary_is_not(tmp_path: Path) -> None:
    """Newer transformers (include_tokens_per_second) write train_runtime and train_tokens_per_second in
    every train log; only the final summary (train_loss, no loss) is not a step."""
    history = [
        {"step": 5 * i, "loss": 1.7 - 0.03 * i, "grad_norm": 0.1, "learning_rate": 1e-4, "epoch": 0.01 * i}
        | {"train_runtime": 15.7 * i, "train_tokens_per_second": 2380.0, "num_input_tokens_seen": 37408 * i}
        for i in range(1, 11)
    ]
    history.insert(5, {"step": 25, "epoch": 0.05, "eval_loss": 1.6, "eval_runtime": 3.0})
    history.append({"step": 50, "epoch": 0.1, "train_loss": 1.55, "train_runtime": 160.0, "total_flos": 1e15})
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": history, "global_step": 50, "max_steps": 50}))
    curve = load_curve(state)
    assert [p.step for p in curve.train] == list(range(5, 51, 5))
    assert [e.step for e in curve.eval] == [25]
    assert diagnose_path(state).verdict == "healthy"
