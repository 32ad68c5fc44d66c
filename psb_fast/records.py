"""A training run's records: metrics.jsonl (one JSON object per line) and TensorBoard scalars.

    records = Records(out_dir)          # rank 0 only
    dropped = records.open(start)       # after a resume: drop the records past the checkpoint's step
    records.record({"step": 10, "loss": 0.3, "lr": 1e-3})
    records.scalars("train", {"loss": 0.3, "lr": 1e-3}, step=10)
    records.close()

Every record gets a "time" (seconds since the epoch). Log records carry "step"; events carry
"event" ("start", "resume", "checkpoint", "eval", "nonfinite", "end") and their step. A resumed run
keeps one record per step: `open(start)` drops the records of steps after `start` (an earlier
run's, written past the checkpoint it resumes from) and torn lines, rewriting the file atomically.
TensorBoard (out_dir/tb) is written when torch.utils.tensorboard can be imported, else skipped.
A failed write raises OSError naming the file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .checkpoint import naming, write_atomic

METRICS = "metrics.jsonl"
TENSORBOARD = "tb"


class Records:
    """metrics.jsonl and the TensorBoard writer of the run in `out_dir` (module docstring)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / METRICS
        self._folder = Path(out_dir)
        self._writer = None

    def open(self, start: int) -> int:
        """Drop the records of steps after `start` and open TensorBoard; returns the lines dropped."""
        dropped = self._truncate(start)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._writer = None
        else:
            self._writer = SummaryWriter(str(self._folder / TENSORBOARD))
        return dropped

    def record(self, entry: dict) -> None:
        """Append `entry` (JSON values) with the current time as one line."""
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": time.time(), **entry}) + "\n")
        except OSError as err:
            raise naming(err, self.path) from None

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        """TensorBoard scalars "<prefix>/<name>" at `step` (nothing without TensorBoard)."""
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _truncate(self, start: int) -> int:
        if not self.path.exists():
            return 0
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as err:
            raise naming(err, self.path) from None
        keep = [line for line in lines if _at_or_before(line, start)]
        if len(keep) < len(lines):
            text = "".join(line + "\n" for line in keep)
            write_atomic(self.path, lambda f: f.write(text.encode("utf-8")))
        return len(lines) - len(keep)


def _at_or_before(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line is a whole record of a step <= `step` (or of no step)."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return False
    if not isinstance(record, dict):
        return False
    at = record.get("step")
    return not (isinstance(at, (int, float)) and not isinstance(at, bool) and at > step)
