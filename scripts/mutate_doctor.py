"""Mutation check of the doctor: halve and double each catalogued threshold in turn, run the doctor's
tests, and report the share of mutations the tests catch (a mutation is caught when a test fails).

    .venv/bin/python scripts/mutate_doctor.py            # every threshold in tunewise.doctor.codes.THRESHOLDS
    .venv/bin/python scripts/mutate_doctor.py --only SPIKE_RATIO --json out.json

Each mutation runs pytest in a subprocess with this file as a plugin (`-p mutate_doctor`): before any test
is collected it sets the threshold to its mutated value in the module that defines it and in every doctor
module that imported the same name. The rules read their thresholds when they run, so the patched value is
the one every test sees. Integer thresholds (window sizes, point counts) are halved and doubled as integers.
Exit status: 0 when every mutation was caught, 1 otherwise, 2 when the unmutated tests fail.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(os.environ.get("TUNEWISE_SRC", ROOT / "src"))  # the source tree to mutate (default: this one)
ENV_KEY = "TUNEWISE_MUTATE"  # "module:NAME=value" for the subprocess plugin
# The doctor's tests that need no training run (the live ones train models: minutes each). The holdout
# corpus test is left out: its targets are reported, not used to judge changes to the rules.
TESTS = ["tests/doctor/test_thresholds.py", "tests/doctor"]  # the boundary cases first: -x stops sooner
IGNORE = ["tests/doctor/test_doctor_live.py"]
DESELECT = ["tests/doctor/test_real_runs.py::test_corpus_holdout_meets_the_targets"]


# ----------------------------------------------------------------------------- pytest plugin side


def pytest_configure(config: object) -> None:
    """Apply the mutation named in TUNEWISE_MUTATE before the tests import anything else."""
    spec = os.environ.get(ENV_KEY)
    if not spec:
        return
    target, value = spec.split("=", 1)
    module_name, name = target.split(":")
    apply_mutation(module_name, name, json.loads(value))


def apply_mutation(module_name: str, name: str, value: float) -> int:
    """Set `name` to `value` in its module and wherever a doctor module imported it; returns how many."""
    import tunewise.doctor

    home = importlib.import_module(module_name)
    original = getattr(home, name)
    patched = 0
    for info in pkgutil.iter_modules(tunewise.doctor.__path__, "tunewise.doctor."):
        module = importlib.import_module(info.name)
        if module is home or getattr(module, name, object()) is original:
            setattr(module, name, value)
            patched += 1
    return patched


# ----------------------------------------------------------------------------- driver side


def mutations(only: set[str] | None) -> list[tuple[str, str, float, float]]:
    """(module, name, original, mutated) for each catalogued threshold, halved then doubled."""
    sys.path.insert(0, str(SRC))
    from tunewise.doctor.codes import THRESHOLDS

    out = []
    for module_name, names in THRESHOLDS.items():
        module = importlib.import_module(module_name)
        for name in names:
            if only and name not in only:
                continue
            value = getattr(module, name)
            for factor in (0.5, 2.0):
                mutated = max(1, int(value * factor)) if isinstance(value, int) else value * factor
                out.append((module_name, name, value, mutated))
    return out


def run_tests(spec: str | None) -> tuple[bool, str]:
    """Run the doctor's tests (stop at the first failure); True when they all pass."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), str(SRC)])}
    env.pop(ENV_KEY, None)
    if spec:
        env[ENV_KEY] = spec
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "mutate_doctor",
        *TESTS,
        *[f"--ignore={path}" for path in IGNORE],
        *[f"--deselect={t}" for t in DESELECT],
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    tail = proc.stdout.strip().splitlines()
    return proc.returncode == 0, failed[0] if failed else (tail[-1] if tail else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="threshold names to mutate (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="pytest processes at once")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    passed, detail = run_tests(None)
    if not passed:
        print(f"the unmutated doctor tests fail ({detail}); fix them first")
        return 2
    todo = mutations(set(args.only) if args.only else None)
    start = time.time()

    def one(m: tuple[str, str, float, float]) -> dict:
        module_name, name, original, mutated = m
        survived, detail = run_tests(f"{module_name}:{name}={json.dumps(mutated)}")
        result = {
            "module": module_name,
            "name": name,
            "original": original,
            "mutated": mutated,
            "caught": not survived,
            "by": None if survived else detail.removeprefix("FAILED "),
        }
        mark = "caught  " if result["caught"] else "SURVIVED"
        print(f"{mark} {name:<20} {original!r:>7} -> {mutated!r:<8} {result['by'] or ''}", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, todo))
    caught = sum(r["caught"] for r in results)
    share = caught / len(results) if results else 1.0
    print(f"\n{caught}/{len(results)} mutations caught ({share:.0%}) in {time.time() - start:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"caught": caught, "total": len(results), "share": share, "results": results}, indent=1
            )
            + "\n"
        )
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
