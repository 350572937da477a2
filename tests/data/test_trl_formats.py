"""Every dataset format TRL's SFT documentation lists, read and labelled by tunewise, with exact -100s.

TRL's formats: language modeling, standard (`text`) and conversational (`messages`); prompt-completion,
standard (strings) and conversational (lists of messages, the prompt may start with a `system` turn);
tool calling (`tools` next to the messages, assistant turns with `tool_calls`, `tool` turns).

Expected labels are built as in tests/test_data.py: the rendered conversation is written out by hand as
segments, each tokenized on its own; trained segments keep their ids. Where TRL's own masking applies
(`completion_only_loss` on prompt-completion rows, and plain text) the labels are also compared with
what TRL's SFTTrainer builds from the same rows. The one difference: TRL trains everything after the
prompt, so it also trains the newline ChatML writes after the last `<|im_end|>`; tunewise trains each
assistant turn through its end-of-turn token and never the template's separator after it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tunewise.config import DataConfig
from tunewise.data import build_datasets, encode_conversation
from tunewise.errors import DataError
from tunewise.formats import Conversation, load_conversations

TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizers" / "smollm2"
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # the template's default
SYSTEM, USER, ANSWER = "You answer in one word.", "What is the capital of France?", "Paris."
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
# A ChatML template that renders tools into the system turn and tool calls as <tool_call> JSON (Qwen-like);
# the fixture SmolLM2 template renders neither.
TOOL_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = 'You can call tools.' %}{% set rest = messages %}"
    "{% endif %}{{ '<|im_start|>system\\n' + system }}"
    "{% if tools %}{{ '\\n# Tools\\n' }}{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\\n' }}"
    "{% for m in rest %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}"
    "{{ '<tool_call>' + (c['function'] | tojson) + '</tool_call>' }}{% endfor %}"
    "{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_one(tmp_path: Path, row: dict, cfg: DataConfig) -> Conversation:
    tmp_path.mkdir(parents=True, exist_ok=True)
    conversations, sources, skipped = load_conversations(write_jsonl(tmp_path / "train.jsonl", [row]), cfg)
    assert len(conversations) == 1 and skipped == {}
    return conversations[0]


def expected(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """input_ids and labels from separately tokenized (text, trained) pieces."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return ids, labels


def chatml(role: str, content: str, trained: bool = False) -> list[tuple[str, bool]]:
    """A ChatML turn: header, then content and <|im_end|> (trained for an assistant turn), then "\\n"."""
    return [(f"<|im_start|>{role}\n", False), (content + "<|im_end|>", trained), ("\n", False)]


# ----------------------------------------------------------------------------- the formats, exact labels


def test_standard_language_modeling_text_trains_every_token_and_eos(tokenizer, tmp_path):
    cfg = DataConfig()
    conversation = read_one(tmp_path, {"text": "Paris is the capital of France."}, cfg)
    example = encode_conversation(conversation, tokenizer, cfg, "x:1")
    ids = tokenizer("Paris is the capital of France.").input_ids + [tokenizer.eos_token_id]
    assert example.input_ids == ids and example.labels == ids


def test_conversational_language_modeling_messages_trains_the_assistant_turn(tokenizer, tmp_path):
    cfg = DataConfig()
    row = {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER},
            {"role": "assistant", "content": ANSWER},
        ]
    }
    example = encode_conversation(read_one(tmp_path, row, cfg), tokenizer, cfg, "x:1")
    ids, labels = expected(
        tokenizer, chatml("system", SYSTEM) + chatml("user", USER) + chatml("assistant", ANSWER, True)
    )
    assert example.input_ids == ids and example.labels == labels


def test_standard_prompt_completion_strings_train_the_completion(tokenizer, tmp_path):
    cfg = DataConfig()
    conversation = read_one(tmp_path, {"prompt": USER, "completion": ANSWER}, cfg)
    assert conversation == [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]
    example = encode_conversation(conversation, tokenizer, cfg, "x:1")
    ids, labels = expected(
        tokenizer, chatml("system", SMOL_SYSTEM) + chatml("user", USER) + chatml("assistant", ANSWER, True)
    )
    assert example.input_ids == ids and example.labels == labels


def test_conversational_prompt_completion_with_a_system_turn(tokenizer, tmp_path):
    cfg = DataConfig()
    row = {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
        "completion": [{"role": "assistant", "content": ANSWER}],
    }
    conversation = read_one(tmp_path, row, cfg)
    assert conversation == row["prompt"] + row["completion"]
    example = encode_conversation(conversation, tokenizer, cfg, "x:1")
    ids, labels = expected(
        tokenizer, chatml("system", SYSTEM) + chatml("user", USER) + chatml("assistant", ANSWER, True)
    )
    assert example.input_ids == ids and example.labels == labels


def test_conversational_prompt_completion_multi_turn_prompt(tokenizer, tmp_path):
    # Earlier assistant turns inside the prompt are context: only the completion is trained.
    cfg = DataConfig(train_on="last")
    prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": USER},
    ]
    conversation = read_one(
        tmp_path, {"prompt": prompt, "completion": [{"role": "assistant", "content": ANSWER}]}, cfg
    )
    example = encode_conversation(conversation, tokenizer, cfg, "x:1")
    pieces = (
        chatml("system", SMOL_SYSTEM)
        + chatml("user", "Hi")
        + chatml("assistant", "Hello.")
        + chatml("user", USER)
        + chatml("assistant", ANSWER, True)
    )
    assert (example.input_ids, example.labels) == expected(tokenizer, pieces)


def test_messages_with_tools_render_the_tools_and_train_the_tool_call(tokenizer, tmp_path):
    cfg = DataConfig(chat_template=TOOL_TEMPLATE)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "name": "get_weather", "content": "22 C, sunny"},
        {"role": "assistant", "content": "It is 22 C and sunny."},
    ]
    conversation = read_one(tmp_path, {"messages": messages, "tools": [WEATHER]}, cfg)
    assert conversation.tools == [WEATHER] and conversation[1]["tool_calls"] == [CALL]
    assert conversation[:2].tools == [WEATHER], "a prefix renders with the same tools"
    example = encode_conversation(conversation, tokenizer, cfg, "x:1")
    system = f"You can call tools.\n# Tools\n{json.dumps(WEATHER)}\n"
    call = f"<tool_call>{json.dumps(CALL['function'])}</tool_call>"
    pieces = (
        chatml("system", system)
        + chatml("user", "Weather in Paris?")
        + chatml("assistant", call, True)
        + chatml("tool", "22 C, sunny")
        + chatml("assistant", "It is 22 C and sunny.", True)
    )
    assert (example.input_ids, example.labels) == expected(tokenizer, pieces)


def test_prompt_completion_with_tools_as_json_text_and_a_system_turn(tokenizer, tmp_path):
    # TRL accepts `tools` as a JSON string (how Parquet/CSV datasets often store it).
    cfg = DataConfig(chat_template=TOOL_TEMPLATE)
    row = {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Weather?"}],
        "completion": [{"role": "assistant", "tool_calls": [CALL]}],
        "tools": json.dumps([WEATHER]),
    }
    example = encode_conversation(read_one(tmp_path, row, cfg), tokenizer, cfg, "x:1")
    system = f"{SYSTEM}\n# Tools\n{json.dumps(WEATHER)}\n"
    call = f"<tool_call>{json.dumps(CALL['function'])}</tool_call>"
    pieces = chatml("system", system) + chatml("user", "Weather?") + chatml("assistant", call, True)
    assert (example.input_ids, example.labels) == expected(tokenizer, pieces)


def test_the_reported_file_passes_check_s_data_step(tokenizer, tmp_path):
    # Issue 11: this file was rejected on every row with "`prompt` is list ..., not a string".
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
            "completion": [{"role": "assistant", "content": str(2 * i)}],
        }
        for i in range(8)
    ]
    bundle = build_datasets(DataConfig(train=str(write_jsonl(tmp_path / "trl.jsonl", rows))), tokenizer)
    assert bundle.format == "prompt_completion" and len(bundle.train) == 8
    assert all(
        e.n_trained == len(tokenizer(str(2 * i) + "<|im_end|>", add_special_tokens=False).input_ids)
        for i, e in enumerate(bundle.train)
    )


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": [], "completion": ANSWER}, "`prompt` is an empty list"),
        ({"prompt": [{"role": "user"}], "completion": ANSWER}, "`prompt` message 0 has no `content`"),
        (
            {"prompt": USER, "completion": [{"role": "assistant", "content": " "}]},
            "`completion` message 0 (assistant) is empty",
        ),
        (
            {"messages": [{"role": "user", "content": USER}, {"role": "assistant", "tool_calls": "x"}]},
            "message 1 has `tool_calls` that are not a list",
        ),
        (
            {
                "messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}],
                "tools": "{not json",
            },
            "`tools` is not valid JSON",
        ),
        (
            {
                "messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}],
                "tools": {"name": "x"},
            },
            "`tools` is dict, not a list of objects",
        ),
    ],
)
def test_bad_trl_rows_name_the_line_and_the_fix(row, problem, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match="bad.jsonl:1: " + problem.replace("(", r"\(").replace(")", r"\)")):
        load_conversations(path, DataConfig())


# ----------------------------------------------------------------------------- the same masks as TRL


def trl_labels(tokenizer, rows: list[dict], tmp_path: Path) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each row as TRL's SFTTrainer prepares them (completion_only_loss default)."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tokenizer),
    )
    torch.manual_seed(0)
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_length=None,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=LlamaForCausalLM(config),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    return [(r["input_ids"], r["labels"]) for r in trainer.train_dataset]


def test_prompt_completion_masks_are_trl_s(tokenizer, tmp_path):
    rows = [
        {
            "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
            "completion": [{"role": "assistant", "content": ANSWER}],
        },
        {
            "prompt": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Name a colour."},
            ],
            "completion": [{"role": "assistant", "content": "Blue."}],
        },
    ]
    cfg = DataConfig(train_on="last")
    theirs = {tuple(ids): labels for ids, labels in trl_labels(tokenizer, rows, tmp_path)}  # TRL may reorder
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    for i, row in enumerate(rows):
        ours = encode_conversation(read_one(tmp_path / str(i), row, cfg), tokenizer, cfg, "x:1")
        labels = theirs[tuple(ours.input_ids)]
        # Identical but for the template's "\n" after the last <|im_end|>, which only TRL trains.
        assert ours.input_ids[-1:] == newline and labels[-1:] == newline and ours.labels[-1] == -100
        assert ours.labels[:-1] == labels[:-1]


def test_text_masks_are_trl_s(tokenizer, tmp_path):
    rows = [{"text": "Paris is the capital of France."}, {"text": "Blue is a colour."}]
    theirs = {tuple(ids): labels for ids, labels in trl_labels(tokenizer, rows, tmp_path)}
    cfg = DataConfig()
    for i, row in enumerate(rows):
        ours = encode_conversation(read_one(tmp_path / str(i), row, cfg), tokenizer, cfg, "x:1")
        assert theirs[tuple(ours.input_ids)] == ours.labels
