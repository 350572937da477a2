"""docs/architecture.md stays true: every module and package it names exists, and every module of the
package is named there."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).parents[1]
DOC = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
NAMED = set(re.findall(r"`(tunewise/[\w/]*?(?:\.py|/))`", DOC))


def test_every_named_module_exists() -> None:
    assert len(NAMED) > 30
    missing = sorted(name for name in NAMED if not (REPO / "src" / name).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_module_is_named() -> None:
    modules = {
        str(path.relative_to(REPO / "src"))
        for path in (REPO / "src" / "tunewise").rglob("*.py")
        if not path.name.startswith("__")
    }
    unnamed = sorted(modules - NAMED)
    assert not unnamed, f"add these modules to docs/architecture.md: {unnamed}"


def test_code_cites_the_architecture_page_not_a_file_outside_the_repo() -> None:
    cited = [
        str(path.relative_to(REPO))
        for path in (REPO / "src").rglob("*.py")
        if "DESIGN.md" in path.read_text(encoding="utf-8")
    ]
    assert not cited, f"cite docs/architecture.md instead of DESIGN.md in {cited}"
