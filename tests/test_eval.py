"""`tunewise eval`: loss/perplexity and generation metrics, base vs tuned, per example, for any dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import read_jsonl, tiny_overrides

from tunewise.cli import main
from tunewise.config import ConfigError, load_config
from tunewise.data import build_datasets, ensure_pad_token
from tunewise.errors import DataError
from tunewise.evaluate import cap_new_tokens, encode_set, evaluate, load_validation_set
from tunewise.metrics import (
    choose_metrics,
    exact_match,
    field_accuracy,
    load_user_metric,
    mean_scores,
    normalized_match,
    primary_metric,
    rank_changes,
    rouge_l,
    score_examples,
    valid_json,
)
from tunewise.model import load_tokenizer
from tunewise.task import score_predictions
from tunewise.training.run import train

CONTACT = '{"name": "Ana Ruiz", "age": 30, "city": "Lima", "job": "nurse"}'
THINGS = [
    ("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("blood", "red"),
    ("banana", "yellow"), ("orange", "orange"), ("violet", "purple"), ("chocolate", "brown"),
    ("silver", "grey"), ("lemon", "yellow"), ("cherry", "red"), ("cloud", "white"), ("leaf", "green"),
    ("night", "black"), ("ocean", "blue"), ("tomato", "red"), ("milk", "white"), ("lime", "green"),
    ("plum", "purple"), ("sand", "beige"), ("rust", "brown"), ("ash", "grey"), ("gold", "yellow"),
    ("ruby", "red"), ("jade", "green"), ("ink", "black"), ("pearl", "white"),
]  # fmt: skip


def write_chat_set(directory: Path) -> dict[str, Path]:
    """A small free-text chat task (not JSON): 20 train, 4 validation, 4 test conversations."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [
        {"messages": [{"role": "user", "content": f"What colour is the {thing}?"},
                      {"role": "assistant", "content": f"The {thing} is {colour}."}]}
        for thing, colour in THINGS
    ]  # fmt: skip
    out = {}
    for split, part in [("train", rows[:20]), ("validation", rows[20:24]), ("test", rows[24:])]:
        out[split] = directory / f"{split}.jsonl"
        out[split].write_text("".join(json.dumps(r) + "\n" for r in part))
    return out


# ----------------------------------------------------------------------------- metrics on known strings


def test_text_metrics_on_known_strings():
    assert exact_match(" The sky is blue.\n", "The sky is blue.") == 1.0
    assert exact_match("the sky is blue.", "The sky is blue.") == 0.0
    assert normalized_match("the  SKY is blue", "The sky is blue.") == 1.0
    assert normalized_match("Le ciel, bleu !", "le ciel bleu") == 1.0  # any Unicode punctuation
    assert normalized_match("The sky is grey.", "The sky is blue.") == 0.0
    # ROUGE-L F: the longest common subsequence "the cat on the mat" is 5 of 6 words on both sides
    assert rouge_l("the cat is on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    assert rouge_l("Привет мир", "привет мир") == 1.0  # words of any script, not only [a-z0-9]
    assert rouge_l("a b", "c d") == 0.0
    assert rouge_l("", "") == 1.0


def test_json_metrics_on_known_strings():
    reordered = '{"city":"Lima","name":"Ana Ruiz","job":"nurse","age":30}'
    assert exact_match(reordered, CONTACT) == 1.0  # equal objects: key order and spacing aside
    assert exact_match(CONTACT.replace("30", '"30"'), CONTACT) == 0.0  # 30 and "30" differ
    assert valid_json(reordered, CONTACT) == 1.0 and valid_json("Sure! " + CONTACT, CONTACT) == 0.0
    assert field_accuracy("Sure! " + CONTACT.replace("Lima", "Quito"), CONTACT) == 0.75
    assert field_accuracy("no json here", CONTACT) == 0.0
    assert exact_match("[1, 2]", " [1,2]") == 1.0  # other JSON values compare parsed too


def test_the_bundled_task_keeps_its_scoring():
    result = score_predictions([CONTACT, CONTACT.replace("Lima", "Quito"), "x"], [CONTACT] * 3)
    assert result == {"n": 3, "exact_match": 1 / 3, "valid_json": 2 / 3, "field_accuracy": 1.75 / 3}


def test_metrics_are_chosen_from_the_references():
    assert choose_metrics([CONTACT, CONTACT], []) == (
        ["exact_match", "normalized_match", "valid_json", "field_accuracy"],
        "every reference is a JSON object",
    )
    assert choose_metrics([CONTACT, "The sky is blue."], [])[0] == [
        "exact_match",
        "normalized_match",
        "rouge_l",
    ]
    assert choose_metrics(["a"], ["rouge_l", "rouge_l"]) == (["rouge_l"], "set by eval.metrics")
    with pytest.raises(ConfigError, match="unknown metric.*bleu.*valid: exact_match"):
        choose_metrics(["a"], ["bleu"])
    with pytest.raises(ConfigError, match="1 of 2 references are not"):
        choose_metrics([CONTACT, "a"], ["field_accuracy"])
    assert primary_metric(["exact_match", "rouge_l"]) == "rouge_l"
    assert primary_metric(["exact_match", "rouge_l"], "mine") == "mine"


# ----------------------------------------------------------------------------- the user's metric


def _metric_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "my_metric.py"
    path.write_text(body)
    return path


def test_a_user_metric_is_loaded_from_its_file_and_its_failures_are_recorded(tmp_path):
    path = _metric_file(
        tmp_path,
        "def length_ratio(prediction, reference):\n"
        "    if prediction == 'boom':\n"
        "        raise ValueError('cannot score boom')\n"
        "    if prediction == 'text':\n"
        "        return 'high'\n"
        "    return len(prediction) / len(reference)\n",
    )
    metric = load_user_metric(f"{path}:length_ratio")
    assert metric.name == "length_ratio" and metric.spec == f"{path}:length_ratio"
    scored = score_examples(["ab", "boom", "text", "abcd"], ["abcd"] * 4, ["exact_match"], metric)
    assert [s["length_ratio"] for s in scored.scores] == [0.5, None, None, 1.0]
    assert scored.errors[1] == {"length_ratio": "ValueError: cannot score boom"}
    assert scored.errors[2] == {"length_ratio": "returned str 'high', not a number"}
    assert scored.errors[0] == {} and scored.errors[3] == {}
    assert mean_scores(scored.scores) == {"exact_match": 0.25, "length_ratio": 0.75}


@pytest.mark.parametrize(
    ("body", "spec", "message"),
    [
        (None, "missing.py:f", "no such file `missing.py`"),
        ("def f(p, r):\n    return 1\n", "{path}", "write it as path/to/metric.py:function_name"),
        ("def f(p, r)\n    return 1\n", "{path}:f", "importing `{path}` failed at {path}:1: SyntaxError"),
        ("import no_such_module_here\n", "{path}:f", "failed at {path}:1: ModuleNotFoundError"),
        (
            "x = 1\n\ndef g(p, r):\n    return 1\n",
            "{path}:f",
            "`f` is not defined in `{path}` .functions there: g",
        ),
        ("f = 3\n", "{path}:f", "`f` is not callable"),
    ],
)
def test_a_user_metric_that_cannot_load_is_one_config_error(tmp_path, monkeypatch, body, spec, message):
    monkeypatch.chdir(tmp_path)
    path = "my_metric.py"
    if body is not None:
        _metric_file(tmp_path, body)
    with pytest.raises(ConfigError, match=message.format(path=path).replace("(", r"\(")):
        load_user_metric(spec.format(path=path))


def test_regressions_and_gains_are_ranked_by_the_primary_metric_then_the_loss():
    def record(i: int, change: float | None, base_loss: float, tuned_loss: float) -> dict:
        return {"index": i, "change": change, "loss": {"base": base_loss, "tuned": tuned_loss}}

    records = [record(0, -0.5, 1, 1), record(1, -1.0, 1, 1), record(2, -0.5, 1, 3), record(3, 0.25, 1, 1),
               record(4, 0.0, 1, 1), record(5, None, 1, 1), record(6, 0.25, 3, 1)]  # fmt: skip
    regressions, gains = rank_changes(records, 2)
    assert [r["index"] for r in regressions] == [1, 2]  # -1.0, then the -0.5 whose loss rose most
    assert [r["index"] for r in gains] == [6, 3]


# ----------------------------------------------------------------------------- loss on what training trains


def test_the_loss_is_measured_on_the_examples_training_encodes(tiny_model_dir, tmp_path):
    data = write_chat_set(tmp_path / "chat")
    cfg = load_config(None, tiny_overrides(tiny_model_dir, data, tmp_path / "runs"))
    tokenizer = load_tokenizer(cfg)
    ensure_pad_token(tokenizer)
    trained = build_datasets(cfg.data, tokenizer).validation
    measured = encode_set(load_validation_set(cfg), tokenizer, cfg)
    assert [(e.input_ids, e.labels) for e in measured] == [(e.input_ids, e.labels) for e in trained]
    short, long = "The ruby is red.", " ".join(["The ruby is red."] * 10)
    n = len(tokenizer(long, add_special_tokens=False).input_ids)
    assert n > 40 and cap_new_tokens(tokenizer, [short, long]) == (
        n + -(-n // 4),
        f"longest reference {n} tokens + {-(-n // 4)}",
    )
    n = len(tokenizer(short, add_special_tokens=False).input_ids)
    assert cap_new_tokens(tokenizer, [short]) == (n + 8, f"longest reference {n} tokens + 8")


def _chat_run(tiny_model_dir: Path, tmp_path: Path, data: dict[str, Path]) -> Path:
    extra = {
        "name": "chat",
        "model.method": "full",
        "training.max_steps": 40,
        "training.learning_rate": 3e-3,
        "training.gradient_accumulation_steps": 1,
        "training.warmup_steps": 0,
        "training.lr_scheduler_type": "constant",
        "training.eval_strategy": "no",
        "training.save_strategy": "no",
        "training.logging_steps": 10,
        "training.max_grad_norm": 1.0,
    }
    result = train(load_config(None, tiny_overrides(tiny_model_dir, data, tmp_path / "runs", extra)))
    assert result.status == "completed", result.error
    return result.run_dir


def test_eval_on_a_chat_set_base_vs_tuned(tiny_model_dir, tmp_path, capsys):
    data = write_chat_set(tmp_path / "chat")
    run_dir = _chat_run(tiny_model_dir, tmp_path, data)
    metric = _metric_file(
        tmp_path,
        "def says_colour(prediction, reference):\n"
        "    if 'jade' in reference:\n"
        "        raise KeyError('jade')\n"
        "    return float(reference.split()[-1] in prediction)\n",
    )
    assert main(["eval", str(run_dir), f"eval.metric={metric}:says_colour"]) == 0
    printed = capsys.readouterr().out
    assert "test loss" in printed and "eval.jsonl" in printed and "says_colour failed on 1" in printed

    result = json.loads((run_dir / "eval.json").read_text())
    base, tuned = result["base"], result["tuned"]
    assert result["metrics"] == ["exact_match", "normalized_match", "rouge_l", "says_colour"]
    assert (
        result["metrics_chosen"] == "references are free text" and result["primary_metric"] == "says_colour"
    )
    for model in (base, tuned):
        assert model["n"] == 4 and model["test_examples"] == 4 and model["validation_examples"] == 4
        assert model["test_perplexity"] == pytest.approx(math.exp(model["test_loss"]))
        assert model["metric_failures"] == 1  # the jade example, for both models
    assert base["test_loss"] > math.log(1000)  # random init: about ln(vocabulary)
    assert (
        tuned["test_loss"] < base["test_loss"] - 2 and tuned["validation_loss"] < base["validation_loss"] - 2
    )

    records = read_jsonl(run_dir / "eval.jsonl")
    assert [r["prompt"] for r in records] == [f"What colour is the {t}?" for t, _ in THINGS[24:]]
    assert [r["reference"] for r in records] == [f"The {t} is {c}." for t, c in THINGS[24:]]
    for r in records:
        assert set(r["scores"]) == {"base", "tuned"} and isinstance(r["tuned"], str)
        assert r["scores"]["tuned"]["exact_match"] == exact_match(r["tuned"], r["reference"])
        assert r["scores"]["tuned"]["rouge_l"] == pytest.approx(rouge_l(r["tuned"], r["reference"]))
        assert r["loss"]["tuned"] < r["loss"]["base"]
    jade = next(r for r in records if "jade" in r["reference"])
    assert jade["scores"]["tuned"]["says_colour"] is None and jade["change"] is None
    assert jade["errors"]["tuned"] == {"says_colour": "KeyError: 'jade'"}
    assert tuned["says_colour"] == mean_scores([r["scores"]["tuned"] for r in records])["says_colour"]


def test_eval_of_the_base_model_alone(tiny_model_dir, tmp_path, capsys):
    data = write_chat_set(tmp_path / "chat")
    config = tmp_path / "base.yaml"
    overrides = tiny_overrides(tiny_model_dir, data, tmp_path / "runs", {"eval.max_new_tokens": 3})
    config.write_text(yaml.safe_dump(load_config(None, overrides).to_dict()))
    assert main(["eval", "--base", "--config", str(config), "--limit", "2", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["which"] == "base" and base["n"] == 2 and base["validation_examples"] == 2
    assert {"exact_match", "normalized_match", "rouge_l", "test_loss", "test_perplexity"} <= set(base)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_one_clear_error(tiny_model_dir, tmp_path, capsys):
    data = write_chat_set(tmp_path / "chat")

    def run(extra: dict) -> str:
        overrides = tiny_overrides(tiny_model_dir, data, tmp_path / "runs", extra)
        config = tmp_path / "cfg.yaml"
        config.write_text(yaml.safe_dump(load_config(None, overrides).to_dict()))
        capsys.readouterr()
        assert main(["eval", "--base", "--config", str(config)]) == 2
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return captured.err

    assert "no test split" in run({"data.test": "null"}) and "data.test" in run({"data.test": "null"})
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "just a sentence"}\n')
    assert f"{text}:1: no assistant turn" in run({"data.test": str(text)})
    not_text = tmp_path / "not_text.jsonl"
    not_text.write_text('{"prompt": "Q", "completion": {"answer": 1}}\n')
    assert f"{not_text}:1" in run({"data.test": str(not_text)})
    broken = _metric_file(tmp_path, "def f(p, r):\n    return 1 +\n")
    err = run({"eval.metric": f"{broken}:f"})
    assert f"importing `{broken}` failed at {broken}:2: SyntaxError" in err
    assert "unknown metric(s) bleu" in run({"eval.metrics": "[bleu]"})
    assert "`eval.batch_size` is 0; must be >= 1" in run({"eval.batch_size": 0})


def test_a_user_metric_named_like_a_built_in_one_is_refused(tiny_model_dir, tmp_path):
    data = write_chat_set(tmp_path / "chat")
    path = _metric_file(tmp_path, "def rouge_l(p, r):\n    return 1.0\n")
    cfg = load_config(
        None, tiny_overrides(tiny_model_dir, data, tmp_path / "runs", {"eval.metric": f"{path}:rouge_l"})
    )
    with pytest.raises(ConfigError, match="built-in metric; rename your function"):
        evaluate(cfg, None)


def test_no_test_split_raises_data_error(tiny_model_dir, tmp_path):
    data = write_chat_set(tmp_path / "chat")
    cfg = load_config(None, tiny_overrides(tiny_model_dir, data, tmp_path / "runs", {"data.test": "null"}))
    with pytest.raises(DataError, match="set `data.test`"):
        evaluate(cfg, None)


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_eval_of_the_embedded_model_on_the_bundled_task(capsys):
    """SmolLM2 base on 4 bundled test examples: JSON metrics chosen, a real loss, short generations."""
    assert main(["eval", "--base", "--limit", "4", "--json", "model.method=lora"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["n"] == 4 and base["test_examples"] == 4
    assert {"exact_match", "valid_json", "field_accuracy"} <= set(base) and "rouge_l" not in base
    assert 0.0 < base["test_loss"] < 10 and base["test_perplexity"] == pytest.approx(
        math.exp(base["test_loss"])
    )
    # The metrics are the means over the generations it recorded, recomputed here on those strings, and
    # the references are the first 4 bundled test rows' answers.
    from tunewise.task import bundled_data_dir

    rows = (bundled_data_dir() / "test.jsonl").read_text().splitlines()[:4]
    answers = [json.loads(row)["messages"][-1]["content"] for row in rows]
    examples = base["examples"]
    assert [e["reference"] for e in examples] == answers
    by_hand = {"exact_match": exact_match, "valid_json": valid_json, "field_accuracy": field_accuracy}
    for name, metric in {**by_hand, "normalized_match": normalized_match}.items():
        assert base[name] == pytest.approx(sum(metric(e["prediction"], e["reference"]) for e in examples) / 4)


def test_the_report_lists_the_worst_regressions_and_best_gains(tmp_path):
    from tunewise.report import write_report

    base = {"which": "base", "n": 3, "test_loss": 2.5, "test_perplexity": math.exp(2.5), "rouge_l": 0.4}
    tuned = {"which": "tuned", "n": 3, "test_loss": 0.5, "test_perplexity": math.exp(0.5), "rouge_l": 0.6}
    evaluation = {
        "base": base,
        "tuned": tuned,
        "metrics": ["exact_match", "rouge_l"],
        "primary_metric": "rouge_l",
    }
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    records = [
        {"index": i, "source": f"test.jsonl:{i + 1}", "prompt": f"prompt {i}", "reference": f"ref {i}",
         "base": f"base {i}", "tuned": f"tuned {i}", "change": change, "loss": {"base": 1.0, "tuned": 1.0}}
        for i, change in enumerate([-0.5, 0.75, 0.0])
    ]  # fmt: skip
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    html = write_report(tmp_path).read_text()
    section = html[html.index('<section id="eval-examples">') :].split("</section>")[0]
    assert "test loss" in section and "2.5" in section and "rouge l" in section
    regressions, gains = section.split("<h3>Worst regressions</h3>")[1].split("<h3>Best gains</h3>")
    assert "prompt 0" in regressions and "-0.50" in regressions and "prompt 1" not in regressions
    assert "prompt 1" in gains and "+0.75" in gains and "prompt 2" not in gains
    assert "3 examples in eval.jsonl" in section
