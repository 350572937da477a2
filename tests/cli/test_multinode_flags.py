"""`tunewise train` across machines: the launch flags, checked together with errors that say the fix; the
torchrun command line each form builds (read back by torchrun's own parser); the relaunch that keeps them
out of each process's line; and a failed rank turned into one line that names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunewise.cli import commands, main
from tunewise.cli.table import parse_args
from tunewise.config import load_config


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("--nnodes 2 --node-rank 2 --master-addr h name=x", "--node-rank is 2 but --nnodes is 2"),
        ("--node-rank 1", "--node-rank 1 without --nnodes"),
        ("--nnodes 2 --node-rank -1 --master-addr h name=x", "node ranks run from 0 to 1"),
        ("--master-addr h --master-port 70000", "--master-port is 70000"),
        ("--master-addr h --master-port 0", "a TCP port is 1..65535"),
        ("--rdzv-endpoint node0 --nnodes 2 name=x", "write HOST:PORT"),
        ("--rdzv-endpoint node0:99999 --nnodes 2 name=x", "write HOST:PORT"),
        ("--rdzv-endpoint h:29400 --master-addr h --nnodes 2 name=x", "two ways to meet"),
        ("--nnodes 2 --node-rank 0 name=x", "needs the rendezvous: --master-addr HOST"),
        ("--nnodes 2 --master-addr h name=x", "needs this machine's --node-rank"),
        ("--nnodes 2 --node-rank 0 --master-addr h", "needs its name on the command line"),
        ("--nproc 0", "--nproc is 0"),
        ("--nnodes 0", "--nnodes is 0"),
    ],
)
def test_a_bad_launch_flag_is_one_error_with_its_fix(
    line: str, says: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(commands.CHILD_ENV, raising=False)
    assert main(["train", *line.split()]) == 2  # a user error: one message, exit 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err


def test_every_problem_is_named_at_once() -> None:
    args = parse_args("train --nnodes 2 --node-rank 5 --master-port 0".split())
    with pytest.raises(commands.ConfigError) as raised:
        commands.launch_settings(args)
    assert len(raised.value.problems) == 4  # the rank, the port, no address, no name


def test_a_port_that_is_not_a_number_is_argparses_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        parse_args("train --master-port abc".split())
    assert raised.value.code == 2 and "invalid int value: 'abc'" in capsys.readouterr().err


def _torchrun_reads(line: str, run_id: str = "x") -> object:
    """What torchrun's own parser makes of the arguments a `train` line launches with."""
    from torch.distributed.run import parse_args as torchrun_parse_args

    launch = commands.launch_settings(parse_args(["train", *line.split()]))
    return torchrun_parse_args([*launch.torchrun_args(run_id), "-m", "tunewise.cli", "train"])


def test_each_form_becomes_torchruns_arguments() -> None:
    static = _torchrun_reads("--nnodes 2 --node-rank 1 --master-addr 10.0.0.5 --master-port 29611 name=x")
    assert (static.nnodes, static.node_rank, static.nproc_per_node) == ("2", 1, "1")
    assert (static.master_addr, static.master_port, static.rdzv_backend) == ("10.0.0.5", 29611, "static")
    assert not static.standalone and static.max_restarts == 0
    rdzv = _torchrun_reads("--nnodes 2 --nproc 4 --rdzv-endpoint node0:29400 name=x", run_id="job-7")
    assert (rdzv.rdzv_backend, rdzv.rdzv_endpoint, rdzv.rdzv_id) == ("c10d", "node0:29400", "job-7")
    assert rdzv.nproc_per_node == "4"
    assert _torchrun_reads("--nproc 2").standalone
    default_port = _torchrun_reads("--nnodes 2 --node-rank 0 --master-addr h name=x")
    assert default_port.master_port == commands.DEFAULT_MASTER_PORT


def test_one_process_per_node_still_launches_and_counts_every_node(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    launched = []
    monkeypatch.setattr(
        commands,
        "_launch_distributed",
        lambda args, cfg: launched.append(commands.launch_settings(args)) or 0,
    )
    monkeypatch.delenv(commands.CHILD_ENV, raising=False)
    line = f"train output_dir={tmp_path} name=x --nnodes 2 --node-rank 1 --master-addr h --master-port 29611"
    args = parse_args(line.split())
    assert args.func(args) == 0
    assert launched[0].world_size == 2 and launched[0].needed and launched[0].node_rank == 1


def test_the_relaunch_leaves_out_every_launch_flag(tmp_path: Path) -> None:
    line = "train run.yaml --nnodes 2 --node-rank 1 --master-addr h --master-port 29611 --nproc 2 --quiet"
    args = parse_args([*line.split(), "name=x"])
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=x"])
    argv = commands.relaunch_argv(args, cfg)
    again = parse_args(argv)
    assert not {flag for opt in commands.LAUNCH_OPTIONS for flag in opt.flags} & set(argv), argv
    assert again.quiet and again.config == "run.yaml"
    assert all(getattr(again, opt.dest) == opt.default for opt in commands.LAUNCH_OPTIONS)
    assert not commands.launch_settings(again).needed  # each process is one process of the run


def test_a_failed_rank_is_one_line_that_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from tunewise.errors import ModelError

    error_file = tmp_path / "rank1" / "error.json"
    error_file.parent.mkdir()
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert commands._rank_failed(ModelError("no weights in /m: save the model"), debug=False) == 1
    assert json.loads(error_file.read_text())["message"] == "ModelError: no weights in /m: save the model"
    failed = ProcessFailure(local_rank=1, pid=11, exitcode=1, error_file=str(error_file))
    killed = ProcessFailure(local_rank=0, pid=10, exitcode=-15, error_file=str(tmp_path / "none.json"))
    text = commands.rank_failure(ChildFailedError("tunewise.cli", {1: failed, 0: killed}))
    assert text.startswith("rank 1 failed: ModelError: no weights in /m: save the model")
    assert "rank(s) 0 stopped with it" in text
    silent = ProcessFailure(local_rank=0, pid=12, exitcode=3, error_file=str(tmp_path / "none.json"))
    text = commands.rank_failure(ChildFailedError("tunewise.cli", {0: silent}))
    assert text == "rank 0 failed: exit code 3; its output above says why"


def test_sharding_where_it_cannot_shard_is_refused_before_any_process_starts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(commands.CHILD_ENV, raising=False)
    launched = []
    monkeypatch.setattr(commands, "_torchrun", lambda cmd, *rest: launched.append(cmd))
    line = ["train", f"output_dir={tmp_path}", "name=x", "training.fsdp=full_shard", "--nproc", "2"]
    assert main(line) == 2  # the check runs for real on this machine (a CPU: accelerate shards only on GPUs)
    err = capsys.readouterr().err
    assert "training.fsdp: sharding needs GPUs" in err and "on cpu" in err and not launched, err
    assert "What works: DDP on the CPU (remove training.fsdp and keep --nproc N)" in err, err  # and why
    assert "would quietly train DDP" in err and "FSDP/DeepSpeed on CUDA GPUs" in err, err
    assert not (tmp_path / "x").exists()


def test_sharding_needs_gpus_and_processes_and_deepspeed_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a),
    )
    gpu, one = {"hardware": {"device": "cuda"}}, commands.Launch()
    cfg = load_config(None, ["training.fsdp=full_shard"])
    with pytest.raises(commands.ConfigError, match="shards over processes; launch with --nproc N"):
        commands._refuse_sharding(cfg, gpu, one)
    commands._refuse_sharding(cfg, gpu, commands.Launch(nproc=2))  # GPUs and processes: accepted
    cfg = load_config(None, ["training.deepspeed={zero_optimization: {stage: 2}}"])
    with pytest.raises(commands.ConfigError, match="pip install deepspeed"):
        commands._refuse_sharding(cfg, gpu, commands.Launch(nproc=2))
    commands._refuse_sharding(
        load_config(None, []), {"hardware": {"device": "cpu"}}, one
    )  # nothing to refuse
