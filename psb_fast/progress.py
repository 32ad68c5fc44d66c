"""Progress bars for terminals and for log files (one home: every bar of psb_fast is made here).

    bar = progress_bar(total=n, desc="tune", unit="candidate", disable=not progress)

A tqdm bar. When stderr is not a terminal (a log file, a pipe, a batch job) each carriage-return
update would land in the file, thousands per run; there the bar refreshes at most every
LOG_INTERVAL seconds instead of tqdm's 0.1 s, so a log gets a line per interval and the final one.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL = 30.0  # seconds between updates when stderr is not a terminal


def progress_bar(**kwargs) -> tqdm:
    """tqdm(**kwargs), refreshing at most every LOG_INTERVAL seconds when stderr is not a terminal
    (unless the caller sets mininterval)."""
    stream = kwargs.get("file") or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(**kwargs)
