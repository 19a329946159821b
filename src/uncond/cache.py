"""The decoded-image cache: images decoded and resized once, kept on disk, read memory-mapped.

The first run over a dataset decodes every image (data.py) and appends its pixels here; later epochs
and later runs read them back without decoding. One cache entry is a folder named by a key that
hashes the dataset's content fingerprint and the preprocessing settings:

    pixels.bin   every image's pixels, HWC, back to back: uint8, or uint16 with --preserve_input_precision
    index.npy    one row per image: offset into pixels.bin (in values, not bytes), height, width, channels
    meta.json    format version, what was decoded with which settings, what was skipped and why
    files.json   a folder's entry: each file (path, size, modification time) and its row, or why it was skipped

A folder that changed (photos added, removed, edited) gets a new entry, since its fingerprint changed: the files
that an earlier entry of the same settings holds as they are now are copied from it, and only the others are
decoded (EarlierImages). The folder's earlier entry, which the new one replaces, is then removed.

Why one flat file with offsets: resized images keep their aspect ratio (shorter side = resolution,
longer side anything), so a random crop can land anywhere along the long side, as the seed's
RandomCrop does. Stored unpadded and back to back they cost no extra space, and a memory map of the
file lets a dataset far bigger than RAM train with RAM bounded by the batches in flight: the
operating system pages pixels in and out. (datasets' Arrow cache maps its files too, but turning a
row back into an array costs Python objects per image per read; here an image is a view until the
crop copies it.)

An entry is written into a hidden temporary folder and renamed into place when complete, so a folder
named by a key is always whole; a run killed while decoding leaves only its temporary folder. Opening an
entry marks it used (meta.json's modification time), so that `uncond cache` can remove the unused ones.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

FORMAT_VERSION = 1
PIXELS_FILE, INDEX_FILE, META_FILE, FILES_FILE = "pixels.bin", "index.npy", "meta.json", "files.json"
REFERENCE_STATS_DIR = "reference-stats"  # uncond evaluate's feature statistics of real images, beside the entries


def cache_root(cache_dir: str | None) -> Path:
    """`--cache_dir`/uncond, else $XDG_CACHE_HOME/uncond, else ~/.cache/uncond."""
    if cache_dir:
        return Path(cache_dir).expanduser() / "uncond"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uncond"


def entry_folder(root: Path, fingerprint: str, settings: dict[str, Any]) -> Path:
    """The folder of the entry for this data and these preprocessing settings."""
    key = json.dumps({"format": FORMAT_VERSION, "data": fingerprint, **settings}, sort_keys=True)
    return root / hashlib.sha256(key.encode(errors="surrogateescape")).hexdigest()[:24]


@dataclass
class ImageCache:
    """A complete cache entry, memory-mapped: `image(i)` is a view into the file, nothing is loaded."""
    folder: Path
    pixels: np.ndarray  # flat and read-only; a plain ndarray view of the np.memmap (faster to slice)
    index: np.ndarray  # (images, 4) int64: offset, height, width, channels
    meta: dict[str, Any]
    built_now: bool = False  # decoded by this call rather than found on disk
    replaced: list[Path] = field(default_factory=list)  # the earlier entries of its folder it replaced, removed

    @classmethod
    def open(cls, folder: Path, use: bool = True) -> "ImageCache | None":
        """The entry in `folder`, or None when there is none or it does not match its own index. `use`: a run
        reads it, which `uncond cache --remove_unused_days` counts (not a look at it, as --dry_run's)."""
        try:
            meta = json.loads((folder / META_FILE).read_text())
            index = np.load(folder / INDEX_FILE, allow_pickle=False)
            dtype = np.dtype(meta["dtype"])
            expected = int((index[:, 1] * index[:, 2] * index[:, 3]).sum()) * dtype.itemsize
            if meta.get("format") != FORMAT_VERSION or (folder / PIXELS_FILE).stat().st_size != expected:
                return None
        except (OSError, ValueError, KeyError, IndexError):
            return None
        pixels = np.memmap(folder / PIXELS_FILE, dtype=dtype, mode="r") if expected else np.empty(0, dtype)
        if use:
            mark_used(folder / META_FILE)
        return cls(folder, pixels.view(np.ndarray), index, meta)

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> np.ndarray:
        offset, height, width, channels = (int(v) for v in self.index[i])
        return self.pixels[offset:offset + height * width * channels].reshape(height, width, channels)

    @property
    def all_gray(self) -> bool:
        return bool((self.index[:, 3] == 1).all())

    @property
    def nbytes(self) -> int:
        """Its size on the disk, as `uncond cache` lists it."""
        return folder_size(self.folder)


def mark_used(path: Path) -> None:
    """A use of a cached file (an entry's meta.json, a reference statistics file), for `uncond cache
    --remove_unused_days`: its modification time."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache is still a cache
        pass


@dataclass
class Entry:
    """A complete entry, as `uncond cache` lists it."""
    folder: Path
    meta: dict[str, Any]
    size: int  # bytes on disk
    last_used: float  # seconds since the epoch


def entries(root: Path) -> list[Entry]:
    """The complete entries under `root`, most recently used first (not the temporary folders of runs
    still decoding, nor uncond evaluate's reference statistics: reference_stats_entries)."""
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        meta_file = folder / META_FILE
        if folder.name.startswith(".") or not meta_file.is_file():
            continue
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            continue
        found.append(Entry(folder, meta, folder_size(folder), meta_file.stat().st_mtime))
    return sorted(found, key=lambda entry: entry.last_used, reverse=True)


def reference_stats_entries(root: Path) -> list[Entry]:
    """uncond evaluate's cached reference statistics (one .npz each), most recently used first."""
    files = sorted((root / REFERENCE_STATS_DIR).glob("*.npz")) if (root / REFERENCE_STATS_DIR).is_dir() else []
    found = [Entry(path, {"source": path.stem}, path.stat().st_size, path.stat().st_mtime) for path in files]
    return sorted(found, key=lambda entry: entry.last_used, reverse=True)


def remove_entry(folder: Path) -> None:
    """Remove an entry: renamed out of the way first, so no run ever opens it half deleted. A run that has it
    memory-mapped keeps reading its pixels until it ends (the files go when it lets go of them)."""
    doomed = folder.parent / f".{folder.name}.removing-{os.getpid()}"
    os.rename(folder, doomed)
    if doomed.is_dir():
        shutil.rmtree(doomed)
    else:  # a reference statistics file
        doomed.unlink()


@contextlib.contextmanager
def decoding_alone(folder: Path, on_wait: Callable[[], None]):
    """Held while an entry is decoded: a second run over the same images waits (`on_wait` says so), then reads the
    entry the first one made, rather than decoding them all a second time beside it. A lock file's flock, which
    the system releases when its process ends, however it ends; no lock where flock is missing (Windows) or the
    cache's file system refuses it (some network ones). The file goes when the decode ends: a run waiting on it
    then finds the entry made (or, if the decode failed, decodes it)."""
    lock_file = folder.parent / f".{folder.name}.lock"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        yield
        return
    handle, locked = held_lock(lock_file, on_wait)
    with handle or contextlib.nullcontext():
        if locked:  # every decode of this entry holds the lock: one of this host's left now was killed
            for partial in folder.parent.glob(f".{folder.name}{PARTIAL}{socket.gethostname()}-*"):
                shutil.rmtree(partial, ignore_errors=True)
        try:
            yield
        finally:
            if handle is not None:
                lock_file.unlink(missing_ok=True)


def held_lock(lock_file: Path, on_wait: Callable[[], None]) -> tuple[Any, bool]:
    """The open `lock_file` and whether this process holds its flock (False where the file system refuses it);
    None where it cannot be opened or flock is missing (Windows). A run that waited holds the lock of a file the
    decode before it removed as it ended: it locks the file at the path anew, or a third run, locking that one at
    once, took itself for alone and removed the second one's decode under way (trial 68 F6)."""
    try:
        import fcntl
    except ImportError:
        return None, False
    waited = False
    while True:
        try:
            handle = open(lock_file, "a")
        except OSError:
            return None, False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                on_wait()
                waited = True
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # not supported here
            return handle, False
        try:
            current = os.stat(lock_file).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return handle, True
        handle.close()


def folder_of(description: str) -> str | None:
    """The folder of an entry's source, as sources.folder_source describes it ("folder PATH (N image files...")."""
    match = re.fullmatch(r"folder (.+?) \([\d,]+ image files?[;)].*", description, flags=re.DOTALL)
    return match[1] if match else None


class EarlierImages:
    """The images that complete entries of the same settings decoded from files still as they were (same path, size
    and modification time), by file key (sources.Source.file_keys): copied instead of decoded again. An entry of a
    folder that no longer exists counts as one of `folder` before a move or rename: its files are matched by their
    place in it (a moved collection with one photo added was decoded whole again, and kept twice)."""

    def __init__(self, root: Path, settings: dict[str, Any], folder: str | None):
        self.found: dict[str, tuple[ImageCache, int | None, bool | str]] = {}  # key: (entry, row, upscaled | reason)
        self.superseded: list[Path] = []  # entries of the same folder and settings: the new entry replaces them
        self.moved: list[Path] = []  # entries of a folder no longer there: replaced too where copied from
        # The superseded entries that are parts of the folder (decodes stopped part way), with their files' keys
        self.parts: dict[Path, set[str]] = {}
        self.copied_from: set[Path] = set()
        for entry in entries(root) if folder is not None else []:  # the most recently used first
            if any(entry.meta.get(name) != value for name, value in {"format": FORMAT_VERSION, **settings}.items()):
                continue
            try:
                files = json.loads((entry.folder / FILES_FILE).read_text())
            except (OSError, ValueError):  # an entry of a dataset, or of a folder from before files.json
                if folder_of(entry.meta.get("source", "")) == folder:
                    self.superseded.append(entry.folder)  # nothing to copy from it, but replaced as well
                continue
            # Mapped now: another machine's run that replaces the entry meanwhile (a shared --cache_dir) removes its
            # files, not the pages mapped here.
            cache = ImageCache.open(entry.folder, use=False)  # used only if copied from (result)
            if cache is None:
                continue
            earlier_folder, rebase = files.get("folder"), None
            if earlier_folder == folder:
                self.superseded.append(entry.folder)
            elif earlier_folder and not os.path.exists(earlier_folder):
                self.moved.append(entry.folder)
                rebase = (earlier_folder + os.sep, folder + os.sep)
            keys = []
            for key, row, detail in files.get("files", []):
                if rebase and key.startswith(rebase[0]):
                    key = rebase[1] + key[len(rebase[0]):]
                self.found.setdefault(key, (cache, row, detail))
                keys.append(key)
            if earlier_folder == folder and entry.meta.get("interrupted"):
                self.parts[entry.folder] = set(keys)

    def replaced(self) -> list[Path]:
        """The entries a new entry of `folder` replaces: its earlier ones, and those of it before a move that were
        copied from (one of a folder removed, whose files matched none, is left to `uncond cache`)."""
        return self.superseded + [path for path in self.moved if path in self.copied_from]

    def __contains__(self, key: str | None) -> bool:
        return key in self.found

    def left_out(self, key: str) -> bool:
        """Whether the file of `key` could not be decoded (and so is left out again)."""
        return self.found[key][1] is None

    def nbytes(self, key: str) -> int:
        """The bytes the image of `key` takes in its entry (and in a new one it is copied into)."""
        cache, row, _ = self.found[key]
        if row is None:
            return 0
        _, height, width, channels = (int(value) for value in cache.index[row])
        return height * width * channels * cache.pixels.itemsize

    def result(self, key: str) -> tuple[np.ndarray, bool, bool] | str:
        """As decoding.decode_record gives it: (HWC pixels, is gray, was upscaled), or why the file was skipped."""
        cache, row, detail = self.found[key]
        self.copied_from.add(cache.folder)
        if row is None:
            return str(detail)
        image = cache.image(row)
        return image, image.shape[2] == 1, bool(detail)


class CacheWriter:
    """Appends decoded images to a new entry; `finish` renames it into place, `abort` removes it."""

    def __init__(self, folder: Path, dtype: np.dtype | type):
        self.folder = folder
        self.dtype = np.dtype(dtype)
        # The host and process in the name tell whose it is; the random part keeps two runs that build the same
        # entry at once apart even where they share both (containers with one hostname and their own pids).
        remove_abandoned(folder.parent)
        owner = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"
        self.staging = folder.parent / f".{folder.name}{PARTIAL}{owner}"
        self.staging.mkdir(parents=True)
        self.file = open(self.staging / PIXELS_FILE, "wb")
        self.rows = array.array("q")  # 32 bytes per image, not a Python tuple each
        self.offset = 0

    def __len__(self) -> int:
        return len(self.rows) // 4

    def append(self, image: np.ndarray) -> None:
        image = np.ascontiguousarray(image, dtype=self.dtype)
        height, width, channels = image.shape
        self.file.write(memoryview(image).cast("B"))
        self.rows.extend((self.offset, height, width, channels))
        self.offset += image.size

    def finish(self, meta: dict[str, Any], files: dict[str, Any] | None = None) -> ImageCache:
        """The entry in place; `files`, a folder's files.json (EarlierImages reads it)."""
        self.file.close()
        np.save(self.staging / INDEX_FILE, np.frombuffer(self.rows, dtype=np.int64).reshape(-1, 4))
        if files is not None:
            (self.staging / FILES_FILE).write_text(json.dumps(files) + "\n")
        meta = {"format": FORMAT_VERSION, "dtype": self.dtype.name, "images": len(self), **meta}
        (self.staging / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if self.folder.exists() and ImageCache.open(self.folder) is None:
            shutil.rmtree(self.folder)  # an entry that does not match its index: replace it
        try:
            os.rename(self.staging, self.folder)
        except OSError:  # another run finished the same entry first; it holds the same pixels
            shutil.rmtree(self.staging, ignore_errors=True)
        cache = ImageCache.open(self.folder)
        if cache is None:
            raise OSError(f"the image cache {self.folder} could not be written")
        cache.built_now = True
        return cache

    def keep_interrupted(self, meta: dict[str, Any], files: dict[str, Any]) -> ImageCache:
        """What a decode stopped part way wrote, as a complete entry of its own under another name (KEY-part-RANDOM,
        which no run opens as the entry of its data), for the next decode to copy from and then replace."""
        self.file.truncate(self.offset * self.dtype.itemsize)  # flushed first; an image the signal cut short goes
        self.folder = self.folder.with_name(f"{self.folder.name}-part-{os.urandom(3).hex()}")
        return self.finish({**meta, "interrupted": True}, files)

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:  # its buffer did not fit on a full disk: the file goes anyway
            pass
        shutil.rmtree(self.staging, ignore_errors=True)


# A staging folder written to within this time is someone's live build, whatever its process id says:
# containers that share a hostname (docker --network host) and a cache volume do not share process ids.
ABANDONED_AFTER_SECONDS = 600


PARTIAL = ".partial-"  # in the name of an entry's temporary folder: .KEY.partial-HOST-PID-RANDOM


def unfinished_decodes(root: Path) -> list[Path]:
    """The temporary folders of entries being decoded now, or left by runs killed while decoding."""
    return sorted(path for path in root.glob(f".*{PARTIAL}*") if path.is_dir()) if root.is_dir() else []


def abandoned(folder: Path, idle_for: float = ABANDONED_AFTER_SECONDS) -> bool:
    """A temporary folder of a run on this host that is gone, not written to for `idle_for` seconds."""
    host = f"{PARTIAL}{socket.gethostname()}-"
    pid = folder.name.split(host, 1)[1].split("-")[0] if host in folder.name else ""
    return pid.isdigit() and not process_alive(int(pid)) and idle_seconds(folder) > idle_for


def remove_abandoned(root: Path, idle_for: float = ABANDONED_AFTER_SECONDS) -> list[Path]:
    """Removes the temporary folders that runs on this host left behind when they were killed; returns them."""
    removed = [folder for folder in unfinished_decodes(root) if abandoned(folder, idle_for)]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def idle_seconds(folder: Path) -> float:
    """Since anything in `folder` (not nested) was last written."""
    try:
        times = [folder.stat().st_mtime] + [entry.stat().st_mtime for entry in folder.iterdir()]
    except OSError:  # removed meanwhile
        return 0.0
    return time.time() - max(times)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
