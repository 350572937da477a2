"""`tunewise train --launcher accelerate --accelerate-config FILE`: the accelerate config file, read and
checked before anything loads, and the run relaunched through accelerate's own launcher.

accelerate's `num_processes` counts every process of every machine (it starts `num_processes //
num_machines` on each), so the world size the plan, the check and the monitor divide by is
`num_processes`. accelerate starts a config's processes with torchrun only for its GPU-like types
(`MULTI_GPU`, `FSDP`, `DEEPSPEED`); `MULTI_CPU` goes through mpirun with a hostfile and, without one,
starts a single process. For several processes on the CPU with gloo, a `MULTI_GPU` config with
`use_cpu: true` is the one accelerate runs (tested: the same loss per step as `--nproc 2`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# The types accelerate launches through torchrun (each process a process of the run, as tunewise's own).
TORCHRUN_TYPES = frozenset({"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"})
SHARDING_TYPES = frozenset({"FSDP", "DEEPSPEED"})
CPU_FORM = "distributed_type: MULTI_GPU with use_cpu: true"


@dataclass(frozen=True)
class AccelerateSetup:
    """What an accelerate config file says about the run's processes."""

    path: str
    distributed_type: str
    num_processes: int  # every machine's processes together: the world size
    num_machines: int
    machine_rank: int
    main_process_ip: str | None
    main_process_port: int | None
    mixed_precision: str

    @property
    def nproc(self) -> int:
        """The processes accelerate starts on this machine."""
        return max(self.num_processes // self.num_machines, 1)


def read_accelerate_config(path: str) -> tuple[AccelerateSetup | None, list[str]]:
    """The config file's launch settings, or None and what is wrong with it (each with its fix).

    The YAML is read here first (a syntax error is named at its file:line), then by accelerate's own
    loader, so a key accelerate does not know is its error, in its words.
    """
    where = f"--accelerate-config {path}"
    file = Path(path)
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        return None, [
            f"{where}: the file {what}; write one with `accelerate config --config_file {path}` "
            "or give the path of an existing accelerate config"
        ]
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        return None, [f"{where}: cannot read it ({exc}); check the file's permissions and encoding"]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(exc, "problem", None) or str(exc)
        return None, [f"{where}: {at}: not valid YAML ({problem}); fix that line (accelerate reads YAML)"]
    if not isinstance(data, dict):
        return None, [
            f"{where}: expected a mapping of accelerate settings (distributed_type: ..., "
            f"num_processes: ...), got {type(data).__name__}"
        ]
    problems = _accelerate_loader_problems(path, where)
    if problems:
        return None, problems
    return _setup_problems(path, where, data)


def _accelerate_loader_problems(path: str, where: str) -> list[str]:
    """What accelerate's own config loader refuses (unknown keys, a SageMaker file ...)."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    try:
        loaded = load_config_from_file(path)
    except (ValueError, TypeError, KeyError) as exc:
        return [f"{where}: accelerate cannot read it: {exc}"]
    if not isinstance(loaded, ClusterConfig):
        return [
            f"{where}: a SageMaker config; tunewise launches on this machine "
            "(compute_environment: LOCAL_MACHINE)"
        ]
    return []


def _int_setting(data: dict[str, Any], key: str, default: int, where: str, problems: list[str]) -> int:
    """An integer setting of the file, or its default; a wrong one is added to `problems`."""
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{where}: {key} is {value!r}: write a whole number (e.g. {key}: {default or 2})")
        return default
    return value


def _setup_problems(path: str, where: str, data: dict[str, Any]) -> tuple[AccelerateSetup | None, list[str]]:
    """The settings that say where the processes are, checked together."""
    problems: list[str] = []
    raw = data.get("distributed_type", "NO")
    kind = "NO" if raw is False else str(raw).upper()  # YAML reads an unquoted NO as false
    processes = _int_setting(data, "num_processes", 1, where, problems)
    machines = _int_setting(data, "num_machines", 1, where, problems)
    rank = _int_setting(data, "machine_rank", 0, where, problems)
    port = data.get("main_process_port")
    if kind == "MULTI_CPU" and not data.get("mpirun_hostfile"):
        problems.append(
            f"{where}: distributed_type: MULTI_CPU without mpirun_hostfile: accelerate starts only one "
            f"process for it (it launches MULTI_CPU through mpirun); for {processes} processes on the CPU "
            f"with gloo write {CPU_FORM}"
        )
    elif kind == "NO" and processes > 1:
        problems.append(
            f"{where}: distributed_type: NO with num_processes {processes}: accelerate starts one process "
            f"for it; for {processes} write distributed_type: MULTI_GPU (with use_cpu: true on the CPU)"
        )
    elif kind not in TORCHRUN_TYPES:
        problems.append(
            f"{where}: distributed_type: {kind}: tunewise launches accelerate's torchrun types "
            f"({', '.join(sorted(TORCHRUN_TYPES))}); on the CPU use {CPU_FORM}"
        )
    if processes < 1 or machines < 1:
        problems.append(f"{where}: num_processes and num_machines are at least 1 (num_processes counts all)")
    elif processes % machines:
        multiple = machines * max(processes // machines, 1)
        problems.append(
            f"{where}: num_processes {processes} over num_machines {machines}: accelerate's num_processes "
            f"counts every machine's processes; make it a multiple of {machines}, e.g. {multiple}"
        )
    if machines > 1 and not 0 <= rank < machines:
        problems.append(f"{where}: machine_rank {rank}: machine ranks run from 0 to {machines - 1}")
    if machines > 1 and not data.get("main_process_ip"):
        problems.append(f"{where}: num_machines {machines} needs main_process_ip (machine 0's address)")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536):
        problems.append(f"{where}: main_process_port {port!r}: a TCP port 1..65535 (0: pick a free one)")
    if problems:
        return None, problems
    return (
        AccelerateSetup(
            path=path,
            distributed_type=kind,
            num_processes=processes,
            num_machines=machines,
            machine_rank=rank,
            main_process_ip=data.get("main_process_ip"),
            main_process_port=port,
            mixed_precision=str(data.get("mixed_precision") or "no").lower(),
        ),
        [],
    )


def precision_problem(setup: AccelerateSetup, precision: str) -> str | None:
    """The config's mixed_precision against the one tunewise chose (the plan's), or None when they agree.

    accelerate hands its mixed_precision to every process; the Trainer keeps tunewise's bf16/fp16 but
    would take the file's for a run tunewise trains in fp32, unlike the plan.
    """
    if setup.mixed_precision in ("no", precision):
        return None
    return (
        f"--accelerate-config {setup.path}: mixed_precision: {setup.mixed_precision}, but this run trains in "
        f"{precision} (the plan's choice): set mixed_precision: 'no' in the file (tunewise chooses the "
        "precision), or training.bf16/training.fp16 in the run's config"
    )


def accelerate_launch(config_file: str, argv: list[str]) -> None:
    """Run `accelerate launch --config_file FILE -m tunewise.cli ARGV` in this process (accelerate's own
    parser and launcher; a failed rank raises torch elastic's ChildFailedError, as torchrun does)."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_command(
        launch_command_parser().parse_args(["--config_file", config_file, "-m", "tunewise.cli", *argv])
    )
