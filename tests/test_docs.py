"""The repository stands alone: no pointer to documents outside it, a README a user reads in two minutes."""
from __future__ import annotations

import re
import subprocess

from tests.helpers import ROOT

# history kept as it was written: the archived studies and the demo's tuning record
HISTORY = ("docs/study", "docs/demo.md")
OUTSIDE = re.compile("|".join([r"\bMETHODS\b", r"\b[Rr]ev[ -]?[0-9]\b", r"\.\./" + "shared",
                                r"\b[Ii]ssues? #?[0-9]+\b"]))
TEXT = (".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cfg", ".txt")


def tracked_text_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in listed.splitlines() if f.endswith(TEXT) and not f.startswith(HISTORY)]


def test_nothing_points_at_documents_outside_the_repository():
    hits = []
    for name in tracked_text_files():
        path = ROOT / name
        if not path.exists():  # deleted in the working tree
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line.replace("study-rev1", "")):  # the first study's preset and archive keep their name
                hits.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)


def test_the_readme_opens_with_what_install_and_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    opening = "\n".join(lines[:60])
    assert "pip install" in opening and "make demo" in opening and "make test" in opening
    for doc in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", "\n".join(lines)):
        assert (ROOT / doc).exists(), f"README links {doc}, which does not exist"
