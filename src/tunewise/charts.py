"""Charts as PNG files: a run's loss, learning rate, gradient norm and throughput (the report), and a
sweep's heatmap and curves.

Each function draws one chart with matplotlib's Agg canvas (no display, no pyplot state) and writes
it to `path`; a run chart returns None, writing nothing, when there is no data to draw. NaN and inf
values cannot be drawn as values: they are red crosses along the top edge.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, NamedTuple

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Transform, blended_transform_factory

from tunewise.doctor.curve import Curve, TrainPoint, hides_nan
from tunewise.doctor.findings import Finding

SEVERITY_COLORS = {"error": "#d93025", "warning": "#e37400", "info": "#5f6368"}
TRAIN_COLOR, EVAL_COLOR, LR_COLOR = "#3367d6", "#e8710a", "#188038"
GRAD_COLOR, SPEED_COLOR = "#9334e6", "#12b5cb"
MUTED = "#5f6368"


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _figure(width: float, height: float, title: str) -> tuple[Figure, Axes]:
    """A clean Agg figure with one axes: light grid, no top/right frame."""
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if title:
        ax.set_title(title, loc="left", fontsize=10, color="#202124", fontweight="bold")
    ax.grid(True, color="#e8eaed", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#bdc1c6")
    ax.tick_params(colors=MUTED, labelsize=8)
    ax.set_xlabel("optimizer step", fontsize=8, color=MUTED)
    return fig, ax


def _log_scale_if_wide(ax: Axes, values: list[float]) -> None:
    """Log scale when the values span more than 30x (an explosion would flatten the rest)."""
    finite = [v for v in values if _finite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 30:
        ax.set_yscale("log")


def _top_edge(ax: Axes) -> Transform:
    """A transform with x in data units and y in axes fractions (0 bottom, 1 top)."""
    return blended_transform_factory(ax.transData, ax.transAxes)


def _mark_non_finite(ax: Axes, steps: list[int], label: str) -> None:
    if steps:
        ax.scatter(
            steps,
            [0.97] * len(steps),
            marker="x",
            color=SEVERITY_COLORS["error"],
            s=30,
            transform=_top_edge(ax),
            label=label,
            zorder=5,
            clip_on=False,
        )


def epoch_ends(curve: Curve) -> list[tuple[int, int]]:
    """(step, k) for the last logged step of each whole epoch k (Trainer logs epoch k at its end)."""
    ends, k = [], 1
    for p in curve.train:
        while _finite(p.epoch) and p.epoch >= k - 1e-6:
            ends.append((p.step, k))
            k += 1
    return ends


def _draw_epochs(ax: Axes, curve: Curve) -> None:
    ends = epoch_ends(curve)
    for step, _ in ends:
        ax.axvline(step, color="#9aa0a6", linestyle=":", linewidth=1)
    if ends:
        top = ax.secondary_xaxis("top")
        top.set_xticks([s for s, _ in ends], labels=[f"epoch {k}" for _, k in ends])
        top.tick_params(labelsize=7, colors="#80868b", length=0)
        top.spines["top"].set_visible(False)


def _draw_findings(ax: Axes, findings: list[Finding]) -> None:
    """A numbered marker per finding at its step, coloured by severity (numbers match the report's list)."""
    for number, f in enumerate(findings, 1):
        if f.step is None:
            continue
        color = SEVERITY_COLORS.get(f.severity, MUTED)
        ax.axvline(f.step, color=color, linestyle="--", linewidth=1, alpha=0.6)
        ax.text(
            f.step,
            0.88,
            str(number),
            transform=_top_edge(ax),
            ha="center",
            va="center",
            fontsize=7,
            color="white",
            fontweight="bold",
            bbox={"boxstyle": "circle,pad=0.25", "facecolor": color, "edgecolor": "none"},
        )


def _hides_nan(point: TrainPoint) -> bool:
    return hides_nan(point.loss, point.grad_norm)


def plot_loss(curve: Curve, findings: list[Finding], best_checkpoint: str | None, path: Path) -> Path | None:
    """Train and validation loss vs step, with epoch ends, numbered findings and the best checkpoint."""
    if not curve.train and not curve.eval:
        return None
    fig, ax = _figure(11, 3.8, "")
    train = [p for p in curve.train if _finite(p.loss) and not _hides_nan(p)]
    ax.plot(
        [p.step for p in train], [p.loss for p in train], color=TRAIN_COLOR, linewidth=1.4, label="train loss"
    )
    evals = [e for e in curve.eval if _finite(e.eval_loss)]
    if evals:
        ax.plot(
            [e.step for e in evals],
            [e.eval_loss for e in evals],
            color=EVAL_COLOR,
            linewidth=1.6,
            marker="o",
            markersize=4,
            label="validation loss",
        )
    bad = [p.step for p in curve.train if not _finite(p.loss) or _hides_nan(p)]
    _mark_non_finite(ax, bad, "NaN / inf loss")
    _log_scale_if_wide(ax, [p.loss for p in train] + [e.eval_loss for e in evals])
    suffix = best_checkpoint.rsplit("-", 1)[-1] if best_checkpoint else ""
    best = int(suffix) if suffix.isdigit() else None
    at = [e.eval_loss for e in evals if e.step == best] or [p.loss for p in train if p.step == best]
    if at:
        ax.scatter(
            [best],
            at[:1],
            marker="*",
            s=240,
            color="#f9ab00",
            edgecolor="#202124",
            linewidth=0.6,
            zorder=6,
            label=f"best: {best_checkpoint}",
        )
    _draw_epochs(ax, curve)
    _draw_findings(ax, findings)
    ax.set_ylabel("loss", fontsize=8, color=MUTED)
    fig.legend(frameon=False, fontsize=8, loc="outside upper right", ncols=4)
    fig.savefig(path)
    return path


def plot_learning_rate(curve: Curve, warmup_steps: int | None, path: Path) -> Path | None:
    """The schedule as the run applied it, the warmup shaded (from plan.json, else up to the peak)."""
    points = [p for p in curve.train if _finite(p.lr)]
    if not points:
        return None
    fig, ax = _figure(5.4, 3.0, "Learning rate")
    ax.plot([p.step for p in points], [p.lr for p in points], color=LR_COLOR, linewidth=1.6)
    if warmup_steps is None:
        peak = max(points, key=lambda p: p.lr)
        warmup_steps = peak.step if peak is not points[0] else 0
    if warmup_steps:
        ax.axvspan(0, warmup_steps, color=LR_COLOR, alpha=0.1, linewidth=0)
        ax.text(
            warmup_steps,
            0.04,
            f" warmup: {warmup_steps} steps",
            transform=_top_edge(ax),
            fontsize=7,
            color=MUTED,
        )
    ax.set_ylim(bottom=0)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.yaxis.get_offset_text().set_fontsize(7)
    fig.savefig(path)
    return path


def plot_grad_norm(curve: Curve, max_grad_norm: float | None, path: Path) -> Path | None:
    """Gradient norm before clipping, with the clipping threshold."""
    points = [p for p in curve.train if p.grad_norm is not None]
    if not points:
        return None
    fig, ax = _figure(5.4, 3.0, "Gradient norm (before clipping)")
    finite = [p for p in points if _finite(p.grad_norm)]
    ax.plot([p.step for p in finite], [p.grad_norm for p in finite], color=GRAD_COLOR, linewidth=1.2)
    _mark_non_finite(ax, [p.step for p in points if not _finite(p.grad_norm)], "NaN / inf")
    _log_scale_if_wide(ax, [p.grad_norm for p in finite])
    if _finite(max_grad_norm) and max_grad_norm > 0:
        ax.axhline(
            max_grad_norm, color=MUTED, linestyle="--", linewidth=1, label=f"clipped at {max_grad_norm:g}"
        )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=7, loc="upper right")
    fig.savefig(path)
    return path


def _running_median(values: list[float]) -> list[float]:
    """Each value's median over a window of about a tenth of the series."""
    half = max(1, len(values) // 20)
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def plot_throughput(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Tokens per second per step (metrics.jsonl; Trainer logs do not record it per step): all tokens, and
    the trained ones (loss targets) where the records have them."""
    points = [(r["step"], r["tokens_per_s"]) for r in records if _finite(r.get("tokens_per_s"))]
    if not points:
        return None
    fig, ax = _figure(5.4, 3.0, "Throughput (tokens/s)")
    steps = [s for s, _ in points]
    rates = [r for _, r in points]
    ax.plot(steps, rates, color=SPEED_COLOR, linewidth=1, alpha=0.45, label="all tokens, per step")
    ax.plot(steps, _running_median(rates), color="#007b83", linewidth=1.6, label="all tokens, running median")
    trained = [
        (r["step"], r["trained_tokens_per_s"]) for r in records if _finite(r.get("trained_tokens_per_s"))
    ]
    if trained:
        ax.plot(
            [s for s, _ in trained],
            _running_median([r for _, r in trained]),
            color=LR_COLOR,
            linewidth=1.6,
            label="trained tokens, running median",
        )
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False, fontsize=7, loc="best")
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------- sweeps


class Series(NamedTuple):
    """One trial of a sweep: its label, finite (step, train loss) and (step, validation loss) points."""

    label: str
    train: list[tuple[int, float]]
    evals: list[tuple[int, float]]


def plot_heatmap(
    cells: list[list[float]],
    labels: list[list[str]],
    rows: tuple[str, list[str]],
    cols: tuple[str, list[str]],
    path: Path,
) -> Path:
    """Validation loss per grid cell (NaN: none), each cell labelled; rows and cols are (name, values)."""
    (rows_key, row_values), (cols_key, col_values) = rows, cols
    fig = Figure(figsize=(1.6 + 1.3 * len(col_values), 1.2 + 0.9 * len(row_values)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(cells, cmap="viridis_r", aspect="auto")
    finite = [x for row in cells for x in row if not math.isnan(x)] or [0.0]
    for r, row in enumerate(labels):
        for c, text in enumerate(row):
            dark = not math.isnan(cells[r][c]) and cells[r][c] > (min(finite) + max(finite)) / 2
            color = "white" if dark else "black"  # viridis_r: high losses are dark
            ax.text(c, r, text, ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(col_values)), col_values)
    ax.set_yticks(range(len(row_values)), row_values)
    ax.set_xlabel(cols_key)
    ax.set_ylabel(rows_key)
    ax.set_title("validation loss (lower is better)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_runs(series: list[Series], path: Path) -> Path:
    """Train loss (left) and validation loss (right) of every trial in one figure."""
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for s in series:
        (line,) = left.plot([x for x, _ in s.train], [y for _, y in s.train], lw=1, alpha=0.8, label=s.label)
        if s.evals:
            right.plot(*zip(*s.evals, strict=True), marker="o", ms=3, color=line.get_color(), label=s.label)
    left.set(title="train loss", xlabel="step", ylabel="loss")
    right.set(title="validation loss", xlabel="step", ylabel="loss")
    right.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
