"""Sharding in the plan: what `training.fsdp`/`fsdp_config` and `training.deepspeed` shard, read and
checked at config time (errors that name the key, and file:line in a broken JSON), and the memory per
device (each sharded part 1/N, offloaded parts off the device, two gathered layers back); `check` says
what it changes in one line, with the world size of `--nproc` x `--nnodes`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_overrides

from tunewise.cli import main
from tunewise.config import load_config
from tunewise.errors import ConfigError
from tunewise.sharding import Sharding, read_sharding, shard_memory, sharding_line

GIB = 2**30
# A full fine-tune's fixed parts (plan.estimate_memory's keys), 10 layers; 2 GiB of activations etc.
MEM = {
    "weights": 8 * GIB,
    "adapter": 0,
    "gradients": 8 * GIB,
    "optimizer": 16 * GIB,
    "peak_step_1": 34 * GIB,
    "peak": 35 * GIB,
    "peak_with_checkpointing": 33 * GIB,
    "peak_without_checkpointing": 35 * GIB,
}
FIXED = 32 * GIB


def _shard(training: dict) -> Sharding:
    sharding, problems = read_sharding(training)
    assert sharding is not None and not problems, problems
    return sharding


@pytest.mark.parametrize(
    ("training", "name", "per_device_fixed"),
    [
        ({"deepspeed": {"zero_optimization": {"stage": 1}}}, "ZeRO-1", 8 + 8 + 16 / 8),
        ({"deepspeed": {"zero_optimization": {"stage": 2}}}, "ZeRO-2", 8 + (8 + 16) / 8),
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "ZeRO-3", 32 / 8 + 2 * 8 / 10),
        ({"fsdp": "shard_grad_op auto_wrap"}, "shard_grad_op", 8 + (8 + 16) / 8),
        ({"fsdp": "full_shard auto_wrap"}, "full_shard", 32 / 8 + 2 * 8 / 10),
        ({"fsdp": True}, "full_shard", 32 / 8 + 2 * 8 / 10),  # FSDP2's default: reshard after forward
        ({"fsdp": True, "fsdp_config": {"reshard_after_forward": False}}, "shard_grad_op", 8 + 24 / 8),
        ({"fsdp": ["full_shard", "offload"]}, "full_shard", 2 * 8 / 10),  # all of it in CPU memory
        (
            {"deepspeed": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}},
            "ZeRO-2",
            8 + 8 / 8,
        ),
        (
            {"deepspeed": {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}},
            "ZeRO-3",
            (8 + 16) / 8 + 2 * 8 / 10,
        ),
        ({"fsdp": "no_shard"}, "no_shard", 32),
    ],
)
def test_each_setting_divides_what_it_shards_by_the_processes(
    training: dict, name: str, per_device_fixed: float
) -> None:
    sharding = _shard(training)
    assert sharding.name == name
    out = shard_memory(MEM, sharding, processes=8, layers=10)
    fixed = out["weights"] + out["adapter"] + out["gradients"] + out["optimizer"]
    assert fixed / GIB == pytest.approx(per_device_fixed, abs=1e-6)
    saved = FIXED - fixed
    for key in ("peak_step_1", "peak", "peak_with_checkpointing", "peak_without_checkpointing"):
        assert out[key] == pytest.approx(MEM[key] - saved, abs=8)  # the activations are each process's own
    assert out["sharding"]["unsharded_peak"] == MEM["peak"]


def test_hybrid_shards_within_one_machine() -> None:
    hybrid = _shard({"fsdp": "hybrid_shard", "fsdp_config": {"version": 1}})
    assert hybrid.within_machine
    out = shard_memory(MEM, hybrid, processes=8, machines=2, layers=10)  # 4 processes per machine
    assert out["sharding"]["processes"] == 4
    assert out["optimizer"] == 4 * GIB and out["gradients"] == 2 * GIB


def test_the_one_line_says_what_changes_per_device() -> None:
    out = shard_memory(MEM, _shard({"fsdp": "full_shard"}), processes=8, layers=10)
    line = sharding_line(out["sharding"])
    assert line.startswith("full_shard over 8 processes: weights+gradients+optimizer 1/8 each: 35.0 GiB -> ")
    assert line.endswith(f"{out['peak'] / GIB:.1f} GiB per device")
    offload = shard_memory(MEM, _shard({"deepspeed": {"zero_optimization": {"stage": 1}}}), 1, layers=10)
    assert "optimizer 1/1 each" in sharding_line(offload["sharding"])


def test_no_sharding_leaves_the_plan_alone() -> None:
    assert read_sharding({}) == (None, [])
    assert read_sharding({"fsdp": None, "deepspeed": None}) == (None, [])


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["training.fsdp=ful_shard"], "'ful_shard' is not an FSDP option; valid: full_shard"),
        (["training.fsdp=hybrid_shard"], "hybrid_shard exists only in FSDP1"),
        (["training.fsdp=full_shard shard_grad_op"], "one sharding strategy at a time"),
        (
            ["training.fsdp=full_shard", "training.fsdp_config={DIR}/none.json"],
            "none.json': that file does not",
        ),
        (["training.deepspeed={DIR}/none.json"], "that file does not exist"),
        (["training.deepspeed={DIR}/ds.json"], "not valid JSON: {DIR}/ds.json:4:3: Expecting property name"),
        (["training.deepspeed={DIR}/list.json"], "expected a JSON object, got list"),
        (["training.deepspeed={zero_optimization: {stage: 4}}"], "zero_optimization.stage is 4: ZeRO stages"),
        (
            ["training.deepspeed={zero_optimization: {stage: 2, offload_param: {device: cpu}}}"],
            "offloads the weights only at stage 3",
        ),
        (["training.fsdp=full_shard", "training.deepspeed={zero_optimization: {stage: 2}}"], "two sharding"),
    ],
)
def test_a_bad_sharding_setting_is_a_config_error_at_its_key(
    overrides: list[str], says: str, tmp_path: Path
) -> None:
    (tmp_path / "ds.json").write_text('{\n  "zero_optimization": {\n    "stage": 3,\n  }\n}\n')
    (tmp_path / "list.json").write_text("[1, 2]\n")
    with pytest.raises(ConfigError) as raised:
        load_config(None, [o.replace("{DIR}", str(tmp_path)) for o in overrides])
    text = "\n".join(raised.value.problems)
    assert says.replace("{DIR}", str(tmp_path)) in text and "override `training." in text, text


def test_a_config_file_names_the_line_of_the_sharding_key(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  method: full\ntraining:\n  learning_rate: 2.0e-5\n  fsdp: full_shrad\n")
    with pytest.raises(ConfigError) as raised:
        load_config(config, [])
    assert f"{config}:5: `training.fsdp`" in raised.value.problems[0]


@pytest.mark.slow
def test_check_says_what_full_shard_changes_over_nproc_x_nnodes(
    tiny_model_dir: Path, small_data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", {"model.method": "full"})
    assert main(["check", *base, "--json"]) in (0, 1)
    plain = json.loads(capsys.readouterr().out)["plan"]["memory"]
    assert main(["check", *base, "training.fsdp=full_shard", "--nproc", "2", "--nnodes", "2", "--json"]) in (
        0,
        1,
    )
    report = json.loads(capsys.readouterr().out)
    mem, steps = report["plan"]["memory"], report["plan"]["steps"]
    assert steps["processes"] == 4 and mem["sharding"]["processes"] == 4
    assert mem["sharding"]["unsharded_peak"] == plain["peak"] and mem["optimizer"] == plain["optimizer"] // 4
    assert mem["peak"] < plain["peak"]
    item = next(i for i in report["items"] if i["id"] == "sharding")
    assert item["status"] == "PASS" and item["detail"].startswith(
        "full_shard over 4 processes: weights+gradients+optimizer 1/4 each: "
    )


def test_plan_prints_what_the_sharding_changes_per_device(
    tiny_model_dir: Path, small_data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", {"model.method": "full"})
    assert main(["plan", *base, "training.fsdp=full_shard", "--nproc", "2", "--nnodes", "2"]) == 0
    printed = capsys.readouterr().out
    assert "  sharding: full_shard over 4 processes: weights+gradients+optimizer 1/4 each: " in printed
    assert main(["plan", *base]) == 0
    assert "sharding:" not in capsys.readouterr().out  # nothing sharded: no line
