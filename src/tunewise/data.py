"""Data: conversations -> chat template -> input_ids + labels (-100 on what is not trained).

Conversations come from `formats` (any file type and row format, normalised to messages). Plain-text
rows (one message with the marker role `"text"`) are tokenized without a chat template and every
token is trained.

Labels come from character spans, so they are right for any chat template (no `{% generation %}`
markers needed): the conversation is rendered once, each assistant turn's span is located by
rendering the conversation up to that turn, the whole text is tokenized once with offsets, and a token
is trained when its characters overlap a trained span. Bad rows raise one `DataError` that names every
file and line, or are skipped and counted with `on_bad_rows: skip`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunewise.config import Config, DataConfig
from tunewise.errors import ConfigError, DataError
from tunewise.formats import TEXT_ROLE, RowProblem, load_file, problem_lines
from tunewise.task import bundled_data_dir

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Only for tokenizers that ship no template but have an EOS: ChatML markers as plain text, EOS ends a turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class EncodedExample:
    """One tokenized example; labels[i] is input_ids[i] where trained and -100 elsewhere (no shift)."""

    input_ids: list[int]
    labels: list[int]
    source: str  # file:line (JSONL) or file:row N (other files)
    n_trained: int
    truncated: bool
    response_cut: bool  # truncation removed trained tokens
    full_length: int  # tokens before truncation
    response_lengths: list[int]  # tokens of each trained span, before truncation
    boundary_merges: int = 0  # trained turns whose first token merged with the prompt's last characters


@dataclass
class DataStats:
    """What happened to the rows on their way to examples (train and validation together)."""

    rows: int = 0
    encoded: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    response_cut: int = 0
    skipped_bad_rows: dict[str, int] = field(default_factory=dict)
    no_trained_tokens: int = 0  # examples left out because no token carries loss
    no_trained_sources: list[str] = field(default_factory=list)
    boundary_merges: int = 0
    default_template_used: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return dataclasses.asdict(self)


@dataclass
class DataBundle:
    """Encoded train/validation examples, the test conversations, and the stats."""

    train: list[EncodedExample]
    validation: list[EncodedExample] | None
    test_rows: list[list[dict]] | None
    stats: DataStats
    format: str

    def to_hf(self, split: str) -> Dataset:
        """The split as a `datasets.Dataset` with exactly the columns `input_ids` and `labels`."""
        from datasets import Dataset

        examples = {"train": self.train, "validation": self.validation}[split]
        if examples is None:
            raise ValueError(f"the bundle has no {split} split")
        return Dataset.from_dict(
            {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
        )


# ----------------------------------------------------------------------------- conversations -> labels


def _chat_template(tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> str | None:
    """The template to render with: `data.chat_template`, else the tokenizer's (None), else the default."""
    if cfg.chat_template:
        return cfg.chat_template
    if tokenizer.chat_template:
        return None
    if tokenizer.eos_token is not None:
        return DEFAULT_CHAT_TEMPLATE
    raise DataError(
        "the tokenizer has no chat template and no EOS token, so tunewise cannot build one; "
        "set `data.chat_template` to a Jinja template (see the model card), or `format: text`"
    )


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], template: str | None, generation: bool = False
) -> str:
    """The chat template applied to messages (and the tools a `formats.Conversation` declares), as text."""
    return tokenizer.apply_chat_template(
        messages,
        tools=getattr(messages, "tools", None),
        tokenize=False,
        add_generation_prompt=generation,
        chat_template=template,
    )


def _special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The text of every special token, longest first."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted(specials | set(tokenizer.all_special_tokens), key=len, reverse=True)


def _turn_span(
    messages: list[dict],
    i: int,
    text: str,
    cursor: int,
    tokenizer: PreTrainedTokenizerBase,
    template: str | None,
) -> tuple[int, int]:
    """Characters of assistant turn i in the full text: its content through the end-of-turn token.

    The turn starts where the conversation up to it, rendered with the generation prompt, ends; it ends
    where the conversation through it ends, less the whitespace the template adds after the end-of-turn
    token. Templates that render earlier turns differently once later ones exist fail that prefix test;
    then the content itself is searched for after the previous turn and a special token right after it
    is taken as the end-of-turn token.
    """
    try:
        before = _render(tokenizer, messages[:i], template, generation=True)
        through = _render(tokenizer, messages[: i + 1], template)
    except Exception:  # a template may refuse a prefix (e.g. an empty conversation)
        before = through = None
    if before is not None and through.startswith(before) and text.startswith(through):
        end = len(through.rstrip())
        if end > len(before):
            return len(before), end
    content = messages[i]["content"].strip()
    start = text.find(content, cursor)
    if start < 0:
        raise RowProblem(
            "template_error",
            f"the chat template changes the text of assistant message {i}",
            "set `data.chat_template` to a template that writes assistant messages verbatim",
        )
    end = start + len(content)
    eot = next((s for s in _special_strings(tokenizer) if text.startswith(s, end)), "")
    return start, end + len(eot)


def _token_in_span(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """A token is trained when its characters overlap a span: a token across the boundary must be produced."""
    if start == end:
        return any(s <= start < e for s, e in spans)
    return any(start < e and end > s for s, e in spans)


def _encode_text(
    content: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int], list[int], int]:
    """Plain text: the tokenizer's own special tokens, EOS appended, every token trained."""
    ids = tokenizer(content).input_ids
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = [*ids, tokenizer.eos_token_id]
    return ids, list(ids), [len(ids)], 0


def _encode_chat(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> tuple[list[int], list[int], list[int], int]:
    """Render once, find trained character spans, tokenize once with offsets, label by overlap."""
    template = _chat_template(tokenizer, cfg)
    try:
        text = _render(tokenizer, messages, template)
    except Exception as exc:  # jinja raises TemplateError and others from raise_exception()
        raise RowProblem(
            "template_error",
            f"the chat template rejected the conversation ({exc})",
            "fix the roles (alternate user/assistant) or set `data.chat_template`",
        ) from None
    # The template decides the special tokens (BOS included), as in transformers and TRL: adding the
    # tokenizer's own would double BOS for Llama/Mistral-style tokenizers.
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow (Python) tokenizers cannot report character offsets
        raise DataError(
            f"{type(tokenizer).__name__} gives no character offsets (label masking needs them); "
            "load the model's fast tokenizer (a tokenizer.json file)"
        ) from None
    ids, offsets = list(encoding.input_ids), encoding.offset_mapping
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if cfg.train_on == "last":
        turns = turns[-1:]
    spans, cursor = [], 0
    for i in turns:
        spans.append(_turn_span(messages, i, text, cursor, tokenizer, template))
        cursor = spans[-1][1]
    if cfg.train_on == "all":
        return ids, list(ids), [len(ids)], _count_merges(spans, text, ids, tokenizer)
    trained = [_token_in_span(s, e, spans) for s, e in offsets]
    labels = [t if keep else -100 for t, keep in zip(ids, trained, strict=True)]
    lengths = [sum(_token_in_span(s, e, [span]) for s, e in offsets) for span in spans]
    return ids, labels, lengths, _count_merges(spans, text, ids, tokenizer)


def _count_merges(
    spans: list[tuple[int, int]], text: str, ids: list[int], tokenizer: PreTrainedTokenizerBase
) -> int:
    """Trained turns whose prompt, tokenized alone, is not a prefix of the full tokenization.

    Then the first response token merged with the end of the prompt (e.g. "[/INST] " + "Yes" -> " Yes"):
    the labels are still right (that token is trained), but at inference the prompt ends with a token the
    model never saw before the response. Recorded, not an error.
    """
    merges = 0
    for start, _ in spans:
        prefix = tokenizer(text[:start], add_special_tokens=False).input_ids
        merges += ids[: len(prefix)] != prefix
    return merges


def encode_conversation(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, source: str = ""
) -> EncodedExample | None:
    """Tokenize one conversation and label it by `cfg.train_on`, applying `cfg.max_seq_length`.

    Returns:
        The example, or None when it is over `max_seq_length` and `too_long` is `drop`.

    Raises:
        DataError: the template rejects the conversation, or it is too long and `too_long` is `error`.
    """
    try:
        if messages and messages[0]["role"] == TEXT_ROLE:
            ids, labels, lengths, merges = _encode_text(messages[0]["content"], tokenizer)
        else:
            ids, labels, lengths, merges = _encode_chat(messages, tokenizer, cfg)
    except RowProblem as problem:
        raise DataError(f"{source}: {problem.what}; fix: {problem.fix}", reason=problem.reason) from None
    full_length, limit = len(ids), cfg.max_seq_length
    if full_length > limit:
        if cfg.too_long == "drop":
            return None
        if cfg.too_long == "error":
            raise DataError(
                f"{source}: is {full_length} tokens, over `data.max_seq_length: {limit}`; "
                f"set `data.max_seq_length: {full_length}` for it to fit, "
                "or `data.too_long: truncate` / `drop`",
                reason="too_long",
            )
    # Truncation only cuts from the end: no real token is ever replaced by EOS.
    response_cut = any(label != -100 for label in labels[limit:])
    ids, labels = ids[:limit], labels[:limit]
    return EncodedExample(
        input_ids=ids,
        labels=labels,
        source=source,
        n_trained=sum(label != -100 for label in labels),
        truncated=full_length > limit,
        response_cut=response_cut,
        full_length=full_length,
        response_lengths=lengths,
        boundary_merges=merges,
    )


# ----------------------------------------------------------------------------- pad token, datasets, batches


def _template_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids that a chat conversation uses as BOS, EOS or template markers: never fit to be pad."""
    ids = {tokenizer.eos_token_id, tokenizer.bos_token_id} - {None}
    if tokenizer.chat_template:
        try:
            probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
            text = _render(tokenizer, probe, None)
        except Exception:  # a template with unusual requirements: fall back to BOS/EOS only
            text = ""
        special = set(tokenizer.added_tokens_decoder)
        ids |= set(tokenizer(text, add_special_tokens=False).input_ids) & special
    return ids


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give the tokenizer a pad token that is never trained (not EOS, BOS or a template marker).

    Reuses an existing unused special token (`<pad>`-like, unk, `<|endoftext|>`...) when there is one.

    Returns:
        True when a new `<|pad|>` token was added: the caller must resize the model's embeddings.
    """
    used = _template_token_ids(tokenizer)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in used:
        return False
    candidates = [t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special and i not in used]

    def preference(token: str) -> int:
        lowered = token.lower()
        return 0 if "pad" in lowered else 1 if token == tokenizer.unk_token else 2 if "text" in lowered else 3

    if candidates:
        tokenizer.pad_token = min(candidates, key=preference)
        logger.info("pad token set to %r (it is never trained; EOS stays trained)", tokenizer.pad_token)
        return False
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    logger.info("added a <|pad|> token (id %d): resize the model's embeddings", tokenizer.pad_token_id)
    return True


def data_paths(cfg: DataConfig) -> tuple[Path, Path | None, Path | None]:
    """Train, validation and test files; with no `data.train`, the bundled dataset's files."""
    if cfg.train is not None:
        return (
            Path(cfg.train),
            Path(cfg.validation) if cfg.validation else None,
            Path(cfg.test) if cfg.test else None,
        )
    bundled = bundled_data_dir()
    validation = Path(cfg.validation) if cfg.validation else None
    if validation is None and cfg.validation_split is None:
        validation = bundled / "validation.jsonl"
    return bundled / "train.jsonl", validation, Path(cfg.test) if cfg.test else bundled / "test.jsonl"


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out round(fraction * n) items (at least 1) chosen by `seed`; both parts keep file order."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(fraction * len(items)))])
    return ([x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held])


def _encode_all(
    conversations: list[list[dict]],
    sources: list[str],
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    stats: DataStats,
    problems: list[str],
    keep_untrained: bool = False,
) -> list[EncodedExample]:
    """Encode a split, updating the stats; problems collect the errors to raise once."""
    examples = []
    for messages, source in zip(conversations, sources, strict=True):
        try:
            example = encode_conversation(messages, tokenizer, cfg, source)
        except DataError as exc:
            if exc.reason == "template_error" and cfg.on_bad_rows == "skip":
                stats.skipped_bad_rows["template_error"] = stats.skipped_bad_rows.get("template_error", 0) + 1
            else:
                problems.append(str(exc))
            continue
        if example is None:
            stats.dropped_too_long += 1
            continue
        stats.truncated += example.truncated
        stats.response_cut += example.response_cut
        stats.boundary_merges += example.boundary_merges
        if example.n_trained == 0:  # nothing to learn; a batch of only these gives a NaN loss
            stats.no_trained_tokens += 1
            stats.no_trained_sources.append(source)
            if not keep_untrained:
                continue
        examples.append(example)
    stats.encoded += len(examples)
    return examples


def build_datasets(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, keep_untrained: bool = False
) -> DataBundle:
    """Load, validate, split and encode the train/validation data and load the test conversations.

    Sets `tokenizer.chat_template` when `data.chat_template` is given or the tokenizer has none (the
    default template, logged), so generation later uses the template training used. Examples with no
    trained token are left out and counted in `stats.no_trained_tokens` (kept, still counted, with
    `keep_untrained`: `train --force` trains what the user forced past the check, so the monitor can
    diagnose it).

    Raises:
        DataError: bad rows (with `on_bad_rows: error`), over-long rows (with `too_long: error`), or
            a missing template; every problem is listed in one message.
    """
    train_path, validation_path, test_path = data_paths(cfg)
    train, train_sources, skipped, fmt = load_file(train_path, cfg)
    stats = DataStats(rows=len(train) + sum(skipped.values()), skipped_bad_rows=dict(skipped))
    if fmt != "text":
        template = _chat_template(tokenizer, cfg)
        if template is not None:
            stats.default_template_used = template == DEFAULT_CHAT_TEMPLATE
            if stats.default_template_used:
                logger.warning(
                    "the tokenizer has no chat template: using tunewise's default ChatML-like "
                    "template with %r ending each turn (set `data.chat_template` to choose one)",
                    tokenizer.eos_token,
                )
            tokenizer.chat_template = template
    validation = validation_sources = None
    if validation_path is not None:
        validation, validation_sources, val_skipped, _ = load_file(validation_path, cfg)
        stats.rows += len(validation) + sum(val_skipped.values())
        stats.skipped_bad_rows = dict(Counter(stats.skipped_bad_rows) + Counter(val_skipped))
    elif cfg.validation_split:
        (train, validation) = split_validation(train, cfg.validation_split, cfg.seed)
        (train_sources, validation_sources) = split_validation(train_sources, cfg.validation_split, cfg.seed)
    problems: list[str] = []
    train_examples = _encode_all(train, train_sources, tokenizer, cfg, stats, problems, keep_untrained)
    validation_examples = None
    if validation is not None:
        validation_examples = _encode_all(validation, validation_sources, tokenizer, cfg, stats, problems)
    if problems:
        raise DataError(f"{len(problems)} example(s) cannot be encoded:\n{problem_lines(problems)}")
    if not train_examples:
        raise DataError(
            f"{train_path}: no example is left to train on ({stats.to_dict()}); "
            "check `data.train_on`, `data.max_seq_length` and the data"
        )
    test_rows = load_file(test_path, cfg)[0] if test_path is not None else None
    return DataBundle(train_examples, validation_examples, test_rows, stats, fmt)


@dataclass
class DataCollator:
    """Right-pads a batch to its longest sequence; padding is masked by length, never by pad id.

    A trained EOS that shares its id with pad keeps its label, because only positions past each
    sequence's end get attention 0 and label -100.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids, labels = list(f["input_ids"]), list(f["labels"])
            pad = width - len(ids)
            batch["input_ids"].append(ids + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(ids) + [0] * pad)
            batch["labels"].append(labels + [-100] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


# ----------------------------------------------------------------------------- tunewise inspect

_GREEN, _DIM, _RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


def render_example(example: EncodedExample, tokenizer: PreTrainedTokenizerBase, color: bool) -> str:
    """The text the model sees, trained tokens told apart from masked ones, with counts and truncation.

    Trained text is green (color) or wrapped in `[[...]]`; masked text is dim or plain.
    """
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != -100
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    parts = []
    for trained, ids in runs:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if color:
            parts.append(f"{_GREEN if trained else _DIM}{text}{_RESET}")
        else:
            parts.append(f"[[{text}]]" if trained else text)
    header = f"{example.source}: {len(example.input_ids)} tokens, {example.n_trained} trained"
    body = "".join(parts)
    if example.truncated:
        body += f"<<TRUNCATED: {example.full_length - len(example.input_ids)} tokens cut>>"
    return f"{header}\n{body}"


LISTED = 5  # sources named in one line of `check` or `inspect`


def listed(sources: list[str]) -> str:
    """The first few sources (file:line), then how many more."""
    more = f" and {len(sources) - LISTED} more" if len(sources) > LISTED else ""
    return ", ".join(sources[:LISTED]) + more


def inspect_examples(
    cfg: Config, tokenizer: PreTrainedTokenizerBase, n: int = 3, index: int | None = None, color: bool = False
) -> str:
    """Examples as the model sees them: trained text marked, each headed by its source and token counts.

    Args:
        cfg: The config; the training split is shown.
        tokenizer: The run's tokenizer (`model.load_tokenizer`).
        n: How many examples from the start, when `index` is None.
        index: Show only the training example at this position.
        color: Trained text green and masked text dim (a terminal), instead of `[[trained]]` brackets.

    Raises:
        ConfigError: `index` is outside the training set.
        DataError: the data cannot be loaded or encoded.
    """
    ensure_pad_token(tokenizer)
    bundle = build_datasets(cfg.data, tokenizer)
    train = bundle.train
    if index is not None and not 0 <= index < len(train):
        raise ConfigError([f"--index {index} is outside the training set; use 0 to {len(train) - 1}"])
    chosen = [index] if index is not None else list(range(min(n, len(train))))
    legend = "trained text green, masked dim" if color else "trained text inside [[ ]], masked text plain"
    blocks = [f"{len(train)} training examples ({bundle.format} format); {legend}"]
    for i in chosen:
        example = train[i]
        head = f"--- example {i} of {len(train)}"
        if example.truncated:
            cut = "the response was cut" if example.response_cut else "only masked tokens were cut"
            head += (
                f"; truncated from {example.full_length} to max_seq_length {cfg.data.max_seq_length} ({cut})"
            )
        blocks.append(f"{head}\n{render_example(example, tokenizer, color)}")
    stats = bundle.stats
    if stats.no_trained_tokens:
        blocks.append(
            f"{stats.no_trained_tokens} examples have no trained token and are left out: "
            f"{listed(stats.no_trained_sources)}"
        )
    return "\n\n".join(blocks)
