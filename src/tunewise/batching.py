"""Batching: how a micro-batch's examples become tensors, and what a step's compute buys.

`data.batching`:
  - `padding_free` (default): the examples of a micro-batch are concatenated into one row, `position_ids`
    restart at each example and there is no attention mask, so no compute is spent on padding. transformers
    builds the block-diagonal causal mask from the restarts (sdpa, eager); FlashAttention reads them as
    sequence boundaries; for sdpa tunewise runs causal attention example by example (`packed_sdpa_attention`),
    which skips the blocks between examples instead of masking them. transformers' DataCollatorWithFlattening
    puts -100 on the first label of each example: the model shifts labels, so that position would be predicted
    from the previous example's last token; in a padded row it is never a target either, so the trained tokens
    and the Trainer's `num_items_in_batch` (the loss normaliser) are the same as padded.
  - `padded`: each row right-padded to the micro-batch's longest example (tunewise.data.DataCollator).
  - `grouped`: padded, with the Trainer's length-grouped sampler (`train_sampling_strategy=group_by_length`).

Whatever the batching, the output layer runs only where a token is trained (`TrainedLogits`): the positions
whose next label is a loss target. A chat example's prompt is most of its tokens, and SmolLM2's output layer
(49,152 x 576) is a fifth of its FLOPs, so the logits of prompt tokens, computed and thrown away by the loss,
were the largest waste after padding. transformers' `logits_to_keep` (a boolean mask) selects the positions
before the output layer, and `shift_labels` gives the loss the targets of exactly those positions; the loss,
its normaliser and the gradients are the same (`trained_logits_problem` checks it on the loaded model, else
every position keeps its logits and the notice says why).

None of them changes the examples per step, so the plan's step count holds. Whether a model really keeps
packed examples apart is not assumed: `packing_problem` runs the loaded model on a packed probe and checks
that the second example's logits neither depend on the first example nor differ from running it alone; when
they do, training falls back to `padded` and says why.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AttentionInterface, DataCollatorWithFlattening
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tunewise import rundir
from tunewise.data import DataCollator

logger = logging.getLogger(__name__)

Batching = Literal["padding_free", "padded", "grouped"]
PACKED_SDPA = "tunewise_packed_sdpa"
# Same shapes, other first example: a model that keeps examples apart gives the second one the same logits.
LEAK_TOLERANCE = 1e-3
# Alone vs packed: other shapes round differently (bf16 most); a model that ignores position_ids is far off.
POSITION_TOLERANCE = 5e-2
# The same loss over fewer rows of the output layer: only the summation order differs.
LOGITS_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------- attention per example


def _segments(position_ids: torch.Tensor | None, length: int) -> list[tuple[int, int]] | None:
    """(start, end) of each example in a packed row of `length` tokens; None when it holds one example."""
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] != length:
        return None
    starts = [0, *(torch.nonzero(position_ids[0, 1:] != position_ids[0, :-1] + 1).flatten() + 1).tolist()]
    if len(starts) == 1:
        return None
    return list(zip(starts, [*starts[1:], length], strict=True))


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, run causally example by example on a packed row (else unchanged).

    The block-diagonal mask makes sdpa compute every pair of the row and discard most of them; per example,
    sdpa's causal kernels compute only the pairs that count.
    """
    segments = (
        _segments(kwargs.get("position_ids"), query.shape[2]) if key.shape[2] == query.shape[2] else None
    )
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    outputs = [
        sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout, scaling, is_causal=True
        )[0]
        for a, b in segments
    ]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # padded batches (generation) keep their mask


# ----------------------------------------------------------------------------- the choice


@dataclass
class BatchingChoice:
    """The batching asked for, the one used, and why they differ."""

    requested: Batching
    used: Batching
    attention: str | None = None  # the model's attention implementation while training
    reason: str | None = None  # why padding_free fell back to padded
    trained_logits_only: bool = False  # the output layer runs only on positions with a loss target
    logits_reason: str | None = None  # why it runs on every position instead

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (plan.json's `batching`)."""
        return asdict(self)

    def notice(self) -> str | None:
        """The one-line notice for a fallback."""
        notes = [f"data.batching: padding_free -> padded: {self.reason}"] if self.reason else []
        if self.logits_reason:
            notes.append(f"logits of every position are computed: {self.logits_reason}")
        return "; ".join(notes) or None


def _base(model: Any) -> Any:
    """The transformers model under a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _attention(model: Any) -> str | None:
    return getattr(getattr(_base(model), "config", None), "_attn_implementation", None)


def _set_attention(model: Any, name: str) -> None:
    _base(model).config._attn_implementation = name  # the setter reaches the sub-configs too


def _probe_logits(model: Any, ids: list[int], positions: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(
        input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions], device=device)
    )
    return out.logits[0].float()


def packing_problem(model: Any) -> str | None:
    """Why this model would not keep the examples of a packed row apart; None when it does.

    Runs the model (eval mode, no gradients) on a packed row [a | b], on [a' | b] with another first example,
    and on b alone: b's logits must be the same in the first two (nothing leaks from a) and match the third
    (positions restart at each example).
    """
    base = _base(model)
    accepts = inspect.signature(base.forward).parameters
    if "position_ids" not in accepts and not any(p.kind is p.VAR_KEYWORD for p in accepts.values()):
        return f"{type(base).__name__}.forward takes no position_ids"
    vocab = int(getattr(base.config, "vocab_size", 0) or 0) or 1000
    a1, a2, b = ([(7 * i + k) % vocab for i in range(n)] for k, n in ((11, 6), (500, 6), (101, 5)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            first = _probe_logits(model, a1 + b, [*range(6), *range(5)])[6:]
            second = _probe_logits(model, a2 + b, [*range(6), *range(5)])[6:]
            alone = _probe_logits(model, b, list(range(5)))
    except Exception as exc:  # a model that cannot take a packed row at all
        return f"{type(base).__name__} failed on a packed row ({type(exc).__name__}: {exc})"
    finally:
        model.train(was_training)
    scale = float(alone.abs().max()) or 1.0
    leak = float((first - second).abs().max()) / scale
    if leak > LEAK_TOLERANCE:
        return (
            f"with attention `{_attention(model)}`, {type(base).__name__} lets packed examples see each "
            f"other (an example's logits moved by {leak:.1%} when the example before it changed)"
        )
    shift = float((first - alone).abs().max()) / scale
    if shift > POSITION_TOLERANCE:
        return (
            f"{type(base).__name__} does not restart positions at each packed example "
            f"(logits {shift:.1%} off running the example alone)"
        )
    return None


def choose_batching(model: Any, requested: Batching) -> BatchingChoice:
    """Decide the batching for this model (`_choose_rows`) and whether only trained positions get logits."""
    choice = _choose_rows(model, requested)
    choice.logits_reason = trained_logits_problem(model)
    choice.trained_logits_only = choice.logits_reason is None
    return choice


def _choose_rows(model: Any, requested: Batching) -> BatchingChoice:
    """Decide the batching for this model; for padding_free, prove the model keeps examples apart.

    With sdpa attention the model is switched to `packed_sdpa_attention` (same results, less compute); a model
    that fails the probe goes back to its own attention and to padded batches.
    """
    original = _attention(model)
    if requested != "padding_free":
        return BatchingChoice(requested, requested, original)
    if original == "sdpa":
        _set_attention(model, PACKED_SDPA)
    problem = packing_problem(model)
    if problem is None:
        return BatchingChoice(requested, requested, _attention(model))
    if original is not None and _attention(model) != original:
        _set_attention(model, original)
    logger.warning("padding_free falls back to padded: %s", problem)
    return BatchingChoice(requested, "padded", original, problem)


def make_collator(choice: BatchingChoice, pad_token_id: int) -> Any:
    """The data collator for the batching in use."""
    if choice.used == "padding_free":
        rows: Any = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    else:
        rows = DataCollator(pad_token_id=pad_token_id)
    return TrainedLogits(rows) if choice.trained_logits_only else rows


# ----------------------------------------------------------------------------- logits where it is trained


def trained_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets): the positions whose next label is a loss target, and those labels, flattened in the
    order the model flattens the kept positions (row-major). The model shifts labels by one; so does this."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[..., :-1] = labels[..., 1:] != -100
    return mask, labels[..., 1:][mask[..., :-1]]


class TrainedLogits:
    """Wraps a collator: each batch also carries `logits_to_keep` (the trained positions, as a boolean mask)
    and `shift_labels` (their targets), so the model's output layer and loss skip every other position."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        if "labels" in batch:
            batch["logits_to_keep"], batch["shift_labels"] = trained_positions(batch["labels"])
        return batch


def trained_logits_problem(model: Any) -> str | None:
    """Why this model cannot compute logits for the trained positions only; None when it can.

    Not assumed from a signature: the loss of a probe batch with `logits_to_keep`/`shift_labels` must equal
    the loss over every position (a model that ignored either would fail or give another loss).
    """
    base = _base(model)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no logits_to_keep"
    vocab = int(getattr(base.config, "vocab_size", 0) or 0) or 1000
    ids = torch.tensor([[(13 * i + 5) % vocab for i in range(12)]], device=next(model.parameters()).device)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[0, 9] = -100  # and a masked token inside the answer
    mask, targets = trained_positions(labels)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            every = model(input_ids=ids, labels=labels).loss.float()
            kept = model(input_ids=ids, labels=labels, logits_to_keep=mask, shift_labels=targets).loss.float()
    except Exception as exc:  # noqa: BLE001 - any failure means: keep every position's logits
        return f"{type(base).__name__} failed with logits_to_keep ({type(exc).__name__}: {exc})"
    finally:
        model.train(was_training)
    if not torch.isclose(every, kept, rtol=LOGITS_TOLERANCE, atol=LOGITS_TOLERANCE):
        name = type(base).__name__
        return f"{name}'s loss changed with logits_to_keep ({float(every):.4f} -> {float(kept):.4f})"
    return None


def sampling_strategy(batching: Batching) -> str | None:
    """TrainingArguments.train_sampling_strategy for the batching (None: leave the Trainer's default)."""
    return "group_by_length" if batching == "grouped" else None


def record_choice(plan_path: Path, choice: BatchingChoice) -> None:
    """Write the batching used into plan.json (the plan is written before the model is loaded)."""
    plan = rundir.read_json_object(plan_path)
    plan["batching"] = choice.to_dict()
    rundir.write_json(plan_path, plan)


# ----------------------------------------------------------------------------- what a step costs


def batch_counts(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Token counts of one micro-batch, as device tensors (no host sync); {} when it has no tokens to count.

    `tokens`: real tokens (no padding); `positions`: positions computed, padding included;
    `trained_tokens`: positions that are a loss target (labels shifted by one, as the model does);
    `attention_pairs`: causal attention pairs (sum of l (l + 1) / 2 over the examples), for the FLOPs.
    """
    shaped = next((inputs[k] for k in ("input_ids", "labels", "attention_mask") if k in inputs), None)
    if shaped is None:
        return {}
    if "attention_mask" in inputs:
        lengths = inputs["attention_mask"].sum(-1)
    elif "position_ids" in inputs:
        # a packed row: an example ends where the next one restarts at position 0
        lengths = (inputs["position_ids"].reshape(-1) == 0).long().cumsum(0).bincount()
    else:
        lengths = torch.full((shaped.shape[0],), shaped.shape[-1], device=shaped.device)
    counts = {
        "positions": torch.tensor(shaped.numel(), device=shaped.device),
        "tokens": lengths.sum(),
        "attention_pairs": (lengths * (lengths + 1) // 2).sum(),
    }
    if "labels" in inputs:
        counts["trained_tokens"] = (inputs["labels"][..., 1:] != -100).sum()
    return counts
