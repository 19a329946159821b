"""`uncond cache`: the decoded-image cache's entries and reference statistics listed, and the old ones (or all)
removed, with the unfinished decodes of killed runs. The cache's on-disk format is cache.py's."""

from __future__ import annotations

import time

from . import cache
from .config import CacheConfig, UsageError, counted, size_text


def list_and_remove(config: CacheConfig) -> None:
    if config.remove_all and config.remove_unused_days is not None:
        raise UsageError("--remove_all removes every entry, --remove_unused_days only old ones; give one of them")
    root = cache.cache_root(config.cache_dir)
    if config.cache_dir and not root.is_dir():  # a mistyped --cache_dir would list an empty cache
        raise UsageError(f"--cache_dir {config.cache_dir}: no uncond cache there ({root} is not a folder); runs "
                         "given --cache_dir DIR keep theirs in DIR/uncond")
    entries, stats = cache.entries(root), cache.reference_stats_entries(root)
    width = max((len(entry.folder.name) for entry in entries + stats), default=0)  # sizes in one column
    print(f"decoded-image cache: {root}")
    for entry in entries:
        meta = entry.meta
        images = counted(meta["images"], "image") if "images" in meta else "? images"
        print(f"  {entry.folder.name:<{width}}  {images:>13}  {meta.get('resolution', '?'):>4} px"
              f"{' 16-bit' if meta.get('dtype') == 'uint16' else '':<7}  "
              f"{size_text(entry.size):>10}  last used {when(entry.last_used)}  {meta.get('source', '')}")
    if stats:
        print(f"reference statistics of uncond evaluate: {root / cache.REFERENCE_STATS_DIR}")
        for entry in stats:
            print(f"  {entry.folder.name:<{width}}  {'':>13}  {'':>14}  {size_text(entry.size):>10}  last used "
                  f"{when(entry.last_used)}")
    unfinished = cache.unfinished_decodes(root)
    if unfinished:
        print(f"{counted(len(unfinished), 'unfinished decode')} ({size_text(sum(map(cache.folder_size, unfinished)))}"
              "): of runs decoding now, or killed while decoding (--remove_unused_days N removes those of runs "
              "killed over 10 minutes ago, --remove_all those of runs killed a moment ago too, with every entry; the "
              "next decode of the same images removes them too)")
    print(f"{counted(len(entries), 'entry')} and {counted(len(stats), 'reference statistics file')}, "
          f"{size_text(sum(e.size for e in entries + stats))} in all")
    unused_since = None if config.remove_unused_days is None else time.time() - config.remove_unused_days * 86400
    doomed = [entry for entry in entries + stats
              if config.remove_all or (unused_since is not None and entry.last_used < unused_since)]
    for entry in doomed:
        cache.remove_entry(entry.folder)
        print(f"removed {entry.folder.name} ({size_text(entry.size)}, {entry.meta.get('source', '')})")
    freed, removed = sum(e.size for e in doomed), len(doomed)
    if config.remove_all or unused_since is not None:  # --remove_all: also those of runs killed a moment ago
        sizes = {folder: cache.folder_size(folder) for folder in unfinished}
        for folder in cache.remove_abandoned(root, idle_for=0 if config.remove_all else cache.ABANDONED_AFTER_SECONDS):
            print(f"removed {folder.name} ({size_text(sizes.get(folder, 0))}, an unfinished decode of a killed run)")
            freed, removed = freed + sizes.get(folder, 0), removed + 1
    if removed:
        print(f"freed {size_text(freed)}")
    elif config.remove_all or unused_since is not None:
        days = counted(config.remove_unused_days or 0, "day")
        print("nothing to remove" + (f": every entry was read in the last {days}"
                                     if unused_since is not None and entries + stats else ""))


def when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))
