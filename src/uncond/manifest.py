"""The manifest a checkpoint is written with (manifest.json, its last file): each file's size and SHA-256, so
that a reader tells a folder written whole and unchanged from one cut short, emptied or damaged since. The
checkpoint module writes it and checks it before a resume; sampling checks the files a model is read from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    files = {path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": file_digest(path)}
             for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST_FILE}
    (folder / MANIFEST_FILE).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")


def listed_files(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The files `folder`'s manifest lists, by path within it; None without a manifest (train_unconditional.py's
    checkpoints carry none). Raises ValueError for a manifest that cannot be read."""
    manifest_file = folder / MANIFEST_FILE
    if not manifest_file.is_file():
        return None
    try:
        files = json.loads(manifest_file.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"unreadable {MANIFEST_FILE}") from error
    if not isinstance(files, dict) or not all(isinstance(entry, dict) and isinstance(entry.get("size"), int)
                                              and isinstance(entry.get("sha256"), str) for entry in files.values()):
        raise ValueError(f"unreadable {MANIFEST_FILE}")  # (a hand-edited one crashed the readers: trial 62 F2)
    return files


def changed_file(folder: Path, under: tuple[str, ...] = ("",)) -> str | None:
    """The first file listed in `folder`'s manifest, of those whose path starts with one of `under`, that is
    missing or whose SHA-256 differs; None where all are as written, or the folder has no manifest."""
    try:
        files = listed_files(folder)
    except ValueError:
        return MANIFEST_FILE
    for name, entry in (files or {}).items():
        if name.startswith(under):
            file = folder / name
            if not file.is_file() or file_digest(file) != entry["sha256"]:
                return name
    return None
