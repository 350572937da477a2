"""Tests for data loading, label masking, length policies, padding and `inspect` rendering.

Expected labels are computed independently of `tunewise.data`: the rendered conversation is written
out by hand as segments for each template, each segment is tokenized on its own, and the segments of
trained turns keep their ids while the rest is -100. This agrees with tokenizing the whole text only when
no token merges across a segment boundary, which the test conversations are chosen to avoid (the
boundary-merge tests build their expectations by hand instead).
"""

import csv
import json
import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tunewise.config import DataConfig
from tunewise.data import (
    DataCollator,
    EncodedExample,
    build_datasets,
    encode_conversation,
    ensure_pad_token,
    render_example,
    split_validation,
)
from tunewise.errors import DataError
from tunewise.formats import load_conversations

TOKENIZERS = Path(__file__).parent / "fixtures" / "tokenizers"
TEMPLATES = ["chatml", "llama3", "mistral"]
SYSTEM, USER, ANSWER = "You are helpful.", "What is the capital?", "Paris is the capital."
USER2, ANSWER2 = "Thanks", "Yes, good."
MULTI = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": ANSWER},
    {"role": "user", "content": USER2},
    {"role": "assistant", "content": ANSWER2},
]


def load_tokenizer(name: str):
    """A fresh copy (some tests change the pad token or the template)."""
    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


@pytest.fixture(scope="module", params=TEMPLATES)
def templated(request):
    return request.param, load_tokenizer(request.param)


def segments(template: str, messages: list[dict], trained: set[int]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces, written out by hand per template.

    `trained` holds the indices of the assistant messages that carry loss: their content and the
    end-of-turn token after it are trained; the newline ChatML adds after `<|im_end|>` is not.
    """
    out: list[tuple[str, bool]] = []
    if template == "chatml":
        for i, m in enumerate(messages):
            out += [
                (f"<|im_start|>{m['role']}\n", False),
                (m["content"] + "<|im_end|>", i in trained),
                ("\n", False),
            ]
    elif template == "llama3":
        out.append(("<|begin_of_text|>", False))
        for i, m in enumerate(messages):
            out += [
                (f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False),
                (m["content"] + "<|eot_id|>", i in trained),
            ]
    elif template == "mistral":  # the system message is folded into the first user turn
        system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
        rest = messages[1:] if system else messages
        out.append(("<s>", False))
        for j, m in enumerate(rest):
            i = j + (1 if system else 0)
            if m["role"] == "user":
                out.append((f"[INST] {system if j == 0 else ''}{m['content']} [/INST] ", False))
            else:
                out.append((m["content"] + "</s>", i in trained))
    return out


def expected(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """input_ids and labels from separately tokenized pieces."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return ids, labels


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- formats x templates

USER_ALPACA = "Extract the contact as JSON.\n\nMaria is a nurse."
FORMAT_ROWS = {
    "messages": {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER},
            {"role": "assistant", "content": ANSWER},
        ]
    },
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": USER},
            {"from": "gpt", "value": ANSWER},
        ]
    },
    "alpaca": {
        "instruction": "Extract the contact as JSON.",
        "input": "Maria is a nurse.",
        "output": 'Maria: {"job": "nurse"}',
    },
    "prompt_completion": {"prompt": USER, "completion": ANSWER},
    "text": {"text": "Paris is the capital of the country."},
}
FORMAT_MESSAGES = {
    "messages": MULTI[:3],
    "sharegpt": MULTI[:3],
    "alpaca": [
        {"role": "user", "content": USER_ALPACA},
        {"role": "assistant", "content": 'Maria: {"job": "nurse"}'},
    ],
    "prompt_completion": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}],
}


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_labels_for_every_format_and_template(fmt, templated, tmp_path):
    name, tokenizer = templated
    path = write_jsonl(tmp_path / "train.jsonl", [FORMAT_ROWS[fmt]])
    cfg = DataConfig()
    conversations, sources, skipped = load_conversations(path, cfg)
    assert sources == [f"{path}:1"] and skipped == {}
    example = encode_conversation(conversations[0], tokenizer, cfg, sources[0])
    if fmt == "text":  # no template; the tokenizer's own BOS (llama3, mistral), EOS appended, all trained
        ids = tokenizer(FORMAT_ROWS["text"]["text"]).input_ids + [tokenizer.eos_token_id]
        assert conversations[0] == [{"role": "text", "content": FORMAT_ROWS["text"]["text"]}]
        assert example.input_ids == ids and example.labels == ids
        return
    messages = FORMAT_MESSAGES[fmt]
    assert conversations[0] == messages
    ids, labels = expected(tokenizer, segments(name, messages, {len(messages) - 1}))
    assert example.input_ids == ids
    assert example.labels == labels
    assert example.n_trained == sum(label != -100 for label in labels)
    assert [i for i, label in enumerate(example.labels) if label != -100] == [
        i for i, label in enumerate(labels) if label != -100
    ]


@pytest.mark.parametrize("policy", ["assistant", "last", "all"])
def test_multi_turn_policies(policy, templated):
    name, tokenizer = templated
    example = encode_conversation(MULTI, tokenizer, DataConfig(train_on=policy), "x:1")
    trained = {"assistant": {2, 4}, "last": {4}, "all": set()}[policy]
    ids, labels = expected(tokenizer, segments(name, MULTI, trained))
    assert example.input_ids == ids
    assert example.labels == (ids if policy == "all" else labels)
    if policy != "all":
        turns = [MULTI[i]["content"] + tokenizer.eos_token for i in sorted(trained)]
        lengths = [len(tokenizer(turn, add_special_tokens=False).input_ids) for turn in turns]
        assert example.response_lengths == lengths
    assert example.boundary_merges == 0


def test_labels_stay_aligned_with_input_ids(templated):
    _, tokenizer = templated
    example = encode_conversation(MULTI, tokenizer, DataConfig(), "x:1")
    assert len(example.labels) == len(example.input_ids)
    assert all(label in (-100, token) for token, label in zip(example.input_ids, example.labels, strict=True))


def test_template_bos_is_not_doubled():
    tokenizer = load_tokenizer("llama3")  # the tokenizer adds <|begin_of_text|> itself, so does the template
    example = encode_conversation(MULTI, tokenizer, DataConfig(), "x:1")
    assert example.input_ids.count(tokenizer.bos_token_id) == 1


# ----------------------------------------------------------------------------- EOS, pad, collator


def test_trained_eos_survives_pad_equal_to_eos():
    tokenizer = load_tokenizer("chatml")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # as SmolLM2 ships it
    short = encode_conversation(MULTI[:3], tokenizer, DataConfig(), "a:1")
    long = encode_conversation(MULTI, tokenizer, DataConfig(), "b:1")
    eos = tokenizer.eos_token_id
    assert eos in [label for label in short.labels if label != -100]
    batch = DataCollator(pad_token_id=tokenizer.pad_token_id)([vars(short), vars(long)])
    row = batch["labels"][0].tolist()
    assert row[: len(short.labels)] == short.labels  # the trained <|im_end|> keeps its label
    assert row[len(short.labels) :] == [-100] * (len(long.labels) - len(short.labels))


@pytest.mark.parametrize(
    ("name", "pad", "added"),
    [
        ("chatml", "<|endoftext|>", False),
        ("llama3", "<|end_of_text|>", False),
        ("mistral", "<unk>", False),
        ("notemplate", "<|pad|>", True),
    ],
)
def test_ensure_pad_token(name, pad, added):
    tokenizer = load_tokenizer(name)
    before = len(tokenizer)
    assert ensure_pad_token(tokenizer) is added
    assert tokenizer.pad_token == pad
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == before + added
    assert ensure_pad_token(tokenizer) is False  # now stable


def test_collator_pads_to_longest_and_masks_padding():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = DataCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    padded = DataCollator(pad_token_id=0, pad_to_multiple_of=4)(features)
    assert padded["input_ids"].shape == (2, 4)
    assert padded["labels"][0].tolist() == [-100, 6, 7, -100]


# ----------------------------------------------------------------------------- length policies


def test_truncate_cuts_from_the_end_without_injecting_eos():
    tokenizer = load_tokenizer("chatml")
    full = encode_conversation(MULTI, tokenizer, DataConfig(), "x:1")
    limit = len(full.input_ids) - 4
    cut = encode_conversation(MULTI, tokenizer, DataConfig(max_seq_length=limit), "x:1")
    assert cut.input_ids == full.input_ids[:limit] and cut.labels == full.labels[:limit]
    assert cut.input_ids[-1] != tokenizer.eos_token_id
    assert cut.truncated and cut.response_cut and cut.full_length == len(full.input_ids)
    assert cut.n_trained == full.n_trained - 3  # "." + "<|im_end|>" + one more trained token; "\n" was masked


def test_truncation_inside_the_prompt_leaves_nothing_to_train(tmp_path):
    tokenizer = load_tokenizer("chatml")
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": MULTI}, {"messages": MULTI[1:3]}])
    bundle = build_datasets(DataConfig(train=str(path), max_seq_length=16, train_on="last"), tokenizer)
    assert bundle.stats.no_trained_tokens == 1 and bundle.stats.no_trained_sources == [f"{path}:1"]
    assert bundle.stats.truncated == 2 and bundle.stats.response_cut == 2
    assert [e.source for e in bundle.train] == [f"{path}:2"]


def test_drop_counts_examples(tmp_path):
    tokenizer = load_tokenizer("chatml")
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": MULTI}, {"messages": MULTI[1:3]}])
    short = encode_conversation(MULTI[1:3], tokenizer, DataConfig(), "")
    bundle = build_datasets(
        DataConfig(train=str(path), max_seq_length=len(short.input_ids), too_long="drop"), tokenizer
    )
    assert bundle.stats.dropped_too_long == 1 and bundle.stats.encoded == 1
    assert [e.source for e in bundle.train] == [f"{path}:2"]


def test_error_names_row_length_and_the_value_that_fits(tmp_path):
    tokenizer = load_tokenizer("chatml")
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": MULTI[1:3]}, {"messages": MULTI}])
    length = len(encode_conversation(MULTI, tokenizer, DataConfig(), "").input_ids)
    with pytest.raises(DataError) as info:
        build_datasets(DataConfig(train=str(path), max_seq_length=20, too_long="error"), tokenizer)
    message = str(info.value)
    assert f"{path}:2: is {length} tokens" in message
    assert f"`data.max_seq_length: {length}`" in message and "max_seq_length: 20" in message


# ----------------------------------------------------------------------------- bad rows

GOOD = {"messages": MULTI[1:3]}
BAD_ROWS = {
    "malformed_json": ('{"messages": [', "not valid JSON"),
    "missing_field": ({"conversation": MULTI[1:3]}, "no `messages` field"),
    "empty_response": ({"messages": [MULTI[1], {"role": "assistant", "content": " \n"}]}, "is empty"),
    "non_string_content": ({"messages": [MULTI[1], {"role": "assistant", "content": 42}]}, "not a string"),
    "unknown_role": ({"messages": [{"role": "bot", "content": "hi"}, MULTI[2]]}, "role 'bot'"),
}


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_bad_jsonl_row_names_file_and_line(reason, tmp_path):
    row, words = BAD_ROWS[reason]
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, row])
    with pytest.raises(DataError) as info:
        load_conversations(path, DataConfig())
    message = str(info.value)
    assert f"{path}:3: " in message and words in message and "fix:" in message
    assert "on_bad_rows: skip" in message
    conversations, sources, skipped = load_conversations(path, DataConfig(on_bad_rows="skip"))
    assert skipped == {reason: 1} and sources == [f"{path}:1", f"{path}:2"]


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    good = json.dumps(GOOD).encode()
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}'
    path.write_bytes(b"\n".join([good, bad, good]) + b"\n")
    with pytest.raises(DataError, match=rf"{path}:2: the line has bytes that are not valid UTF-8; fix: "):
        load_conversations(path, DataConfig())
    _, sources, skipped = load_conversations(path, DataConfig(on_bad_rows="skip"))
    assert skipped == {"not_utf8": 1} and sources == [f"{path}:1", f"{path}:3"]


def test_bad_rows_in_csv_and_json_name_the_row_index(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_bytes(b"prompt,completion\nWhat is it?,Paris\nWhat?,   \ncaf\xe9,ok\n")
    with pytest.raises(DataError) as info:
        load_conversations(csv_path, DataConfig())
    assert f"{csv_path}:row 1: message 1 (assistant) is empty" in str(info.value)
    assert f"{csv_path}:row 2: the row has bytes that are not valid UTF-8" in str(info.value)
    json_path = tmp_path / "train.json"
    json_path.write_text(json.dumps([GOOD, {"messages": [MULTI[1], {"role": "assistant"}]}]))
    with pytest.raises(DataError, match=rf"{json_path}:row 1: message 1 has no `content`"):
        load_conversations(json_path, DataConfig())


def test_every_bad_row_is_listed_once_and_skip_counts_by_reason(tmp_path):
    rows = [GOOD] + [row for row, _ in BAD_ROWS.values()] + [BAD_ROWS["empty_response"][0]]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"^6 bad row\(s\)"):
        load_conversations(path, DataConfig())
    _, _, skipped = load_conversations(path, DataConfig(on_bad_rows="skip"))
    assert skipped == {
        "malformed_json": 1,
        "missing_field": 1,
        "empty_response": 2,
        "non_string_content": 1,
        "unknown_role": 1,
    }


def test_template_rejection_is_a_data_error_or_skipped(tmp_path):
    tokenizer = load_tokenizer("mistral")  # roles must alternate user/assistant
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, {"messages": [MULTI[1], MULTI[3], MULTI[2]]}])
    with pytest.raises(DataError, match=rf"{path}:2: the chat template rejected the conversation"):
        build_datasets(DataConfig(train=str(path)), tokenizer)
    bundle = build_datasets(DataConfig(train=str(path), on_bad_rows="skip"), tokenizer)
    assert bundle.stats.skipped_bad_rows == {"template_error": 1} and len(bundle.train) == 1


# ----------------------------------------------------------------------------- files, formats, splits


def test_every_file_type_reads_the_same_rows(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(3)]
    files = [
        write_jsonl(tmp_path / "d.jsonl", rows),
        tmp_path / "d.json",
        tmp_path / "wrapped.json",
        tmp_path / "d.csv",
        tmp_path / "d.parquet",
        tmp_path / "saved",
    ]
    files[1].write_text(json.dumps(rows))
    files[2].write_text(json.dumps({"data": rows}))
    files.append(write_jsonl(tmp_path / "lines.json", rows))  # JSON lines under a .json name
    with files[3].open("w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    Dataset.from_list(rows).to_parquet(str(files[4]))
    Dataset.from_list(rows).save_to_disk(str(files[5]))
    results = [load_conversations(path, DataConfig())[0] for path in files]
    assert all(r == results[0] for r in results)
    assert results[0][2] == [
        {"role": "user", "content": "Question 2?"},
        {"role": "assistant", "content": "Answer 2."},
    ]
    assert load_conversations(files[3], DataConfig())[1][0] == f"{files[3]}:row 0"


def test_csv_messages_column_holds_json(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["messages"], [json.dumps(MULTI)]])
    assert load_conversations(path, DataConfig())[0] == [MULTI]


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_format_auto_detection(fmt, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [FORMAT_ROWS[fmt]])
    bundle = build_datasets(DataConfig(train=str(path)), load_tokenizer("chatml"))
    assert bundle.format == fmt


def test_columns_map_user_field_names(tmp_path):
    rows = [{"question": USER, "answer": ANSWER}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(columns={"prompt": "question", "completion": "answer"})
    assert load_conversations(path, cfg)[0] == [FORMAT_MESSAGES["prompt_completion"]]
    path = write_jsonl(tmp_path / "c.jsonl", [{"conversation": MULTI}])
    renamed = DataConfig(format="messages", columns={"messages": "conversation"})
    assert load_conversations(path, renamed)[0] == [MULTI]
    with pytest.raises(DataError, match="no `conversation` field \\(mapped from `messages`"):
        load_conversations(
            write_jsonl(tmp_path / "e.jsonl", [{"conversation": MULTI}, {"messages": MULTI}]),
            DataConfig(format="messages", columns={"messages": "conversation"}),
        )


def test_unknown_columns_say_how_to_map_them(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": USER, "answer": ANSWER}])
    with pytest.raises(DataError, match=r"keys: \['answer', 'question'\].*data.columns"):
        load_conversations(path, DataConfig())


def test_system_prompt_added_when_missing(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI[1:3]}, {"messages": MULTI}])
    conversations = load_conversations(path, DataConfig(system_prompt="Be brief."))[0]
    assert conversations[0][0] == {"role": "system", "content": "Be brief."}
    assert conversations[1][0] == MULTI[0]


def test_validation_split_is_seeded(tmp_path):
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    tokenizer = load_tokenizer("chatml")

    def split(seed):
        bundle = build_datasets(DataConfig(train=str(path), validation_split=0.2, seed=seed), tokenizer)
        return [e.source for e in bundle.train], [e.source for e in bundle.validation]

    train, validation = split(1)
    assert len(train) == 16 and len(validation) == 4 and not set(train) & set(validation)
    assert split(1) == (train, validation)
    assert split(2) != (train, validation)
    assert split_validation(list(range(10)), 0.01, 0)[1] != []  # at least one held out


def test_separate_validation_and_test_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD])
    validation = write_jsonl(tmp_path / "val.jsonl", [{"prompt": USER, "completion": ANSWER}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"messages": MULTI}])
    bundle = build_datasets(
        DataConfig(train=str(train), validation=str(validation), test=str(test)), load_tokenizer("chatml")
    )
    assert len(bundle.train) == 2 and [e.source for e in bundle.validation] == [f"{validation}:1"]
    assert bundle.test_rows == [MULTI] and bundle.stats.rows == 3 and bundle.stats.encoded == 3
    dataset = bundle.to_hf("train")
    assert dataset.column_names == ["input_ids", "labels"] and dataset[0]["labels"] == bundle.train[0].labels


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_conversations(tmp_path / "nope.jsonl", DataConfig())
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        load_conversations(tmp_path / "d.txt", DataConfig())


# ----------------------------------------------------------------------------- templates


def test_default_template_only_with_eos(tmp_path, caplog):
    tokenizer = load_tokenizer("notemplate")
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    with caplog.at_level(logging.WARNING, logger="tunewise.data"):
        bundle = build_datasets(DataConfig(train=str(path)), tokenizer)
    assert bundle.stats.default_template_used and "default ChatML-like template" in caplog.text
    example = bundle.train[0]
    assert example.input_ids[-2] == tokenizer.eos_token_id and example.labels[-2] == tokenizer.eos_token_id
    assert example.labels[-1] == -100  # the newline after the end of turn
    tokenizer = load_tokenizer("notemplate")
    tokenizer.chat_template = None
    tokenizer.eos_token = None
    with pytest.raises(DataError, match="set `data.chat_template`"):
        build_datasets(DataConfig(train=str(path)), tokenizer)


def test_config_chat_template_is_used(tmp_path):
    tokenizer = load_tokenizer("llama3")
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    from_chatml = load_tokenizer("chatml").chat_template
    bundle = build_datasets(DataConfig(train=str(path), chat_template=from_chatml), tokenizer)
    ids, labels = expected(tokenizer, segments("chatml", MULTI[1:3], {1}))
    assert bundle.train[0].input_ids == ids and bundle.train[0].labels == labels
    assert tokenizer.chat_template == from_chatml


def test_boundary_merge_is_detected_and_the_merged_token_trained():
    tokenizer = load_tokenizer("mistral")  # "[/INST] " + "You are" tokenizes as "[/INST]", " You", " are"
    messages = [{"role": "user", "content": USER2}, {"role": "assistant", "content": "You are good."}]
    example = encode_conversation(messages, tokenizer, DataConfig(), "x:1")
    prompt = tokenizer("<s>[INST] Thanks [/INST] ", add_special_tokens=False).input_ids
    assert example.input_ids[: len(prompt)] != prompt and example.boundary_merges == 1
    answer = tokenizer(" You are good.</s>", add_special_tokens=False).input_ids
    assert example.input_ids[-len(answer) :] == answer  # " You" carries the space the prompt ended with
    assert example.labels == [-100] * (len(example.input_ids) - len(answer)) + answer


# Renders earlier assistant turns differently from the last one (like templates that drop old reasoning),
# so a conversation rendered up to a turn is not a prefix of the whole: the span search fallback is used.
EARLIER_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and not loop.last %}"
    "{{ '<|im_start|>assistant\\n(earlier) ' + m['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_template_that_rewrites_earlier_turns_falls_back_to_search():
    tokenizer = load_tokenizer("chatml")
    example = encode_conversation(MULTI, tokenizer, DataConfig(chat_template=EARLIER_TEMPLATE), "x:1")
    pieces = segments("chatml", MULTI, {2, 4})
    pieces[6] = ("<|im_start|>assistant\n(earlier) ", False)  # the header of the first assistant turn
    ids, labels = expected(tokenizer, pieces)
    assert example.input_ids == ids and example.labels == labels


# ----------------------------------------------------------------------------- inspect


def test_render_example_brackets_and_truncation():
    tokenizer = load_tokenizer("chatml")
    example = encode_conversation(MULTI[1:3], tokenizer, DataConfig(), "d.jsonl:1")
    text = render_example(example, tokenizer, color=False)
    assert text.startswith(f"d.jsonl:1: {len(example.input_ids)} tokens, {example.n_trained} trained\n")
    assert text.endswith("<|im_start|>assistant\n[[Paris is the capital.<|im_end|>]]\n")
    cut = encode_conversation(MULTI[1:3], tokenizer, DataConfig(max_seq_length=10), "d.jsonl:1")
    assert render_example(cut, tokenizer, color=False).endswith(
        f"<<TRUNCATED: {cut.full_length - 10} tokens cut>>"
    )
    colored = render_example(example, tokenizer, color=True)
    assert "\x1b[32mParis is the capital.<|im_end|>\x1b[0m" in colored and "[[" not in colored


def test_render_handles_an_example_built_by_hand():
    tokenizer = load_tokenizer("chatml")
    ids = tokenizer("Paris is", add_special_tokens=False).input_ids
    example = EncodedExample(ids, [-100, *ids[1:]], "x", len(ids) - 1, False, False, len(ids), [len(ids) - 1])
    header = f"x: {len(ids)} tokens, {len(ids) - 1} trained"
    assert render_example(example, tokenizer, color=False) == f"{header}\nParis[[ is]]"


# ----------------------------------------------------------------------------- TRL cross-check


@pytest.mark.parametrize("name", TEMPLATES)
def test_completion_mask_matches_trl(name, tmp_path):
    """Ours vs `trl.SFTTrainer(completion_only_loss=True)` on the same prompt/completion rows.

    Our string prompt/completion rows go through the chat template, so TRL gets them in its
    conversational prompt/completion form, which it also renders with the chat template. TRL trains
    every token after the rendered prompt, including the newline ChatML writes after `<|im_end|>`;
    we stop at the end-of-turn token. That newline is the only allowed difference.
    """
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(name)
    pairs = [(USER, ANSWER), (USER2, "You are good."), ("Extract the contact as JSON.", '{"name": "Maria"}')]
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
    )
    model = LlamaForCausalLM(config)
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        completion_only_loss=True,
        report_to="none",
        max_length=None,
        bf16=False,
        use_cpu=True,
    )
    rows = [
        {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
        for p, c in pairs
    ]
    processed = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    ).train_dataset
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in pairs])
    ours = build_datasets(DataConfig(train=str(path)), tokenizer).train
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    for trl_row, example in zip(processed, ours, strict=True):
        assert trl_row["input_ids"] == example.input_ids
        theirs = {i for i, label in enumerate(trl_row["labels"]) if label != -100}
        mine = {i for i, label in enumerate(example.labels) if label != -100}
        extra = sorted(theirs - mine)
        assert mine <= theirs
        if name == "chatml":
            assert extra == [len(example.input_ids) - 1] and example.input_ids[-1:] == newline
        else:
            assert extra == []


# ----------------------------------------------------------------------------- the real SmolLM2 tokenizer

needs_smollm2 = pytest.mark.skipif(not (TOKENIZERS / "smollm2").exists(), reason="no smollm2 tokenizer saved")


@needs_smollm2
def test_smollm2_masks_and_default_system_prompt():
    tokenizer = load_tokenizer("smollm2")
    messages = MULTI[1:]  # no system message: the template writes SmolLM2's own
    example = encode_conversation(messages, tokenizer, DataConfig(), "x:1")
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    pieces = segments("chatml", [{"role": "system", "content": default}, *messages], {2, 4})
    ids, labels = expected(tokenizer, pieces)
    assert example.input_ids == ids and example.labels == labels
    assert example.boundary_merges == 0


@needs_smollm2
def test_smollm2_boundary_merge():
    tokenizer = load_tokenizer("smollm2")  # "assistant\n" + "  Hello" merges "\n " into one token
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello"}]
    example = encode_conversation(messages, tokenizer, DataConfig(), "x:1")
    assert example.boundary_merges == 1
    trained = tokenizer.convert_ids_to_tokens([t for t in example.labels if t != -100])
    assert trained == ["ĊĠ", "ĠHello", "<|im_end|>"]
    assert example.labels[-1] == -100 and example.input_ids[-2] == tokenizer.eos_token_id


@needs_smollm2
def test_bundled_dataset_is_the_default():
    tokenizer = load_tokenizer("smollm2")
    bundle = build_datasets(DataConfig(), tokenizer)
    assert (len(bundle.train), len(bundle.validation), len(bundle.test_rows)) == (800, 100, 100)
    assert bundle.format == "messages" and bundle.stats.boundary_merges == 0
    assert bundle.stats.skipped_bad_rows == {} and bundle.stats.no_trained_tokens == 0
    for example in bundle.train[:50]:
        trained = [t for t in example.labels if t != -100]
        assert trained[-1] == tokenizer.eos_token_id and tokenizer.decode(trained).startswith('{"name": ')
