"""Crash-safe checkpoints: a checkpoint directory is complete or it does not count.

The Trainer writes each checkpoint into a staging directory (`<run>/.saving/checkpoint-N`); every
file is fsynced, a small manifest (step, files, sizes) is written last, and the directory is renamed
to `<run>/checkpoint-N`. A process killed mid-save leaves only the staging directory, which no reader
takes for a checkpoint. `rundir.resumable` returns the newest checkpoint whose manifest validates and names
each torn one it skipped; `prune` applies the retention limit but never deletes the best checkpoint,
the newest complete one, or anything without tunewise's manifest. `room_problem` says, before training,
whether the run directory is writable and has room for the checkpoints the run will keep.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tunewise import rundir
from tunewise.errors import CheckpointError
from tunewise.training.monitor import WatchedTrainer

logger = logging.getLogger(__name__)

ADAM_STATES = 2  # exp_avg and exp_avg_sq: fp32 copies of every trainable parameter
SMALL_FILES = 32 * 2**20  # tokenizer, scheduler, RNG, trainer state, config: a generous allowance


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, step: int) -> None:
    """fsync every file of a staged checkpoint, then write (and fsync) its manifest last."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != rundir.MANIFEST):
        _fsync(path)
        files[str(path.relative_to(folder))] = path.stat().st_size
    manifest = folder / rundir.MANIFEST
    manifest.write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")
    _fsync(manifest)
    _fsync(folder)


def prune(run_dir: Path, keep: int | None, best: str | Path | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep`; never the best, the newest, or foreign ones.

    Returns:
        The deleted directories.
    """
    if not keep or keep < 1:
        return []
    found = sorted(rundir.checkpoints(run_dir).items())
    complete = [p for _, p in found if rundir.checkpoint_problem(p) is None]
    protected = {complete[-1].name} if complete else set()
    if best:
        protected.add(Path(best).name)
    deleted = []
    for path in complete:
        if len(complete) - len(deleted) <= keep:
            break
        if path.name not in protected:
            shutil.rmtree(path)
            deleted.append(path)
    return deleted


def checkpoint_bytes(model: Any, full: bool) -> int:
    """Bytes one checkpoint takes: saved weights (all for full, else the trainable ones) and Adam's states."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    saved = params if full else trainable
    weights = sum(p.numel() * p.element_size() for p in saved)
    return weights + ADAM_STATES * 4 * sum(p.numel() for p in trainable) + SMALL_FILES


def room_problem(run_dir: Path, per_checkpoint: int, kept: int) -> str | None:
    """Why the run directory cannot hold the checkpoints (with the numbers and the fix), or None."""
    probe = Path(run_dir) / ".tunewise-write-test"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        return f"cannot write in {run_dir} ({exc.strerror}); choose a writable `output_dir`"
    need = per_checkpoint * (kept + 1)  # the checkpoints kept plus the one being written
    free = shutil.disk_usage(run_dir).free
    if need > free:
        return (
            f"{run_dir} has {free / 2**30:.2f} GiB free but {kept} checkpoint(s) of "
            f"{per_checkpoint / 2**30:.2f} GiB plus one being written need {need / 2**30:.2f} GiB; "
            "free space, choose another `output_dir`, or lower `training.save_total_limit`"
        )
    return None


def _barrier() -> None:
    """Wait for every process of a distributed run (nothing to wait for in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CrashSafeTrainer(WatchedTrainer):
    """The WatchedTrainer whose checkpoints are staged, fsynced, given a manifest and renamed into place.

    The Trainer writes where `_get_output_dir` says; during a save that is the staging directory, so
    its own rotation only ever sees the checkpoint being written and retention is `prune`'s.
    """

    _staging_root: Path | None = None

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        step = self.state.global_step
        name = f"{rundir.CHECKPOINT_PREFIX}{step}"
        staging = run_dir / rundir.STAGING
        try:
            if self.args.should_save:  # the main process; in DDP the others add their RNG files
                shutil.rmtree(staging, ignore_errors=True)  # what a killed save left behind
                staging.mkdir(parents=True)
            _barrier()  # every process writes into the staging directory the main one made
            self._staging_root = staging
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_root = None
            _barrier()  # ... and has written there before the main one seals and renames it
            self._point_best_at(run_dir, staging / name, step)  # every process: each loads it at the end
            if self.args.should_save:
                write_manifest(staging / name, step)
                final = run_dir / name
                if final.exists():  # saved again at the same step (a resumed run's last step)
                    shutil.rmtree(final)
                os.replace(staging / name, final)
                _fsync(run_dir)
                shutil.rmtree(staging, ignore_errors=True)
            _barrier()  # no process goes on (to load the best checkpoint) before it is in place
            if not self.args.should_save:
                return
        except Exception as exc:  # OSError, safetensors' and torch's own errors for a full disk
            shutil.rmtree(staging, ignore_errors=True)
            good, _ = rundir.resumable(run_dir)
            last = (
                f"the last good checkpoint, {good.name}, is intact" if good else "no checkpoint was saved yet"
            )
            raise CheckpointError(
                f"could not save {name} in {run_dir} ({type(exc).__name__}: {exc}); the run stops here and "
                f"{last}. Free space or fix the permissions of {run_dir}, then run `tunewise train "
                f"{run_dir / rundir.CONFIG} --resume`"
            ) from exc
        deleted = prune(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        if deleted:
            logger.info("retention: deleted %s", ", ".join(p.name for p in deleted))

    def _point_best_at(self, run_dir: Path, staged: Path, step: int) -> None:
        """The Trainer looked for the best checkpoint in the staging directory: point it at the real one.

        Every process does this, not only the main one: each loads the best checkpoint at the end
        (`load_best_model_at_end`), and one left pointing into the staging directory, which is gone by
        then, would keep its last weights while the main process loads the best ones. The path does not
        depend on whether this process sees the renamed directory yet; only the main process rewrites
        the staged trainer_state.json.
        """
        best_step = self.state.best_global_step
        if not best_step:
            return
        best = run_dir / f"{rundir.CHECKPOINT_PREFIX}{best_step}"
        recorded = self.state.best_model_checkpoint
        staged_best = recorded is not None and Path(recorded).parent == staged.parent
        if best_step == step or staged_best or best.is_dir():
            self.state.best_model_checkpoint = str(best)
            if self.args.should_save:
                self.state.save_to_json(str(staged / "trainer_state.json"))
