"""Hostile and broken input never gives a traceback (#13): property-based tests over every loader.

Each loader — the config (YAML file + `key=value` overrides), every data file type (JSONL, JSON,
CSV, Parquet, `save_to_disk` directories) in every row format, and the doctor's inputs
(trainer_state.json, metrics.jsonl, TensorBoard event files, LLaMA-Factory trainer_log.jsonl, a
run's config.yaml / plan.json / result.json) — is fed generated input. Only ConfigError, DataError
or DoctorError may escape, each naming the file (with its line where one is at fault) or the
override as written, and the user's files are never modified (hashed before and after).

The generated cases are counted; `pytest -s` prints the total at the end of the module.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TOKENIZERS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunewise.config import DataConfig, load_config
from tunewise.data import build_datasets
from tunewise.doctor.diagnose import diagnose_path, render_diagnosis
from tunewise.errors import DataError, DoctorError

try:  # the architect moves ConfigError into errors.py; both homes are the same class
    from tunewise.errors import ConfigError
except ImportError:
    from tunewise.config import ConfigError

PROJECT_ERRORS = (ConfigError, DataError, DoctorError)
CASES: Counter[str] = Counter()
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)

# ----------------------------------------------------------------------------- generated values

NASTY_TEXT = [
    "\ud800",  # a lone high surrogate (JSON "\ud800"): the tokenizer's TypeError of #13
    "\udfff",
    "\udc80",  # the half surrogateescape uses for an undecodable byte
    "\x00",
    "\u2028",
    "\ufeff",
    "<|im_end|>",
    "<|im_start|>assistant\n",
    "{{ raise_exception('boom') }}",
    "{% for x in y %}",
    "\r\n",
    "",
    " ",
    "ü" * 300,
]
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(NASTY_TEXT),
    st.lists(st.one_of(st.text(max_size=8), st.sampled_from(NASTY_TEXT)), max_size=4).map("".join),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=12,
)
ROLES = ["user", "assistant", "system", "human", "gpt", "tool", "", "USER", None, 3]
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": texts}),
        st.fixed_dictionaries({"from": st.sampled_from(ROLES), "value": texts}),
        json_values,
    ),
    max_size=5,
)
FORMAT_ROWS = {
    "messages": st.fixed_dictionaries({"messages": st.one_of(messages, json_values)}),
    "sharegpt": st.fixed_dictionaries({"conversations": st.one_of(messages, json_values)}),
    "alpaca": st.fixed_dictionaries(
        {"instruction": st.one_of(texts, json_values), "output": st.one_of(texts, json_values)},
        optional={"input": st.one_of(texts, json_values)},
    ),
    "prompt_completion": st.fixed_dictionaries(
        {"prompt": st.one_of(texts, json_values), "completion": st.one_of(texts, json_values)}
    ),
    "text": st.fixed_dictionaries({"text": st.one_of(texts, json_values)}),
}
rows = st.one_of(*FORMAT_ROWS.values(), json_values)


def _mutate(data: bytes, how: str, at: float) -> bytes:
    """Damage a file the ways real files get damaged: cut short, a bad byte, a nesting bomb, a huge number."""
    cut = int(len(data) * at)
    return {
        "none": data,
        "truncate": data[:cut],
        "bad_byte": data[:cut] + b"\xff\xfe" + data[cut:],
        "nul": data[:cut] + b"\x00" + data[cut:],
        "deep": data[:cut] + b"[" * 100_000 + data[cut:],
        "deep_closed": data + b"\n" + b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}\n",
        "big_int": data + b'\n{"text": ' + b"9" * 5000 + b"}\n",
        "bom": b"\xef\xbb\xbf" + data,
        "crlf": data.replace(b"\n", b"\r\n"),
    }[how]


mutations = st.sampled_from(
    ["none", "none", "truncate", "bad_byte", "nul", "deep", "deep_closed", "big_int", "bom", "crlf"]
)
positions = st.floats(min_value=0, max_value=1)

# ----------------------------------------------------------------------------- the contract


def _hashes(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def expect_clean(call: Any, inputs: Path, names: list[str], kind: str) -> Any:
    """Run `call`: it returns, or raises a project error naming one of `names`; `inputs` stay unmodified."""
    CASES[kind] += 1
    before = _hashes(inputs)
    result = None
    try:
        result = call()
    except PROJECT_ERRORS as exc:
        text = str(exc)
        assert any(name in text for name in names), f"the error names no input ({names}): {text}"
        for problem in getattr(exc, "problems", []):  # a ConfigError: every problem says where
            assert any(name in problem for name in names) or "override `" in problem, problem
    assert _hashes(inputs) == before, "an input file was modified"
    return result


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "smollm2")
    yield tok
    print(f"\nhostile-input cases run: {sum(CASES.values())} {dict(CASES)}")


# ----------------------------------------------------------------------------- the two crashes of #13


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_lone_surrogate_is_a_bad_row_not_a_type_error(tmp_path, tokenizer, policy):
    path = tmp_path / "train.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}'
    bad = '{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "ok"}]}'
    path.write_text(f"{good}\n{bad}\n", encoding="utf-8")
    cfg = DataConfig(train=str(path), on_bad_rows=policy)
    if policy == "error":
        with pytest.raises(DataError, match=rf"{path}:2: message 0 \(user\) holds a lone UTF-16 surrogate"):
            build_datasets(cfg, tokenizer)
    else:
        bundle = build_datasets(cfg, tokenizer)
        assert len(bundle.train) == 1 and bundle.stats.skipped_bad_rows == {"bad_text": 1}


def test_deeply_nested_brackets_are_a_bad_row_not_a_recursion_error(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: not readable JSON \(nested too deep"):
        build_datasets(DataConfig(train=str(path), format="text"), tokenizer)
    as_json = tmp_path / "train.json"
    as_json.write_text('[{"text": "a"},\n' + "[" * 100_000 + "]" * 100_000 + "]", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{as_json}:2: not readable JSON"):
        build_datasets(DataConfig(train=str(as_json), format="text"), tokenizer)


def test_a_deep_or_undecodable_or_surrogate_config_is_a_config_error_with_its_line(tmp_path):
    cases = {
        "deep.yaml": (
            "training:\n  seed: " + "[" * 5000 + "]" * 5000 + "\n",
            r"deep.yaml:2: cannot read the YAML",
        ),
        "latin1.yaml": ("name: ok\nmodel:\n  name: caf\xe9\n", r"latin1.yaml:3: byte 0xe9 is not UTF-8"),
        "surrogate.yaml": (
            'data:\n  system_prompt: "\\ud800"\n',
            r"surrogate.yaml:2: `data.system_prompt` holds",
        ),
        "bigint.yaml": ("training:\n  seed: " + "9" * 5000 + "\n", r"bigint.yaml:2: cannot read the YAML"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(text.encode("latin-1") if "latin1" in name else text.encode("utf-8"))
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def test_an_alias_bomb_config_is_read_in_linear_time(tmp_path):
    lines = ["a0: &a0 {x: 1, y: 1}", *(f"a{i}: &a{i} {{x: *a{i - 1}, y: *a{i - 1}}}" for i in range(1, 60))]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"bomb.yaml:1: `a0` is not a config section"):
        load_config(path)


# ----------------------------------------------------------------------------- config: YAML + overrides

TRAINING_KEYS = [
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "eval_steps",
    "save_steps",
    "save_strategy",
    "eval_strategy",
    "evaluation_strategy",
    "warmup_ratio",
    "warmup_steps",
    "logging_steps",
    "load_best_model_at_end",
    "lr_scheduler_type",
    "optim",
    "seed",
    "max_grad_norm",
    "save_total_limit",
    "gradient_accumulation_steps",
    "max_seq_length",
    "output_dir",
    "learing_rate",
    "report_to",
]
SECTION_KEYS = {
    "model": ["name", "method", "precision", "trust_remote_code", "keep_unquantized", "rank"],
    "adapter": ["r", "alpha", "dropout", "target_modules", "bias", "lora_r"],
    "data": [
        "train",
        "validation",
        "validation_split",
        "format",
        "columns",
        "max_seq_length",
        "train_on",
        "too_long",
        "on_bad_rows",
        "system_prompt",
        "chat_template",
        "seed",
    ],
    "doctor": ["on_divergence", "max_recoveries", "early_stopping_patience"],
    "training": TRAINING_KEYS,
}
config_values = st.one_of(
    json_values,
    st.sampled_from(
        [5, 10, 20, 0, -1, 0.5, "steps", "epoch", "no", "1e-4", "../../etc", "/tmp/x", "a/b", ".."]
    ),
)
config_docs = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            **{
                section: st.one_of(
                    st.dictionaries(st.sampled_from(keys), config_values, max_size=5), json_values
                )
                for section, keys in SECTION_KEYS.items()
            },
            "name": config_values,
            "output_dir": config_values,
            "unknown_section": json_values,
        },
    ),
    json_values,
)
override_keys = st.one_of(
    st.sampled_from([f"{s}.{k}" for s, keys in SECTION_KEYS.items() for k in keys] + ["name", "output_dir"]),
    texts,
)
overrides = st.lists(
    st.one_of(
        st.tuples(
            override_keys,
            st.one_of(texts, st.sampled_from(["[" * 3000, "9" * 5000, "{a: [", "!!python/object:os.system"])),
        ).map(lambda kv: f"{kv[0]}={kv[1]}"),
        texts,
    ),
    max_size=3,
)


@FUZZ
@given(doc=config_docs, how=mutations, at=positions, extra=overrides)
def test_config_yaml_and_overrides_never_give_a_traceback(tmp_path_factory, doc, how, at, extra):
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    text = yaml.safe_dump(doc, allow_unicode=True) if isinstance(doc, dict) else json.dumps(doc)
    path.write_bytes(_mutate(text.encode("utf-8", "surrogatepass"), how, at))
    expect_clean(lambda: load_config(path, extra), path, [str(path), "override `"], "config")


@settings(max_examples=60, deadline=None)
@given(extra=overrides)
def test_overrides_alone_never_give_a_traceback(extra):
    CASES["overrides"] += 1
    try:
        load_config(None, extra)
    except ConfigError as exc:
        assert all("override `" in p or "config" in p for p in exc.problems), exc.problems


# ---------------------------------------------------------------- data: every format and file type


def _write_jsonl(path: Path, items: list[Any]) -> None:
    lines = [json.dumps(r, ensure_ascii=bool(i % 2)) for i, r in enumerate(items)]
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))


def _write_json(path: Path, items: list[Any]) -> None:
    path.write_bytes(
        json.dumps({"data": items} if len(items) % 2 else items).encode("utf-8", "surrogatepass")
    )


def _write_csv(path: Path, items: list[Any]) -> None:
    dicts = [r for r in items if isinstance(r, dict)] or [{"text": "x"}]
    columns = sorted({str(k) for r in dicts for k in r})
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in dicts:
        writer.writerow({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})
    path.write_bytes(out.getvalue().encode("utf-8", "surrogatepass"))


WRITERS = {"train.jsonl": _write_jsonl, "train.json": _write_json, "train.csv": _write_csv}
data_configs = st.fixed_dictionaries(
    {
        "format": st.sampled_from(["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]),
        "on_bad_rows": st.sampled_from(["error", "skip"]),
        "train_on": st.sampled_from(["assistant", "last", "all"]),
        "too_long": st.sampled_from(["truncate", "drop", "error"]),
        "max_seq_length": st.sampled_from([8, 16, 512]),
        "system_prompt": st.one_of(st.none(), st.text(max_size=10)),
    }
)


def _build(tokenizer: Any, path: Path, options: dict[str, Any]) -> Any:
    return build_datasets(DataConfig(train=str(path), **options), tokenizer)


@pytest.mark.parametrize("name", sorted(WRITERS))
@FUZZ
@given(items=st.lists(rows, min_size=0, max_size=5), how=mutations, at=positions, options=data_configs)
def test_text_data_files_never_give_a_traceback(tmp_path_factory, tokenizer, name, items, how, at, options):
    path = tmp_path_factory.mktemp("data") / name
    WRITERS[name](path, items)
    path.write_bytes(_mutate(path.read_bytes(), how, at))
    expect_clean(lambda: _build(tokenizer, path, options), path, [str(path)], name.split(".")[1])


@FUZZ
@given(
    fmt=st.sampled_from(sorted(FORMAT_ROWS)),
    items=st.lists(st.data(), min_size=1, max_size=4),
    options=data_configs,
    kind=st.sampled_from(["parquet", "save_to_disk"]),
)
def test_parquet_and_saved_datasets_never_give_a_traceback(
    tmp_path_factory, tokenizer, fmt, items, options, kind
):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    # Columnar files need one schema: every row of a file has the same fields, with string or null values
    # (and a list of messages for the chat formats), drawn per file.
    table_rows = []
    for draw in items:
        row = draw.draw(FORMAT_ROWS[fmt])
        table_rows.append(
            {k: v if isinstance(v, str | type(None)) else json.dumps(v) for k, v in row.items()}
        )
    keys = sorted({k for r in table_rows for k in r})
    table_rows = [
        {k: (r.get(k) or "").encode("utf-8", "surrogatepass").decode("utf-8", "replace") for k in keys}
        for r in table_rows
    ]
    root = tmp_path_factory.mktemp("columnar")
    if kind == "parquet":
        path = root / "train.parquet"
        pq.write_table(pa.Table.from_pylist(table_rows), path)
    else:
        path = root / "train"
        Dataset.from_list(table_rows).save_to_disk(str(path))
    options = {**options, "format": fmt}
    expect_clean(lambda: _build(tokenizer, path, options), path, [str(path)], kind)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    blob=st.binary(max_size=300),
    name=st.sampled_from(["train.parquet", "train.jsonl", "train.json", "train.csv"]),
)
def test_arbitrary_bytes_as_any_data_file_never_give_a_traceback(tmp_path_factory, tokenizer, blob, name):
    path = tmp_path_factory.mktemp("bytes") / name
    path.write_bytes(blob)
    expect_clean(lambda: _build(tokenizer, path, {}), path, [str(path)], "bytes")


def test_a_damaged_saved_dataset_directory_is_a_data_error(tmp_path, tokenizer):
    from datasets import Dataset, DatasetDict

    saved = tmp_path / "saved"
    Dataset.from_list([{"text": "a"}]).save_to_disk(str(saved))
    for victim in saved.iterdir():
        victim.write_bytes(b"\x00garbage")
    expect_clean(lambda: _build(tokenizer, saved, {}), saved, [str(saved)], "save_to_disk")
    split_dir = tmp_path / "dict"
    DatasetDict({"train": Dataset.from_list([{"text": "a"}])}).save_to_disk(str(split_dir))
    (split_dir / "dataset_dict.json").write_text("[[[not json")
    with pytest.raises(DataError, match=rf"{split_dir}: is a DatasetDict"):
        _build(tokenizer, split_dir, {})


# ----------------------------------------------------------------------------- doctor inputs

# Mostly plausible numbers, so that generated logs get past their first entry to the odd one.
plausible = st.one_of(st.integers(min_value=0, max_value=500), st.floats(min_value=0, max_value=10))
odd_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**20), max_value=10**20),
    json_values,
)
log_numbers = st.one_of(plausible, plausible, plausible, odd_numbers)
train_records = st.fixed_dictionaries(
    {"step": log_numbers, "loss": log_numbers},
    optional={
        "grad_norm": log_numbers,
        "learning_rate": log_numbers,
        "epoch": log_numbers,
        "type": st.sampled_from(["train", "train", "eval", "other"]),
        "trained_tokens": log_numbers,
    },
)
eval_records = st.fixed_dictionaries(
    {"step": log_numbers, "eval_loss": log_numbers},
    optional={"epoch": log_numbers, "eval_accuracy": log_numbers, "type": st.just("eval")},
)
stepless = st.one_of(st.fixed_dictionaries({"loss": log_numbers}), json_values)
log_records = st.lists(st.one_of(train_records, train_records, eval_records, stepless), max_size=8)


def _diagnose(path: Path) -> None:
    render_diagnosis(diagnose_path(path))


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


DEEP = "[" * 5000 + "]" * 5000
KNOWN_DOCTOR_CRASHES = {  # the minimal inputs the fuzz tests below found (fixed in doctor/curve.py)
    "bracket_bomb_trainer_state": {"trainer_state.json": '{"log_history": ' + DEEP + "}"},
    "bracket_bomb_metrics": {"metrics.jsonl": '{"step": 1, "loss": 1.0}\n' + DEEP + "\n"},
    "nan_step": {"metrics.jsonl": '{"step": NaN, "loss": 1.0}\n'},
    "infinite_step": {"trainer_state.json": '{"log_history": [{"step": Infinity, "loss": 1.0}]}'},
    "config_is_text": {"metrics.jsonl": '{"step": 1, "loss": 1.0}\n', "config.yaml": "just text\n"},
    "config_section_is_text": {"metrics.jsonl": '{"step": 1, "loss": 1.0}\n', "config.yaml": "model: lora\n"},
    "best_checkpoint_not_a_path": {
        "trainer_state.json": '{"log_history": [{"step": 1, "loss": 1.0}, {"step": 1, "eval_loss": 1.0}], '
        '"best_model_checkpoint": true}'
    },
}


@pytest.mark.parametrize("case", sorted(KNOWN_DOCTOR_CRASHES))
def test_known_doctor_crashes_are_doctor_errors_or_verdicts(tmp_path, case):
    for name, text in KNOWN_DOCTOR_CRASHES[case].items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    before = _hashes(tmp_path)
    try:
        _diagnose(tmp_path)
    except DoctorError as exc:
        assert str(tmp_path) in str(exc)
    assert _hashes(tmp_path) == before


@FUZZ
@given(
    records=log_records,
    how=mutations,
    at=positions,
    layout=st.sampled_from(["file", "dir", "checkpoint"]),
    extra=st.dictionaries(
        st.sampled_from(["max_steps", "best_model_checkpoint", "global_step"]), json_values
    ),
)
def test_trainer_state_json_never_gives_a_traceback(tmp_path_factory, records, how, at, layout, extra):
    root = tmp_path_factory.mktemp("hf")
    folder = root / "checkpoint-10" if layout == "checkpoint" else root
    folder.mkdir(exist_ok=True)
    path = folder / "trainer_state.json"
    path.write_bytes(_mutate(_dumps({"log_history": records, **extra}), how, at))
    target = path if layout == "file" else root
    expect_clean(lambda: _diagnose(target), root, [str(root)], "trainer_state")


@FUZZ
@given(
    records=log_records,
    how=mutations,
    at=positions,
    context=st.fixed_dictionaries(
        {},
        optional={
            "config.yaml": st.one_of(config_docs, texts),
            "plan.json": st.one_of(
                json_values,
                st.fixed_dictionaries(
                    {},
                    optional={"steps": json_values, "warmup_steps": json_values, "vocab_size": json_values},
                ),
            ),
            "result.json": st.one_of(json_values, st.fixed_dictionaries({"status": json_values})),
        },
    ),
)
def test_metrics_jsonl_and_run_context_never_give_a_traceback(tmp_path_factory, records, how, at, context):
    root = tmp_path_factory.mktemp("run")
    (root / "metrics.jsonl").write_bytes(_mutate(b"\n".join(_dumps(r) for r in records), how, at))
    for name, value in context.items():
        data = (
            yaml.safe_dump(value).encode("utf-8", "surrogatepass") if name.endswith("yaml") else _dumps(value)
        )
        (root / name).write_bytes(data)
    expect_clean(lambda: _diagnose(root), root, [str(root)], "metrics_jsonl")


@FUZZ
@given(
    records=st.lists(
        st.fixed_dictionaries(
            {"current_steps": log_numbers, "loss": log_numbers},
            optional={
                "total_steps": log_numbers,
                "lr": log_numbers,
                "epoch": log_numbers,
                "eval_loss": log_numbers,
                "percentage": log_numbers,
                "elapsed_time": texts,
            },
        ),
        max_size=8,
    ),
    how=mutations,
    at=positions,
    as_dir=st.booleans(),
)
def test_llamafactory_trainer_log_never_gives_a_traceback(tmp_path_factory, records, how, at, as_dir):
    root = tmp_path_factory.mktemp("llamafactory")
    path = root / "trainer_log.jsonl"
    path.write_bytes(_mutate(b"\n".join(_dumps(r) for r in records), how, at))
    expect_clean(lambda: _diagnose(root if as_dir else path), root, [str(root)], "trainer_log")


def _event_file(folder: Path, scalars: list[tuple[str, int, float]]) -> Path:
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(folder))
    for tag, step, value in scalars:
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
        writer.add_event(event_pb2.Event(step=step, wall_time=1.0, summary=summary))
    writer.close()
    return next(folder.glob("events.out.tfevents.*"))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    scalars=st.lists(
        st.tuples(
            st.sampled_from(["train/loss", "eval/loss", "train/grad_norm", "loss", "other"]),
            st.integers(min_value=-(2**62), max_value=2**62),
            st.floats(allow_nan=True, allow_infinity=True, width=32),
        ),
        max_size=8,
    ),
    how=st.sampled_from(["none", "truncate", "bad_byte", "nul"]),
    at=positions,
    as_dir=st.booleans(),
)
def test_tensorboard_event_files_never_give_a_traceback(tmp_path_factory, scalars, how, at, as_dir):
    root = tmp_path_factory.mktemp("tb")
    path = _event_file(root, scalars)
    path.write_bytes(_mutate(path.read_bytes(), how, at))
    expect_clean(lambda: _diagnose(root if as_dir else path), root, [str(root)], "tensorboard")


# ----------------------------------------------------------------------------- what transformers refuses


def test_a_config_transformers_refuses_fails_at_load_at_the_key_written(tmp_path, capsys):
    from tunewise.cli import main

    path = tmp_path / "run.yaml"
    path.write_text("name: cadence\ntraining:\n  eval_steps: 10\n  save_steps: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:4: `training.save_steps` must be a multiple of `eval_steps` (10) because "
        "`load_best_model_at_end` is on: use 10 or 20 (or set `training.load_best_model_at_end: false`)"
    ]
    assert main(["check", str(path)]) == 2  # `check` refuses it before any weights load, no traceback
    assert "`training.save_steps` must be a multiple of `eval_steps` (10)" in capsys.readouterr().err
    written = ["training.eval_steps=30", "training.save_steps=100"]
    with pytest.raises(ConfigError, match=r"override `training.save_steps=100` must be .* use 90 or 120"):
        load_config(None, written)
    cfg = load_config(None, ["training.eval_steps=30"])  # a default follows the written cadence
    assert cfg.training["save_steps"] == 120 and any("save_steps=120 (not 100)" in n for n in cfg.notices)
    cfg = load_config(None, ["training.eval_strategy=epoch"])
    assert cfg.training["save_strategy"] == "epoch" and any("save_strategy follows" in n for n in cfg.notices)


def test_hardware_choices_transformers_refuses_are_blamed_on_the_precision(monkeypatch):
    from tunewise.config import validate_training_arguments

    # As on a GPU without bf16 (this machine may have any): TrainingArguments asks this function.
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: False)
    cfg = load_config(None, ["model.precision=bf16"])
    with pytest.raises(ConfigError, match=r"override `model.precision=bf16` is 'bf16', not runnable here"):
        validate_training_arguments(cfg, {"bf16": True, "use_cpu": False})
    validate_training_arguments(cfg, {"bf16": True, "use_cpu": True})  # bf16 on the CPU is allowed
