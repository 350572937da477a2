"""Padding-free batches: the same losses and gradients as padded ones, the fallback, and the step count.

A tiny Llama (hidden 64, fp32) runs one micro-batch of examples of different lengths padded and packed; the
loss of every example and the gradients of the micro-batch loss must agree. A model that lets packed
examples see each other (eager attention with a cache: transformers then skips the packed mask) must fall
back to padded batches with the reason.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from tunewise.batching import (
    PACKED_SDPA,
    BatchingChoice,
    TrainedLogits,
    batch_counts,
    choose_batching,
    make_collator,
    packing_problem,
    record_choice,
    sampling_strategy,
    trained_logits_problem,
    trained_positions,
)
from tunewise.data import DataCollator
from tunewise.plan import plan_steps
from tunewise.training import cost
from tunewise.training.cost import peak_flops, step_cost

VOCAB = 300
TRAINED_ONLY = ("logits_to_keep", "shift_labels")  # what TrainedLogits adds to a batch


def _tiny(attention: str = "sdpa", use_cache: bool = False, hidden: int = 64, layers: int = 2):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        use_cache=use_cache,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation=attention).float()


def _features(lengths: list[int], prompt: int = 3, seed: int = 1) -> list[dict[str, list[int]]]:
    """Examples whose first `prompt` tokens are masked, like a chat prompt."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, VOCAB, (n,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _example_losses(model, batch: dict, spans: list[tuple[int, int, int]]) -> torch.Tensor:
    """Summed token loss of each example; spans are (row, start, end) of the examples in the batch."""
    logits = model(**{k: v for k, v in batch.items() if k not in ("labels", *TRAINED_ONLY)}).logits
    labels = batch["labels"]
    losses = []
    for row, start, end in spans:
        lg, lb = logits[row, start : end - 1], labels[row, start + 1 : end]
        losses.append(torch.nn.functional.cross_entropy(lg, lb, ignore_index=-100, reduction="sum"))
    return torch.stack(losses)


def _padded_and_packed(model, lengths: list[int]):
    features = _features(lengths)
    padded = DataCollator(pad_token_id=0)(features)
    choice = choose_batching(model, "padding_free")
    assert choice.used == "padding_free", choice.reason
    packed = make_collator(choice, pad_token_id=0)(features)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    padded_spans = [(i, 0, n) for i, n in enumerate(lengths)]
    packed_spans = [(0, s, s + n) for s, n in zip(starts, lengths, strict=True)]
    return padded, packed, padded_spans, packed_spans


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_losses_and_gradients_equal_padded(attention):
    model = _tiny(attention)
    lengths = [7, 19, 4, 12]
    padded, packed, padded_spans, packed_spans = _padded_and_packed(model, lengths)
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]

    per_padded = _example_losses(model, padded, padded_spans)
    per_packed = _example_losses(model, packed, packed_spans)
    torch.testing.assert_close(per_packed, per_padded, rtol=1e-5, atol=1e-5)

    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        out = model(**batch)  # the model's own loss: mean over trained tokens, as the Trainer uses it
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def _loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batching", ["padded", "padding_free"])
def test_logits_of_trained_positions_only_give_the_same_loss_and_gradients(batching):
    """The output layer on the trained positions only: the model's loss (the Trainer's, with and without
    num_items_in_batch) and every gradient equal those of logits at every position."""
    model = _tiny()
    features = _features([7, 19, 5, 12], prompt=4)
    features[1]["labels"][9:11] = [-100, -100]  # a masked stretch inside an answer
    choice = BatchingChoice(batching, batching)
    every = make_collator(choice, pad_token_id=0)(features)
    choice.trained_logits_only = True
    kept = make_collator(choice, pad_token_id=0)(features)
    assert set(kept) - set(every) == set(TRAINED_ONLY)
    trained = int(batch_counts(every)["trained_tokens"])
    assert int(kept["logits_to_keep"].sum()) == trained == kept["shift_labels"].numel()
    assert (kept["shift_labels"] != -100).all()
    for extra in ({}, {"num_items_in_batch": torch.tensor(trained + 3)}):
        loss_every, grads_every = _loss_and_grads(model, {**every, **extra})
        loss_kept, grads_kept = _loss_and_grads(model, {**kept, **extra})
        torch.testing.assert_close(loss_kept, loss_every, rtol=1e-5, atol=1e-6)
        assert grads_every.keys() == grads_kept.keys() and grads_every
        for name in grads_every:
            torch.testing.assert_close(grads_kept[name], grads_every[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trained_positions_follow_the_models_shift():
    labels = torch.tensor([[-100, -100, 7, 8, -100, 9], [-100, 3, -100, -100, -100, -100]])
    mask, targets = trained_positions(labels)
    # position p is kept when label p + 1 is a target; the last position predicts nothing
    assert mask.tolist() == [
        [False, True, True, False, True, False],
        [True, False, False, False, False, False],
    ]
    assert targets.tolist() == [7, 8, 9, 3]


class _NoLogitsToKeep(LlamaForCausalLM):
    def forward(self, input_ids=None, labels=None, position_ids=None):  # an older model's signature
        return super().forward(input_ids=input_ids, labels=labels, position_ids=position_ids)


class _IgnoresShiftLabels(LlamaForCausalLM):
    def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
        return super().forward(input_ids=input_ids, labels=labels, logits_to_keep=logits_to_keep)


def test_a_model_that_cannot_keep_trained_logits_computes_every_position_and_says_why():
    assert trained_logits_problem(_tiny()) is None
    config = _tiny().config
    for cls, words in (
        (_NoLogitsToKeep, "takes no logits_to_keep"),
        (_IgnoresShiftLabels, "failed with logits_to_keep"),
    ):
        model = cls._from_config(config, attn_implementation="sdpa").float()
        problem = trained_logits_problem(model)
        assert problem is not None and words in problem, problem
        choice = choose_batching(model, "padded")
        assert not choice.trained_logits_only and choice.logits_reason == problem
        assert choice.notice() == f"logits of every position are computed: {problem}"
        assert not isinstance(make_collator(choice, pad_token_id=0), TrainedLogits)


def test_sdpa_runs_attention_example_by_example_with_the_same_result():
    """The per-example sdpa path gives what transformers' block-diagonal mask gives."""
    features = _features([9, 3, 14])
    packed = make_collator(BatchingChoice("padding_free", "padding_free"), pad_token_id=0)(features)
    masked, per_example = _tiny("sdpa"), _tiny("sdpa")
    assert choose_batching(per_example, "padding_free").attention == PACKED_SDPA
    with torch.no_grad():
        torch.testing.assert_close(
            per_example(**packed).logits, masked(**packed).logits, rtol=1e-5, atol=1e-5
        )
    padded = DataCollator(pad_token_id=0)(features)  # padded batches (eval, generation) still take the mask
    with torch.no_grad():
        torch.testing.assert_close(
            per_example(**padded).logits, masked(**padded).logits, rtol=1e-5, atol=1e-5
        )


def test_packed_labels_train_the_same_tokens_as_padded():
    features = _features([5, 8, 2], prompt=2)
    padded = DataCollator(pad_token_id=0)(features)
    packed = make_collator(BatchingChoice("padding_free", "padding_free"), pad_token_id=0)(features)
    # an example's first label is never a target: -100 in the packed row, dropped by the shift when padded
    assert packed["labels"][0, [0, 5, 13]].tolist() == [-100, -100, -100]
    padded_counts = {k: int(v) for k, v in batch_counts(padded).items()}
    packed_counts = {k: int(v) for k, v in batch_counts(packed).items()}
    same = {"trained_tokens": (5 - 2) + (8 - 2) + 0, "tokens": 15, "attention_pairs": 15 + 36 + 3}
    assert padded_counts == {**same, "positions": 3 * 8}
    assert packed_counts == {**same, "positions": 15}
    assert batch_counts({"inputs_embeds": torch.zeros(1, 2, 4)}) == {}


def test_a_model_that_leaks_falls_back_to_padded_with_the_reason(caplog):
    """Eager attention with a cache: transformers skips the packed-sequence mask, so examples would mix."""
    leaky = _tiny("eager", use_cache=True)
    problem = packing_problem(leaky)
    assert problem is not None and "see each other" in problem
    with caplog.at_level("WARNING", logger="tunewise.batching"):
        choice = choose_batching(leaky, "padding_free")
    assert (choice.requested, choice.used, choice.reason) == ("padding_free", "padded", problem)
    assert choice.notice() == f"data.batching: padding_free -> padded: {problem}"
    assert problem in caplog.text
    collator = make_collator(choice, pad_token_id=0)
    assert isinstance(collator, TrainedLogits) and isinstance(collator.collator, DataCollator)
    assert packing_problem(_tiny("eager", use_cache=False)) is None  # the same model without a cache is fine


def test_padded_and_grouped_are_taken_as_asked():
    model = _tiny("sdpa")
    for batching in ("padded", "grouped"):
        choice = choose_batching(model, batching)
        assert (choice.used, choice.reason, choice.attention) == (batching, None, "sdpa")
    assert sampling_strategy("grouped") == "group_by_length" and sampling_strategy("padded") is None


class _Varied(torch.utils.data.Dataset):
    """Token sequences of lengths 3..40."""

    def __init__(self, n: int):
        self.items = _features([3 + (7 * i) % 38 for i in range(n)], prompt=1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@pytest.mark.parametrize("batching", ["padding_free", "grouped"])
@pytest.mark.parametrize(("examples", "batch", "accumulation", "epochs"), [(23, 4, 2, 1), (10, 3, 1, 2)])
def test_plan_matches_the_trainer_for_each_batching(
    tmp_path, batching, examples, batch, accumulation, epochs
):
    model = _tiny("sdpa", hidden=16, layers=1)
    choice = choose_batching(model, batching)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=epochs,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        train_sampling_strategy=sampling_strategy(batching) or "random",
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=_Varied(examples), data_collator=make_collator(choice, 0)
    )
    trainer.train()
    assert plan_steps(examples, batch, accumulation, epochs).total_steps == trainer.state.global_step


def test_record_choice_writes_plan_json(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"steps": {"total_steps": 3}}))
    record_choice(plan, BatchingChoice("padding_free", "padded", "eager", "a reason"))
    data = json.loads(plan.read_text())
    assert data["steps"] == {"total_steps": 3}
    assert data["batching"] == {
        "requested": "padding_free",
        "used": "padded",
        "attention": "eager",
        "reason": "a reason",
        "trained_logits_only": False,
        "logits_reason": None,
    }


def test_step_cost_and_mfu():
    cost = step_cost(total_params=1000, trainable_params=10, layers=2, hidden=8, peak=1e6)
    assert cost.flops_per_token == 4 * 1000 + 2 * 10 and cost.flops_per_pair == 12 * 2 * 8
    assert cost.step_flops(tokens=100, pairs=50) == 100 * 4020 + 50 * 192
    assert cost.mfu(tokens=100, pairs=50, seconds=2.0) == pytest.approx((402000 + 9600) / 2.0 / 1e6)
    assert step_cost(1000, 1000, 2, 8, None).flops_per_token == 6 * 1000  # full fine-tuning: 6N
    assert step_cost(1000, 10, 2, 8, None).mfu(100, 50, 1.0) is None


def test_peak_flops_is_measured_once_per_device(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cost, "measure_peak_flops", lambda device, dtype: calls.append(1) or 5e9)
    cache = tmp_path / "peak.json"
    assert peak_flops("cpu", "Test CPU", torch.bfloat16, cache) == 5e9
    assert peak_flops("cpu", "Test CPU", torch.bfloat16, cache) == 5e9
    assert len(calls) == 1
    peak_flops("cpu", "Test CPU", torch.float32, cache)
    assert len(calls) == 2 and len(json.loads(cache.read_text())) == 2


def test_run_numbers_leave_out_the_first_step_and_warn_on_a_wrong_memory_estimate():
    from types import SimpleNamespace

    from tunewise.training.monitor import StepMonitor, StepRecord, peak_memory_bytes

    notes: list[str] = []
    cost = step_cost(total_params=1000, trainable_params=10, layers=2, hidden=8, peak=1e6)
    trainer = SimpleNamespace(step_record=StepRecord())
    monitor = StepMonitor(trainer, None, None, cost=cost, memory_estimate=1, on_notice=notes.append)
    for step_time in (9.0, 2.0, 2.0):  # the first step is warm-up and is left out
        record = {"step_time": step_time, "tokens": 100, "positions": 125, "trained_tokens": 40}
        monitor._add_to_totals(record | {"attention_pairs": 50})
    numbers = monitor.run_numbers()
    assert numbers["speed"]["steps_timed"] == 2
    assert numbers["speed"]["trained_tokens_per_s"] == 80 / 4.0
    assert numbers["speed"]["tokens_per_s"] == 200 / 4.0 and numbers["speed"]["padding_fraction"] == 0.2
    assert numbers["speed"]["mfu"] == pytest.approx(2 * cost.step_flops(100, 50) / 4.0 / 1e6)
    assert numbers["memory"]["estimated_peak"] == 1 and numbers["memory"]["warning"] == notes[0]
    exact = StepMonitor(trainer, None, None, memory_estimate=peak_memory_bytes(), on_notice=notes.append)
    assert "warning" not in exact.run_numbers()["memory"] and len(notes) == 1


def test_the_measured_peak_is_trainings_own_not_what_the_process_did_before():
    """The demo evaluates the base model before training in the same process: reset, then measure."""
    import numpy as np

    from tunewise.training.monitor import peak_memory_bytes, reset_peak_memory

    block = np.ones(600 * 2**20 // 8)  # 600 MiB resident, then freed
    before = peak_memory_bytes()
    del block
    reset_peak_memory()
    after = peak_memory_bytes()
    assert before - after > 400 * 2**20, (before, after)


def test_measuring_the_peak_leaves_the_global_rng_alone():
    """A first run measures the peak, later ones read the cache: both must draw the same dropout masks."""
    from tunewise.training.cost import measure_peak_flops

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    measure_peak_flops("cpu", torch.float32, size=64, seconds=0.01)
    assert torch.equal(torch.rand(4), expected)
