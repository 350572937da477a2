"""The pre-flight check on real data and a tiny model: each item's PASS, WARN and FAIL, made to happen."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoConfig

from tunewise import check
from tunewise.check import CheckReport, precision_item, run_check
from tunewise.config import load_config
from tunewise.data import inspect_examples
from tunewise.errors import ConfigError
from tunewise.model import load_tokenizer
from tunewise.plan import estimate_memory, plan_config, plan_steps

REPO = Path(__file__).parent.parent
BROKEN = REPO / "examples" / "broken.yaml"
ITEM_IDS = list(check.NAMES)

# A ChatML template that forgets the end-of-turn token after assistant messages.
NO_EOT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' + m['content'] + '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _overrides(
    model_dir: Path, tmp_path: Path, data: dict[str, Path] | None = None, *extra: str
) -> list[str]:
    out = [f"model.name={model_dir}", "model.method=lora", f"output_dir={tmp_path / 'runs'}"]
    if data:
        out += [f"data.train={data['train']}", f"data.validation={data['validation']}"]
    return out + list(extra)


def _broken(model_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"model.name={model_dir}",
        f"output_dir={tmp_path / 'runs'}",
        f"data.train={REPO / 'examples/broken/train.jsonl'}",
        f"data.validation={REPO / 'examples/broken/validation.jsonl'}",
        *extra,
    ]


@pytest.fixture(scope="module")
def bundled_report(tiny_model_dir, tmp_path_factory) -> CheckReport:
    return run_check(load_config(None, _overrides(tiny_model_dir, tmp_path_factory.mktemp("bundled"))))


@pytest.fixture(scope="module")
def broken_report(tiny_model_dir, tmp_path_factory) -> CheckReport:
    return run_check(load_config(BROKEN, _broken(tiny_model_dir, tmp_path_factory.mktemp("broken"))))


def test_bundled_dataset_passes(bundled_report):
    assert [item.id for item in bundled_report.items] == ITEM_IDS
    assert not bundled_report.failed, [(i.id, i.detail) for i in bundled_report.items if i.status == "FAIL"]
    for item_id in (
        "trainable_examples",
        "sequence_length",
        "leakage",
        "duplicates",
        "eos_trained",
        "pad_token",
        "learning_rate",
        "warmup",
        "clipping",
        "memory",
    ):
        assert bundled_report.item(item_id).status == "PASS", bundled_report.item(item_id)
    assert bundled_report.item("trainable_examples").numbers["trainable_train_examples"] == 800
    eos = bundled_report.item("eos_trained").numbers
    assert eos["end_of_turn_token"] == "<|im_end|>" and eos["missing"] == 0 and eos["examples"] == 900
    pad = bundled_report.item("pad_token").numbers
    assert pad["pad_before"] == eos["end_of_turn_id"] != pad["pad_id"]  # SmolLM2 ships pad = EOS: replaced
    assert bundled_report.counts()["FAIL"] == 0
    assert sum(bundled_report.counts().values()) == len(ITEM_IDS)


def test_broken_dataset_fails_on_the_planted_problems(broken_report):
    failed = {item.id for item in broken_report.items if item.status == "FAIL"}
    assert failed == {"trainable_examples", "sequence_length", "leakage"}
    warned = {item.id for item in broken_report.items if item.status == "WARN"}
    assert {"duplicates", "empty_responses", "learning_rate"} <= warned
    trainable = broken_report.item("trainable_examples").numbers
    assert trainable["no_trained_tokens"] == 25 and trainable["trainable_train_examples"] == 122
    assert all(re.fullmatch(r".*/broken/train\.jsonl:\d+", s) for s in trainable["sources"])
    length = broken_report.item("sequence_length")
    assert length.numbers["responses_cut"] == 40 and length.numbers["examples"] == 167
    assert length.numbers["p99"] > 256
    assert length.fix == f"data.max_seq_length={length.numbers['covers_99_percent']}"
    assert broken_report.item("leakage").numbers["shared"] == 8
    assert broken_report.item("duplicates").numbers["duplicates"] == 4
    assert broken_report.item("empty_responses").numbers["empty_responses"] == 3
    assert broken_report.failed


def test_the_suggested_length_fix_clears_the_length_fails(broken_report, tiny_model_dir, tmp_path):
    fix = broken_report.item("sequence_length").fix
    report = run_check(load_config(BROKEN, _broken(tiny_model_dir, tmp_path, fix)))
    assert {i.id for i in report.items if i.status == "FAIL"} == {"leakage"}
    assert report.item("sequence_length").status == "PASS"


@pytest.mark.parametrize(
    ("extra", "item_id", "fix", "words"),
    [
        (["training.learning_rate=2e-5"], "learning_rate", "training.learning_rate=2e-4", "flat-loss"),
        (
            ["model.method=full", "training.learning_rate=5e-4"],
            "learning_rate",
            "training.learning_rate=2e-5",
            "full fine-tuning",
        ),
        (["training.warmup_steps=0"], "warmup", "training.warmup_steps=0.03", "0 warmup steps"),
        (["training.max_grad_norm=0"], "clipping", "training.max_grad_norm=0.3", "off"),
        (["training.max_grad_norm=5"], "clipping", "training.max_grad_norm=0.3", "rarely clips"),
        (["data.validation="], "evaluation", "data.validation_split=0.1", "no validation set"),
        (["training.eval_strategy='no'"], "evaluation", "training.eval_strategy=steps", "evaluation is off"),
        (["training.num_train_epochs=10"], "epochs", "training.num_train_epochs=3", "overfitting"),
        (
            ["training.save_total_limit=null"],
            "checkpoints",
            "training.save_total_limit=3",
            "every checkpoint",
        ),
    ],
)
def test_item_warns_with_its_fix(tiny_model_dir, small_data, tmp_path, extra, item_id, fix, words):
    overrides = _overrides(tiny_model_dir, tmp_path, small_data, "training.save_steps=5", *extra)
    report = run_check(load_config(None, overrides))
    item = report.item(item_id)
    assert (item.status, item.fix) == ("WARN", fix), item
    assert words in item.detail


def test_epochs_warning_shows_the_step_count(tiny_model_dir, small_data, tmp_path):
    report = run_check(
        load_config(None, _overrides(tiny_model_dir, tmp_path, small_data, "training.num_train_epochs=10"))
    )
    steps = plan_steps(64, 4, 4, 10).total_steps
    assert f"{steps} optimizer steps" in report.item("epochs").detail
    assert report.item("trainable_examples").status == "FAIL"  # 64 examples: fewer than 100 trainable


def test_validation_equal_to_train_is_leakage(tiny_model_dir, small_data, tmp_path):
    data = {"train": small_data["train"], "validation": small_data["train"]}
    item = run_check(load_config(None, _overrides(tiny_model_dir, tmp_path, data))).item("leakage")
    assert item.status == "FAIL" and item.numbers["percent"] == 100.0


def test_checkpointing_off_passes_when_memory_allows(tiny_model_dir, small_data, tmp_path):
    report = run_check(
        load_config(
            None, _overrides(tiny_model_dir, tmp_path, small_data, "training.gradient_checkpointing=false")
        )
    )
    item = report.item("gradient_checkpointing")
    assert item.status == "PASS" and "not needed" in item.detail


def test_untrained_end_of_turn_fails(tiny_model_dir, small_data, tmp_path):
    cfg = load_config(None, _overrides(tiny_model_dir, tmp_path, small_data))
    cfg.data.chat_template = NO_EOT_TEMPLATE
    item = run_check(cfg).item("eos_trained")
    assert item.status == "FAIL" and item.numbers["missing"] == item.numbers["examples"] == 80


@pytest.mark.parametrize(
    ("args", "status", "fix"),
    [
        (("bf16", "bf16", "cuda", "Tesla T4", False), "FAIL", "model.precision=fp16"),
        (("auto", "fp16", "cuda", "Tesla V100", False), "PASS", None),
        (("fp16", "fp16", "cuda", "NVIDIA A100", True), "WARN", "model.precision=bf16"),
        (("auto", "bf16", "cuda", "NVIDIA A100", True), "PASS", None),
        (("fp32", "fp32", "cuda", "NVIDIA H100", True), "WARN", "model.precision=auto"),
        (("bf16", "bf16", "cpu", "old CPU", False), "WARN", "model.precision=auto"),
        (("auto", "fp32", "cpu", "old CPU", False), "PASS", None),
    ],
)
def test_precision_fits_the_hardware(args, status, fix):
    item = precision_item(*args)
    assert (item.status, item.fix) == (status, fix)


@pytest.mark.parametrize(("peak", "status"), [(50, "PASS"), (80, "WARN"), (95, "FAIL")])
def test_memory_thresholds(peak, status):
    cfg = load_config(None, ["model.method=lora"])
    item = check._memory_item(cfg, {"peak": peak * 2**30, "device_bytes": 100 * 2**30})
    assert item.status == status
    assert item.fix == (None if status == "PASS" else "model.method=qlora")


def test_report_json_round_trip(broken_report):
    data = json.loads(json.dumps(broken_report.to_dict()))
    again = CheckReport.from_dict(data)
    assert again.to_dict() == data
    assert data["failed"] is True and data["counts"] == broken_report.counts()
    assert data["data"]["lengths"]["p99"] == broken_report.item("sequence_length").numbers["p99"]


def test_plan_config_counts_steps_and_memory(tiny_model_dir, small_data, tmp_path):
    plan = plan_config(load_config(None, _overrides(tiny_model_dir, tmp_path, small_data)), processes=2)
    assert plan["steps"]["total_steps"] == plan_steps(64, 4, 4, 3, processes=2).total_steps
    assert plan["memory"]["peak"] > 0 and plan["data"]["encoded"] == 80


def test_memory_estimate_adds_the_evaluation_forward(tiny_model_dir, small_data, tmp_path):
    """An evaluating run's peak holds the eval batch's logits (compute dtype + fp32 for the loss) on top of
    step 1 on the CPU; a run that never evaluates peaks at step 1; a bigger eval batch costs more."""
    base = _overrides(
        tiny_model_dir, tmp_path, small_data, "training.eval_strategy=steps", "training.eval_steps=1"
    )
    plans = {
        b: plan_config(load_config(None, [*base, f"training.per_device_eval_batch_size={b}"])) for b in (2, 8)
    }
    for batch, plan in plans.items():
        mem, vocab = plan["memory"], AutoConfig.from_pretrained(tiny_model_dir).vocab_size
        act_b = 4 if plan["hardware"]["precision"] == "fp32" else 2
        assert mem["eval_batch"] == batch
        assert 0.1 < mem["logits_share"] < 1  # a Llama computes logits for the trained positions only
        expected = batch * mem["seq_len"] * mem["logits_share"] * vocab * (act_b + 4)
        assert mem["evaluation"] == pytest.approx(expected, rel=1e-3)
        assert mem["peak"] == mem["peak_step_1"] + mem["evaluation"]  # the CPU's resident set keeps both
    assert plans[8]["memory"]["peak"] > plans[2]["memory"]["peak"]
    never = plan_config(load_config(None, [*base[:-2], "training.eval_strategy=no"]))["memory"]
    assert never["evaluation"] == 0 and never["peak"] == never["peak_step_1"]


def test_on_cuda_the_evaluation_reuses_training_activations():
    shape = {"total": 10**8, "linear": 9 * 10**7, "other": 10**7, "lora": 10**6}
    shape |= {"layers": 12, "hidden": 512, "heads": 8, "vocab": 32000}
    cfg = load_config(None, ["model.method=lora"])
    small = estimate_memory(cfg, shape, "bf16", 8, 256, "cuda", eval_batch=1)
    assert small["peak"] == small["peak_step_1"]  # one example's logits fit where training's activations were
    big = estimate_memory(cfg, shape, "bf16", 8, 256, "cuda", eval_batch=64)
    fixed = sum(big[k] for k in ("weights", "adapter", "gradients", "optimizer", "framework_overhead"))
    assert big["peak"] == fixed + big["evaluation"] > big["peak_step_1"]


def test_inspect_marks_trained_text(tiny_model_dir, small_data, tmp_path):
    cfg = load_config(None, _overrides(tiny_model_dir, tmp_path, small_data))
    text = inspect_examples(cfg, load_tokenizer(cfg), n=2)
    answer = json.loads(small_data["train"].read_text().splitlines()[0])["messages"][2]["content"]
    assert f"[[{answer}<|im_end|>]]" in text
    assert f"{small_data['train']}:1:" in text and f"{small_data['train']}:2:" in text
    assert "\x1b[32m" in inspect_examples(cfg, load_tokenizer(cfg), index=5, color=True)
    with pytest.raises(ConfigError, match="--index 64"):
        inspect_examples(cfg, load_tokenizer(cfg), index=64)


def test_inspect_shows_truncation_and_untrained_examples(tiny_model_dir, tmp_path):
    cfg = load_config(BROKEN, _broken(tiny_model_dir, tmp_path))
    text = inspect_examples(cfg, load_tokenizer(cfg), n=200)
    assert "truncated from" in text and "(the response was cut)" in text
    assert "25 examples have no trained token" in text


def test_cli_check_exits_1_on_the_broken_example(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from tunewise.cli import main

    monkeypatch.chdir(REPO)  # the example's data paths are relative to the repository root
    assert (
        main(
            [
                "check",
                "examples/broken.yaml",
                f"model.name={tiny_model_dir}",
                f"output_dir={tmp_path}",
                "--json",
            ]
        )
        == 1
    )
    data = json.loads(capsys.readouterr().out)
    assert data["counts"]["FAIL"] == 3
