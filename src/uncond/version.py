"""Which uncond this is: the version number, and the commit of a git checkout it runs from."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=None)
def uncond_version() -> str:
    """The version pip recorded when it installed uncond, and where it runs from a git checkout (an editable
    install, as the README's), its commit: the version number alone does not change between commits."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("uncond")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        number = "(not installed)"
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
        changed = commit and subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--", "."],
                                            capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git, or a hung file system
        return number
    if not commit or not (source.parent.parent / "pyproject.toml").is_file():  # not uncond's own checkout
        return number
    return f"{number} (git {commit}{', with uncommitted changes' if changed else ''})"

