"""Report: one self-contained report.html (charts as embedded PNGs) read back from a run directory.

`write_report(run_dir)` reads what training, `eval` and the doctor left in a run directory and writes
report.html plus the charts as PNG files next to it. It reads plain Hugging Face Trainer output
(trainer_state.json) through the doctor's `load_curve` too, and runs that failed or diverged: what is
missing is said to be missing, never invented. No torch or transformers here (nor in what it imports).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from tunewise import charts, rundir
from tunewise.config import DEFAULT_LR, TRAINING_DEFAULTS, Config
from tunewise.doctor.curve import Curve, load_curve
from tunewise.doctor.diagnose import Diagnosis, diagnose_path
from tunewise.doctor.findings import Finding
from tunewise.errors import DoctorError
from tunewise.metrics import METRICS, rank_changes

logger = logging.getLogger(__name__)

BADGE_COLORS = {"error": "#d93025", "warning": "#e37400", "healthy": "#188038", "unknown": "#5f6368"}
CHART_FILES = {
    "loss": "loss.png",
    "learning_rate": "learning_rate.png",
    "grad_norm": "grad_norm.png",
    "throughput": "throughput.png",
}
CSS_FILE = Path(__file__).with_name("report.css")  # the page's style, a package file
EVAL_METRICS = {"exact_match": "exact match", "valid_json": "valid JSON", "field_accuracy": "field accuracy"}


@dataclass
class RunFiles:
    """What a run directory holds; each part is empty or None when it is missing or unreadable."""

    out_dir: Path
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl train records
    curve: Curve | None = None
    diagnosis: Diagnosis | None = None
    config: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    memorization: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # what could not be read, in words

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.out_dir.resolve().name)

    def findings(self) -> list[Finding]:
        """The doctor's findings in step order: the numbering the loss chart and the list share."""
        found = self.diagnosis.findings if self.diagnosis else []
        return sorted(found, key=lambda f: (f.step is None, f.step or 0))


# ----------------------------------------------------------------------------- reading


def read_run(path: Path) -> RunFiles:
    """Read everything the report shows from a run directory (or next to a trainer_state.json file)."""
    path = Path(path)
    run = RunFiles(out_dir=path if path.is_dir() else path.parent)
    d, missing = run.out_dir, run.missing
    try:
        run.curve = load_curve(path)
        run.diagnosis = diagnose_path(path).in_run_words()  # a watched script's fixes in its own words
    except DoctorError as exc:
        missing.append(f"no diagnosis: {exc}")
    if (d / rundir.CONFIG).is_file():
        try:
            run.config = yaml.safe_load((d / rundir.CONFIG).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            missing.append("config.yaml is not valid YAML")
    run.records = rundir.train_records(rundir.read_metrics(d))
    for attr, name in [
        ("plan", rundir.PLAN),
        ("check", rundir.CHECK),
        ("result", rundir.RESULT),
        ("evaluation", rundir.EVAL),
        ("memorization", rundir.MEMORIZATION),
    ]:
        value = rundir.read_json(d / name, missing)
        setattr(run, attr, value if isinstance(value, dict) else {})
    samples = rundir.read_json(d / rundir.SAMPLES, missing)
    run.samples = [s for s in samples if isinstance(s, dict)] if isinstance(samples, list) else []
    return run


# ----------------------------------------------------------------------------- writing


def write_charts(run: RunFiles) -> dict[str, Path]:
    """Write the PNG charts into the run directory; returns those that had data to draw."""
    curve = run.curve or Curve([], [])
    warmup = run.plan.get("warmup_steps")
    clip = (run.config.get("training") or {}).get("max_grad_norm")
    best = run.diagnosis.best_checkpoint if run.diagnosis else None
    draw = {
        "loss": lambda p: charts.plot_loss(curve, run.findings(), best, p),
        "learning_rate": lambda p: charts.plot_learning_rate(
            curve, warmup if isinstance(warmup, int) else None, p
        ),
        "grad_norm": lambda p: charts.plot_grad_norm(
            curve, clip if isinstance(clip, int | float) else None, p
        ),
        "throughput": lambda p: charts.plot_throughput(run.records, p),
    }
    written = {}
    for key, plot in draw.items():
        path = run.out_dir / CHART_FILES[key]
        try:
            if plot(path) is not None:
                written[key] = path
        except (ValueError, TypeError, OverflowError) as exc:  # odd data must not cost the whole report
            logger.warning("could not draw %s: %s", path.name, exc)
            run.missing.append(f"{path.name} could not be drawn ({exc})")
    return written


def write_report(run_dir: Path) -> Path:
    """Write report.html and the PNG charts into a run directory; returns the report's path.

    Args:
        run_dir: a tunewise run directory, a Trainer output directory, or a trainer_state.json file
            (the report goes next to it).
    """
    run = read_run(Path(run_dir))
    images = {
        key: base64.b64encode(path.read_bytes()).decode("ascii") for key, path in write_charts(run).items()
    }
    out = run.out_dir / rundir.REPORT
    out.write_text(render_html(run, images, datetime.now()), encoding="utf-8")
    return out


# ----------------------------------------------------------------------------- formatting


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(x: Any) -> str:
    """A number for people: NaN and inf spelled out, 4 significant digits, small rates in e-notation."""
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if not math.isfinite(x):
        return "NaN" if math.isnan(x) else "inf" if x > 0 else "-inf"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.2e}" if 0 < abs(x) < 1e-3 else f"{x:.4g}"


def _bytes(n: Any) -> str:
    if not isinstance(n, int | float) or n <= 0:
        return "—"
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes} min {sec:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _pct(x: Any) -> str:
    return f"{x:.1%}" if isinstance(x, int | float) and math.isfinite(x) else "—"


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...] | None = None, cls: str = "kv") -> str:
    """A table of already-escaped cells."""
    top = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{top}{body}</table>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{body}</section>'


def _figure(images: dict[str, str], key: str, alt: str, caption: str) -> str:
    if key not in images:
        return ""
    return (
        f'<figure><img id="{key.replace("_", "-")}-chart" alt="{_e(alt)}" '
        f'src="data:image/png;base64,{images[key]}"><figcaption>{caption}</figcaption></figure>'
    )


def _bar(value: Any, color: str = "#3367d6") -> str:
    """A percentage with a small horizontal bar."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "—"
    width = max(0.0, min(1.0, value)) * 100
    return (
        f'<div class="bar"><div class="fill" style="width:{width:.1f}%;background:{color}"></div></div>'
        f'<span class="barnum">{_pct(value)}</span>'
    )


# ----------------------------------------------------------------------------- sections


def _badge(run: RunFiles) -> tuple[str, str]:
    """(text, colour) of the verdict badge: red for errors, amber for warnings, green when healthy."""
    d, status = run.diagnosis, run.result.get("status")
    if d is None:
        return (
            f"{status or 'no metrics'}",
            BADGE_COLORS["error" if status in ("failed", "diverged") else "unknown"],
        )
    worst = d.worst_severity()
    if d.verdict == "diverged" or worst == "error":
        key = "error"
    elif worst == "warning" or d.verdict in ("overfitting", "flat", "unstable"):
        key = "warning"
    else:
        key = "healthy" if d.verdict == "healthy" else "unknown"
    return d.verdict, BADGE_COLORS[key]


def _header(run: RunFiles, generated: datetime) -> str:
    text, color = _badge(run)
    source = run.diagnosis.source if run.diagnosis else str(run.out_dir)
    summary = run.diagnosis.summary if run.diagnosis else "The doctor found no training curve to judge."
    error = run.result.get("error")
    trace = run.result.get("traceback")
    failure = ""
    if error:
        details = f"<details><summary>traceback</summary><pre>{_e(trace)}</pre></details>" if trace else ""
        status = _e(run.result.get("status", "failed"))
        failure = f'<div class="failure"><b>{status}:</b> {_e(error)}{details}</div>'
    return (
        f'<header><div><div class="eyebrow">tunewise training report</div><h1>{_e(run.name)}</h1>'
        f'<div class="muted">{_e(source)} · generated {generated:%Y-%m-%d %H:%M}</div></div>'
        f'<div id="verdict" class="badge" style="background:{color}">{_e(text.upper())}</div></header>'
        f'<p class="summary">{_e(summary)}</p>{failure}'
    )


def _cards(run: RunFiles) -> str:
    """The headline numbers."""
    r, ev = run.result, (run.diagnosis.evidence if run.diagnosis else {})
    last = run.records[-1] if run.records else {}
    planned = (run.plan.get("steps") or {}).get("total_steps")
    steps = r.get("global_step", ev.get("last_step"))
    cards = [
        ("status", r.get("status", "—")),
        ("steps", f"{_num(steps)}" + (f" / {_num(planned)}" if planned else "")),
        ("duration", _duration(r.get("duration_s", last.get("time")))),
        ("final train loss", _num(r.get("final_train_loss", ev.get("loss_last")))),
        ("best eval loss", _num(r.get("best_eval_loss", ev.get("best_eval_loss")))),
        ("best checkpoint", (run.diagnosis.best_checkpoint if run.diagnosis else None) or "—"),
        ("tokens seen", _num(last.get("tokens_total"))),
        ("memory at step 1", _bytes((run.records[0] if run.records else {}).get("memory_bytes"))),
    ]
    base, tuned = _eval_pair(run.evaluation)
    if tuned and "exact_match" in tuned:
        before = f"{_pct(base['exact_match'])} → " if base and "exact_match" in base else ""
        cards.append(("exact match", before + _pct(tuned["exact_match"])))
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="label">{_e(k)}</div><div class="value">{_e(v)}</div></div>'
            for k, v in cards
            if v not in ("—", "— / —")
        )
        + "</div>"
    )


def _findings(run: RunFiles) -> str:
    if run.diagnosis is None:
        notes = "".join(f"<li>{_e(m)}</li>" for m in run.missing if m.startswith("no diagnosis"))
        return _section("findings", "Doctor", f"<p>The doctor could not judge this run.</p><ul>{notes}</ul>")
    items = []
    for number, f in enumerate(run.findings(), 1):
        causes = "".join(f"<li>{_e(c)}</li>" for c in f.causes)
        fixes = "".join(
            f"<li>{f'<code>{_e(x.change)}</code> ' if x.change else ''}{_e(x.why)}</li>" for x in f.fixes
        )
        evidence = ", ".join(f"{_e(k)}={_e(_num(v))}" for k, v in f.evidence.items() if v is not None)
        where = f"step {f.step}" if f.step is not None else "whole run"
        items.append(
            f'<li class="finding"><span class="num sev-{f.severity}">{number}</span>'
            f'<span class="pill sev-{f.severity}">{_e(f.severity)}</span> <span class="muted">{where}</span>'
            f'<div class="ftitle">{_e(f.title)}</div>'
            f"<details><summary>evidence, likely causes and fixes</summary>"
            f'<div class="muted small">{evidence}</div><div class="cols">'
            f"<div><h4>likely causes</h4><ol>{causes}</ol></div>"
            f"<div><h4>fixes, in order</h4><ol>{fixes}</ol></div></div></details></li>"
        )
    keep = _e(run.diagnosis.evidence.get("keep", ""))
    body = (
        f"<p>Verdict <b>{_e(run.diagnosis.verdict)}</b>; checkpoint to keep: "
        f"<b>{_e(run.diagnosis.best_checkpoint or 'the final model')}</b> "
        f'<span class="muted">({keep})</span></p>'
        + (
            f'<ol class="findings">{"".join(items)}</ol>'
            if items
            else "<p>No findings: nothing unusual in the curve.</p>"
        )
    )
    return _section("findings", "Doctor: verdict and findings", body)


def _eval_pair(evaluation: dict[str, Any]) -> tuple[dict | None, dict | None]:
    """(base, tuned) results from eval.json: {"base", "tuned"} or one result with `which`."""
    if "base" in evaluation or "tuned" in evaluation:
        return evaluation.get("base"), evaluation.get("tuned")
    which = evaluation.get("which")
    return (evaluation, None) if which == "base" else (None, evaluation) if which else (None, None)


def _evaluation(run: RunFiles) -> str:
    base, tuned = _eval_pair(run.evaluation)
    if not base and not tuned:
        return ""
    rows = []
    for key, label in EVAL_METRICS.items():
        b, t = (base or {}).get(key), (tuned or {}).get(key)
        if b is None and t is None:
            continue
        change = (
            f"{(t - b) * 100:+.1f} pts" if isinstance(b, int | float) and isinstance(t, int | float) else "—"
        )
        rows.append((_e(label), _bar(b, "#9aa0a6"), _bar(t, "#188038"), _e(change)))
    n = (tuned or base or {}).get("n")
    return _section(
        "evaluation",
        "Evaluation: before and after",
        _table(rows, ("metric", "base model", "tuned model", "change"), "wide")
        + f'<p class="muted">greedy generation on {_e(_num(n))} test examples</p>',
    )


def _eval_examples(run: RunFiles) -> str:
    """Loss, perplexity and the other metrics base vs tuned (eval.json); the worst regressions and best
    gains among the examples of eval.jsonl."""
    models = base, tuned = [x or {} for x in _eval_pair(run.evaluation)]
    records = [r for _, r in rundir.read_jsonl(run.out_dir / rundir.EVAL_EXAMPLES)]
    keys = [f"{s}_{m}" for s in ("test", "validation") for m in ("loss", "perplexity")]
    keys += [m for m in run.evaluation.get("metrics") or [] if m not in EVAL_METRICS]
    rows = [
        (_e(k.replace("_", " ")), *(_bar(m.get(k)) if k in METRICS else _e(_num(m.get(k))) for m in models))
        for k in keys  # a built-in metric is a fraction (a bar); losses and the user's metric are any number
        if k in base or k in tuned
    ]
    if not rows and not records:
        return ""
    body = _table(rows, ("measure", "base model", "tuned model"), "wide") if rows else ""
    metric = run.evaluation.get("primary_metric") or "the primary metric"
    for title, picked in zip(("Worst regressions", "Best gains"), rank_changes(records, 3), strict=True):
        cells = [
            (_e(r.get("source", r.get("index"))), _e(f"{r['change']:+.2f}"),
             *(f"<pre>{_e(r.get(k, ''))}</pre>" for k in ("prompt", "reference", "base", "tuned")))
            for r in picked
        ]  # fmt: skip
        if cells:
            head = ("example", f"change in {_e(metric)}", "prompt", "reference", "base", "tuned")
            body += f"<h3>{title}</h3>" + _table(cells, head, "wide")
    note = f"{len(records)} examples in {rundir.EVAL_EXAMPLES}; teacher-forced loss on the trained tokens"
    return _section(
        "eval-examples", "Evaluation: loss and per-example changes", body + f'<p class="muted">{note}</p>'
    )


def _memorization(run: RunFiles) -> str:
    m = run.memorization
    if not m:
        return ""
    sets = m.get("sets") or {}
    labels = {
        "train": "training prompts",
        "rephrased": "training prompts, lightly rephrased",
        "heldout": "held-out prompts",
    }
    rows = [
        (
            _e(label),
            _bar((sets.get(k) or {}).get("near_verbatim"), "#9334e6"),
            _bar((sets.get(k) or {}).get("verbatim"), "#5f6368"),
        )
        for k, label in labels.items()
    ]
    color = BADGE_COLORS["warning" if m.get("flagged") else "healthy"]
    flag = "memorized" if m.get("flagged") else "not memorized"
    message = str(m.get("message", "")).split(": ", 1)[-1]  # its lead words repeat the pill
    body = (
        f'<p><span class="pill" style="background:{color};color:white">{flag}</span> {_e(message)}</p>'
        + _table(
            rows,
            ("prompts", f"near-verbatim (similarity ≥ {_e(m.get('threshold', 0.9))})", "verbatim"),
            "wide",
        )
    )
    return _section("memorization", "Memorization check", body)


def _samples(run: RunFiles) -> str:
    if not run.samples:
        return ""
    cards = []
    for s in run.samples[:5]:
        ref = str(s.get("reference", "")).strip()
        cells = [
            f'<div class="prompt"><h4>prompt</h4><pre>{_e(s.get("prompt", ""))}</pre></div>',
            f"<div><h4>reference</h4><pre>{_e(ref)}</pre></div>",
        ]
        for which in ("base", "tuned"):
            if which in s:
                out = str(s[which] or "").strip()
                mark = ' <span class="pill ok">matches</span>' if out == ref and ref else ""
                cells.append(f"<div><h4>{which}{mark}</h4><pre>{_e(out) or '<i>(empty)</i>'}</pre></div>")
        cards.append(f'<div class="sample">{"".join(cells)}</div>')
    return _section("samples", "Sample generations: base vs tuned", "".join(cards))


def _plan_and_check(run: RunFiles) -> str:
    if not run.plan and not run.check:
        return ""
    p, s = run.plan, run.plan.get("steps") or {}
    mem = p.get("memory") or {}
    measured = (run.records[0] if run.records else {}).get("memory_bytes")
    rows = [
        ("optimizer steps", _num(s.get("total_steps"))),
        ("steps per epoch", _num(s.get("steps_per_epoch"))),
        ("epochs", _num(s.get("epochs"))),
        ("effective batch", _num(s.get("effective_batch"))),
        ("training examples", _num(s.get("examples"))),
        ("warmup steps", _num(p.get("warmup_steps"))),
        ("evaluations", _num(p.get("evaluations"))),
        ("checkpoints saved", _num(p.get("saves"))),
        ("learning rate", _num(p.get("learning_rate"))),
        ("method", p.get("method", "—")),
        ("memory estimate (step 1)", f"{_bytes(mem.get('peak'))} (measured {_bytes(measured)})"),
    ]
    body = (
        _table([(_e(k), _e(v)) for k, v in rows])
        if p
        else '<p class="muted">no plan.json in this directory</p>'
    )
    items = run.check.get("items") or []
    if items:
        check_rows = [
            (
                f'<span class="pill st-{_e(i.get("status"))}">{_e(i.get("status"))}</span>',
                _e(i.get("name")),
                _e(i.get("detail")),
                f"<code>{_e(i['fix'])}</code>" if i.get("fix") else "",
            )
            for i in items
        ]
        body += "<h3>Pre-flight check</h3>" + _table(check_rows, ("", "item", "detail", "fix"), "wide")
    return _section("plan", "Plan and pre-flight check", body)


def _hardware_and_time(run: RunFiles) -> str:
    hw, r = run.plan.get("hardware") or {}, run.result
    if not hw and not r and not run.records:
        return ""
    steps = [x.get("step_time") for x in run.records if isinstance(x.get("step_time"), int | float)]
    rates = [x["tokens_per_s"] for x in run.records if isinstance(x.get("tokens_per_s"), int | float)]
    rows = [
        ("device", f"{hw.get('device', '—')} ({hw.get('device_name', '—')})"),
        ("precision", hw.get("precision", "—")),
        ("optimizer", hw.get("optim", "—")),
        ("device memory", _bytes(hw.get("memory_bytes"))),
        ("started", r.get("started", "—")),
        ("duration", _duration(r.get("duration_s"))),
        ("mean step time", _duration(sum(steps) / len(steps)) if steps else "—"),
        ("mean throughput", f"{_num(sum(rates) / len(rates))} tokens/s" if rates else "—"),
    ]
    notes = "".join(f"<li>{_e(n)}</li>" for n in hw.get("notes") or [])
    return _section(
        "hardware",
        "Hardware and time",
        _table([(_e(k), _e(v)) for k, v in rows]) + (f"<ul>{notes}</ul>" if notes else ""),
    )


def _flops(x: Any) -> str:
    """FLOP/s for people: 1.23 TFLOP/s."""
    if not isinstance(x, int | float) or not math.isfinite(x) or x <= 0:
        return "—"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}FLOP/s"
    return f"{x:.3g} FLOP/s"


def _given(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _speed_rows(speed: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) of result.json's `speed`: the run's totals over the steps timed; None left out."""
    trained, every = speed.get("trained_tokens_per_s"), speed.get("tokens_per_s")
    padding, mfu, steps = speed.get("padding_fraction"), speed.get("mfu"), speed.get("steps_timed")
    peak = f" of {_flops(speed.get('peak_flops'))} (a matmul's peak, measured on this device)"
    rows = [
        ("trained tokens/s", f"{_num(trained)} tokens/s" if _given(trained) else None),
        ("all tokens/s", f"{_num(every)} tokens/s" if _given(every) else None),
        ("padding fraction", _pct(padding) if _given(padding) else None),
        ("MFU", _pct(mfu) + peak if _given(mfu) else None),
        (
            "steps timed",
            f"{_num(steps)} (the first step of each attempt left out)" if _given(steps) else None,
        ),
    ]
    return [(k, v) for k, v in rows if v is not None]


def _memory_rows(memory: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) of result.json's `memory`: the plan's estimate against the measured peak."""
    error = memory.get("error")
    rows = [
        ("estimated peak (plan)", memory.get("estimated_peak")),
        ("measured peak", memory.get("measured_peak")),
        ("estimated at step 1 (plan)", memory.get("estimated_step_1")),
        ("measured at step 1", memory.get("measured_step_1")),
    ]
    shown = [(k, _bytes(v)) for k, v in rows if v is not None]
    if _given(error):
        shown.append(("estimate error", f"{error:+.1%} (measured vs estimated)"))
    return shown


def _speed_and_memory(run: RunFiles) -> str:
    """What the run's steps cost and the memory it took, from result.json (absent for older runs)."""
    speed, memory = run.result.get("speed"), run.result.get("memory")
    rows = _speed_rows(speed) if isinstance(speed, dict) else []
    rows += _memory_rows(memory) if isinstance(memory, dict) else []
    if not rows:
        return ""
    warning = memory.get("warning") if isinstance(memory, dict) else None
    body = _table([(_e(k), _e(v)) for k, v in rows])
    if warning:
        body += f'<div class="warn">{_e(warning)}</div>'
    return _section("speed", "Speed and memory", body)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def _default_config(method: Any) -> dict[str, Any]:
    """Every default, with the method's own default learning rate (from the config's own tables).

    Read from the tables rather than through `load_config`, whose validation builds TrainingArguments:
    the report never imports transformers or torch.
    """
    defaults = Config().to_dict()
    defaults["training"] = dict(TRAINING_DEFAULTS)
    defaults["training"]["learning_rate"] = DEFAULT_LR.get(method or defaults["model"]["method"])
    return defaults


def _config(run: RunFiles) -> str:
    if not run.config:
        return _section("config", "Config", '<p class="muted">no config.yaml in this directory</p>')
    values = _flatten(run.config)
    defaults = _flatten(_default_config((run.config.get("model") or {}).get("method")))
    show = lambda v: json.dumps(v) if isinstance(v, list | dict | type(None) | bool) else str(v)  # noqa: E731
    changed = [k for k in values if k not in defaults or show(defaults[k]) != show(values[k])]
    rows = [
        (
            f"<code>{_e(k)}</code>",
            f"<b>{_e(show(values[k]))}</b>",
            _e(show(defaults[k])) if k in defaults else "<i>(not set)</i>",
        )
        for k in changed
    ]
    every = [(f"<code>{_e(k)}</code>", _e(show(v))) for k, v in values.items()]
    body = (
        f"<p>{len(changed)} of {len(values)} settings differ from the defaults.</p>"
        + _table(rows, ("setting", "this run", "default"), "wide changed")
        + f"<details><summary>every setting ({len(values)})</summary>{_table(every)}</details>"
    )
    return _section("config", "Config (resolved): differences from the defaults", body)


# ----------------------------------------------------------------------------- the page


def render_html(run: RunFiles, images: dict[str, str], generated: datetime) -> str:
    """The whole report page: every section the run has data for, images as base64 data URIs."""
    css = CSS_FILE.read_text(encoding="utf-8")
    loss_caption = (
        "train loss at every optimizer step, validation loss at each evaluation; dotted lines end "
        "each epoch, numbered dashed lines are the doctor's findings (listed below), the star is "
        "the best checkpoint; red crosses on the top edge are NaN/inf losses"
    )
    dynamics = "".join(
        [
            _figure(
                images, "learning_rate", "learning-rate schedule", "the rate each update used; warmup shaded"
            ),
            _figure(
                images, "grad_norm", "gradient norm", "pre-clip gradient norm; dashed: the clipping threshold"
            ),
            _figure(
                images,
                "throughput",
                "throughput",
                "tokens per second of each optimizer step: all tokens, and the trained ones (loss targets)",
            ),
        ]
    )
    missing = (
        (
            "<details class='muted small'><summary>not in this directory</summary><ul>"
            + "".join(f"<li>{_e(m)}</li>" for m in run.missing)
            + "</ul></details>"
        )
        if run.missing
        else ""
    )
    speed = _speed_and_memory(run)  # under hardware and time, in the column next to the plan
    parts = [
        _header(run, generated),
        _cards(run),
        _section(
            "loss",
            "Loss",
            _figure(images, "loss", "training and validation loss", loss_caption)
            or '<p class="muted">no loss was recorded</p>',
        ),
        _findings(run),
        _section("dynamics", "Training dynamics", f'<div class="grid3">{dynamics}</div>') if dynamics else "",
        _evaluation(run),
        _eval_examples(run),
        _memorization(run),
        _samples(run),
        f'<div class="two">{_plan_and_check(run)}<div>{_hardware_and_time(run)}{speed}</div></div>',
        _config(run),
        missing,
    ]
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>tunewise report: {_e(run.name)}</title><style>{css}</style></head><body><main>"
        + "".join(parts)
        + f"<footer>written by tunewise report · {generated:%Y-%m-%d %H:%M}</footer>"
        "</main></body></html>\n"
    )
