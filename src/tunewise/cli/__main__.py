"""`python -m tunewise.cli`: what sweeps and the `--nproc` relaunch run in each process."""

import atexit
import logging
import os
import sys

from tunewise.cli import main


def _leave(code: int) -> None:
    """End a torchrun/accelerate worker without the interpreter's teardown: Python's exit handlers run and
    the streams are flushed, then the process exits. Left to the teardown, the C++ destructors of the
    collective backend's threads sometimes abort a finished rank ("terminate called without an active
    exception", SIGABRT, exit 1: seen on the CPU with gloo), and the launcher reports a run that completed
    as failed."""
    atexit._run_exitfuncs()  # what sys.exit would run: e.g. TensorBoard's and logging's flushes
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


code = main()
if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:  # a launched worker
    _leave(code)
sys.exit(code)
