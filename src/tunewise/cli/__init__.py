"""Command line: one verb per job; the only part of tunewise that prints.

- table.py     the command table (each verb's function, help and arguments) and the parser
- commands.py  the commands, one function per verb
- printers.py  what they print: plans, checklists, findings, results, progress

A user error exits 2 with one message that says what is wrong, where and how to fix it; `--debug`
shows the traceback instead.
"""

import ctypes
import logging
import os
import sys
import traceback
import warnings

from tunewise.cli.printers import err_console
from tunewise.cli.table import parse_args
from tunewise.errors import CheckpointError, ConfigError, DataError, DoctorError, ModelError

USER_ERRORS = (
    ConfigError,
    DataError,
    DoctorError,
    ModelError,
    CheckpointError,
)  # the user's to fix: one line, exit 2
NOISY_LOGGERS = ("transformers", "torch", "accelerate", "peft", "bitsandbytes", "datasets")


ONEDNN_KERNELS = "64"  # oneDNN's default keeps 1024 compiled kernels, each with its own buffers
MMAP_THRESHOLD = 1 << 22  # glibc: blocks from 4 MiB on are mapped (and unmapped when freed), at a fixed line
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _steady_cpu_memory() -> None:
    """Keep the CPU's resident set near what is live. Padding-free batches change shape every step, and two
    caches grew with the shapes: oneDNN's kernel cache and glibc's heap (its mmap threshold rises to the
    largest block freed, so later tensors come from a heap that does not shrink). Measured on the demo's
    config, 34 steps, peak against the plan's estimate: +26% with the kernel cache capped, +22% with the
    threshold also fixed at 4 MiB (+62% with neither); at 1 MiB +19%, but steps on long rows were 20%
    slower (mapping fresh pages), at 4 MiB as fast as without. Must run before torch starts (the kernel
    cache reads its size once); a user's own ONEDNN_PRIMITIVE_CACHE_CAPACITY or MALLOC_MMAP_THRESHOLD_
    wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_KERNELS)
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its allocator keeps its own ways
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tunewise` command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # tunewise reports progress itself
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. the one-off GGUF conversion bar
    _steady_cpu_memory()
    # bitsandbytes says this on every CPU step; tunewise says it once as a hardware notice
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    # renames announced for transformers 6 (gradient_ -> activation_checkpointing): noise for our users
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        if args.debug:
            traceback.print_exc()
        err_console.print(f"error: {exc}", markup=False, highlight=False)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        return 130
