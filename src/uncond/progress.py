"""Progress bars: tqdm's on a terminal; in a log file (stderr redirected: a batch job, `> log.txt`, `| tee`) a
plain line now and then instead, since a bar redrawn with carriage returns leaves every redraw in the file and
glues the log's own lines onto them."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm

LOG_PERIOD = 60.0  # seconds between a log file's progress lines; tqdm's TQDM_MININTERVAL changes it
LINE_WIDTH = 1 << 16  # wider than any line: no cut
LINE_FORMAT = ("{desc}: {n_fmt}/{total_fmt} {unit}s ({percentage:.0f}%), {elapsed} elapsed, {remaining} left, "
               "{rate_noinv_fmt}{postfix}")  # always per second: lines of one run compare


def on_terminal() -> bool:
    """stderr is a terminal with a width. A pseudo-terminal that reports 0 columns (`script` run from a
    non-terminal, some CI runners) gets lines as a log file does: tqdm would draw its bar 0 characters wide,
    which is nothing at all."""
    if not sys.stderr.isatty():
        return False
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except OSError:  # a terminal that cannot say its size: tqdm falls back to 80 columns
        return True


def draws_bars() -> bool:
    """Whether progress bars can be drawn: on a terminal, or in a notebook (as its widgets)."""
    return on_terminal() or "ipykernel" in sys.modules


def progress_bar(iterable: Any = None, **options: Any) -> tqdm:
    """A progress bar (tqdm's arguments) that a log file gets as lines; a notebook, as its widget."""
    if draws_bars():
        from tqdm.auto import tqdm as drawn

        return drawn(iterable, **options)
    return ProgressLines(iterable, **options)


class ProgressLines(tqdm):
    """tqdm's bar as a line of its own: at the start, at most every LOG_PERIOD seconds, and at the end."""

    def __init__(self, *args: Any, **options: Any) -> None:
        # miniters=1: each update looks at the clock (cheap), and tqdm's monitor thread, which redraws a bar that
        # has not been drawn for 10 s, leaves this one alone (it added a line 19 s after each).
        # ncols: a line is never cut to a width (tqdm cut one character off at a terminal's reported 0 columns).
        options.update(mininterval=float(os.environ.get("TQDM_MININTERVAL", LOG_PERIOD)), miniters=1,
                       bar_format=LINE_FORMAT, dynamic_ncols=False, ncols=LINE_WIDTH)
        self.shown: int | None = None  # the count of the last line written
        super().__init__(*args, **options)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clears a bar by drawing an empty one: a file has nothing to clear
            return False
        self.fp.write((str(self) if msg is None else msg) + "\n")
        self.fp.flush()
        self.shown = self.n
        return True

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **values: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **values)  # shown in the next line, not a line of its own

    def close(self) -> None:
        if not self.disable and self.n != self.shown:  # the end, if the last line was not of it
            self.display()
        self.leave = False  # else tqdm draws the last line again
        super().close()
