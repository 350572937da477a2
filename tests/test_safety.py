"""Safe by default (#13): no name places files outside output_dir, no pickle or remote code unless asked,
and no secret from the environment reaches anything a run writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import tiny_overrides

from tunewise.config import load_config, run_name_problem

try:  # the architect moves ConfigError into errors.py; both homes are the same class
    from tunewise.errors import ConfigError
except ImportError:
    from tunewise.config import ConfigError

REPO = Path(__file__).parents[1]
ESCAPING_NAMES = ["../../../tmp/x", "/tmp/x", "a/b", "a\\b", "..", ".", "", "  ", "C:x", "run\0x"]


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_a_run_name_that_could_leave_output_dir_is_a_config_error_with_the_fix(tmp_path, name):
    path = tmp_path / "run.yaml"
    path.write_text(f"name: {name!r}\n".replace("'", '"') if "\0" not in name else 'name: "run\\0x"\n')
    with pytest.raises(
        ConfigError,
        match=rf"{re.escape(str(path))}:1: `name` is .*one directory name under "
        r"`output_dir`.*use e\.g\. `name: [\w.-]+`",
    ):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override `name=.*` is .*one directory name"):
        load_config(None, [f"name={name}"] if name.strip() else ['name=" "'])


@pytest.mark.parametrize("name", ["my-run", "lora_r8.lr2e-4", "run 1", "über", "a..b"])
def test_ordinary_run_names_are_accepted(name):
    assert run_name_problem(name) is None
    assert load_config(None, [f"name={name}"]).name == name


def test_train_with_an_escaping_name_writes_nothing_outside(tmp_path, capsys):
    from tunewise.cli import main

    out = tmp_path / "deep" / "runs"
    assert main(["train", f"output_dir={out}", "name=../../escaped", "--quiet"]) == 2
    assert "one directory name under `output_dir`" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists() and not out.exists()


def test_trust_remote_code_and_pickles_are_off_unless_asked_and_then_said(tmp_path):
    cfg = load_config(None)
    assert cfg.model.trust_remote_code is False and cfg.model.allow_pickle is False
    assert not any("trust_remote_code" in n or "allow_pickle" in n for n in cfg.notices)
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  trust_remote_code: true\n  allow_pickle: true\n")
    notices = load_config(path).notices
    assert f"{path}:2: `model.trust_remote_code` is on: Python code shipped with" in notices[0]
    assert f"{path}:3: `model.allow_pickle` is on: weights may load from pickle files" in notices[1]


def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in (REPO / folder).rglob("*.py") if ".venv" not in p.parts]


def test_torch_load_is_only_called_with_weights_only_true():
    calls = [
        (path, line)
        for path in _python_files("src", "benchmarks", "scripts")
        for line in path.read_text(encoding="utf-8").splitlines()
        if re.search(r"\btorch\.load\(", line)
    ]
    unsafe = [
        f"{p.relative_to(REPO)}: {line.strip()}" for p, line in calls if "weights_only=True" not in line
    ]
    assert not unsafe, unsafe


def test_tests_too_call_torch_load_only_with_weights_only_true():
    unsafe = [
        f"{p.relative_to(REPO)}: {line.strip()}"
        for p in _python_files("tests")
        for line in p.read_text(encoding="utf-8").splitlines()
        if re.search(r"\btorch\.load\(", line)
        and "weights_only=True" not in line
        and p.name != "test_safety.py"
    ]
    assert not unsafe, unsafe


def test_no_source_file_turns_trust_remote_code_on_by_itself():
    hits = [
        f"{p.relative_to(REPO)}: {line.strip()}"
        for p in _python_files("src")
        for line in p.read_text(encoding="utf-8").splitlines()
        if re.search(r"trust_remote_code\s*=\s*True", line)
    ]
    assert not hits, hits


SECRETS = {
    "HF_TOKEN": "hf_FAKEtunewiseSecret0123456789abcd",
    "HUGGING_FACE_HUB_TOKEN": "hf_FAKEtunewiseHubSecret98765",
    "WANDB_API_KEY": "FAKEwandbSecret0123456789abcdef01234567",
    "OPENAI_API_KEY": "sk-FAKEtunewiseSecret",
}


@pytest.mark.model
def test_no_secret_from_the_environment_reaches_the_run_directory(
    tiny_model_dir, small_data, tmp_path, monkeypatch
):
    from tunewise.training.run import train

    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # a key in the environment must not switch reporting on
    cfg = load_config(
        None, tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", {"name": "secrets"})
    )
    result = train(cfg)
    assert result.status == "completed", result.error
    run_dir = tmp_path / "runs" / "secrets"
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "plan.json", "result.json", "metrics.jsonl"} <= names, names
    assert any(p.name == "training_args.bin" for p in files)  # checkpoints are searched too
    leaks = [
        f"{p.relative_to(run_dir)} holds {key}"
        for p in files
        for key, value in SECRETS.items()
        if value.encode() in p.read_bytes()
    ]
    assert not leaks, leaks


def test_weights_load_only_from_safetensors_unless_allowed(tmp_path):
    """A model saved as a pickle (pytorch_model.bin) is refused with the fix; allow_pickle loads it."""
    import torch
    from conftest import make_tiny_model
    from transformers import AutoModelForCausalLM

    from tunewise.config import load_config
    from tunewise.errors import ModelError
    from tunewise.model import load_base_model, resolve_hardware

    directory = make_tiny_model(tmp_path / "pickled")
    torch.save(AutoModelForCausalLM.from_pretrained(directory).state_dict(), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    assert (directory / "pytorch_model.bin").is_file()
    cfg = load_config(None, [f"model.name={directory}", "model.method=lora", f"output_dir={tmp_path}"])
    with pytest.raises(ModelError, match="model.allow_pickle: true"):
        load_base_model(cfg, resolve_hardware(cfg))
    cfg = load_config(None, [f"model.name={directory}", "model.method=lora", "model.allow_pickle=true"])
    assert load_base_model(cfg, resolve_hardware(cfg)) is not None
