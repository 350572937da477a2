"""Write a run's report and screenshot it with headless Chromium: the picture in docs/report.png.

Usage: python scripts/screenshot_report.py RUN_DIR OUT.png [--width 1280] [--height 2400]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chromium import screenshot

from tunewise.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory (or Trainer output directory)")
    parser.add_argument("out", type=Path, help="where to write the PNG, e.g. docs/report.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args()
    report = write_report(args.run_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    screenshot(report, args.out, args.width, args.height)
    print(f"wrote {report} and {args.out}")


if __name__ == "__main__":
    main()
