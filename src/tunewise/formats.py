"""Data files -> conversations: read rows from any supported file and normalise each to messages.

Rows come from JSONL, JSON, CSV, Parquet or a `save_to_disk` directory in one of five formats
(OpenAI messages, ShareGPT, Alpaca, prompt/completion, plain text) and are normalised to a
`Conversation`: a list of `{"role", "content"}` messages. Plain text rows become one message with the
marker role `"text"`. Every format TRL's SFT documentation lists is one of these: language modeling
(`text`; `messages`), prompt-completion with strings or with lists of messages (`prompt` may hold a
`system` turn), and tool calling (`tools` next to the messages, assistant turns with `tool_calls`,
`tool` turns); the tools travel with the conversation to the chat template.
A bad row is a `RowProblem` (reason, what, fix); a file's bad rows raise one `DataError` naming every
file and line, or are skipped and counted with `on_bad_rows: skip`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import reprlib
from collections import Counter
from pathlib import Path
from typing import Any

from tunewise.config import SURROGATE, DataConfig
from tunewise.errors import DataError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
TOOL_KEYS = ("tool_calls", "name", "tool_call_id")  # kept on a message for the chat template (tool calling)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", **{role: role for role in ROLES}}
TEXT_ROLE = "text"  # marker role of plain-text rows: no chat template, every token trained
FORMAT_FIELDS = {  # format -> the fields it needs (auto-detection checks them in this order)
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
MAX_LISTED = 10  # problems listed in one DataError
SKIP_HINT = "or set `data.on_bad_rows: skip` to skip bad rows and count them"
MAX_DEPTH = 200  # brackets deeper than this are blamed when Python's JSON reader runs out of stack
_SHORT = reprlib.Repr()  # a bounded repr of a bad value, however long or deep
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel = 40, 40, 2


class Conversation(list):
    """One row's messages, a list of {role, content, ...} dicts, and the tools the row declares (TRL's `tools`
    column: JSON schemas the chat template renders). A slice keeps the tools, so a prefix renders the same."""

    def __init__(self, messages: list[dict] | None = None, tools: list[dict] | None = None):
        super().__init__(messages or [])
        self.tools = tools

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        return Conversation(item, self.tools) if isinstance(index, slice) else item


class RowProblem(Exception):
    """One bad row: a reason key for the skip counts, what is wrong, and the fix."""

    def __init__(self, reason: str, what: str, fix: str):
        super().__init__(what)
        self.reason, self.what, self.fix = reason, what, fix


# ----------------------------------------------------------------------------- reading files


def _read_rows(path: Path) -> list[tuple[str, Any]]:
    """(source, row) for each row of a file; a row that cannot be parsed is a `RowProblem`."""
    if not path.exists():
        raise DataError(f"{path}: file not found; check `data.train` / `data.validation` / `data.test`")
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path, path.read_bytes().decode("utf-8", "surrogateescape"))
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path, path.read_bytes().decode("utf-8", "surrogateescape"))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise DataError(f"{path}: cannot read as Parquet ({exc}); re-export the file") from None
        return [(f"{path}:row {i}", row) for i, row in enumerate(rows)]
    raise DataError(
        f"{path}: unknown file type {suffix!r}; use .jsonl, .json, .csv, .parquet "
        "or a directory written by `datasets.Dataset.save_to_disk`"
    )


def _read_csv(path: Path, text: str) -> list[tuple[str, Any]]:
    """Rows under the header line; a row with more cells than the header is a `RowProblem`."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    out: list[tuple[str, Any]] = []
    try:
        for i, row in enumerate(reader):
            if None in row:  # DictReader files cells beyond the header under the key None
                out.append(
                    (
                        f"{path}:row {i}",
                        RowProblem(
                            "bad_structure",
                            f"the row has {len(row[None])} more cell(s) than the header",
                            "quote cells that hold commas, or add the missing column names to the header",
                        ),
                    )
                )
            else:
                out.append((f"{path}:row {i}", row))
    except csv.Error as exc:  # an unclosed quote or a cell over the csv module's size limit
        raise DataError(
            f"{path}:{reader.line_num}: cannot read as CSV ({exc}); close the quotes "
            "(an unclosed quote swallows the lines after it) or store long texts as JSONL"
        ) from None
    return out


def _json_problem(exc: ValueError | RecursionError) -> str:
    """What is wrong with text `json.loads` refused, in words."""
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if isinstance(exc, RecursionError):
        return f"not readable JSON (nested too deep for Python's reader; keep it under {MAX_DEPTH} levels)"
    return f"not readable JSON ({exc})"  # e.g. an integer of more than 4300 digits


def _deep_line(text: str) -> int:
    """The 1-based line where brackets (outside strings) first nest deeper than MAX_DEPTH, else 1."""
    depth, line, in_string, escaped = 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        elif in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return line
        elif ch in "]}":
            depth -= 1
    return 1


def _read_jsonl(path: Path, text: str) -> list[tuple[str, Any]]:
    """One JSON object per line; blank lines are ignored, line numbers start at 1."""
    out: list[tuple[str, Any]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        if _has_bad_bytes(line):
            out.append(
                (
                    source,
                    RowProblem(
                        "not_utf8",
                        "the line has bytes that are not valid UTF-8",
                        "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
                    ),
                )
            )
            continue
        try:
            out.append((source, json.loads(line)))
        except (ValueError, RecursionError) as exc:
            problem = RowProblem("malformed_json", _json_problem(exc), "write one JSON object per line")
            out.append((source, problem))
    return out


def _read_json(path: Path) -> list[tuple[str, Any]]:
    """A JSON list of rows or {"data": [...]}; a .json file holding JSON lines is read as JSONL."""
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, json.JSONDecodeError) and exc.msg == "Extra data":
            return _read_jsonl(path, text)
        line = exc.lineno if isinstance(exc, json.JSONDecodeError) else _deep_line(text)
        raise DataError(
            f"{path}:{line}: {_json_problem(exc)}; "
            'fix the file (a list of rows, {"data": [...]}, or one object per line)'
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(
            f'{path}: expected a JSON list of rows or {{"data": [...]}}, got {type(data).__name__}'
        )
    return [(f"{path}:row {i}", row) for i, row in enumerate(data)]


def _read_saved_dataset(path: Path) -> list[tuple[str, Any]]:
    """A directory written by `datasets.Dataset.save_to_disk`."""
    from datasets import load_from_disk

    if (path / "dataset_dict.json").exists():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (ValueError, KeyError, TypeError, RecursionError):  # unreadable: no split names to offer
            splits = []
        raise DataError(
            f"{path}: is a DatasetDict with splits {splits}; point the path at one split "
            f"directory, e.g. {path / (splits[0] if splits else 'train')}"
        )
    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError or its own errors
        raise DataError(f"{path}: not a directory written by `Dataset.save_to_disk` ({exc})") from None
    return [(f"{path}:row {i}", row) for i, row in enumerate(dataset)]


def _has_bad_bytes(value: Any) -> bool:
    """True when a string (anywhere in the value, keys too) holds undecodable bytes (surrogateescape).

    Walks with a stack, not recursion: a row may nest as deep as the JSON reader allows.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if any("\udc80" <= ch <= "\udcff" for ch in item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


def surrogate_problem(text: str, what: str) -> RowProblem | None:
    """A problem when `text` holds a lone UTF-16 surrogate (JSON `"\\ud800"`), which tokenizers reject."""
    found = SURROGATE.search(text)
    if found is None:
        return None
    return RowProblem(
        "bad_text",
        f"{what} holds a lone UTF-16 surrogate (U+{ord(found.group()):04X}) at "
        f"character {found.start()}, which no tokenizer can encode",
        "remove it or write the character it stands for (a JSON pair such as \\ud83d\\ude00 is fine)",
    )


# ----------------------------------------------------------------------------- rows -> conversations


def detect_format(row: Any, cfg: DataConfig) -> str:
    """The format named in `cfg.format`, or the first one whose fields (after `cfg.columns`) the row has."""
    if cfg.format != "auto":
        return cfg.format
    if isinstance(row, dict):
        for fmt, fields in FORMAT_FIELDS.items():
            if all(cfg.columns.get(f, f) in row for f in fields):
                return fmt
    keys = sorted(map(str, row)) if isinstance(row, dict) else type(row).__name__
    raise DataError(
        f"cannot tell the data format from the first row (keys: {keys}); expected "
        "`messages`, `conversations`, `instruction`+`output`, `prompt`+`completion` or `text`. "
        "Set `data.format` and map your column names with `data.columns`, "
        "e.g. {prompt: question, completion: answer}"
    )


def _field(row: dict, name: str, cfg: DataConfig, required: bool = True) -> Any:
    """The row's value for our field `name`, read under the user's column name."""
    column = cfg.columns.get(name, name)
    value = row.get(column)
    if value is None and required:
        mapped = f" (mapped from `{name}` by data.columns)" if column != name else ""
        raise RowProblem(
            "missing_field",
            f"the row has no `{column}` field{mapped}",
            f"add it, or map your column with `data.columns: {{{name}: <your column>}}`",
        )
    return value


def _text(value: Any, what: str) -> str:
    """A string field, or a problem naming the type found."""
    if not isinstance(value, str):
        found = f"{type(value).__name__} {_SHORT.repr(value)}"
        raise RowProblem("non_string_content", f"{what} is {found}, not a string", "write it as a string")
    return value


def _message(raw: Any, index: int, where: str = "message") -> dict:
    """One message as {role, content} (plus tool_calls, name, tool_call_id when present); accepts
    role/content and ShareGPT's from/value. An assistant turn that calls tools may have no content."""
    if not isinstance(raw, dict):
        raise RowProblem(
            "bad_structure",
            f"{where} {index} is {type(raw).__name__}, not an object",
            'write each message as {"role": ..., "content": ...}',
        )
    role = raw.get("role", raw.get("from"))
    content = raw.get("content", raw.get("value"))
    calls = raw.get("tool_calls")
    if role is None or (content is None and not calls):
        missing = "role" if role is None else "content"
        raise RowProblem(
            "missing_field",
            f"{where} {index} has no `{missing}`",
            "give every message a role and a content (ShareGPT: from and value)",
        )
    if not isinstance(role, str) or role not in SHAREGPT_ROLES:
        raise RowProblem(
            "unknown_role",
            f"{where} {index} has role {_SHORT.repr(role)}",
            "use system, user, assistant or tool (ShareGPT: system, human or gpt)",
        )
    role = SHAREGPT_ROLES[role]
    content = _text("" if content is None else content, f"{where} {index} ({role}) content")
    if role == "assistant" and not content.strip() and not calls:
        raise RowProblem(
            "empty_response", f"{where} {index} (assistant) is empty", "write the response, or remove the row"
        )
    if calls is not None and (not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)):
        raise RowProblem(
            "bad_structure",
            f"{where} {index} has `tool_calls` that are not a list of objects",
            'write them as [{"type": "function", "function": {"name": ..., "arguments": {...}}}]',
        )
    return {"role": role, "content": content, **{k: raw[k] for k in TOOL_KEYS if raw.get(k) is not None}}


def _turns(value: Any, name: str, role: str) -> list[dict]:
    """A prompt or a completion: a string (one `role` turn) or a list of messages (TRL's conversational
    prompt-completion: the prompt may start with a system turn, the completion is the assistant's)."""
    if isinstance(value, list):
        if not value:
            raise RowProblem("bad_structure", f"`{name}` is an empty list", "write at least one message")
        return [_message(m, i, f"`{name}` message") for i, m in enumerate(value)]
    if role == "assistant":
        return [_message({"role": role, "content": value}, 1)]  # a string completion: the answer to turn 0
    return [{"role": role, "content": _text(value, f"`{name}`")}]


def _tools(row: dict, cfg: DataConfig) -> list[dict] | None:
    """The row's `tools` (a list of JSON schemas, or that list as JSON text as TRL accepts), if any."""
    tools = _field(row, "tools", cfg, required=False)
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError):
            raise RowProblem(
                "bad_structure", "`tools` is not valid JSON", "write a JSON list of tool schemas"
            ) from None
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise RowProblem(
            "bad_structure",
            f"`tools` is {type(tools).__name__}, not a list of objects",
            'write a list of tool schemas, e.g. [{"type": "function", "function": {"name": ...}}]',
        )
    return tools or None


def _normalise(row: Any, fmt: str, cfg: DataConfig) -> Conversation:
    """One row of any format -> a Conversation of {role, content} messages (and the row's tools)."""
    if not isinstance(row, dict):
        raise RowProblem(
            "bad_structure",
            f"the row is {type(row).__name__}, not an object",
            "write each row as a JSON object",
        )
    if _has_bad_bytes(row):
        raise RowProblem(
            "not_utf8",
            "the row has bytes that are not valid UTF-8",
            "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
        )
    if fmt in ("messages", "sharegpt"):
        raw = _field(row, fmt if fmt == "messages" else "conversations", cfg)
        if isinstance(raw, str):  # CSV cells hold the list as JSON text
            try:
                raw = json.loads(raw)
            except (ValueError, RecursionError):
                raise RowProblem(
                    "bad_structure",
                    "the messages cell is not a JSON list",
                    "write the messages as a JSON list of {role, content}",
                ) from None
        if not isinstance(raw, list) or not raw:
            raise RowProblem(
                "bad_structure",
                "the messages are not a non-empty list",
                "write a JSON list of {role, content} messages",
            )
        messages = [_message(m, i) for i, m in enumerate(raw)]
    elif fmt == "alpaca":
        instruction = _text(_field(row, "instruction", cfg), "`instruction`")
        extra = _text(_field(row, "input", cfg, required=False) or "", "`input`")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [
            {"role": "user", "content": user},
            _message({"role": "assistant", "content": _field(row, "output", cfg)}, 1),
        ]
    elif fmt == "prompt_completion":
        messages = _turns(_field(row, "prompt", cfg), "prompt", "user")
        messages += _turns(_field(row, "completion", cfg), "completion", "assistant")
    else:
        text = _text(_field(row, "text", cfg), "`text`")
        if not text.strip():
            raise RowProblem("empty_text", "the `text` is empty", "remove the row")
        messages = [{"role": TEXT_ROLE, "content": text}]
    if cfg.system_prompt and messages[0]["role"] not in ("system", TEXT_ROLE):
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    for i, message in enumerate(messages):
        problem = surrogate_problem(message["content"], f"message {i} ({message['role']})")
        if problem is not None:
            raise problem
    return Conversation(messages, _tools(row, cfg) if fmt != "text" else None)


def problem_lines(problems: list[str]) -> str:
    """The first problems, one per line, and how many more there are."""
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return "\n".join(f"  - {p}" for p in problems[:MAX_LISTED]) + more


def load_file(path: str | Path, cfg: DataConfig) -> tuple[list[list[dict]], list[str], dict[str, int], str]:
    """Read and normalise one file; also returns the format used."""
    rows = _read_rows(Path(path))
    if not rows:
        raise DataError(f"{path}: has no rows")
    first = next(((src, row) for src, row in rows if not isinstance(row, RowProblem)), None)
    try:
        fmt = cfg.format if first is None else detect_format(first[1], cfg)  # no good row: all are reported
    except DataError as exc:
        raise DataError(f"{first[0]}: {exc}") from None
    conversations, sources, skipped, problems = [], [], Counter(), []
    for source, row in rows:
        try:
            if isinstance(row, RowProblem):
                raise row
            conversations.append(_normalise(row, fmt, cfg))
            sources.append(source)
        except RowProblem as problem:
            skipped[problem.reason] += 1
            problems.append(f"{source}: {problem.what}; fix: {problem.fix}")
    if problems and cfg.on_bad_rows == "error":
        raise DataError(
            f"{len(problems)} bad row(s) in {path} ({fmt} format):\n{problem_lines(problems)}\n"
            f"Fix them, {SKIP_HINT}."
        )
    if problems:
        logger.warning("%s: skipped %d bad row(s): %s", path, len(problems), dict(skipped))
    return conversations, sources, dict(skipped), fmt


def load_conversations(
    path: str | Path, cfg: DataConfig
) -> tuple[list[list[dict]], list[str], dict[str, int]]:
    """Read a data file and normalise every row to `[{"role", "content"}, ...]`.

    Returns:
        The conversations, their sources (file:line or file:row N), and skipped rows counted by reason
        (only with `on_bad_rows: skip`). Plain-text rows are `[{"role": "text", "content": ...}]`.

    Raises:
        DataError: naming every bad row's file and line/row, what is wrong and the fix.
    """
    conversations, sources, skipped, _ = load_file(path, cfg)
    return conversations, sources, skipped
