"""The doctor next to its PyPI peers on the corpus of real runs, in one run.

Every run of tests/fixtures/real_runs/<group>/manifest.jsonl (every group with a manifest) carries a
verdict labelled by hand (tests/fixtures/real_runs/LABELS.md). Each tool reads each run and its output is
mapped onto the same verdicts, as generously as its output allows (/work/shared/PEERS.md):

  - tunewise: `tunewise doctor PATH --json`, the "verdict" field (bare NaN in that JSON is tolerated);
  - losslint: `losslint check --format json --color never FILE`, `findings[].check` of any severity:
    nan_inf, divergence -> diverged; overfit_onset -> overfitting; stagnation -> flat; loss_spike -> unstable;
  - trainspotter: `trainspotter analyze --output json FILE`, `findings[]`: divergence on an eval metric ->
    overfitting, otherwise diverged; overfitting -> overfitting; plateau, loss_floor -> flat; spikes or
    grad_norm with severity error -> unstable;
  - finetune-doctor: `finetune-doctor diagnose -f json FILE`, findings of severity CRITICAL or WARNING:
    loss_degenerate, gradients -> diverged; overfitting -> overfitting; not_learning -> flat;
    loss_spikes -> unstable.

Several problems -> the most severe (diverged > overfitting > flat > unstable); none -> healthy. The peers
have no "too short to judge" answer, so every run labelled insufficient-data is a miss for them;
`accuracy_judgeable` leaves those runs out for every tool.

A peer is given the trainer_state.json file, or for a LLaMA-Factory run the trainer_log.jsonl inside its
folder; tunewise gets the folder. A run a tool cannot read (an error, or no loss series read) is left out
of that tool's metrics and counted in `unreadable`; `accuracy_strict` counts it as wrong.

The peers live in their own venv, benchmarks/.peers-venv (created with python3.11 and the pinned versions
below when missing), so they never touch the project's environment.

    python benchmarks/bench_doctor.py [--jobs 2]

Writes benchmarks/results/doctor.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fixtures" / "real_runs"
# Every corpus folder with a manifest: public, issues, smollm2 and each unseen batch (fresh, fresh2, ...).
GROUPS = tuple(sorted(p.parent.name for p in CORPUS.glob("*/manifest.jsonl")))
RESULTS = ROOT / "benchmarks" / "results" / "doctor.json"
TUNEWISE = ROOT / ".venv" / "bin" / "tunewise"
PEERS_VENV = ROOT / "benchmarks" / ".peers-venv"
PEER_PINS = {"losslint": "0.4.1", "trainspotter": "0.2.6", "finetune-doctor": "0.2.2"}
FAILURES = ("diverged", "unstable", "flat", "overfitting")
SEVERITY = {"diverged": 4, "overfitting": 3, "flat": 2, "unstable": 1, "healthy": 0}
TIMEOUT_S = 180
UNREADABLE = "unreadable"


def ensure_peers_venv() -> dict[str, str]:
    """Create benchmarks/.peers-venv with the pinned peers if it is missing; return the installed versions."""
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run(["python3.11", "-m", "venv", str(PEERS_VENV)], check=True)
        pins = [f"{name}=={version}" for name, version in PEER_PINS.items()]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True
    )
    installed = {row["name"].lower(): row["version"] for row in json.loads(out.stdout)}
    return {name: installed.get(name, "missing") for name in PEER_PINS}


def load_runs() -> list[dict]:
    """Every labelled run of every group that has a manifest, with the paths each kind of tool reads."""
    runs = []
    for group in GROUPS:
        manifest = CORPUS / group / "manifest.jsonl"
        if not manifest.exists():
            continue
        for line in manifest.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            path = CORPUS / group / row["file"]
            peer_path = path / "trainer_log.jsonl" if row.get("format") == "llamafactory" else path
            runs.append({**row, "group": group, "path": path, "peer_path": peer_path})
    return runs


def run_json(command: list[str]) -> dict | None:
    """Run a command and parse its stdout as JSON (NaN allowed); None when it fails or prints no JSON."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None
    text = proc.stdout.strip()
    start = text.find("{")
    if start < 0:
        return None
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return None


def worst(verdicts: list[str]) -> str:
    """The most severe of several verdicts (healthy when there are none)."""
    return max(verdicts, key=SEVERITY.__getitem__, default="healthy")


def verdict_tunewise(run: dict) -> str:
    """tunewise's own verdict for a run, or "unreadable" when the command gives no verdict."""
    out = run_json([str(TUNEWISE), "doctor", str(run["path"]), "--json"])
    return out["verdict"] if out and "verdict" in out else UNREADABLE


def verdict_losslint(run: dict) -> str:
    """losslint's findings mapped onto a verdict."""
    out = run_json(
        [
            str(PEERS_VENV / "bin" / "losslint"),
            "check",
            "--format",
            "json",
            "--color",
            "never",
            str(run["peer_path"]),
        ]
    )
    if out is None or not any(r.get("points") for r in out.get("runs", [])):
        return UNREADABLE
    mapping = {
        "nan_inf": "diverged",
        "divergence": "diverged",
        "overfit_onset": "overfitting",
        "stagnation": "flat",
        "loss_spike": "unstable",
    }
    return worst([mapping[f["check"]] for f in out.get("findings", []) if f.get("check") in mapping])


def trainspotter_verdict(finding: dict) -> str | None:
    """One trainspotter finding as a verdict, or None when it says nothing about the curve's health."""
    detector, metric = finding.get("detector", ""), finding.get("metric", "")
    if detector == "divergence":
        return "overfitting" if "eval" in metric else "diverged"
    if detector == "overfitting":
        return "overfitting"
    if detector in ("plateau", "loss_floor"):
        return "flat"
    if detector in ("spikes", "grad_norm") and finding.get("severity") == "error":
        return "unstable"
    return None


def verdict_trainspotter(run: dict) -> str:
    """trainspotter's findings mapped onto a verdict."""
    out = run_json(
        [str(PEERS_VENV / "bin" / "trainspotter"), "analyze", "--output", "json", str(run["peer_path"])]
    )
    metrics = (out or {}).get("run", {}).get("metrics", {})
    if out is None or not any("loss" in name and m.get("count") for name, m in metrics.items()):
        return UNREADABLE
    return worst([v for f in out.get("findings", []) if (v := trainspotter_verdict(f))])


def verdict_finetune_doctor(run: dict) -> str:
    """finetune-doctor's CRITICAL and WARNING findings mapped onto a verdict."""
    out = run_json(
        [str(PEERS_VENV / "bin" / "finetune-doctor"), "diagnose", "-f", "json", str(run["peer_path"])]
    )
    if out is None or "findings" not in out:
        return UNREADABLE
    mapping = {
        "loss_degenerate": "diverged",
        "gradients": "diverged",
        "overfitting": "overfitting",
        "not_learning": "flat",
        "loss_spikes": "unstable",
    }
    return worst(
        [
            mapping[f["check"]]
            for f in out["findings"]
            if f.get("check") in mapping and f.get("severity") in ("CRITICAL", "WARNING")
        ]
    )


TOOLS: dict[str, Callable[[dict], str]] = {
    "tunewise": verdict_tunewise,
    "losslint": verdict_losslint,
    "trainspotter": verdict_trainspotter,
    "finetune-doctor": verdict_finetune_doctor,
}


def score(runs: list[dict], predictions: list[str]) -> dict:
    """Accuracy, recall per failure class, macro-recall and false alarms on healthy runs."""
    pairs = [(r["label"], p) for r, p in zip(runs, predictions, strict=True)]
    read = [(label, p) for label, p in pairs if p != UNREADABLE]
    judgeable = [(label, p) for label, p in read if label != "insufficient-data"]
    recall = {}
    for cls in FAILURES:
        members = [p for label, p in read if label == cls]
        recall[cls] = {
            "n": len(members),
            "hit": sum(p == cls for p in members),
            "recall": round(sum(p == cls for p in members) / len(members), 3) if members else None,
        }
    healthy = [p for label, p in read if label == "healthy"]
    alarms = sum(p in FAILURES for p in healthy)
    present = [v["recall"] for v in recall.values() if v["recall"] is not None]
    return {
        "n": len(pairs),
        "read": len(read),
        "unreadable": len(pairs) - len(read),
        "accuracy": _ratio(sum(label == p for label, p in read), len(read)),
        "accuracy_strict": _ratio(sum(label == p for label, p in pairs), len(pairs)),
        "accuracy_judgeable": _ratio(sum(label == p for label, p in judgeable), len(judgeable)),
        "recall": recall,
        "macro_recall": round(sum(present) / len(present), 3) if present else None,
        "healthy_runs": len(healthy),
        "false_alarms": alarms,
        "false_alarm_rate": _ratio(alarms, len(healthy)),
    }


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 3) if whole else None


def predict_all(runs: list[dict], jobs: int) -> dict[str, list[str]]:
    """Every tool's verdict on every run, `jobs` subprocesses at a time."""
    predictions = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for name, tool in TOOLS.items():
            started = time.perf_counter()
            predictions[name] = list(pool.map(tool, runs))
            print(f"{name}: {len(runs)} runs in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return predictions


def table(metrics: dict) -> str:
    """The markdown table of the headline numbers, one row per tool and split."""
    head = [
        "tool",
        "split",
        "read",
        "accuracy",
        "acc. (judgeable)",
        *[f"recall {c}" for c in FAILURES],
        "macro-recall",
        "false alarms",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tool, by_split in metrics.items():
        for split, m in by_split.items():
            recalls = [_cell(m["recall"][c]) for c in FAILURES]
            alarms = f"{m['false_alarms']}/{m['healthy_runs']}"
            lines.append(
                f"| {tool} | {split} | {m['read']}/{m['n']} | {_pct(m['accuracy'])} | "
                f"{_pct(m['accuracy_judgeable'])} | "
                + " | ".join(recalls)
                + f" | {_pct(m['macro_recall'])} | {alarms} |"
            )
    return "\n".join(lines)


def _cell(recall: dict) -> str:
    return f"{recall['hit']}/{recall['n']}" if recall["n"] else "-"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="tool processes at a time")
    args = parser.parse_args()
    versions = ensure_peers_venv()
    runs = load_runs()
    predictions = predict_all(runs, args.jobs)
    splits = {
        "all": lambda r: True,
        "dev": lambda r: r["split"] == "dev",
        "holdout": lambda r: r["split"] == "holdout",
    }
    metrics = {}
    for tool, preds in predictions.items():
        metrics[tool] = {}
        for split, keep in splits.items():
            chosen = [(r, p) for r, p in zip(runs, preds, strict=True) if keep(r)]
            metrics[tool][split] = score([r for r, _ in chosen], [p for _, p in chosen])
    per_run = [
        {
            "group": r["group"],
            "file": r["file"],
            "format": r.get("format", "trainer_state"),
            "task": r["task"],
            "split": r["split"],
            "label": r["label"],
            **{t: predictions[t][i] for t in TOOLS},
        }
        for i, r in enumerate(runs)
    ]
    tunewise_wrong_dev = [
        {k: row[k] for k in ("group", "file", "label", "tunewise")}
        for row in per_run
        if row["split"] == "dev" and row["tunewise"] != row["label"]
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "corpus": {g: sum(r["group"] == g for r in runs) for g in GROUPS},
                "peer_versions": versions,
                "metrics": metrics,
                "tunewise_wrong_on_dev": tunewise_wrong_dev,
                "runs": per_run,
            },
            indent=1,
        )
        + "\n"
    )
    print(table(metrics))
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
