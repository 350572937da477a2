"""The command table: one entry per verb (its function, its help, its arguments) and the parser built
from it. To add a command: write `cmd_<verb>` in commands.py and add its entry to COMMANDS.

Every verb reads its line with argparse's intermixed parsing, so `key=value` overrides (and other
positionals) may come before, between or after the flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunewise.cli import commands
from tunewise.cli.commands import TRAIN_OPTIONS, Option, option

CONFIG_HELP = "YAML config (default: every default, the embedded model and the bundled dataset)"
OVERRIDES = option("overrides", nargs="*", help="key=value overrides, e.g. adapter.r=16")
JSON = option("--json", action="store_true", help="machine-readable output")
NPROC = option(
    "--nproc",
    type=int,
    default=1,
    help="data-parallel processes the run will use: per machine with --nnodes, else over every machine "
    "(2 machines x 4: --nproc 4 --nnodes 2, or --nproc 8)",
)
NNODES = option(
    "--nnodes", type=int, default=1, help="machines the run will use (world size: nproc x nnodes)"
)


@dataclass(frozen=True)
class Command:
    """One verb: what runs it, its one-line help, and its arguments."""

    func: Callable[[argparse.Namespace], int]
    help: str
    options: tuple[Option, ...] = ()
    config: bool = True  # takes `[CONFIG] [key=value ...]` before its own options
    path: str | None = None  # the positional read with the overrides (default: `config` when it has one)

    @property
    def path_dest(self) -> str | None:
        return self.path or ("config" if self.config else None)


COMMANDS: dict[str, Command] = {
    "init": Command(
        commands.cmd_init,
        "write a starter config with every default and a one-line comment each",
        (
            option(
                "path", nargs="?", default="tunewise.yaml", help="where to write it (default tunewise.yaml)"
            ),
            option("--force", action="store_true", help="overwrite an existing file"),
        ),
        config=False,
    ),
    "plan": Command(
        commands.cmd_plan,
        "steps, warmup, cadence and memory of a run, before loading any weights",
        (NPROC, NNODES, JSON),
    ),
    "check": Command(
        commands.cmd_check,
        "the pre-flight checklist: PASS/WARN/FAIL per item with numbers and fixes",
        (NPROC, NNODES, JSON),
    ),
    "inspect": Command(
        commands.cmd_inspect,
        "show examples as the model sees them: trained vs masked tokens",
        (
            option("--n", type=int, default=3, help="how many examples"),
            option("--index", type=int, default=None, help="show the example at this index"),
        ),
    ),
    "train": Command(
        commands.cmd_train,
        "fine-tune: check, load, train with the live doctor, save the run directory",
        TRAIN_OPTIONS,
    ),
    "doctor": Command(
        commands.cmd_doctor,
        "diagnose a run: tunewise run dir, HF Trainer output dir, trainer_state.json or TensorBoard events",
        (option("path", help="run directory, output directory, trainer_state.json or event files"), JSON),
        config=False,
    ),
    "eval": Command(
        commands.cmd_eval,
        "base vs tuned on the test split: loss, perplexity, generation metrics, per-example eval.jsonl",
        (
            option("run_dir", nargs="?", help="run directory to evaluate"),
            option(
                "--base", action="store_true", help="evaluate the base model of --config instead of a run"
            ),
            option("--config", default=None, help="config for --base (default: defaults)"),
            option("--limit", type=int, default=None, help="evaluate only the first N test examples"),
            option(
                "--memorization",
                action="store_true",
                help="memorization check: training vs rephrased vs held-out prompts (--limit N each, "
                "default 20); writes memorization.json",
            ),
            JSON,
            OVERRIDES,
        ),
        config=False,
        path="run_dir",
    ),
    "sweep": Command(
        commands.cmd_sweep,
        "hyperparameter search: one short training per grid point, ranked by validation loss, with the "
        "doctor's verdict per trial; re-running resumes",
        (
            option(
                "--grid",
                nargs="+",
                action="append",
                metavar="KEY=V1,V2",
                help="values to try, e.g. --grid training.learning_rate=1e-4,2e-4 adapter.r=8,16 "
                "(default: learning_rate 1e-4,2e-4,5e-4 x adapter.r 4,8,16); a key=value with one value "
                "is an override, wherever it is",
            ),
            option("--max-steps", type=int, default=100, help="optimizer steps per trial (default 100)"),
            option(
                "--strategy",
                choices=["grid", "halving"],
                default="grid",
                help="grid: every trial runs max-steps; halving: successive halving, keep the best 1/eta "
                "at each rung",
            ),
            option(
                "--eta", type=int, default=3, help="halving: keep the best 1/eta at each rung (default 3)"
            ),
            option(
                "--workers",
                type=int,
                default=1,
                help="trials run in parallel on this machine (with --backend ray: at most this many at "
                "once when above 1; default: as many as the cluster's resources allow)",
            ),
            option(
                "--backend",
                choices=["local", "ray"],
                default="local",
                help="local processes, or Ray Tune trials on a Ray cluster (pip install 'tunewise[ray]')",
            ),
            option("--ray-address", default=None, help="Ray cluster address (default: a local Ray instance)"),
            option(
                "--ray-resources",
                default="cpu=1",
                metavar="cpu=N,gpu=N",
                help="what each Ray trial holds (default cpu=1); e.g. cpu=4,gpu=1",
            ),
            option("--name", default=None, help="sweep name (default: config name + a hash of the sweep)"),
            option(
                "--then-train", action="store_true", help="then train the winner with its resolved config"
            ),
            option("--json", action="store_true", help="machine-readable output (sweep.json)"),
        ),
    ),
    "lr-find": Command(
        commands.cmd_lr_find,
        "learning-rate range test: ramp the lr exponentially, plot the loss, suggest a rate and a sweep "
        "grid around it",
        (
            option("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)"),
            option("--end", type=float, default=1.0, help="last learning rate (default 1)"),
            option("--steps", type=int, default=100, help="optimizer steps in the ramp (default 100)"),
            option("--json", action="store_true", help="machine-readable output (lr_find.json)"),
        ),
    ),
    "report": Command(
        commands.cmd_report,
        "one self-contained report.html: curves, findings, eval, samples, config",
        (
            option("run_dir", help="run directory, Trainer output directory or trainer_state.json"),
            option("--open", action="store_true", help="open the report in the default browser"),
        ),
        config=False,
    ),
    "generate": Command(
        commands.cmd_generate,
        "generate with a trained run (adapter applied, chat template; greedy)",
        (
            option("run_dir", help="run directory"),
            option("--prompt", default=None, help="one prompt (a user message)"),
            option(
                "--file", default=None, help="prompts: a text file (one per line) or a data file (JSONL, ...)"
            ),
            option("--sample", action="store_true", help="sample instead of greedy decoding"),
            option("--temperature", type=float, default=0.7, help="sampling temperature (with --sample)"),
            option(
                "--max-new-tokens", type=int, default=128, help="tokens to generate per reply (default 128)"
            ),
            JSON,
        ),
        config=False,
    ),
    "merge": Command(
        commands.cmd_merge,
        "merge the LoRA adapter into the base weights: a plain Transformers model directory",
        (
            option("run_dir", help="run directory of a lora or qlora run"),
            option("--out", required=True, help="directory for the merged model"),
            option(
                "--dtype",
                choices=["fp32", "bf16", "fp16"],
                default="fp32",
                help="dtype of the merged weights (default fp32); a qlora base is reloaded unquantized in it",
            ),
        ),
        config=False,
    ),
    "demo": Command(
        commands.cmd_demo,
        "the embedded model on the bundled dataset: check, train, evaluate, diagnose",
        (
            option("--quiet", action="store_true", help="no progress output"),
            option("overrides", nargs="*", help="key=value overrides of the demo config"),
        ),
        config=False,
    ),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `tunewise` parser (global options, the verbs and their help) and each verb's own parser."""
    parser = argparse.ArgumentParser(
        prog="tunewise",
        description="Fine-tune causal language models (LoRA, QLoRA, full) with the training loop "
        "and hyperparameters planned, checked, watched and diagnosed.",
        epilog="Every command that reads a config accepts key=value overrides anywhere on the line, "
        "e.g. training.learning_rate=1e-4.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    verbs = {}
    for name, command in COMMANDS.items():
        verb = sub.add_parser(name, help=command.help, description=command.help)
        verb.set_defaults(func=command.func)
        if command.config:
            verb.add_argument("config", nargs="?", help=CONFIG_HELP)
            verb.add_argument(*OVERRIDES.flags, **OVERRIDES.kwargs)
        for opt in command.options:
            verb.add_argument(*opt.flags, **opt.kwargs)
        verbs[name] = verb
    return parser, verbs


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Global options, then the verb, then the verb's arguments in any order.

    Without a known verb (or with `--help` before it) the whole parser answers: help, or what is wrong.
    """
    parser, verbs = build_parser()
    at = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))
    if at == len(argv) or argv[at] not in verbs or {"-h", "--help"} & set(argv[:at]):
        return parser.parse_args(argv)
    unknown = [word for word in argv[:at] if word != "--debug"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args = argparse.Namespace(debug="--debug" in argv[:at], command=argv[at])
    verbs[argv[at]].parse_intermixed_args(argv[at + 1 :], namespace=args)
    dest = COMMANDS[argv[at]].path_dest
    if dest:  # the config (or run directory) is the one word that is not key=value, wherever it is
        words = [*filter(None, [getattr(args, dest)]), *args.overrides]
        path = next((i for i, word in enumerate(words) if "=" not in word or Path(word).exists()), None)
        setattr(args, dest, words.pop(path) if path is not None else None)
        args.overrides = words
    return args
