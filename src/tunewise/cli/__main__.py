"""`python -m tunewise.cli`: what sweeps and the `--nproc` relaunch run in each process."""

import sys

from tunewise.cli import main

sys.exit(main())
