"""`tunewise train --launcher accelerate --accelerate-config FILE`: the flags and the file checked together
(one error with its fix, exit 2, no traceback), the world size taken from the file (accelerate's
num_processes counts every machine's), and the command accelerate's own parser reads back."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ACCELERATE_CPU_PAIR as CPU_PAIR

from tunewise.cli import commands, main
from tunewise.cli.accelerate_launch import precision_problem, read_accelerate_config
from tunewise.cli.table import parse_args
from tunewise.config import load_config


def _write(tmp_path: Path, text: str, name: str = "acc.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("words", "text", "says"),
    [
        (
            ["--accelerate-config", "{file}"],
            CPU_PAIR,
            "without --launcher accelerate: add --launcher accelerate",
        ),
        (["--launcher", "accelerate"], None, "--launcher accelerate needs --accelerate-config FILE"),
        (
            ["--launcher", "accelerate", "--accelerate-config", "{dir}/nope.yaml"],
            None,
            "the file does not exist",
        ),
        (
            ["--launcher", "accelerate", "--accelerate-config", "{file}"],
            "num_processes: 2\ndistributed_type: [MULTI_GPU\n",
            "acc.yaml:3: not valid YAML",
        ),
        (["--launcher", "accelerate", "--accelerate-config", "{file}"], "- 2\n", "expected a mapping"),
        (
            ["--launcher", "accelerate", "--accelerate-config", "{file}"],
            CPU_PAIR + "num_gpus_per_banana: 3\n",
            "accelerate cannot read it: The config file at",
        ),
        (
            ["--launcher", "accelerate", "--accelerate-config", "{file}"],
            CPU_PAIR.replace("MULTI_GPU", "MULTI_CPU"),
            "MULTI_CPU without mpirun_hostfile: accelerate starts only one process",
        ),
        (
            ["--launcher", "accelerate", "--accelerate-config", "{file}"],
            CPU_PAIR.replace("MULTI_GPU", "NO"),
            "distributed_type: NO with num_processes 2",
        ),
        (
            ["--launcher", "accelerate", "--accelerate-config", "{file}"],
            CPU_PAIR.replace("MULTI_GPU", "XLA"),
            "tunewise launches accelerate's torchrun types",
        ),
        (
            ["--launcher", "accelerate", "--accelerate-config", "{file}"],
            CPU_PAIR.replace("num_processes: 2", "num_processes: two"),
            "num_processes is 'two': write a whole number",
        ),
        (
            ["--launcher", "accelerate", "--accelerate-config", "{file}", "name=x"],
            CPU_PAIR.replace("num_processes: 2", "num_processes: 3").replace(
                "num_machines: 1", "num_machines: 2"
            ),
            "make it a multiple of 2",
        ),
        (
            ["--launcher", "accelerate", "--accelerate-config", "{file}", "name=x"],
            CPU_PAIR.replace("num_machines: 1", "num_machines: 2").replace(
                "machine_rank: 0", "machine_rank: 2"
            ),
            "machine_rank 2: machine ranks run from 0 to 1",
        ),
        (
            ["--launcher", "accelerate", "--accelerate-config", "{file}"],
            CPU_PAIR.replace("num_processes: 2", "num_processes: 4").replace(
                "num_machines: 1", "num_machines: 2"
            )
            + "main_process_ip: 10.0.0.4\n",
            "needs its name on the command line",
        ),
        (
            [
                "--launcher",
                "accelerate",
                "--accelerate-config",
                "{file}",
                "--nproc",
                "2",
                "--master-port",
                "29500",
            ],
            CPU_PAIR,
            "--nproc --master-port with --launcher accelerate: the accelerate config says where",
        ),
    ],
)
def test_a_bad_accelerate_launch_is_one_error_with_its_fix(
    words: list[str],
    text: str | None,
    says: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(commands.CHILD_ENV, raising=False)
    file = _write(tmp_path, text) if text is not None else tmp_path / "acc.yaml"
    line = [w.format(file=file, dir=tmp_path) for w in words]
    assert main(["train", f"output_dir={tmp_path}", *line]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("lora-*"))  # refused before a run directory was made


def test_the_world_size_is_the_files_num_processes_over_every_machine(tmp_path: Path) -> None:
    two_machines = (
        CPU_PAIR.replace("num_processes: 2", "num_processes: 8")
        .replace("num_machines: 1", "num_machines: 2")
        .replace("machine_rank: 0", "machine_rank: 1")
    )
    file = _write(tmp_path, two_machines + "main_process_ip: 10.0.0.4\n")
    args = parse_args(["train", "name=x", "--launcher", "accelerate", "--accelerate-config", str(file)])
    launch = commands.launch_settings(args)
    assert (launch.world_size, launch.nproc, launch.nnodes, launch.node_rank) == (8, 4, 2, 1)
    assert launch.needed and launch.master_addr == "10.0.0.4"
    one = _write(tmp_path, CPU_PAIR, "pair.yaml")
    launch = commands.launch_settings(
        parse_args(["train", "--launcher", "accelerate", "--accelerate-config", str(one)])
    )
    assert (launch.world_size, launch.nproc, launch.nnodes) == (2, 2, 1)


def test_accelerates_parser_reads_the_relaunch_and_the_launch_flags_stay_out(tmp_path: Path) -> None:
    from accelerate.commands.launch import launch_command_parser

    file = _write(tmp_path, CPU_PAIR)
    line = [
        "train",
        "run.yaml",
        "--launcher",
        "accelerate",
        "--accelerate-config",
        str(file),
        "--quiet",
        "name=x",
    ]
    args = parse_args(line)
    argv = commands.relaunch_argv(args, load_config(None, [f"output_dir={tmp_path}", "name=x"]))
    assert "--launcher" not in argv and "--accelerate-config" not in argv
    read = launch_command_parser().parse_args(["--config_file", str(file), "-m", "tunewise.cli", *argv])
    assert read.config_file == str(file) and read.module and read.training_script == "tunewise.cli"
    again = parse_args(read.training_script_args)
    assert again.quiet and again.config == "run.yaml" and not commands.launch_settings(again).needed


def test_the_files_mixed_precision_must_be_the_runs(tmp_path: Path) -> None:
    setup, problems = read_accelerate_config(str(_write(tmp_path, CPU_PAIR.replace("'no'", "bf16"))))
    assert setup is not None and not problems
    assert precision_problem(setup, "bf16") is None
    problem = precision_problem(setup, "fp32")
    assert problem is not None and "set mixed_precision: 'no'" in problem and "trains in fp32" in problem


def test_a_failed_accelerate_rank_is_the_same_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    error_file = tmp_path / "error.json"
    error_file.write_text('{"message": "ModelError: no weights", "timestamp": 1}')
    failed = ProcessFailure(local_rank=1, pid=11, exitcode=1, error_file=str(error_file))

    def fails(config_file: str, argv: list[str]) -> None:
        raise ChildFailedError("tunewise.cli", {1: failed})

    monkeypatch.setattr("tunewise.cli.accelerate_launch.accelerate_launch", fails)
    launch = commands.Launch(nproc=2, accelerate=read_accelerate_config(str(_write(tmp_path, CPU_PAIR)))[0])
    text = commands._accelerate(str(tmp_path / "acc.yaml"), ["train"], {}, launch)
    assert text == "rank 1 failed: ModelError: no weights"


def test_an_accelerate_fsdp_config_on_the_cpu_is_refused_before_any_process_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # tried: accelerate's FSDP type over 2 CPU processes trains DDP (MULTI_CPU is never made FSDP)
    monkeypatch.delenv(commands.CHILD_ENV, raising=False)
    launched = []
    monkeypatch.setattr(commands, "_accelerate", lambda *a: launched.append(a))
    fsdp = _write(tmp_path, CPU_PAIR.replace("MULTI_GPU", "FSDP"))
    line = ["train", f"output_dir={tmp_path}", "name=x", "--launcher", "accelerate", "--accelerate-config"]
    assert main([*line, str(fsdp)]) == 2
    err = capsys.readouterr().err
    assert f"--accelerate-config {fsdp} (distributed_type: FSDP): sharding needs GPUs" in err, err
    assert "write distributed_type: MULTI_GPU with use_cpu: true in it" in err and not launched, err
    assert not (tmp_path / "x").exists()
