"""Memorization check: a tiny model drilled on 4 examples is flagged; a barely trained one is not; any chat
set works, with the user's own rewordings or tunewise's perturbation (and the result says which)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_overrides, write_subset
from test_eval import write_chat_set

from tunewise.cli import main
from tunewise.config import load_config
from tunewise.errors import DataError
from tunewise.memorization import (
    PERTURBATION,
    check_memorization,
    edit_similarity,
    judge_memorization,
    rephrase,
)
from tunewise.training.run import train


def test_rephrase_is_light_deterministic_and_keeps_the_input():
    prompt = "Extract the contact as JSON.\nAnn Lee, 30, works as a nurse in Oslo."
    once = rephrase(prompt)
    assert once == rephrase(prompt)
    assert once == "Ann Lee, 30, works as a nurse in Oslo.\npull out the contact details in JSON form"
    assert rephrase("Summarize this text, please.") == "please, sum up this text"
    assert rephrase("What is the capital of France?") == "what is the capital of France?"


def test_edit_similarity():
    assert edit_similarity("abc", "abc") == 1.0
    assert edit_similarity("a  b\n", "a b") == 1.0  # whitespace is normalized
    assert edit_similarity("abcdefghij", "abcdefghiX") == 0.9
    assert edit_similarity("abc", "xyz") == 0.0


def test_judge_needs_train_far_above_both_others():
    def sets(train: float, rephrased: float, heldout: float) -> dict:
        return {
            k: {"near_verbatim": v}
            for k, v in [("train", train), ("rephrased", rephrased), ("heldout", heldout)]
        }

    assert judge_memorization(sets(1.0, 0.0, 0.1))[0]
    assert not judge_memorization(sets(1.0, 0.9, 0.1))[0]  # survives rephrasing: it learned the task
    assert not judge_memorization(sets(0.9, 0.2, 0.8))[0]  # held-out is as good: it generalizes
    assert not judge_memorization(sets(0.25, 0.0, 0.0))[0]  # too little reproduction to call it memorized
    flagged, message = judge_memorization(sets(1.0, 0.0, 0.25))
    assert "100%" in message and "0%" in message and "25%" in message


def _run(
    tiny_model_dir: Path,
    tmp_path: Path,
    name: str,
    steps: int,
    lr: float,
    method: str,
    data: dict[str, Path] | None = None,
) -> Path:
    data = data or write_subset(tmp_path / "data", n_train=4, n_val=4, n_test=4)
    extra = {
        "name": name,
        "model.method": method,
        "training.max_steps": steps,
        "training.learning_rate": lr,
        "training.gradient_accumulation_steps": 1,
        "training.warmup_steps": 0,
        "training.lr_scheduler_type": "constant",
        "training.eval_strategy": "no",
        "training.save_strategy": "no",
        "training.logging_steps": 10,
        "training.weight_decay": 0.0,
        "training.max_grad_norm": 1.0,
    }
    result = train(load_config(None, tiny_overrides(tiny_model_dir, data, tmp_path / "runs", extra)))
    assert result.status == "completed", result.error
    return result.run_dir


def test_a_drilled_tiny_model_is_flagged(tiny_model_dir, tmp_path):
    run_dir = _run(tiny_model_dir, tmp_path, "drilled", steps=80, lr=1e-2, method="full")
    result = check_memorization(load_config(run_dir / "config.yaml"), run_dir, n=4)
    sets = result["sets"]
    assert result["flagged"], result["message"]
    assert sets["train"]["near_verbatim"] >= 0.75
    assert sets["heldout"]["near_verbatim"] <= 0.25 and sets["rephrased"]["near_verbatim"] <= 0.25
    assert json.loads((run_dir / "memorization.json").read_text())["verdict"] == "memorized"
    assert result["examples"][0]["rephrased"] != result["examples"][0]["prompt"]


def test_a_barely_trained_run_is_not_flagged(tiny_model_dir, tmp_path, capsys):
    run_dir = _run(tiny_model_dir, tmp_path, "barely", steps=2, lr=1e-4, method="lora")
    assert main(["eval", str(run_dir), "--memorization", "--limit", "4"]) == 0
    assert "no sign of memorization" in capsys.readouterr().out
    saved = json.loads((run_dir / "memorization.json").read_text())
    assert not saved["flagged"] and saved["sets"]["train"]["n"] == 4


def test_a_chat_set_with_the_users_rewordings(tiny_model_dir, tmp_path, capsys):
    data = write_chat_set(tmp_path / "chat")
    run_dir = _run(tiny_model_dir, tmp_path, "chat", steps=60, lr=1e-2, method="full", data=data)
    reworded = tmp_path / "reworded.jsonl"
    rows = [json.loads(line) for line in data["train"].read_text().splitlines()[:3]]
    for row in rows:
        thing = row["messages"][0]["content"].split()[-1].rstrip("?")
        row["messages"][0]["content"] = f"Tell me the colour of a {thing}."
    reworded.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(run_dir), "--memorization", "--limit", "3", f"eval.rephrased={reworded}"]) in (
        0,
        1,
    )
    printed = capsys.readouterr().out
    assert f"your rewordings in {reworded}" in printed
    saved = json.loads((run_dir / "memorization.json").read_text())
    assert saved["rephrased_by"] == "user" and saved["sets"]["rephrased"]["n"] == 3
    assert [e["rephrased"] for e in saved["examples"]] == [r["messages"][0]["content"] for r in rows]
    assert [e["reference"] for e in saved["examples"]] == [r["messages"][1]["content"] for r in rows]
    assert saved["sets"]["train"]["loss"] < saved["sets"]["heldout"]["loss"]  # trained answers are easier

    result = check_memorization(load_config(run_dir / "config.yaml"), run_dir, n=2)
    assert result["rephrased_by"] == "tunewise" and result["rephrasing"] == PERTURBATION
    assert result["examples"][0]["rephrased"] == rephrase(result["examples"][0]["prompt"])


def test_rewordings_that_do_not_keep_a_training_answer_are_one_error(tiny_model_dir, tmp_path):
    data = write_chat_set(tmp_path / "chat")
    bad = tmp_path / "bad.jsonl"
    first = json.loads(data["train"].read_text().splitlines()[0])
    changed = {"messages": [{"role": "user", "content": "Colour of the sky?"},
                            {"role": "assistant", "content": "Blue, I think."}]}  # fmt: skip
    bad.write_text(json.dumps(first) + "\n" + json.dumps(changed) + "\n")
    cfg = load_config(
        None, tiny_overrides(tiny_model_dir, data, tmp_path / "runs", {"eval.rephrased": str(bad)})
    )
    with pytest.raises(DataError) as error:
        check_memorization(cfg, tmp_path, n=2)
    message = str(error.value)
    assert f"{bad}:1: its prompt is the training prompt of {data['train']}:1, not reworded" in message
    assert f"{bad}:2: its answer is not the answer of any training row" in message
