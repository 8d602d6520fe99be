"""The README stays a newcomer's page, and every link in it and in the reference it points to resolves.

Reference material lives in docs/ and the per-folder READMEs; section names that recipe comments and module
docstrings cite ("Soft labels in Axolotl", "On-policy rounds", "A teacher larger than one node", "Measurements")
are named in the README's "Read more" table so a reader who searches the README for one finds where it went.
"""
from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
LINKED_DOCS = [README, REPO_ROOT / "recipes" / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of PATH: lowercase, punctuation but `-` and `_` dropped, spaces as `-`."""
    found, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return found


def test_readme_is_short_and_keeps_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 300
    assert "bash launch/demo.sh" in text and "bash launch/test.sh" in text
    for phrase in ("data/competition/train.jsonl", "train_cases", "test_cases", "launch.doctor", "--plan",
                   "--print-config", "--limit", "MEDKD_DEBUG=1", "docs/RELIABILITY.md"):
        assert phrase in text, phrase


def test_sections_cited_elsewhere_are_findable_from_the_readme():
    text = README.read_text(encoding="utf-8")
    for section in ("Soft labels in Axolotl", "On-policy rounds", "A teacher larger than one node", "Measurements",
                    "Which model made an answer", "One run record"):
        assert section in text, section


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for doc in LINKED_DOCS:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(#[^)\s]+)?\)", doc.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                continue
            path = (doc.parent / target).resolve() if target else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(REPO_ROOT)}: {target} does not exist")
            elif anchor and path.suffix == ".md" and anchor[1:] not in anchors(path):
                broken.append(f"{doc.relative_to(REPO_ROOT)}: {target}{anchor} has no such heading")
    assert not broken, "\n".join(broken)
