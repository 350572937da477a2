"""Past one machine, on the CPU with gloo: two launchers with node ranks 0 and 1 on localhost train the
run a 2-process single-node run trains (the same loss, step by step); a doctor stop under DDP ends every
rank; a failed rank is one line that names it; the monitor's agreement (the mean loss, one stop for all).

Every launch is a `tunewise train` process (or torchrun) with a timeout: a rank left waiting in a
collective fails the test by the clock instead of hanging it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ACCELERATE_CPU_PAIR, read_jsonl, tiny_overrides
from test_divergence_stop import EXPLODES  # full fine-tuning at a constant 0.9: explodes by step 3

from tunewise import rundir

REPO = Path(__file__).parents[2]
TIMEOUT = 600  # seconds for one launch; a hung rank fails here
QUICK = {"training.max_steps": 4, "training.eval_steps": 1000, "training.save_steps": 1000}


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _train(*words: str) -> list[str]:
    """A `tunewise train` command line (the flags the tests always pass: no samples, no progress)."""
    return [sys.executable, "-m", "tunewise.cli", "train", *words, "--force", "--quiet", "--no-samples"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=TIMEOUT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in rundir.train_records(read_jsonl(run_dir / rundir.METRICS))]


def _result(run_dir: Path) -> dict:
    return json.loads((run_dir / rundir.RESULT).read_text())


def _two_launchers(overrides: list[str], flags: list[list[str]], ok: bool = True) -> list[tuple[int, str]]:
    """Start one `tunewise train` launcher per node (node ranks 0 and 1 on this machine), each with its
    own overrides and flags; their exit codes and outputs (stdout and stderr together)."""
    launchers = [
        subprocess.Popen(
            _train(*overrides, *node), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()
        )
        for node in flags
    ]
    outputs = []
    try:
        for launcher in launchers:
            outputs.append(launcher.communicate(timeout=TIMEOUT)[0])
    finally:
        for launcher in launchers:
            launcher.kill()
    ended = [(p.returncode, out) for p, out in zip(launchers, outputs, strict=True)]
    if ok:
        assert [code for code, _ in ended] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    return ended


@pytest.mark.slow
def test_two_nodes_of_one_process_train_what_two_processes_on_one_node_train(
    tiny_model_dir: Path, small_data: dict[str, Path], tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    static = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    ended = _two_launchers(
        tiny_overrides(tiny_model_dir, small_data, runs, {**QUICK, "name": "static"}),
        [[*static, "--node-rank", "1"], [*static, "--node-rank", "0"]],  # node 1 waits for node 0's check
    )
    assert "on node 1 of 2, 2 in all" in ended[0][1]
    for _, output in ended:  # the launchers' watch on the rendezvous waits quietly for it to open
        assert "TCPStore.cpp" not in output and "socket.cpp" not in output, output[-3000:]
    rdzv = ["--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}"]  # ranks given as they join
    _two_launchers(tiny_overrides(tiny_model_dir, small_data, runs, {**QUICK, "name": "rdzv"}), [rdzv, rdzv])
    single = _run(
        _train(*tiny_overrides(tiny_model_dir, small_data, runs, {**QUICK, "name": "one"}), "--nproc", "2")
    )
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

    one_node = _losses(runs / "one")
    assert len(one_node) == 4 and one_node[-1] != pytest.approx(one_node[0], rel=1e-3)  # it trained
    for name in ("static", "rdzv"):
        two_nodes = _losses(runs / name)
        assert len(two_nodes) == 4, name  # one line per step: only global rank 0 writes
        assert two_nodes == pytest.approx(one_node, rel=1e-4, abs=1e-5), name
        plan = json.loads((runs / name / rundir.PLAN).read_text())
        check = json.loads((runs / name / rundir.CHECK).read_text())
        assert plan["steps"]["processes"] == 2 and plan["steps"]["effective_batch"] == 4 * 2 * 2
        assert check["plan"]["steps"]["processes"] == 2  # the launcher's check, with the real world size
        assert _result(runs / name)["status"] == "completed" and _result(runs / name)["global_step"] == 4


@pytest.mark.slow
def test_a_doctor_stop_under_ddp_ends_every_rank(
    tiny_model_dir: Path, small_data: dict[str, Path], tmp_path: Path
) -> None:
    overrides = tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", {**EXPLODES, "name": "boom"})
    done = _run(_train(*overrides, "--nproc", "2"))  # returns only when every rank has exited
    run_dir = tmp_path / "runs" / "boom"
    result = _result(run_dir)
    assert result["status"] == "diverged", done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 1 and "failed" not in done.stderr  # a stop, not a crash of any rank
    assert result["global_step"] == result["diverged_at"] < EXPLODES["training.max_steps"]
    assert len(_losses(run_dir)) == result["diverged_at"]  # nothing trained after the stop
    assert f"diverged at step {result['global_step']}" in done.stdout


@pytest.mark.slow
def test_a_failed_rank_is_one_line_naming_it(
    tiny_model_dir: Path, small_data: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "no-weights"  # the check reads the config and tokenizer; loading the weights fails
    shutil.copytree(tiny_model_dir, broken, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    overrides = tiny_overrides(broken, small_data, tmp_path / "runs", {**QUICK, "name": "broken"})
    done = _run(_train(*overrides, "--nproc", "2"))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    line = next((x for x in done.stderr.splitlines() if x.startswith("error: rank ")), "")
    assert " failed: ModelError: " in line, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-3000:]
    assert _result(tmp_path / "runs" / "broken")["status"] == "failed"


@pytest.mark.slow
def test_every_process_judges_the_mean_loss_and_stops_with_the_one_that_diverged(tmp_path: Path) -> None:
    script = REPO / "tests" / "training" / "ddp_agree_script.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = _run([*cmd, str(script), str(tmp_path)])
    assert done.returncode == 0, done.stderr[:4000]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in seen:  # rank r recorded a loss of r + 1; only rank 1's doctor found the explosion
        assert rank["losses"] == [1.5, 1.5, 1.5]
        assert rank["stopped_at"] == rank["diverged_at"] == 3


@pytest.mark.slow
def test_a_machine_whose_rank_fails_early_stops_the_other_machine_too(
    tiny_model_dir: Path, small_data: dict[str, Path], tmp_path: Path
) -> None:
    # node 1 has no weights: its rank dies before the process group forms, which would leave node 0's
    # rank waiting for it (the process group's timeout is 30 minutes); node 0 hears it at the rendezvous
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, broken, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    overrides = tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", {**QUICK, "name": "half"})
    static = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    ended = _two_launchers(
        overrides,
        [[*static, "--node-rank", "0"], [*static, "--node-rank", "1", f"model.name={broken}"]],
        ok=False,
    )
    (code0, out0), (code1, out1) = ended
    assert code1 == 1 and "error: rank 1 failed: ModelError: " in out1, out1[-3000:]
    assert code0 == 1, out0[-3000:]
    assert "error: another machine: node 1's rank 1 failed: ModelError: " in out0, out0[-3000:]
    assert "Traceback" not in out0 + out1 and "ChildFailedError" not in out0 + out1


@pytest.mark.slow
def test_every_rank_loads_the_best_checkpoint_from_the_run_directory(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # The Trainer finds the best checkpoint where it was written, the staging directory (.saving/);
    # every rank, not only rank 0, must point at the renamed one, or the others keep their last weights
    script = REPO / "tests" / "training" / "ddp_best_script.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = _run([*cmd, str(script), str(tiny_model_dir), str(tmp_path)])
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Could not locate the best model" not in done.stderr, done.stderr[-4000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    best = tmp_path / "run" / "checkpoint-2"  # the earliest: the script's metric favours it
    assert (best / rundir.MANIFEST).is_file()
    for rank in seen:
        assert rank["best"] == str(best) and rank["best_is_dir"], seen
    assert seen[0]["weights"] == pytest.approx(seen[0]["best_saved"], rel=1e-9)  # rank 0 loaded it
    assert seen[1]["weights"] == pytest.approx(seen[0]["weights"], rel=1e-9)  # ... and so did rank 1


@pytest.mark.slow
def test_accelerate_launch_trains_what_torchrun_trains(
    tiny_model_dir: Path, small_data: dict[str, Path], tmp_path: Path
) -> None:
    # accelerate starts a MULTI_CPU config through mpirun (a single process without a hostfile); its
    # torchrun path with use_cpu is the one that runs 2 processes with gloo on the CPU
    runs, config = tmp_path / "runs", tmp_path / "acc.yaml"
    config.write_text(ACCELERATE_CPU_PAIR)
    flags = ["--launcher", "accelerate", "--accelerate-config", str(config)]
    done = _run(_train(*tiny_overrides(tiny_model_dir, small_data, runs, {**QUICK, "name": "acc"}), *flags))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"2 in all: accelerate launch --config_file {config}" in done.stdout
    single = _run(
        _train(*tiny_overrides(tiny_model_dir, small_data, runs, {**QUICK, "name": "one"}), "--nproc", "2")
    )
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    torchrun, accelerate = _losses(runs / "one"), _losses(runs / "acc")
    assert len(accelerate) == 4 and torchrun[-1] != pytest.approx(torchrun[0], rel=1e-3)  # it trained
    assert accelerate == pytest.approx(torchrun, rel=1e-4, abs=1e-5)
    assert json.loads((runs / "acc" / rundir.PLAN).read_text())["steps"]["processes"] == 2
    assert json.loads((runs / "acc" / rundir.CHECK).read_text())["plan"]["steps"]["processes"] == 2
    assert _result(runs / "acc")["status"] == "completed"

    broken = tmp_path / "no-weights"  # a failed rank under accelerate: the same one line
    shutil.copytree(tiny_model_dir, broken, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    failed = _run(_train(*tiny_overrides(broken, small_data, runs, {**QUICK, "name": "broken"}), *flags))
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    line = next((x for x in failed.stderr.splitlines() if x.startswith("error: rank ")), "")
    assert " failed: ModelError: " in line, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr and "ChildFailedError" not in failed.stderr, failed.stderr[-3000:]
