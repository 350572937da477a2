"""Verdicts: replay a run through the doctor's rules and say what happened, with the checkpoint to keep.

`diagnose_curve` replays a whole run through the rules (`watcher.CurveWatcher`, which the training
monitor feeds live) and turns what they found into a verdict, a plain summary, the evidence and the
checkpoint to keep; `diagnose_path` does it for any log `curve.load_curve` reads (a tunewise run,
Hugging Face Trainer output, TensorBoard events). No torch or transformers here: `tunewise doctor`
starts fast anywhere.

Diagnosis.exit_code(): 0 when no finding is worse than info, 1 when the worst is a warning, 2 when
any is an error.
"""

import dataclasses
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunewise.doctor.codes import DIVERGED_CODES, OVERFIT_CODES, UNSTABLE_CODES, Verdict
from tunewise.doctor.curve import Curve, finite, load_curve, read_context
from tunewise.doctor.divergence import (
    CALM_ABOVE,
    CALM_RATIO,
    MEDIAN_WINDOW,
    MIN_NOISE_POINTS,
    NOISE_WINDOW,
    above_spike_line,
    above_start_line,
)
from tunewise.doctor.findings import (
    SEVERITY_RANK,
    Advice,
    Finding,
    Fix,
    Severity,
    Vocabulary,
    fmt_lr,
    num,
    speak_finding,
)
from tunewise.doctor.progress import FLAT_BAND, OSC_SPREAD, spread
from tunewise.doctor.watcher import WATCHER_KEYS, CurveWatcher

logger = logging.getLogger(__name__)

MIN_POINTS = 5  # fewer train points than this are too few to judge (unless the run diverged)
GRAD_BLIP_POINTS = 2  # a grad-norm spike with no loss spike within this many points is a blip
SPIKE_UNSTABLE = 3.0  # a loss spike that came back counts as unstable from this many times its median
# How the fixes heading says whose words they are in.
FIX_WORDS = {"tunewise": "; tunewise config overrides", "trainer": "; as arguments of your training script"}
NO_CHANGE = {"tunewise": "(no config change)", "trainer": "(no argument to change)"}


@dataclass
class Diagnosis:
    """What happened to a whole run: a verdict, a plain summary, findings and the checkpoint to keep."""

    verdict: Verdict
    summary: str
    findings: list[Finding]
    evidence: dict[str, Any]
    best_checkpoint: str | None
    source: str
    vocabulary: Vocabulary = "tunewise"  # whose words the run's user applies fixes in (see findings.py)

    def in_run_words(self) -> "Diagnosis":
        """The same diagnosis with every fix in the run's own vocabulary (a script's TrainingArguments for a
        watched run or a Trainer output_dir); the findings of this one keep tunewise's overrides."""
        findings = [speak_finding(f, self.vocabulary) for f in self.findings]
        return dataclasses.replace(self, findings=findings)

    def worst_severity(self) -> Severity | None:
        return max((f.severity for f in self.findings), key=SEVERITY_RANK.__getitem__, default=None)

    def exit_code(self) -> int:
        """0 when no finding is worse than info, 1 when the worst is a warning, 2 when any is an error."""
        return SEVERITY_RANK[self.worst_severity() or "info"]

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON: a NaN or inf number is written as null, with `<key>_non_finite` "NaN"/"inf"/"-inf"."""
        return json_safe(self._raw_dict())

    def _raw_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "summary": self.summary,
            "evidence": self.evidence,
            "best_checkpoint": self.best_checkpoint,
            "source": self.source,
            "fix_vocabulary": self.vocabulary,
            "worst_severity": self.worst_severity(),
            "exit_code": self.exit_code(),
            "findings": [f.to_dict() for f in self.findings],
        }


def json_safe(value: Any) -> Any:
    """A copy of `value` that strict JSON parsers accept: each non-finite float in a dict becomes None
    next to a `<key>_non_finite` flag ("NaN", "inf" or "-inf"); in a list it becomes that string."""
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if isinstance(item, float) and not math.isfinite(item):
                out[key], out[f"{key}_non_finite"] = None, num(item)
            else:
                out[key] = json_safe(item)
        return out
    if isinstance(value, list | tuple):
        return [num(x) if isinstance(x, float) and not math.isfinite(x) else json_safe(x) for x in value]
    return value


def diagnose_path(path: Path) -> Diagnosis:
    """Load a run from any supported log and diagnose it, with config.yaml/result.json as context."""
    path = Path(path)
    curve = load_curve(path)
    return diagnose_curve(curve, read_context(path if path.is_dir() else path.parent))


def diagnose_curve(curve: Curve, context: dict[str, Any] | None = None) -> Diagnosis:
    """Replay a curve through a CurveWatcher, add the whole-run checks, and give the verdict.

    Args:
        curve: the run's points.
        context: optional facts: CurveWatcher's arguments, and `status` from result.json.
    """
    context = context or {}
    watcher = CurveWatcher(**{key: context.get(key) for key in WATCHER_KEYS})
    watcher.total_steps = watcher.total_steps or curve.total_steps
    watcher.replay(curve)
    watcher.finish()
    _settle(watcher)
    verdict = _verdict(watcher, len(curve.train), context.get("status"))
    evidence = _run_evidence(curve, context.get("status"), watcher.divergence.hidden_steps)
    bad_steps = [watcher.open_episodes[c] for c in DIVERGED_CODES if c in watcher.open_episodes]
    bad_step = min(bad_steps) if bad_steps else None
    checkpoint, evidence["keep"] = _choose_checkpoint(curve, bad_step)
    cause = _cause(watcher, verdict)
    if cause:
        evidence["cause"] = cause
    findings = list(watcher.findings)
    if verdict == "insufficient-data":
        findings.append(
            Finding(
                curve.train[-1].step if curve.train else None,
                "info",
                "insufficient_data",
                f"only {len(curve.train)} train points; {MIN_POINTS} are needed to judge",
                {"train_points": len(curve.train)},
            )
        )
    summary = _summarize(verdict, findings, evidence)
    vocabulary = context.get("vocabulary") or "tunewise"
    return Diagnosis(verdict, summary, findings, evidence, checkpoint, curve.source, vocabulary)


def _settle(watcher: CurveWatcher) -> None:
    """Post hoc, soften live findings that the rest of the run proved too pessimistic."""
    ended = {(code, began): end for code, began, end in watcher.recovered}
    last_step, last_loss = watcher.losses[-1] if watcher.losses else (None, None)
    for f in watcher.findings:
        fell = watcher.end_change is not None and watcher.end_change <= -FLAT_BAND
        if f.code in ("not_falling", "flat") and fell:
            f.severity, f.title = "info", f"{f.title}; it fell later ({num(last_loss)} at step {last_step})"
        episode = {
            "non_finite": ("non_finite", f.step),
            "loss_explosion": ("loss_spike", f.evidence.get("spike_step")),
            "loss_degradation": ("loss_degradation", f.evidence.get("min_step")),
            "eval_degradation": ("eval_degradation", f.evidence.get("best_eval_step")),
        }.get(f.code)
        if episode in ended and f.severity == "error":
            f.severity, f.title = "warning", f"{f.title} (recovered by step {ended[episode]})"
            if f.code == "eval_degradation":
                f.severity = "info"  # the eval came back: no lasting harm
            if f.code == "loss_degradation" and _outlearned(watcher, f):
                f.severity = "info"
                f.title += f"; it then fell below that minimum ({num(last_loss)} at step {last_step})"
            if f.code == "non_finite" and _one_overflow(watcher, f, ended[episode]):
                f.severity = "info"
                f.title += (
                    ": one overflow step, its update skipped; the loss was back on its curve at the next log"
                )
        if f.code == "eval_degradation" and f.severity == "error" and _last_eval_only(watcher, f):
            watcher.open_episodes.pop("eval_degradation", None)  # not a divergence the run ended in
            f.severity = "info"
            f.title += (
                "; the run's last eval, the only one after its best: a tick until another eval confirms it"
            )
        if f.code == "loss_spike" and ("loss_spike", f.step) in ended and _small_spike(f):
            f.severity, f.title = (
                "info",
                f"{f.title}; a single blip, back by step {ended[('loss_spike', f.step)]}",
            )
        elif f.code == "loss_spike" and ("loss_spike", f.step) in ended and _noisy_batch(watcher, f):
            f.severity = "info"
            f.title += "; one batch of a curve whose batches swing widely: back under the spike line at once"
        if f.code in ("overfitting", "memorization") and not watcher.overfitting.still_above_best():
            f.severity, f.title = "info", f"{f.title}; eval came back near its best by the end"
    for f in watcher.findings:  # after the loss spikes settled: a grad-norm spike is as bad as what followed
        if f.code == "grad_norm_spike" and _blip(watcher, f.step):
            f.severity, f.title = "info", f"{f.title}; the loss did not follow it"
        elif f.code == "grad_norm_spike" and _blip(watcher, f.step, serious_only=True):
            f.severity, f.title = "info", f"{f.title}; the loss came back at once"


def _outlearned(watcher: CurveWatcher, f: Finding) -> bool:
    """A climb that came back and that the run then outlearned: the median of its last tenth (at least
    MEDIAN_WINDOW points) is below the minimum the climb started from. A bump on the way down (a warmup
    peak, a hard stretch of data), not a divergence nor instability; a climb that came back only to its
    old level still counts (unstable)."""
    low = f.evidence.get("min_loss")
    values = [x for _, x in watcher.losses]
    tail = values[-max(MEDIAN_WINDOW, len(values) // 10) :]
    return low is not None and len(values) >= 2 * MEDIAN_WINDOW and statistics.median(tail) < low


def _last_eval_only(watcher: CurveWatcher, f: Finding) -> bool:
    """An eval degradation that rests on the run's last eval alone: the only eval after the best."""
    best = f.evidence.get("best_eval_step")
    evals = watcher.overfitting.evals
    return best is not None and bool(evals) and [e.step for e in evals if e.step > best] == [evals[-1].step]


def _one_overflow(watcher: CurveWatcher, f: Finding, ended: int) -> bool:
    """A non-finite grad norm with a finite loss at one logged step, the next one finite: an overflow whose
    update was skipped (fp16's loss scaler, or tunewise's monitor), however high that one batch's own loss
    was. The model never took the step, so nothing was damaged; a loss that stayed high after it is judged
    by the loss rules on its own."""
    ev, step = f.evidence, f.step or 0
    overflow = finite(ev.get("loss")) and not finite(ev.get("grad_norm", 0.0))
    if not overflow or ev.get("nan_hidden_by_logging_filter"):
        return False
    before = [x for s, x in watcher.losses if s < step][-MEDIAN_WINDOW:]
    after = next(((s, x) for s, x in watcher.losses if s > step), None)
    if not before or after is None or after[0] != ended:
        return False
    ref = statistics.median(before)
    return after[1] <= max(CALM_RATIO * ref, ref + CALM_ABOVE)  # back on the curve at the next log


def _noisy_batch(watcher: CurveWatcher, f: Finding) -> bool:
    """A loss spike of one log (the next log is back under the spike line) on a curve whose own per-batch
    noise swings widely: the 10-90% range of the NOISE_WINDOW losses before it is over OSC_SPREAD of their
    median (progress.py's "swinging widely"). Such a curve's batches have a heavy tail, so one batch far
    above the median is its noise (LABELS H4), not instability; on a quiet curve the same spike stands out
    and counts. A spike over the first steps' explosion line (EARLY_RATIO x the run's starting loss and
    EARLY_ABOVE above it) undid more than the run had learned: never one batch's noise (LABELS R6a).
    (A swinging curve without a trend is caught by the oscillation rule on its own.)"""
    steps = [s for s, _ in watcher.losses]
    if f.step not in steps:
        return False
    at = steps.index(f.step)
    before = [x for _, x in watcher.losses[max(0, at - NOISE_WINDOW) : at]]
    if len(before) < MIN_NOISE_POINTS or at + 1 >= len(steps):
        return False
    low, ref = f.evidence.get("running_min"), f.evidence.get("recent_median")
    if low is None or ref is None or above_spike_line(watcher.losses[at + 1][1], low, ref):
        return False
    start, loss = watcher.divergence.start, f.evidence.get("loss", 0.0)
    if start and above_start_line(loss, start):
        return False  # far above where the run started (the first steps' explosion line): no batch's noise
    return spread(before) > OSC_SPREAD


def _small_spike(f: Finding) -> bool:
    """A loss spike under SPIKE_UNSTABLE x its recent median (one that exploded is never small)."""
    ref = f.evidence.get("recent_median")
    return bool(ref) and f.evidence.get("loss", 0.0) < SPIKE_UNSTABLE * ref


def _blip(watcher: CurveWatcher, began: int | None, serious_only: bool = False) -> bool:
    """A grad-norm spike that the loss did not follow: no loss spike within GRAD_BLIP_POINTS points of it
    (with `serious_only`, none that is more than info: the loss spikes near it were single blips or one
    noisy batch, back at once, so the update it stands for did no lasting harm)."""
    steps = [s for s, _ in watcher.losses]
    if began is None or began not in steps:
        return began is not None
    at = steps.index(began)
    near = set(steps[max(0, at - GRAD_BLIP_POINTS) : at + GRAD_BLIP_POINTS + 1])
    return not any(
        f.code in ("loss_spike", "loss_explosion")
        and f.step in near
        and not (serious_only and f.severity == "info")
        for f in watcher.findings
    )


def _only_inferred_nan(watcher: CurveWatcher) -> bool:
    """The divergence rests only on a 0.0 loss read as a hidden NaN with no grad norm to confirm it (a
    positive loss, then exactly 0.0): on a log too short to judge, a collator that left nothing to train
    reads the same, so the evidence is too thin for a verdict."""
    errors = [f for f in watcher.findings if f.code in DIVERGED_CODES and f.severity == "error"]
    return bool(errors) and all(
        f.code == "non_finite"
        and f.evidence.get("nan_hidden_by_logging_filter")
        and f.evidence.get("grad_norm") is None
        for f in errors
    )


def _serious_codes(watcher: CurveWatcher) -> set[str]:
    return {f.code for f in watcher.findings if f.severity != "info"}


def _verdict(watcher: CurveWatcher, train_points: int, status: str | None) -> Verdict:
    """diverged > nothing trained (flat) > insufficient-data > overfitting > unstable > flat > healthy."""
    codes = _serious_codes(watcher)
    diverged = status == "diverged" or DIVERGED_CODES & watcher.open_episodes.keys()
    if diverged and not (train_points < MIN_POINTS and status != "diverged" and _only_inferred_nan(watcher)):
        return "diverged"
    if watcher.nothing_trained:
        return "flat"
    if train_points < MIN_POINTS:
        return "insufficient-data"
    if codes & OVERFIT_CODES:
        return "overfitting"
    if codes & UNSTABLE_CODES:
        return "unstable"
    return "flat" if watcher.flat_at_end else "healthy"


def _cause(watcher: CurveWatcher, verdict: Verdict) -> str | None:
    """The short cause behind a failure verdict, in the corpus labels' words."""
    open_codes = watcher.open_episodes.keys()
    if verdict == "diverged":
        hidden = any(
            f.code == "non_finite" and f.evidence.get("nan_hidden_by_logging_filter")
            for f in watcher.findings
        )
        if "non_finite" in open_codes:
            return "nan_hidden" if hidden else "non_finite"
        if {"loss_degradation", "eval_degradation"} & open_codes:
            return "degradation"
        return "explosion" if "loss_explosion" in open_codes else None
    if verdict == "flat":
        return "nothing_trained" if watcher.nothing_trained else "not_learning"
    if verdict == "unstable":
        codes = _serious_codes(watcher)
        return (
            "oscillation"
            if "oscillation" in codes
            else "degradation"
            if codes & {"loss_rising", "loss_degradation", "eval_degradation", "eval_rising"}
            else "spikes"
        )
    return None


def _run_evidence(curve: Curve, status: str | None, hidden: set[int]) -> dict[str, Any]:
    """Whole-run numbers: span, first/last/min loss, best and last eval, peak learning rate (a loss the
    logging filter wrote as 0.0 for a NaN, at a step in `hidden`, counts as NaN)."""
    losses = [(p.step, math.nan if p.step in hidden else p.loss) for p in curve.train]
    kept = [(s, x) for s, x in losses if finite(x)]
    evals = [e for e in curve.eval if finite(e.eval_loss)]
    lrs = [p.lr for p in curve.train if finite(p.lr)]
    evidence: dict[str, Any] = {"train_points": len(losses), "eval_points": len(curve.eval)}
    if losses:
        evidence.update(first_step=losses[0][0], last_step=losses[-1][0], loss_last=losses[-1][1])
    if kept:
        low = min(kept, key=lambda t: t[1])
        evidence.update(loss_first=kept[0][1], loss_min=low[1], loss_min_step=low[0])
    if evals:
        best = min(evals, key=lambda e: e.eval_loss)
        evidence.update(
            best_eval_loss=best.eval_loss,
            best_eval_step=best.step,
            last_eval_loss=evals[-1].eval_loss,
            last_eval_step=evals[-1].step,
        )
    if lrs:
        evidence["peak_lr"] = max(lrs)
    if status:
        evidence["status"] = status
    return evidence


def _choose_checkpoint(curve: Curve, bad_step: int | None) -> tuple[str | None, str]:
    """The checkpoint to keep and why: lowest eval loss, else the last one before divergence."""
    evals = [e for e in curve.eval if finite(e.eval_loss) and (bad_step is None or e.step < bad_step)]
    if evals:
        best = min(evals, key=lambda e: e.eval_loss)
        named = curve.best_model_checkpoint and Path(curve.best_model_checkpoint).name
        earlier = [s for s in curve.checkpoints if s <= best.step]
        name = (
            named
            if named == f"checkpoint-{best.step}"
            else f"checkpoint-{earlier[-1] if earlier else best.step}"
        )
        return name, f"lowest eval loss {num(best.eval_loss)} at step {best.step}"
    saved = [s for s in curve.checkpoints if bad_step is None or s < bad_step]
    if bad_step is not None and saved:
        return f"checkpoint-{saved[-1]}", f"the last checkpoint before the loss went bad at step {bad_step}"
    if bad_step is not None:
        return None, f"the last checkpoint saved before step {bad_step}, if any (checkpoint list unknown)"
    if saved:
        return f"checkpoint-{saved[-1]}", "no eval to compare: the final checkpoint; the run did not diverge"
    return None, "no eval and no checkpoint list: keep the final model"


def _summarize(verdict: Verdict, findings: list[Finding], ev: dict[str, Any]) -> str:
    """One or two plain sentences with the run's numbers."""
    span = (
        f"{num(ev.get('loss_first'))} at step {ev.get('first_step')} to {num(ev.get('loss_last'))} "
        f"at step {ev.get('last_step')}"
    )
    if verdict == "diverged":
        bad = [f for f in findings if f.code in DIVERGED_CODES and f.severity == "error"]
        what = bad[0].title if bad else f"result.json says the run diverged; loss went from {span}"
        return f"Training diverged: {what}. It never recovered (last logged step {ev.get('last_step')})."
    if verdict == "insufficient-data":
        return (
            f"Only {ev['train_points']} train points (steps {ev.get('first_step')}-"
            f"{ev.get('last_step')}); at least {MIN_POINTS} are needed to judge the curve."
        )
    if verdict == "overfitting" and ev.get("best_eval_step", ev.get("last_eval_step")) != ev.get(
        "last_eval_step"
    ):
        return (
            f"Overfitting: eval loss was best at {num(ev['best_eval_loss'])} (step "
            f"{ev['best_eval_step']}) and rose to {num(ev['last_eval_loss'])} at step "
            f"{ev['last_eval_step']}, while train loss went from {span}."
        )
    untrained = [
        f
        for f in findings
        if f.code in ("no_trainable_tokens", "nothing_trained", "weights_unchanged") and f.severity == "error"
    ]
    if verdict == "flat" and untrained:
        return f"Nothing to learn: {untrained[0].title} (last logged step {ev.get('last_step')})."
    codes = {"overfitting": OVERFIT_CODES, "flat": {"flat"}, "unstable": UNSTABLE_CODES}.get(verdict)
    if codes:
        first = min(
            (f for f in findings if f.code in codes and f.severity != "info"), key=lambda f: f.step or 0
        )
        lead = {"overfitting": "Overfitting", "flat": "Loss barely moved", "unstable": "Unstable"}[verdict]
        return f"{lead}: {first.title}. Over the run, loss went from {span}."
    tail = (
        f"; eval loss {num(ev['last_eval_loss'])} at step {ev['last_eval_step']} (best "
        f"{num(ev['best_eval_loss'])} at step {ev['best_eval_step']})"
        if "best_eval_step" in ev
        else ""
    )
    first, last = ev.get("loss_first"), ev.get("loss_last")
    moved = "fell" if finite(first) and finite(last) and last < first else "went"
    return f"Healthy: loss {moved} from {span}{tail}."


# ----------------------------------------------------------------------------- text and findings.jsonl

_COLORS = {
    "error": "\033[31m",
    "warning": "\033[33m",
    "info": "\033[36m",
    "healthy": "\033[32m",
    "bold": "\033[1m",
}


def _paint(text: str, style: str, color: bool) -> str:
    return f"{_COLORS[style]}{text}\033[0m" if color else text


def render_diagnosis(d: Diagnosis, color: bool = False) -> str:
    """The text `tunewise doctor` prints: verdict, summary, evidence, findings, causes, fixes (in the run's
    own vocabulary), checkpoint."""
    d = d.in_run_words()
    style = {"healthy": "healthy", "diverged": "error", "insufficient-data": "info"}.get(d.verdict, "warning")
    lines = [
        f"verdict: {_paint(d.verdict.upper(), style, color)}   (exit code {d.exit_code()})",
        f"source:  {d.source}",
        "",
        d.summary,
        "",
        "evidence:",
    ]
    for key, value in d.evidence.items():
        if key != "keep":
            if isinstance(value, float):
                value = fmt_lr(value) if key.endswith("lr") else num(value)
            lines.append(f"  {key:<18} {value}")
    lines += ["", "findings over time:" if d.findings else "findings: none"]
    for f in sorted(d.findings, key=lambda f: (f.step is None, f.step or 0)):
        where = f"step {f.step}" if f.step is not None else "run"
        lines.append(f"  {where:<11} {_paint(f'{f.severity:<8}', f.severity, color)} {f.title}")
    causes, fixes = _ranked_advice(d.findings)
    if causes:
        lines += ["", "likely causes (most likely first):"] + [f"  {i}. {c}" for i, c in enumerate(causes, 1)]
    if fixes:
        lines += ["", f"fixes (try in this order{FIX_WORDS[d.vocabulary]}):"]
        for i, fix in enumerate(fixes, 1):
            lines += [
                f"  {i}. {_paint(fix.change, 'bold', color) if fix.change else NO_CHANGE[d.vocabulary]}",
                f"     {fix.why}",
            ]
    keep = _paint(d.best_checkpoint, "bold", color) if d.best_checkpoint else "-"
    lines += ["", f"checkpoint to keep: {keep} ({d.evidence.get('keep', '')})"]
    return "\n".join(lines)


def _ranked_advice(findings: list[Finding]) -> Advice:
    """Causes and fixes of warning/error findings, worst and latest (best informed) first, no repeats."""
    causes: list[str] = []
    fixes: list[Fix] = []
    seen: set[str] = set()  # the setting a fix changes (or its advice), else the cause text
    for f in sorted(findings, key=lambda f: (-SEVERITY_RANK[f.severity], -(f.step or 0))):
        if f.severity == "info":
            continue
        # The doctor's own findings pair each cause with its fix; others may not.
        pairs = (
            list(zip(f.causes, f.fixes, strict=True))
            if len(f.causes) == len(f.fixes)
            else [(c, None) for c in f.causes] + [(None, x) for x in f.fixes]
        )
        for cause, fix in pairs:
            key = ((fix.change or "").split("=")[0] or fix.why) if fix else cause
            if key not in seen:
                seen.add(key)
                causes += [cause] if cause else []
                fixes += [fix] if fix else []
    return causes, fixes
