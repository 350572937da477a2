"""Config: sections, overrides, every TrainingArguments field, legacy names, errors that teach."""

from __future__ import annotations

import dataclasses
import enum
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

from tunewise.cli import main
from tunewise.config import IGNORED_TRAINING_KEYS, load_config
from tunewise.errors import ConfigError

REPO = Path(__file__).parent.parent


def _error(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_defaults_are_the_lessons():
    cfg = load_config(None)
    t = cfg.training
    assert cfg.model.method == "qlora" and cfg.adapter.r == 8 and cfg.adapter.alpha == 16
    assert cfg.adapter.dropout == 0.05 and cfg.adapter.target_modules == "all-linear"
    assert t["learning_rate"] == 2e-4 and t["lr_scheduler_type"] == "cosine" and t["warmup_steps"] == 0.03
    assert t["per_device_train_batch_size"] == 4 and t["gradient_accumulation_steps"] == 4
    assert t["num_train_epochs"] == 3 and t["optim"] == "paged_adamw_32bit" and t["weight_decay"] == 0.001
    assert t["max_grad_norm"] == 0.3 and t["gradient_checkpointing"] is True
    assert (t["logging_steps"], t["eval_steps"], t["save_steps"], t["save_total_limit"]) == (10, 50, 100, 3)
    assert t["load_best_model_at_end"] and t["metric_for_best_model"] == "eval_loss"
    assert t["report_to"] == ["tensorboard"] and t["logging_nan_inf_filter"] is False
    assert load_config(None, ["model.method=full"]).training["learning_rate"] == 2e-5


def test_every_training_arguments_field_is_accepted_by_its_own_name(tmp_path):
    """A YAML that sets every TrainingArguments field of the installed release to its own default loads,
    and each value is kept as written (the lesson's defaults never overwrite what the user wrote)."""
    written = {}
    for f in dataclasses.fields(TrainingArguments):
        if not f.init or f.name in IGNORED_TRAINING_KEYS:
            continue
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        written[f.name] = value.value if isinstance(value, enum.Enum) else value
    assert len(written) > 100 and "learning_rate" in written and "neftune_noise_alpha" in written
    path = tmp_path / "every.yaml"
    path.write_text(yaml.safe_dump({"training": written}))
    training = load_config(path).training
    assert {k: training.get(k, "<dropped>") for k in written} == written
    assert training["learning_rate"] == 5e-5  # transformers' default as written, not the lesson's 2e-4
    cfg = load_config(None, ["training.adam_beta2=0.95", "training.lr_scheduler_kwargs={}"])
    assert cfg.training["adam_beta2"] == 0.95 and cfg.training["lr_scheduler_kwargs"] == {}


def test_misspelled_key_names_file_line_and_suggestion(tmp_path):
    msg = _error(tmp_path, "model:\n  method: lora\ntraining:\n  learing_rate: 1e-4\n")
    assert "run.yaml:4" in msg and "training.learing_rate" in msg and "did you mean `learning_rate`" in msg


def test_all_problems_are_reported_at_once(tmp_path):
    msg = _error(
        tmp_path,
        "model:\n  method: lorra\nadapter:\n  rank: 8\n  dropout: 1.5\ntraining:\n  num_train_epochs: many\n",
        ["data.train_onn=all"],
    )
    assert "5 problem(s)" in msg
    assert "run.yaml:2: `model.method`" in msg and "'qlora'" in msg
    assert "adapter.rank" in msg and "did you mean `r`" in msg
    assert "adapter.dropout" in msg and "[0, 1)" in msg
    assert "num_train_epochs" in msg and "a number" in msg
    assert "override `data.train_onn=all`" in msg and "did you mean `train_on`" in msg


def test_unknown_section_and_bad_yaml(tmp_path):
    assert "did you mean `training`" in _error(tmp_path, "trainig:\n  learning_rate: 1e-4\n")
    msg = _error(tmp_path, "model:\n  method: [lora\n")
    assert "run.yaml:" in msg and "not valid YAML" in msg


def test_overrides_parse_values_and_legacy_names_map_with_notices():
    cfg = load_config(
        None,
        [
            "training.learning_rate=1e-4",
            "adapter.target_modules=[q_proj,v_proj]",
            "training.warmup_ratio=0.1",
            "training.evaluation_strategy=epoch",
            "training.max_seq_length=256",
        ],
    )
    assert cfg.training["learning_rate"] == 1e-4 and cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.training["warmup_steps"] == 0.1 and cfg.training["eval_strategy"] == "epoch"
    assert cfg.data.max_seq_length == 256
    assert cfg.training["save_strategy"] == "epoch"  # follows eval_strategy: load_best_model_at_end needs it
    assert len(cfg.notices) == 4 and sum("override" in n for n in cfg.notices) == 3


def test_values_outside_what_can_work_are_rejected():
    with pytest.raises(ConfigError, match="learning rate >= 1 always diverges"):
        load_config(None, ["training.learning_rate=3"])
    with pytest.raises(ConfigError, match="max_grad_norm"):
        load_config(None, ["training.max_grad_norm=-1"])


def test_init_writes_every_default_with_comments_and_it_loads(tmp_path):
    path = tmp_path / "starter.yaml"
    assert main(["init", str(path)]) == 0
    text = path.read_text()
    cfg = load_config(path)
    assert cfg.to_dict() == load_config(None).to_dict()
    written = yaml.safe_load(text)
    keys = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    sections = [line for line in keys if line.endswith(":") and not line.startswith(" ")]
    settings = [line for line in keys if line not in sections]
    # every key init writes carries its one-line comment (model.name/method/precision were bare once)
    bare = [line for line in settings if "  # " not in line or not line.split("  # ", 1)[1].strip()]
    assert bare == [], bare
    n_settings = sum(len(v) if isinstance(v, dict) else 1 for v in written.values())
    assert len(settings) == n_settings
    for key in ["model:", "  name:", "  method:", "  precision:"]:
        assert any(line.startswith(key) for line in keys), key
    assert main(["init", str(path)]) == 2  # refuses to overwrite without --force


def shipped_yamls() -> list[Path]:
    """Every tunewise config in the repository (not other tools' files kept as doctor fixtures)."""
    foreign = REPO / "tests" / "fixtures"
    return sorted(
        p
        for p in REPO.rglob("*.yaml")
        if not {".venv", "runs", ".cache"} & set(p.parts) and foreign not in p.parents
    )


@pytest.mark.parametrize("path", shipped_yamls(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_loads_and_validates(path):
    load_config(path)


def test_cli_user_error_exits_2_with_one_message_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learing_rate: 1e-4\n")
    proc = subprocess.run(
        [sys.executable, "-m", "tunewise.cli", "plan", str(bad)], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "bad.yaml:2" in proc.stderr and "learning_rate" in proc.stderr


def test_help_explains_every_command():
    proc = subprocess.run([sys.executable, "-m", "tunewise.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ["init", "plan", "check", "inspect", "train", "doctor", "eval", "demo"]:
        assert command in proc.stdout
        sub = subprocess.run(
            [sys.executable, "-m", "tunewise.cli", command, "--help"], capture_output=True, text=True
        )
        assert sub.returncode == 0 and len(sub.stdout.splitlines()) > 3, command


def test_a_moved_training_key_reports_its_problem_where_the_user_wrote_it(tmp_path):
    """training.max_seq_length is data.max_seq_length now; a bad value is shown at the override or line."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.max_seq_length="])
    assert err.value.problems == ["override `training.max_seq_length=` is None; expected an integer"]
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  learning_rate: 1.0e-4\n  max_seq_length: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    assert err.value.problems == [f"{path}:3: `data.max_seq_length` is 3; must be >= 8 tokens"]
