"""tunewise.watch vs trainpulse (PyPI), a live peer, attached to the same diverging TRL SFTTrainer runs.

trainpulse's Trainer integration (`trainpulse.callbacks.make_hf_callback`) reads the Trainer's logs
(`on_log`); tunewise.watch sees every optimizer step and guards the update. Both are attached to the same
run, and each run is repeated with trainpulse alone (the run as its users see it: nothing stops it).
Scenarios, a tiny Llama (hidden 64, SmolLM2 tokenizer) fully fine-tuned on a small TRL prompt-completion
dataset, 12 steps, logging every step (trainpulse's best case) unless said:

  - `climb`: plain SGD at lr 3, no clipping, fp32: the loss explodes from about step 4, NaN later;
  - `climb-logging-10`: the same with TRL's default `logging_steps=10`;
  - `absurd`: AdamW at lr 1e8, bf16: the first update throws every weight away, step 2's gradient is NaN.

Per scenario: the first step at which each tool reports (and what), where the run stopped, and whether the
model's weights are finite at the end. Trainer's default `logging_nan_inf_filter` is kept, as users have it.

trainpulse runs in its own venv (created when missing, with the same torch, transformers and trl as the
project's; tunewise from src/), so it never touches the project's environment:

    python benchmarks/bench_trainpulse.py

Writes benchmarks/results/trainpulse.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "trainpulse.json"
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizers" / "smollm2"
PEER_VENV = Path(tempfile.gettempdir()) / "tunewise-peers-trainpulse"
# The peer's pin, then the project's training stack at the versions its own venv has.
PINS = [
    "trainpulse==0.4.0",
    "transformers==5.24.0",
    "trl==1.16.0",
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "peft==0.21.2",
    "pyyaml",
]
STEPS = 12
CLIMB = {"optim": "sgd", "learning_rate": 3.0, "max_grad_norm": 0.0, "bf16": False, "logging_steps": 1}
SCENARIOS = {
    "climb": CLIMB,
    "climb-logging-10": {**CLIMB, "logging_steps": 10},
    "absurd": {
        "optim": "adamw_torch",
        "learning_rate": 1e8,
        "max_grad_norm": 0.0,
        "bf16": True,
        "logging_steps": 1,
    },
}


def ensure_venv() -> Path:
    """The peer venv's python; torch==2.13.0 goes in first, alone, so pip takes the CPU build."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PINS], check=True)
    return python


def one_run(scenario: str, out: Path, with_tunewise: bool) -> dict:
    """One diverging SFTTrainer run with trainpulse attached, and tunewise.watch when `with_tunewise`."""
    import torch
    from datasets import Dataset
    from trainpulse import MonitorConfig
    from trainpulse.callbacks import make_hf_callback
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    import tunewise

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
            "completion": [{"role": "assistant", "content": str(2 * i)}],
        }
        for i in range(64)
    ]
    args = SFTConfig(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        max_length=64,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_pin_memory=False,
        **SCENARIOS[scenario],
    )
    trainer = SFTTrainer(
        model=LlamaForCausalLM(config),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    alerts: list = []
    peer = make_hf_callback(MonitorConfig(alert_callbacks=[alerts.append]))
    trainer.add_callback(peer)
    watched = tunewise.watch(trainer, stream=io.StringIO()) if with_tunewise else None
    trainer.train()
    finite = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    result = {
        "stopped_at": trainer.state.global_step,
        "weights_finite": finite,
        "trainpulse_alerts": [
            {"step": a.step, "severity": a.severity.value, "detector": a.detector, "message": a.message}
            for a in alerts
        ],
        "trainpulse_health_score": round(peer.trainpulse_monitor.report().health_score, 3),
    }
    if watched is not None:
        result["tunewise_findings"] = [
            {"step": f.step, "severity": f.severity, "code": f.code, "title": f.title}
            for f in watched.findings
        ]
        result["tunewise_status"] = watched.status
        result["tunewise_error"] = watched.error
    losses = [h.get("loss") for h in trainer.state.log_history if "loss" in h]
    result["logged_losses"] = losses
    return result


def first(items: list[dict], severities: tuple[str, ...]) -> dict | None:
    return next((x for x in items if x["severity"] in severities), None)


def summarize(scenario: str, both: dict, alone: dict) -> dict:
    tw = first(both["tunewise_findings"], ("warning", "error"))
    tw_error = first(both["tunewise_findings"], ("error",))
    tp_alone = first(alone["trainpulse_alerts"], ("warning", "critical"))
    tp_alone_critical = first(alone["trainpulse_alerts"], ("critical",))
    return {
        "scenario": scenario,
        "tunewise_first_report": tw and {k: tw[k] for k in ("step", "severity", "code")},
        "tunewise_first_error": tw_error and {k: tw_error[k] for k in ("step", "code")},
        "tunewise_stopped_at": both["stopped_at"],
        "weights_finite_with_tunewise": both["weights_finite"],
        "trainpulse_first_report": tp_alone and {k: tp_alone[k] for k in ("step", "severity", "detector")},
        "trainpulse_first_critical": tp_alone_critical
        and {k: tp_alone_critical[k] for k in ("step", "detector")},
        "trainpulse_alone_ran_to": alone["stopped_at"],
        "weights_finite_with_trainpulse_alone": alone["weights_finite"],
        "trainpulse_alerts_before_tunewise_stopped": len(both["trainpulse_alerts"]),
    }


def inside() -> int:
    """Run every scenario in this (the peer venv's) interpreter and write the results."""
    from importlib.metadata import version

    out: dict = {
        "steps": STEPS,
        "versions": {name: version(name) for name in ("trainpulse", "transformers", "trl", "torch")},
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in SCENARIOS:
            both = one_run(scenario, Path(tmp) / f"{scenario}-both", with_tunewise=True)
            alone = one_run(scenario, Path(tmp) / f"{scenario}-alone", with_tunewise=False)
            out["scenarios"][scenario] = {
                "summary": summarize(scenario, both, alone),
                "with_tunewise": both,
                "trainpulse_alone": alone,
            }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
    print(table(out))
    return 0


def _report(x: dict | None, what: str) -> str:
    return (
        "nothing" if x is None else f"step {x['step']} ({x.get('severity', '')} {x[what]})".replace(" )", ")")
    )


def table(out: dict) -> str:
    rows = [
        "| run | tunewise.watch reports | stops at | weights finite | trainpulse reports | "
        "trainpulse alone runs to | weights finite |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, data in out["scenarios"].items():
        s = data["summary"]
        rows.append(
            f"| {name} | {_report(s['tunewise_first_report'], 'code')} | {s['tunewise_stopped_at']} | "
            f"{'yes' if s['weights_finite_with_tunewise'] else 'no'} | "
            f"{_report(s['trainpulse_first_report'], 'detector')} | {s['trainpulse_alone_ran_to']} | "
            f"{'yes' if s['weights_finite_with_trainpulse_alone'] else 'no'} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inside", action="store_true", help="(internal) run in the peer venv")
    if parser.parse_args().inside:
        return inside()
    python = ensure_venv()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run([str(python), __file__, "--inside"], env=env, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
