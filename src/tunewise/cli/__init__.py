"""Command line: one verb per job; the only part of tunewise that prints.

- table.py     the command table (each verb's function, help and arguments) and the parser
- commands.py  the commands, one function per verb
- printers.py  what they print: plans, checklists, findings, results, progress

A user error exits 2 with one message that says what is wrong, where and how to fix it; `--debug`
shows the traceback instead.
"""

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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tunewise` command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # tunewise reports progress itself
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. the one-off GGUF conversion bar
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
