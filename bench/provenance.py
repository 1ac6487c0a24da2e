"""Where a bench result came from: the commit of the code measured, and the host's name as a file name takes it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


def git_commit(directory: Path) -> str | None:
    """HEAD of the source tree at `directory`, and whether its service/ differs from it (the code being measured);
    None outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, check=True).stdout.strip()

    try:
        modified = " (service/ modified)" if git("status", "--porcelain", "service") else ""
        return git("rev-parse", "--short", "HEAD") + modified
    except (OSError, subprocess.CalledProcessError):
        return None


def file_name_part(text: str) -> str:
    """`text` (a host's or a GPU's name) as a part of a results file's name: lower case, runs of anything else "-"."""
    return re.sub(r"[^a-z0-9.-]+", "-", text.lower()).strip("-")
