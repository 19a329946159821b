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
        found = subprocess.run(["git", "-C", str(source), "rev-parse", "--show-toplevel", "--short", "HEAD"],
                               capture_output=True, text=True, timeout=5).stdout.splitlines()
        # uncond's own checkout (src/uncond in it), not a copy installed somewhere inside another one
        if len(found) != 2 or Path(found[0]).resolve() != source.parent.parent:
            return number
        commit = found[1]
        changed = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--", "."],
                                 capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git, or a hung file system
        return number
    return f"{number} (git {commit}{', with uncommitted changes' if changed else ''})"

