"""Tests for the bundled contacts task: generation, shipped files and scoring."""

import json

import pytest

from tunewise.task import (
    FIELDS,
    SPLIT_SIZES,
    SYSTEM_PROMPT,
    bundled_data_dir,
    generate_examples,
    generate_splits,
    score_prediction,
    score_predictions,
    write_splits,
)

REFERENCE = '{"name": "Maria Lopez", "age": 34, "city": "Denver", "job": "nurse"}'


@pytest.fixture(scope="module")
def splits():
    return generate_splits()


def _user(row):
    return row["messages"][1]["content"]


def _answer(row):
    return row["messages"][2]["content"]


def test_generate_examples_is_deterministic():
    assert generate_examples(50, seed=3) == generate_examples(50, seed=3)
    assert generate_examples(50, seed=3) != generate_examples(50, seed=4)
    assert len(generate_examples(7, seed=0)) == 7


def test_generate_splits_is_deterministic(splits):
    assert generate_splits(seed=0) == splits
    assert generate_splits(seed=1) != splits


def test_split_sizes(splits):
    sizes = {name: len(rows) for name, rows in splits.items()}
    assert sizes == SPLIT_SIZES == {"train": 800, "validation": 100, "test": 100}


def test_splits_are_disjoint_in_sentences_and_people(splits):
    sentences = {name: {_user(row) for row in rows} for name, rows in splits.items()}
    people = {name: {json.loads(_answer(row))["name"] for row in rows} for name, rows in splits.items()}
    assert sum(len(s) for s in sentences.values()) == sum(SPLIT_SIZES.values())
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not sentences[a] & sentences[b]
        assert not people[a] & people[b]


def test_rows_are_chat_examples_with_canonical_json_answers(splits):
    for row in (row for rows in splits.values() for row in rows):
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == SYSTEM_PROMPT
        record = json.loads(_answer(row))
        assert tuple(record) == FIELDS
        assert json.dumps(record, ensure_ascii=True) == _answer(row)
        assert isinstance(record["age"], int) and 18 <= record["age"] <= 80
        sentence = _user(row).split("\n", 1)[1]
        for value in record.values():
            assert str(value) in sentence


def test_shipped_files_equal_a_fresh_generation(tmp_path):
    fresh = write_splits(tmp_path)
    for split, path in fresh.items():
        shipped = bundled_data_dir() / f"{split}.jsonl"
        assert shipped.read_bytes() == path.read_bytes(), "run `python scripts/make_dataset.py`"


def test_write_splits_round_trips(tmp_path, splits):
    paths = write_splits(tmp_path / "new")
    assert sorted(p.name for p in paths.values()) == ["test.jsonl", "train.jsonl", "validation.jsonl"]
    rows = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    assert rows == splits["test"]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        (REFERENCE, {"exact": True, "valid_json": True, "field_accuracy": 1.0}),
        ("  " + REFERENCE + "\n", {"exact": True, "valid_json": True, "field_accuracy": 1.0}),
        (
            '{"name":"Maria Lopez","age":34,"city":"Denver","job":"nurse"}',
            {"exact": True, "valid_json": True, "field_accuracy": 1.0},
        ),
        (
            '{"name": "Maria Lopez", "age": 34, "city": "Boston", "job": "nurse"}',
            {"exact": False, "valid_json": True, "field_accuracy": 0.75},
        ),
        (
            '{"name": "Maria Lopez", "age": "34", "city": "Denver", "job": "nurse"}',
            {"exact": False, "valid_json": True, "field_accuracy": 0.75},
        ),
        (
            '{"name": "Maria Lopez", "city": "Denver"}',
            {"exact": False, "valid_json": True, "field_accuracy": 0.5},
        ),
        (
            '{"name": "Maria Lopez", "age": 34, "city": "Denver", "job": "nurse", "x": 1}',
            {"exact": False, "valid_json": True, "field_accuracy": 1.0},
        ),
        (
            'Sure! {"name": "Maria Lopez", "age": 34, "city": "Denver", "job": "nurse"} Done.',
            {"exact": False, "valid_json": False, "field_accuracy": 1.0},
        ),
        (REFERENCE + "\nAnything else?", {"exact": False, "valid_json": False, "field_accuracy": 1.0}),
        ('{"name": "Maria Lopez", "age": 34', {"exact": False, "valid_json": False, "field_accuracy": 0.0}),
        ("Maria Lopez is a nurse.", {"exact": False, "valid_json": False, "field_accuracy": 0.0}),
        ('["Maria Lopez", 34]', {"exact": False, "valid_json": False, "field_accuracy": 0.0}),
        ("", {"exact": False, "valid_json": False, "field_accuracy": 0.0}),
    ],
)
def test_score_prediction(prediction, expected):
    assert score_prediction(prediction, REFERENCE) == expected


def test_score_predictions_aggregates():
    wrong_city = REFERENCE.replace("Denver", "Boston")
    result = score_predictions([REFERENCE, wrong_city, "no json", REFERENCE], [REFERENCE] * 4)
    assert result == {"n": 4, "exact_match": 0.5, "valid_json": 0.75, "field_accuracy": 0.6875}


def test_score_predictions_rejects_bad_input():
    with pytest.raises(ValueError, match="predictions"):
        score_predictions([REFERENCE], [REFERENCE, REFERENCE])
    with pytest.raises(ValueError, match="empty"):
        score_predictions([], [])
