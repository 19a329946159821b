"""uncond's CLI where each process adds the words after `--rank1` only on the process of rank 1, as when each
machine of a launch is given a command of its own and one of them differs (test_distributed.py)."""

from __future__ import annotations

import os
import sys

from uncond import cli

if __name__ == "__main__":
    words = sys.argv[1:]
    common, rank1 = (words[:words.index("--rank1")], words[words.index("--rank1") + 1:]) if "--rank1" in words \
        else (words, [])
    sys.exit(cli.console(common + (rank1 if os.environ.get("RANK") == "1" else [])))
