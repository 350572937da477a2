"""The checkpoint chooser (`rundir.resumable`, which `--resume` uses) on sharded checkpoints laid out as
transformers' Trainer writes them (names from trainer.py `_save_checkpoint`/`_load_from_checkpoint`,
accelerate's `save_fsdp_model`/`save_fsdp_optimizer`, DeepSpeed's `save_checkpoint`): a whole one is
resumable, with tunewise's manifest or without (a plain Trainer's, `tunewise.watch`); one whose shards
never finished is skipped with the reason. Real sharded training and resume need GPUs: not run here."""

from __future__ import annotations

from pathlib import Path

from tunewise import rundir
from tunewise.training.checkpoints import write_manifest

COMMON = {"trainer_state.json": "{}", "scheduler.pt": "s", "rng_state_0.pth": "r0", "rng_state_1.pth": "r1"}


def _fsdp(folder: Path) -> Path:
    """FSDP SHARDED_STATE_DICT over 2 ranks: torch.distributed.checkpoint dirs for model and optimizer."""
    for name in ("pytorch_model_fsdp_0", "optimizer_0"):
        (folder / name).mkdir(parents=True)
        for rank in (0, 1):
            (folder / name / f"__{rank}_0.distcp").write_bytes(b"shard" * (rank + 1))
        (folder / name / rundir.DCP_METADATA).write_bytes(b"meta")
    return folder


def _deepspeed(folder: Path, step: int) -> Path:
    """DeepSpeed ZeRO-3 over 2 ranks: global_step<N>/ with per-rank model and optimizer states, and latest."""
    tag = folder / f"global_step{step}"
    tag.mkdir(parents=True)
    for rank in (0, 1):
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"m")
        (tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o")
    (folder / rundir.DEEPSPEED_LATEST).write_text(f"global_step{step}")
    (folder / "zero_to_fp32.py").write_text("# DeepSpeed's converter\n")
    return folder


def _checkpoint(run: Path, step: int, layout: str, manifest: bool = True) -> Path:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name, text in COMMON.items():
        (folder / name).write_text(text)
    _fsdp(folder) if layout == "fsdp" else _deepspeed(folder, step)
    if manifest:
        write_manifest(folder, step)
    return folder


def test_whole_sharded_checkpoints_are_resumable_with_or_without_the_manifest(tmp_path: Path) -> None:
    for layout, name in (("fsdp", "FSDP"), ("deepspeed", "DeepSpeed")):
        for manifest in (True, False):
            run = tmp_path / f"{layout}-{manifest}"
            folder = _checkpoint(run, 4, layout, manifest)
            assert rundir.sharded_layout(folder) == name
            assert rundir.resumable(run, foreign=not manifest) == (folder, []), (layout, manifest)


def test_the_manifest_covers_every_rank_s_shards(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path, 4, "fsdp")
    (folder / "pytorch_model_fsdp_0" / "__1_0.distcp").write_bytes(b"cut")  # a rank's shard truncated
    assert rundir.checkpoint_problem(folder) == (
        "pytorch_model_fsdp_0/__1_0.distcp is 3 bytes, not the 10 it was saved with (truncated)"
    )


def test_a_sharded_save_that_never_finished_is_skipped_for_the_one_before(tmp_path: Path) -> None:
    good = _checkpoint(tmp_path, 2, "fsdp", manifest=False)
    torn = _checkpoint(tmp_path, 4, "fsdp", manifest=False)
    (torn / "optimizer_0" / rundir.DCP_METADATA).unlink()  # killed before DCP wrote the metadata
    chosen, skipped = rundir.resumable(tmp_path, foreign=True)
    assert chosen == good
    reason = "its FSDP shards optimizer_0/ have no .metadata (the sharded save never finished)"
    assert skipped == [f"checkpoint-4 skipped: {reason}"]


def test_a_deepspeed_checkpoint_without_its_tag_directory_is_skipped(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path, 4, "deepspeed", manifest=False)
    (folder / rundir.DEEPSPEED_LATEST).write_text("global_step9")
    assert rundir.checkpoint_problem(folder) is not None  # no manifest: not tunewise's
    chosen, skipped = rundir.resumable(tmp_path, foreign=True)
    assert chosen is None
    assert skipped == ["checkpoint-4 skipped: its DeepSpeed `latest` names global_step9/, which is not there"]
    (folder / rundir.DEEPSPEED_LATEST).unlink()
    assert "no `latest` file" in rundir.resumable(tmp_path, foreign=True)[1][0]


def test_a_plain_checkpoint_has_no_sharded_layout(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"w")
    (folder / "trainer_state.json").write_text("{}")
    write_manifest(folder, 2)
    assert rundir.sharded_layout(folder) is None and rundir.checkpoint_problem(folder) is None
