"""Prompts are files: a system prompt and a user template, identified by a content hash.

They are the only source of prompts for the teacher, the training data and inference, so a
changed prompt changes every cache key that depends on it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from prep.answers import Answer, answer_json
from prep.paths import REPO_ROOT
from prep.records import Case

DEFAULT_PROMPT_DIR = REPO_ROOT / "data" / "prompts"
PLACEHOLDER = "{feature_content}"


@dataclass(frozen=True)
class PromptSet:
    system: str
    user_template: str

    @property
    def hash(self) -> str:
        """First 12 hex digits of sha256 over both texts: the prompt part of every cache key."""
        digest = hashlib.sha256()
        for text in (self.system, "\0", self.user_template):
            digest.update(text.encode("utf-8"))
        return digest.hexdigest()[:12]

    def user(self, case: Case) -> str:
        # str.replace, not format(): a template may hold a JSON example whose braces format() would choke on.
        return self.user_template.replace(PLACEHOLDER, case.feature_content)

    def messages(self, case: Case, answer: Answer | None = None) -> list[dict[str, str]]:
        """Chat messages for a case; with an answer, the assistant turn is its canonical JSON."""
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": self.user(case)}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer_json(answer)})
        return messages


def load_prompts(system_path: str | Path | None = None, user_path: str | Path | None = None) -> PromptSet:
    """Read the prompt files (default: data/prompts/system.txt and user.txt); relative paths are from the repo root."""
    system_path = _resolve(system_path or DEFAULT_PROMPT_DIR / "system.txt")
    user_path = _resolve(user_path or DEFAULT_PROMPT_DIR / "user.txt")
    # utf-8-sig: a byte-order mark an editor wrote would otherwise open the prompt (str.strip keeps it)
    system = system_path.read_text(encoding="utf-8-sig").strip()
    user_template = user_path.read_text(encoding="utf-8-sig").strip()
    if PLACEHOLDER not in user_template:
        raise ValueError(f"{user_path}: the user template has no {PLACEHOLDER} placeholder")
    return PromptSet(system, user_template)


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.exists():
        raise FileNotFoundError(f"{path}: prompt file not found")
    return path
