"""The commands: one function per verb, `args` in, exit status out.

Each command imports the stage it runs inside its function: those stages load torch, transformers
or matplotlib, and every `tunewise` command line starts by importing this module.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import webbrowser
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunewise import rundir
from tunewise.cli.printers import Printer, console, err_console, fmt, say
from tunewise.config import Config, load_config, starter_config_text
from tunewise.doctor.diagnose import diagnose_path, render_diagnosis
from tunewise.errors import ConfigError

if TYPE_CHECKING:
    from tunewise.cli.accelerate_launch import AccelerateSetup

out = Printer()


@dataclass(frozen=True)
class Option:
    """One argument of a verb, as `ArgumentParser.add_argument` takes it."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.flags[0].lstrip("-").replace("-", "_")

    @property
    def is_switch(self) -> bool:
        return self.kwargs.get("action") == "store_true"

    @property
    def default(self) -> Any:
        return self.kwargs.get("default", False if self.is_switch else None)


def option(*flags: str, **kwargs: Any) -> Option:
    return Option(flags, kwargs)


# Where the processes of a run are and how they find each other: torchrun's settings, never passed on to
# the processes it starts (each one is one process of the run).
LAUNCH_OPTIONS = (
    option(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel processes on this machine (DDP through torchrun; gloo on CPU)",
    ),
    option(
        "--nnodes",
        type=int,
        default=1,
        metavar="N",
        help="machines in the run; run the same command on each (with the same name=...)",
    ),
    option(
        "--node-rank",
        type=int,
        default=None,
        metavar="R",
        help="this machine's rank, 0..N-1 (node 0 hosts the rendezvous at --master-addr)",
    ),
    option(
        "--master-addr", default=None, metavar="HOST", help="address of node 0, reachable from every node"
    ),
    option(
        "--master-port", type=int, default=None, metavar="PORT", help="a free port on node 0 (default 29500)"
    ),
    option(
        "--rdzv-endpoint",
        default=None,
        metavar="HOST:PORT",
        help="torchrun's rendezvous form (c10d) instead of --node-rank/--master-*: ranks are given as "
        "machines join",
    ),
    option(
        "--launcher",
        choices=("torchrun", "accelerate"),
        default="torchrun",
        help="what starts the processes: torchrun (the --nproc/--nnodes flags) or accelerate launch "
        "(--accelerate-config)",
    ),
    option(
        "--accelerate-config",
        default=None,
        metavar="FILE",
        help="with --launcher accelerate: the accelerate config (num_processes over every machine, "
        "num_machines, machine_rank, main_process_ip/port); on the CPU: distributed_type: MULTI_GPU, "
        "use_cpu: true",
    ),
)
LAUNCH_DESTS = frozenset(opt.dest for opt in LAUNCH_OPTIONS)
# The train verb's flags; the relaunch rebuilds each process's command line from them.
TRAIN_OPTIONS = (
    option(
        "--resume",
        action="store_true",
        help="continue the run (config `name`, else the newest run) "
        "from its latest checkpoint: optimizer, scheduler and data position restored",
    ),
    option("--force", action="store_true", help="train even when the pre-flight check FAILs"),
    option("--quiet", action="store_true", help="no progress output"),
    option(
        "--stop-at-step",
        type=int,
        default=None,
        metavar="N",
        help="pause after step N is evaluated and checkpointed (status stopped); --resume goes on",
    ),
    option("--no-samples", action="store_true", help="skip the sample generations (samples.json)"),
    *LAUNCH_OPTIONS,
)


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        raise ConfigError([f"`{path}` already exists; pass --force to overwrite it or choose another path"])
    path.write_text(starter_config_text(), encoding="utf-8")
    say(f"wrote {path} (every default, one comment each). Next: tunewise check {path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tunewise.plan import plan_config

    processes, machines = _planned_world(args)
    plan = plan_config(load_config(args.config, args.overrides), processes=processes, machines=machines)
    if args.json:
        print(json.dumps(plan, indent=2, default=str))
    else:
        out.plan(plan)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from tunewise.check import run_check

    processes, machines = _planned_world(args)
    report = run_check(load_config(args.config, args.overrides), processes=processes, machines=machines)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        out.check(report)
        say("the loss falling by step 10 is watched live by the training monitor")
    return 1 if report.failed else 0


def _planned_world(args: argparse.Namespace) -> tuple[int, int]:
    """(every process, machines) of `plan`/`check --nproc N --nnodes M`: nproc x nnodes processes.

    Raises:
        ConfigError: a count below 1.
    """
    problems = [
        f"{flag} is {value}: at least 1 (e.g. {flag} 2)"
        for flag, value in (("--nproc", args.nproc), ("--nnodes", args.nnodes))
        if value < 1
    ]
    if problems:
        raise ConfigError(problems)
    return args.nproc * args.nnodes, args.nnodes


def cmd_inspect(args: argparse.Namespace) -> int:
    from tunewise.data import inspect_examples
    from tunewise.model import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    text = inspect_examples(cfg, load_tokenizer(cfg), n=args.n, index=args.index, color=console.is_terminal)
    sys.stdout.write(text + "\n")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tunewise.check import run_check
    from tunewise.training.distributed import is_main_process, leave_process_group
    from tunewise.training.run import TrainHooks, train

    launch = launch_settings(args)  # the flags' mistakes first, before anything loads
    cfg = load_config(args.config, args.overrides)
    child = bool(os.environ.get(CHILD_ENV))  # a process torchrun started for the relaunch
    if args.resume and not cfg.name:
        cfg.name = _latest_run_name(Path(cfg.output_dir))
    if launch.needed and not child:
        return _launch_distributed(args, cfg)
    check = _inherited_check() if child else None
    if not child:
        report = run_check(cfg)
        _refuse_sharding(cfg, report.plan, launch)
        out.check(report, brief=True)
        check = report.to_dict()
        if report.failed and not args.force:
            say(
                "refusing to train: the check has FAIL items (fix them, or pass --force to train anyway)",
                style="bold red",
            )
            return 1
    progress = out.progress(args.quiet)
    hooks = TrainHooks(
        on_plan=out.plan,
        on_notice=out.notice,
        on_finding=out.finding,
        on_step=progress.step,
        on_start=progress.begin,
        stop_at_step=args.stop_at_step,
        samples=not args.no_samples,
    )
    try:
        result = train(cfg, resume=args.resume, hooks=hooks, force=args.force, check=check)
    except Exception as exc:
        if not child:
            raise
        return _rank_failed(exc, args.debug)  # the launcher names this rank and its message
    finally:
        progress.end()
    if child:
        leave_process_group()
    if child or not is_main_process():
        return 0  # a run that ended but did not complete is the launcher's to report (result.json)
    out.result(result)
    return 0 if result.status == "completed" else 1


# ----------------------------------------------------------------------------- the torchrun relaunch

# Set in each process torchrun starts: it trains; the launcher checks and reports.
CHILD_ENV = "TUNEWISE_CHILD"
CHECK_ENV = "TUNEWISE_CHECK_FILE"  # the launcher's check (for check.json), handed to the processes
DEFAULT_MASTER_PORT = 29500  # torchrun's


@dataclass(frozen=True)
class Launch:
    """Where the processes of a run are: torchrun's settings, validated."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None
    accelerate: AccelerateSetup | None = None  # --launcher accelerate: its config file says the rest

    @property
    def world_size(self) -> int:
        """Every process of every node: what the plan, the check and the monitor divide by."""
        return self.nproc * self.nnodes

    @property
    def needed(self) -> bool:
        """More than one process, a rendezvous named, or accelerate: the run goes through a launcher."""
        named = bool(self.master_addr or self.master_port or self.rdzv_endpoint)
        return self.world_size > 1 or named or self.accelerate is not None

    def torchrun_args(self, run_id: str) -> list[str]:
        """torchrun's own arguments (before the command it runs)."""
        base = [f"--nnodes={self.nnodes}", f"--nproc-per-node={self.nproc}", "--max-restarts=0"]
        if self.rdzv_endpoint:
            return [
                *base,
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.rdzv_endpoint}",
                f"--rdzv-id={run_id}",
            ]
        if self.master_addr or self.master_port:
            port = self.master_port or DEFAULT_MASTER_PORT
            host = self.master_addr or "127.0.0.1"
            return [*base, f"--node-rank={self.node_rank}", f"--master-addr={host}", f"--master-port={port}"]
        return ["--standalone", *base]


def launch_settings(args: argparse.Namespace) -> Launch:
    """The launch flags of a `train` line, checked together.

    Raises:
        ConfigError: every mistake, each with its fix (a node rank past the nodes, a rank without the
            nodes, a bad port, a multi-node run without a rendezvous address, ...).
    """
    if args.launcher == "accelerate" or args.accelerate_config is not None:
        return _accelerate_settings(args)
    problems = [*_count_problems(args), *_rendezvous_problems(args)]
    if problems:
        raise ConfigError(problems)
    return Launch(
        nproc=args.nproc,
        nnodes=args.nnodes,
        node_rank=args.node_rank or 0,
        master_addr=args.master_addr,
        master_port=args.master_port,
        rdzv_endpoint=args.rdzv_endpoint,
    )


def _accelerate_settings(args: argparse.Namespace) -> Launch:
    """`--launcher accelerate --accelerate-config FILE`: where the processes are comes from the file.

    Raises:
        ConfigError: the flags that do not go together, or what is wrong with the file.
    """
    from tunewise.cli.accelerate_launch import read_accelerate_config

    if args.launcher != "accelerate":
        raise ConfigError(
            [
                f"--accelerate-config {args.accelerate_config} without --launcher accelerate: add "
                "--launcher accelerate to start the processes with `accelerate launch`, or remove "
                "--accelerate-config to use torchrun (--nproc N)"
            ]
        )
    if args.accelerate_config is None:
        raise ConfigError(
            [
                "--launcher accelerate needs --accelerate-config FILE: the accelerate config that says how "
                "many processes (write one with `accelerate config --config_file acc.yaml`)"
            ]
        )
    given = [
        flag
        for flag, value, default in (
            ("--nproc", args.nproc, 1),
            ("--nnodes", args.nnodes, 1),
            ("--node-rank", args.node_rank, None),
            ("--master-addr", args.master_addr, None),
            ("--master-port", args.master_port, None),
            ("--rdzv-endpoint", args.rdzv_endpoint, None),
        )
        if value != default
    ]
    setup, problems = read_accelerate_config(args.accelerate_config)
    if given:
        problems.insert(
            0,
            f"{' '.join(given)} with --launcher accelerate: the accelerate config says where the processes "
            "are (num_processes over every machine, num_machines, machine_rank, main_process_ip/port); "
            f"remove {'/'.join(given)}, or drop --launcher accelerate to launch with torchrun",
        )
    if setup is not None and setup.num_machines > 1 and not _named(args):
        problems.append(
            "a run over several machines needs its name on the command line, the same on every machine "
            "(e.g. name=run-$SLURM_JOB_ID): each machine would otherwise pick its own"
        )
    if problems or setup is None:
        raise ConfigError(problems)
    return Launch(
        nproc=setup.nproc,
        nnodes=setup.num_machines,
        node_rank=setup.machine_rank,
        master_addr=setup.main_process_ip,
        master_port=setup.main_process_port or None,
        accelerate=setup,
    )


def _count_problems(args: argparse.Namespace) -> list[str]:
    """--nproc, --nnodes and --node-rank: positive counts, a rank inside the nodes."""
    problems = []
    if args.nproc < 1:
        problems.append(
            f"--nproc is {args.nproc}: the processes on this machine, at least 1 (e.g. --nproc 2)"
        )
    if args.nnodes < 1:
        problems.append(f"--nnodes is {args.nnodes}: the machines in the run, at least 1 (e.g. --nnodes 2)")
    rank = args.node_rank
    if rank is not None and args.nnodes == 1 and rank != 0:
        problems.append(
            f"--node-rank {rank} without --nnodes: say how many machines take part, e.g. "
            f"--nnodes {rank + 1} --node-rank {rank}"
        )
    elif rank is not None and not 0 <= rank < args.nnodes:
        problems.append(
            f"--node-rank is {rank} but --nnodes is {args.nnodes}: node ranks run from 0 to "
            f"{args.nnodes - 1} (0 on the machine at --master-addr)"
        )
    return problems


def _rendezvous_problems(args: argparse.Namespace) -> list[str]:
    """How the machines find each other: one form, a real port, a node rank on each machine."""
    problems = []
    if args.master_port is not None and not 0 < args.master_port < 65536:
        problems.append(f"--master-port is {args.master_port}: a TCP port is 1..65535 (e.g. 29500)")
    if args.rdzv_endpoint is not None:
        problems += _endpoint_problems(args.rdzv_endpoint)
        if args.master_addr or args.master_port:
            problems.append(
                "--rdzv-endpoint and --master-addr/--master-port are two ways to meet: keep one "
                "(--rdzv-endpoint HOST:PORT, or --master-addr HOST --master-port PORT --node-rank R)"
            )
    elif args.nnodes > 1 and not args.master_addr:
        problems.append(
            f"--nnodes {args.nnodes} needs the rendezvous: --master-addr HOST (node 0's address, reachable "
            "from every node) with --master-port PORT and --node-rank R, or --rdzv-endpoint HOST:PORT"
        )
    elif args.nnodes > 1 and args.node_rank is None:
        problems.append(
            f"--nnodes {args.nnodes} with --master-addr needs this machine's --node-rank: 0 on "
            f"{args.master_addr}, 1..{args.nnodes - 1} on the others (on SLURM: --node-rank $SLURM_NODEID)"
        )
    if args.nnodes > 1 and not _named(args):
        problems.append(
            "a run over several machines needs its name on the command line, the same on every machine "
            "(e.g. name=run-$SLURM_JOB_ID): each machine would otherwise pick its own"
        )
    return problems


def _endpoint_problems(endpoint: str) -> list[str]:
    """HOST:PORT with a port in range."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return [f"--rdzv-endpoint is {endpoint!r}: write HOST:PORT with a port 1..65535 (e.g. node0:29400)"]
    return []


def _named(args: argparse.Namespace) -> bool:
    """The run's name is given on the line (an override) or in the config file."""
    if any(word.split("=", 1)[0] == "name" for word in args.overrides):
        return True
    return bool(args.config) and bool(load_config(args.config, []).name)


def _refuse_sharding(cfg: Config, plan: dict[str, Any], launch: Launch) -> None:
    """FSDP and DeepSpeed where they cannot shard: an error before any process starts, not a silent DDP run.

    accelerate turns FSDP on only for GPU-like devices: its CPU processes are MULTI_CPU, which it never
    makes FSDP (accelerate/state.py), so the Trainer trains plain DDP with every weight in every process
    (tried: `training.fsdp: full_shard`, and an accelerate config of type FSDP, over 2 CPU processes:
    the model came back wrapped in DistributedDataParallel, unsharded). torch's own FSDP2 does shard
    on the CPU with gloo, but not through the Trainer. Either engine needs more than one process.

    Raises:
        ConfigError: `training.fsdp`, `training.deepspeed` or an accelerate FSDP/DeepSpeed config set for a
            run that cannot shard.
    """
    import importlib.util

    device = (plan.get("hardware") or {}).get("device", "cpu")
    asked = [  # (what asks for sharding, how the same run trains DDP on the CPU)
        (f"training.{key}", f"remove training.{key} and keep --nproc N")
        for key in ("fsdp", "deepspeed")
        if cfg.training.get(key)
    ]
    acc = launch.accelerate
    if acc is not None and acc.distributed_type in ("FSDP", "DEEPSPEED"):
        asked.append(
            (
                f"--accelerate-config {acc.path} (distributed_type: {acc.distributed_type})",
                "write distributed_type: MULTI_GPU with use_cpu: true in it",
            )
        )
    problems = []
    for what, instead in asked:
        if device != "cuda":
            problems.append(
                f"{what}: sharding needs GPUs: accelerate turns FSDP and DeepSpeed on only for GPU-like "
                f"devices, and this run is on {device}, where the Trainer would quietly train DDP with the "
                "whole model in every process (torch's own FSDP2 shards on the CPU, but not through the "
                f"Trainer). What works: DDP on the CPU ({instead}), or FSDP/DeepSpeed on CUDA GPUs"
            )
        elif launch.world_size < 2:
            problems.append(f"{what}: shards over processes; launch with --nproc N (and --nnodes)")
    wants_deepspeed = cfg.training.get("deepspeed") or any("DEEPSPEED" in what for what, _ in asked)
    if wants_deepspeed and importlib.util.find_spec("deepspeed") is None:
        problems.append("training.deepspeed: the deepspeed package is not installed (pip install deepspeed)")
    if problems:
        raise ConfigError(problems)


def relaunch_argv(args: argparse.Namespace, cfg: Config) -> list[str]:
    """The `train` command line each torchrun process runs, built from the parsed arguments: the config,
    the overrides, the run's name and output directory, then every flag set but the launch flags.

    Args:
        args: the parsed `train` arguments.
        cfg: the loaded config; its name is already chosen (every process writes the same run).
    """
    argv = ["--debug"] if args.debug else []
    argv += ["train", *([args.config] if args.config else []), *args.overrides]
    argv += [f"name={cfg.name}", f"output_dir={cfg.output_dir}"]
    for opt in TRAIN_OPTIONS:
        value = getattr(args, opt.dest)
        if opt.dest not in LAUNCH_DESTS and value != opt.default:
            argv += [opt.flags[0]] if opt.is_switch else [opt.flags[0], str(value)]
    return argv


def _launch_distributed(args: argparse.Namespace, cfg: Config) -> int:
    """Check this machine with the run's real world size, then re-run this train command under torchrun
    (gloo on the CPU); a failed rank becomes one line that names it."""
    import tempfile

    from tunewise.check import run_check

    launch = launch_settings(args)
    report = run_check(cfg, processes=launch.world_size, machines=launch.nnodes)
    _refuse_sharding(cfg, report.plan, launch)
    _refuse_accelerate_precision(launch, report.plan)
    out.check(report, brief=True)
    run_dir = rundir.make_run_dir(cfg)  # the run's name, chosen once for every process
    if report.failed and not args.force:
        say(
            "refusing to train: the check has FAIL items (fix them, or pass --force to train anyway)",
            style="bold red",
        )
        return 1
    argv = relaunch_argv(args, cfg)
    cmd = [*launch.torchrun_args(cfg.name or run_dir.name), "-m", "tunewise.cli", *argv]
    where = (
        f" on node {launch.node_rank} of {launch.nnodes}"
        if launch.nnodes > 1 and not launch.rdzv_endpoint
        else ""
    )
    shown = (
        f"accelerate launch --config_file {launch.accelerate.path} -m tunewise.cli {' '.join(argv)}"
        if launch.accelerate
        else f"torchrun {' '.join(cmd)}"
    )
    say(f"launching {launch.nproc} process(es){where}, {launch.world_size} in all: {shown}")
    with tempfile.TemporaryDirectory(prefix="tunewise-launch-") as tmp:
        check_file = Path(tmp) / rundir.CHECK
        rundir.write_json(check_file, report.to_dict())
        env = {
            CHILD_ENV: "1",
            CHECK_ENV: str(check_file),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        if launch.accelerate:
            failure = _accelerate(launch.accelerate.path, argv, env, launch)
        else:
            failure = _torchrun(cmd, env, launch)
    if failure:
        if not failure.startswith(PEER_SAID):  # this machine's own: the others may be waiting for it
            _tell_the_other_machines(launch, failure)
        _record_failure(run_dir, failure)
        err_console.print(f"error: {failure}", markup=False, highlight=False)
        return 1
    result = rundir.read_json_object(run_dir / rundir.RESULT)
    if not result:  # another machine's node 0 wrote it, on a disk this one does not share
        say(f"node {launch.node_rank}: every process of this machine finished")
        return 0
    say(f"run {run_dir}: {result['status']} at step {result['global_step']}")
    if result.get("error"):
        say(str(result["error"]))
    return 0 if result["status"] == "completed" else 1


def _record_failure(run_dir: Path, failure: str) -> None:
    """result.json says `failed` with the failed rank's line, where rank 0 did not write one: the launcher
    stops every process as soon as one fails, often before rank 0 has got to writing it."""
    if run_dir.is_dir() and not rundir.read_json_object(run_dir / rundir.RESULT):
        rundir.write_result(rundir.RunResult(run_dir=run_dir, status="failed", error=failure), time.time())


def _refuse_accelerate_precision(launch: Launch, plan: dict[str, Any]) -> None:
    """An accelerate config whose mixed_precision is not the run's: an error before any process starts."""
    from tunewise.cli.accelerate_launch import precision_problem

    if launch.accelerate is None:
        return
    problem = precision_problem(launch.accelerate, str((plan.get("hardware") or {}).get("precision", "fp32")))
    if problem:
        raise ConfigError([problem])


def _torchrun(cmd: list[str], env: dict[str, str], launch: Launch | None = None) -> str | None:
    """Run torchrun in this process with `env` added for its processes; None, or what the failed rank said."""
    from torch.distributed.run import parse_args as torchrun_parse_args
    from torch.distributed.run import run as torchrun_run

    return _launched(lambda: torchrun_run(torchrun_parse_args(cmd)), env, launch)


def _accelerate(config_file: str, argv: list[str], env: dict[str, str], launch: Launch) -> str | None:
    """`accelerate launch --config_file FILE` in this process; None, or what the failed rank said."""
    from tunewise.cli.accelerate_launch import accelerate_launch

    return _launched(lambda: accelerate_launch(config_file, argv), env, launch)


def _launched(start: Any, env: dict[str, str], launch: Launch | None) -> str | None:
    """Run a launcher (`start`: torchrun's or accelerate's, in this process) with `env` added for its
    processes; None, or what the failed rank said.

    Over several machines a watcher listens at the rendezvous for another machine's failure: a rank
    that died before the process group formed would leave this machine's ranks waiting for it.
    """
    import logging
    import subprocess

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:  # its traceback wall
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    watch = PeerWatch(launch) if launch is not None and launch.nnodes > 1 else None
    try:
        if watch:
            watch.start()
        start()
    except ChildFailedError as exc:
        return rank_failure(exc)
    except subprocess.CalledProcessError as exc:  # accelerate's one-process launcher: no error file
        return f"rank 0 failed: exit code {exc.returncode}; its output above says why"
    except SignalException as exc:  # Ctrl-C, a scheduler's SIGTERM, or the watcher: the processes are stopped
        if watch and watch.peer_failure:
            return f"{PEER_SAID}{watch.peer_failure}; this machine's processes were stopped with it"
        return f"the launcher received {exc.sigval.name}; its processes were stopped (resume with --resume)"
    finally:
        if watch:
            watch.stop.set()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return None


def rank_failure(exc: Any) -> str:
    """One sentence for torch elastic's ChildFailedError: the first rank that failed, and its message."""
    rank, first = exc.get_first_failure()
    message = first.message.get("message", "") if isinstance(first.message, dict) else str(first.message)
    if first.error_file_data.get("errorTraits") or not message:  # no error file: nothing but the exit code
        message = f"exit code {first.exitcode}; its output above says why"
    text = f"rank {rank} failed: {message}"
    if PEER_LOST in message:
        text += " (a process on another machine stopped first: its launcher names the rank that failed)"
    others = sorted(r for r in exc.failures if r != rank)
    if others:
        text += f"; rank(s) {', '.join(map(str, others))} stopped with it"
    return text


PEER_LOST = "Connection closed by peer"  # gloo's words when the process at the other end has gone
PEER_FAILED_KEY = "tunewise/failed"  # set at the rendezvous store by a machine whose rank failed
PEER_SAID = "another machine: "  # how a failure that came from another machine begins


def _rendezvous_address(launch: Launch) -> tuple[str, int]:
    """Where the machines meet: the key-value store node 0's torchrun (or the endpoint's host) serves."""
    if launch.rdzv_endpoint:
        host, _, port = launch.rdzv_endpoint.rpartition(":")
        return host, int(port)
    return launch.master_addr or "127.0.0.1", launch.master_port or DEFAULT_MASTER_PORT


def _rendezvous_store(launch: Launch, timeout_s: float) -> Any:
    """A client of the rendezvous store, or None while nothing listens there (probed with a plain
    socket first: a TCPStore client that cannot connect prints C++ warnings with stack frames)."""
    import socket
    from datetime import timedelta

    from torch.distributed import TCPStore

    host, port = _rendezvous_address(launch)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError:
        return None
    return TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def _tell_the_other_machines(launch: Launch, failure: str) -> None:
    """Leave this machine's failure at the rendezvous, for the other machines' watchers (best effort)."""
    if launch.nnodes < 2 or (launch.node_rank == 0 and not launch.rdzv_endpoint):
        return  # node 0's torchrun hosted the store: gone with it, and the others fail on its loss
    try:
        store = _rendezvous_store(launch, timeout_s=5)
        if store is not None:
            store.set(PEER_FAILED_KEY, f"node {launch.node_rank}'s {failure}")
    except Exception:  # the store has gone with node 0: the others' collectives fail on their own
        return


class PeerWatch(threading.Thread):
    """Polls the rendezvous store for another machine's failure; on one, stops this launcher's torchrun
    (a SIGTERM to this process: torchrun stops its processes and raises SignalException)."""

    POLL_S = 2.0

    def __init__(self, launch: Launch) -> None:
        super().__init__(daemon=True, name="tunewise-peer-watch")
        self.launch, self.stop, self.peer_failure = launch, threading.Event(), None

    def run(self) -> None:
        store = None
        while not self.stop.wait(self.POLL_S):
            try:
                if store is None:
                    store = _rendezvous_store(self.launch, timeout_s=self.POLL_S)
                if store is not None and store.check([PEER_FAILED_KEY]):
                    self.peer_failure = store.get(PEER_FAILED_KEY).decode("utf-8", "replace")
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            except Exception:  # not up yet (node 0 is still checking), or gone at the end of the run
                store = None


def _rank_failed(exc: Exception, debug: bool) -> int:
    """In a process torchrun started: write the error where torchrun reads it, for the launcher's one line."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    message = f"{type(exc).__name__}: {exc}"
    if path:
        Path(path).write_text(
            json.dumps({"message": message, "timestamp": int(time.time())}), encoding="utf-8"
        )
    if debug or not path:
        raise exc
    return 1


def _inherited_check() -> dict | None:
    """The check the launcher ran with the run's real world size (for check.json), if it handed one."""
    path = os.environ.get(CHECK_ENV)
    return (rundir.read_json_object(Path(path)) or None) if path else None


def _latest_run_name(output_dir: Path) -> str:
    runs = sorted(
        (p for p in output_dir.glob("*") if (p / rundir.CONFIG).is_file()), key=lambda p: p.stat().st_mtime
    )
    if not runs:
        raise ConfigError([f"--resume: no run directory under `{output_dir}`; name the run with `name=...`"])
    return runs[-1].name


def cmd_doctor(args: argparse.Namespace) -> int:
    # Fixes in the run's own words: tunewise overrides for `tunewise train`, a script's arguments otherwise.
    diagnosis = diagnose_path(Path(args.path)).in_run_words()
    if args.json:
        print(json.dumps(diagnosis.to_dict(), indent=2, default=str))
    else:
        sys.stdout.write(render_diagnosis(diagnosis, color=console.is_terminal) + "\n")
    return diagnosis.exit_code()


def _require_run_dir(path: str) -> Path:
    run_dir = Path(path)
    if not (run_dir / rundir.CONFIG).is_file():
        raise ConfigError(
            [
                f"`{run_dir}` is not a run directory (no config.yaml); pass the directory that "
                "`tunewise train` printed"
            ]
        )
    return run_dir


def cmd_eval(args: argparse.Namespace) -> int:
    from tunewise.cli.printers import EvalProgress
    from tunewise.evaluate import compare, evaluate

    if args.base:
        cfg = load_config(args.config, args.overrides)
        run_dir = None
    else:
        if not args.run_dir:
            raise ConfigError(["eval needs a RUN_DIR (a directory that `tunewise train` wrote) or --base"])
        run_dir = _require_run_dir(args.run_dir)
        cfg = load_config(run_dir / rundir.CONFIG, args.overrides)
    if args.memorization:
        return _eval_memorization(args, cfg, run_dir)
    progress = EvalProgress(args.json)
    try:
        if run_dir is None:
            result = evaluate(cfg, None, limit=args.limit, progress=progress)
        else:  # base and tuned; writes eval.json and eval.jsonl
            result = compare(cfg, run_dir, limit=args.limit, progress=progress)
    finally:
        progress.end()
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif run_dir is None:
        out.eval(result)
    else:
        out.comparison(result, run_dir)
    return 0


def _eval_memorization(args: argparse.Namespace, cfg: Config, run_dir: Path | None) -> int:
    from tunewise.memorization import check_memorization

    if run_dir is None:
        raise ConfigError(["--memorization checks a trained run: pass its RUN_DIR instead of --base"])
    result = check_memorization(cfg, run_dir, n=args.limit or 20)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 1 if result["flagged"] else 0
    say(f"reworded prompts: {result['rephrasing']}")
    for name, label in [
        ("train", "training prompts"),
        ("rephrased", "same, reworded"),
        ("heldout", "held-out prompts"),
    ]:
        numbers = result["sets"][name]
        say(
            f"  {label:<24} near-verbatim {numbers['near_verbatim']:.0%}  "
            f"verbatim {numbers['verbatim']:.0%}  loss {fmt(numbers['loss'])}  (n={numbers['n']})"
        )
    say(result["message"], style="bold red" if result["flagged"] else "bold green")
    say(f"wrote {run_dir / rundir.MEMORIZATION}")
    return 1 if result["flagged"] else 0


def cmd_report(args: argparse.Namespace) -> int:
    from tunewise.report import write_report

    path = Path(args.run_dir)
    if not path.exists():
        raise ConfigError([f"`{path}` does not exist; pass a run directory or a Trainer output directory"])
    report = write_report(path)
    say(f"wrote {report} (and its charts as PNG files next to it)")
    if args.open:
        webbrowser.open(report.resolve().as_uri())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tunewise.evaluate import conversations_from_file, generate, load_for_inference, prompt_conversations

    run_dir = _require_run_dir(args.run_dir)
    cfg = load_config(run_dir / rundir.CONFIG)
    if bool(args.prompt) == bool(args.file):
        raise ConfigError(["generate needs exactly one of --prompt TEXT or --file FILE"])
    conversations = (
        prompt_conversations(cfg, [args.prompt])
        if args.prompt
        else conversations_from_file(cfg, Path(args.file))
    )
    model, tokenizer = load_for_inference(cfg, run_dir)
    replies = generate(
        model,
        tokenizer,
        conversations,
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        temperature=args.temperature,
    )
    if args.json:
        pairs = zip(conversations, replies, strict=True)
        print(json.dumps([{"prompt": c[-1]["content"] if c else "", "reply": r} for c, r in pairs], indent=2))
        return 0
    for conversation, reply in zip(conversations, replies, strict=True):
        if len(conversations) > 1:
            say(f"> {conversation[-1]['content'] if conversation else ''}", style="dim")
        say(reply)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from tunewise.export import merge_adapter

    result = merge_adapter(_require_run_dir(args.run_dir), Path(args.out), args.dtype)
    for note in result.notes:
        say(f"note: {note}", style="bold yellow")
    say(
        f"merged {args.run_dir}/adapter into {result.base} ({result.dtype}): {result.out_dir}\n"
        f"load it with AutoModelForCausalLM.from_pretrained({str(result.out_dir)!r})",
        style="bold",
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tunewise.demo import run_demo

    return run_demo(out, overrides=args.overrides, quiet=args.quiet)


def cmd_sweep(args: argparse.Namespace) -> int:
    from tunewise.sweep import DEFAULT_GRID, SweepSpec, parse_grid, parse_resources, run_sweep, split_values

    # `--grid` takes every word up to the next flag: a `key=value` there with one value is an override
    items = [item for group in args.grid or [] for item in group]
    fixed = [item for item in items if len(split_values(item.partition("=")[2])) == 1]
    grid = parse_grid([item for item in items if item not in fixed]) or dict(DEFAULT_GRID)
    spec = SweepSpec(
        config=args.config,
        overrides=[*args.overrides, *fixed],
        grid=grid,
        max_steps=args.max_steps,
        strategy=args.strategy,
        eta=args.eta,
        workers=args.workers,
        backend=args.backend,
        ray_address=args.ray_address,
        ray_resources=parse_resources(args.ray_resources),
        name=args.name,
    )
    result = run_sweep(spec, on_trial=None if args.json else out.trial_event)
    if args.json:
        print(json.dumps(rundir.read_json(result.sweep_dir / "sweep.json"), indent=2))
    else:
        out.sweep(result)
    if args.then_train and result.winner is not None:
        from tunewise.cli import main  # the package's entry point; it imports this module

        say(f"training the winner {result.winner.name} with its resolved config", style="bold")
        return main(["train", result.files["best_config"]])
    return 0 if result.winner is not None else 1


def cmd_lr_find(args: argparse.Namespace) -> int:
    from tunewise.training.lrfind import find_learning_rate

    cfg = load_config(args.config, args.overrides)
    result = find_learning_rate(cfg, start=args.start, end=args.end, steps=args.steps)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    say(
        f"lr-find: {len(result.lrs)} steps from lr {args.start:.2g} to {result.lrs[-1]:.2g}; "
        f"stopped: {result.stop_reason}",
        style="bold",
    )
    if result.suggestion is None:
        say(f"no suggestion: {result.caution}", style="bold red")
    else:
        say(f"suggested: {result.sweep_override()}  ({result.rule})", style="bold green")
    if result.caution:
        say(f"caution: {result.caution}", style="yellow")
    else:
        say(f"note: {result.note}")
    say(f"curve: {result.out_dir / 'lr_find.png'}  data: {result.out_dir / 'lr_find.json'}")
    if result.suggestion is not None:
        words = ["tunewise sweep", args.config, *args.overrides, "--grid", result.sweep_grid()]
        say(f"next: {' '.join(w for w in words if w)}")
    return 0
