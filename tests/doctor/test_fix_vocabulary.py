"""Fixes in the run's own words, and overflow fixes that fit the run's precision (#11).

The same curves are written as three kinds of run directory: one `tunewise train` wrote (config.yaml
from a real tunewise Config), one `tunewise.watch` wrote (`source: tunewise.watch`), and a plain Trainer
output_dir (trainer_state.json only). `tunewise doctor` must give tunewise overrides for the first and
a script's TrainingArguments for the other two. A gradient overflow must never be "fixed" with bf16 in a
run that is bf16 already.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunewise import rundir
from tunewise.cli import main
from tunewise.config import load_config
from tunewise.doctor.diagnose import diagnose_path
from tunewise.doctor.findings import WATCH_SOURCE, Finding, Fix, run_vocabulary, speak_finding, speak_fix

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20
BF16 = {"model.precision=bf16", "training.bf16=true"}  # the two spellings of "switch to bf16"


def diverging() -> list[dict]:
    """A loss that falls, then goes NaN at step 15 (lr 5e-3, too high for LoRA)."""
    records = [
        {"type": "train", "step": s, "loss": 2.5 - 0.05 * s, "grad_norm": 0.8, "learning_rate": 5e-3}
        for s in range(1, 15)
    ]
    return records + [
        {"type": "train", "step": s, "loss": math.nan, "grad_norm": math.nan, "learning_rate": 5e-3}
        for s in range(15, 18)
    ]


def overflow() -> list[dict]:
    """A calm loss with one inf gradient norm at step 12: an overflow whose update was skipped."""
    return [
        {
            "type": "train",
            "step": s,
            "loss": 1.0 + 1.5 * math.exp(-s / 8),
            "grad_norm": math.inf if s == 12 else 0.9,
            "learning_rate": 2e-4,
        }
        for s in range(1, STEPS + 1)
    ]


def tunewise_run(path: Path, records: list[dict], precision: str = "bf16") -> Path:
    """A run directory as `tunewise train` writes it: the resolved config, plan.json, metrics.jsonl."""
    path.mkdir(parents=True)
    cfg = load_config(None, ["model.method=lora", "training.learning_rate=5.0e-03"])
    (path / rundir.CONFIG).write_text(cfg.to_yaml(), encoding="utf-8")
    rundir.write_json(path / rundir.PLAN, {"hardware": {"device": "cpu", "precision": precision}})
    rundir.append_jsonl(path / rundir.METRICS, records)
    return path


def watched_run(path: Path, records: list[dict], precision: str = "bf16") -> Path:
    """A run directory as `tunewise.watch` writes it (its config.yaml holds TrainingArguments)."""
    path.mkdir(parents=True)
    config = {
        "source": WATCH_SOURCE,
        "model": {"name": "tiny", "method": "lora", "precision": precision},
        "training": {"learning_rate": 5e-3, "max_grad_norm": 1.0, "bf16": precision == "bf16"},
    }
    (path / rundir.CONFIG).write_text(yaml.safe_dump(config), encoding="utf-8")
    plan = {"source": WATCH_SOURCE, "hardware": {"precision": precision}}
    rundir.write_json(path / rundir.PLAN, plan)
    rundir.append_jsonl(path / rundir.METRICS, records)
    return path


def trainer_output(path: Path, records: list[dict]) -> Path:
    """A plain Trainer output_dir: trainer_state.json and nothing tunewise wrote."""
    path.mkdir(parents=True)
    history = [{k: v for k, v in r.items() if k != "type"} for r in records]
    state = {"log_history": history, "max_steps": STEPS}
    (path / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    return path


def doctor_text(path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    main(["doctor", str(path), *flags])
    return capsys.readouterr().out


def fix_lines(text: str) -> list[str]:
    """The changes under "fixes (try in this order...)" of `tunewise doctor`'s text."""
    block = text.split("fixes (try in this order", 1)[1].split("checkpoint to keep", 1)[0]
    return [line.split(". ", 1)[1] for line in block.splitlines() if line[:4].strip().rstrip(".").isdigit()]


# ----------------------------------------------------------------------------- whose words


def test_a_tunewise_run_keeps_tunewise_overrides(tmp_path, capsys):
    text = doctor_text(tunewise_run(tmp_path / "run", diverging()), capsys)
    changes = fix_lines(text)
    assert changes[0] == "training.learning_rate=5.0e-04", changes
    assert "training.max_grad_norm=0.3" in changes and "tunewise config overrides" in text
    assert not [c for c in changes if c.startswith(("learning_rate=", "max_grad_norm="))]


@pytest.mark.parametrize("kind", [watched_run, trainer_output])
def test_a_script_run_gets_training_arguments(kind, tmp_path, capsys):
    text = doctor_text(kind(tmp_path / "run", diverging()), capsys)
    changes = fix_lines(text)
    assert changes[0] == "learning_rate=5.0e-04", changes
    assert "max_grad_norm=0.3" in changes and "as arguments of your training script" in text
    assert not [c for c in changes if c.startswith(("training.", "model.", "adapter.", "data."))], changes


def test_doctor_json_speaks_the_run_words_and_says_which(tmp_path, capsys):
    watched = watched_run(tmp_path / "watched", diverging())
    out = json.loads(doctor_text(watched, capsys, "--json"))
    assert out["fix_vocabulary"] == "trainer"
    changes = [fix["change"] for f in out["findings"] for fix in f["fixes"] if fix["change"]]
    assert changes and not [c for c in changes if c.startswith("training.")]
    own = json.loads(doctor_text(tunewise_run(tmp_path / "own", diverging()), capsys, "--json"))
    assert own["fix_vocabulary"] == "tunewise"
    assert [fix["change"] for f in own["findings"] for fix in f["fixes"]][0].startswith("training.")


def test_the_diagnosis_keeps_the_doctor_overrides_and_renders_the_run_words(tmp_path):
    d = diagnose_path(watched_run(tmp_path / "run", diverging()))
    assert d.vocabulary == "trainer"
    assert d.findings[0].fixes[0].change == "training.learning_rate=5.0e-04"  # the doctor's own, structured
    assert d.in_run_words().findings[0].fixes[0].change == "learning_rate=5.0e-04"
    assert d.findings[0].fixes[0].change == "training.learning_rate=5.0e-04", "the original was changed"


def test_which_directory_gets_which_words():
    assert run_vocabulary({"model": {"method": "lora"}, "training": {}}, {"steps": {}}) == "tunewise"
    assert run_vocabulary({"source": WATCH_SOURCE}, {}) == "trainer"
    assert run_vocabulary({"model": {}}, {"source": WATCH_SOURCE}) == "trainer"  # plan.json says it too
    assert run_vocabulary({}, {}) == "trainer"  # no config.yaml: not written by tunewise train


@pytest.mark.parametrize(
    ("change", "spoken"),
    [
        ("training.learning_rate=2.0e-05", "learning_rate=2.0e-05"),
        ("training.logging_nan_inf_filter=false", "logging_nan_inf_filter=False"),
        ("training.gradient_checkpointing=true", "gradient_checkpointing=True"),
        ("model.precision=bf16", "bf16=True"),
        ("model.precision=fp16", "fp16=True"),
        ("model.precision=fp32", "bf16=False fp16=False"),
        ("adapter.r=4", "LoraConfig(r=4)"),
        ("adapter.dropout=0.1", "LoraConfig(lora_dropout=0.1)"),
        ("data.max_seq_length=256", "max_length=256"),
        (
            "training.per_device_train_batch_size=2 training.gradient_accumulation_steps=8",
            "per_device_train_batch_size=2 gradient_accumulation_steps=8",
        ),
    ],
)
def test_each_tunewise_setting_in_a_script_words(change, spoken):
    fix = Fix(change, "why")
    assert speak_fix(fix) == Fix(spoken, "why")
    assert speak_fix(speak_fix(fix)) == Fix(spoken, "why"), "speaking twice changes nothing more"
    assert speak_fix(fix, "tunewise") is fix


def test_data_settings_a_script_has_no_name_for_become_advice():
    for change in ("data.train_on=assistant", "data.too_long=drop"):
        spoken = speak_fix(Fix(change, "tunewise's reason"))
        assert spoken.change is None and "labels" in spoken.why or "max_length" in spoken.why
    assert speak_fix(Fix(None, "filter the dataset")) == Fix(None, "filter the dataset")
    finding = Finding(3, "error", "flat", "t", {}, ["c"], [Fix("data.train_on=assistant", "w")])
    assert speak_finding(finding).fixes[0].change is None and finding.fixes[0].change is not None


# ----------------------------------------------------------------------------- the run's precision


def overflow_changes(path: Path) -> list[str | None]:
    d = diagnose_path(path)
    found = next(f for f in d.findings if f.code == "grad_norm_non_finite")
    assert found.step == 12 and len(found.causes) == len(found.fixes)
    return [fix.change for fix in found.fixes]


def test_an_overflow_of_unknown_precision_offers_bf16_as_the_trainer_switch(tmp_path):
    """A Trainer output_dir says nothing of its precision: bf16 stays a suggestion, for an fp16 run."""
    d = diagnose_path(trainer_output(tmp_path / "run", overflow()))
    found = next(f for f in d.findings if f.code == "grad_norm_non_finite")
    assert found.fixes[0].change == "training.bf16=true" and "if the run is fp16" in found.causes[0]
    assert d.in_run_words().findings[0].fixes[0].change == "bf16=True"


@pytest.mark.parametrize("kind", [tunewise_run, watched_run])
def test_a_bf16_overflow_is_never_fixed_with_bf16(kind, tmp_path):
    changes = overflow_changes(kind(tmp_path / "run", overflow(), precision="bf16"))
    assert not BF16 & set(changes), changes
    assert "model.precision=fp32" in changes  # fp32 for the part bf16's mantissa cannot hold
    # The real blow-up: a tenth of the configured 5e-3 first.
    assert changes[0] == "training.learning_rate=5.0e-04", changes


def test_an_fp16_overflow_keeps_the_bf16_fix_first(tmp_path, capsys):
    changes = overflow_changes(tunewise_run(tmp_path / "run", overflow(), precision="fp16"))
    assert changes[0] == "model.precision=bf16" and "model.precision=fp32" not in changes
    watched = fix_lines(doctor_text(watched_run(tmp_path / "watched", overflow(), "fp16"), capsys))
    assert watched[0] == "bf16=True", watched  # the same advice, as the script's TrainingArguments


def test_an_fp32_overflow_gets_neither_half_precision_fix(tmp_path):
    changes = overflow_changes(tunewise_run(tmp_path / "run", overflow(), precision="fp32"))
    assert not BF16 & set(changes) and "model.precision=fp32" not in changes, changes
    assert changes[0] == "training.learning_rate=5.0e-04"


def test_a_bf16_overflow_in_a_watched_run_reads_as_training_arguments(tmp_path, capsys):
    changes = fix_lines(doctor_text(watched_run(tmp_path / "run", overflow(), "bf16"), capsys))
    assert "bf16=True" not in changes and "bf16=False fp16=False" in changes, changes
    assert changes[0] == "learning_rate=5.0e-04"


def test_a_hidden_nan_gets_the_half_precision_fix_of_its_precision(tmp_path):
    """A NaN the logging filter wrote as 0.0 (grad norm NaN): bf16 suggests fp32, fp16 suggests bf16."""
    records = [r if r["step"] < 15 else {**r, "loss": 0.0} for r in diverging()]
    by_precision = {}
    for precision in ("bf16", "fp16", "fp32"):
        d = diagnose_path(tunewise_run(tmp_path / precision, records, precision))
        found = next(f for f in d.findings if f.code == "non_finite")
        assert found.evidence["nan_hidden_by_logging_filter"] is True
        by_precision[precision] = [fix.change for fix in found.fixes]
    assert (
        "model.precision=bf16" not in by_precision["bf16"] and "model.precision=fp32" in by_precision["bf16"]
    )
    assert "model.precision=bf16" in by_precision["fp16"]
    assert not (BF16 | {"model.precision=fp32"}) & set(by_precision["fp32"])
    assert all("training.logging_nan_inf_filter=false" in c for c in by_precision.values())


def test_the_doctor_that_speaks_a_script_words_stays_torch_free():
    code = (
        "import sys, tunewise.doctor.findings, tunewise.doctor.diagnose; "
        "assert not {'torch', 'transformers'} & set(sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src")}
    )
    assert done.returncode == 0, done.stderr
