"""Regenerate the shipped contacts dataset (src/tunewise/bundled/contacts/*.jsonl).

Run from the repository root after changing `tunewise.task` (with tunewise installed, or
with `PYTHONPATH=src` in front):

    python scripts/make_dataset.py

The output is deterministic (seed 0); tests/test_task.py fails if the shipped files drift.
"""

import logging

from tunewise.task import bundled_data_dir, write_splits

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for split, path in write_splits(bundled_data_dir()).items():
        logging.info("wrote %s: %s", split, path)
