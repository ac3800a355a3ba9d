"""What a run shows while it works (a progress bar on a terminal, log lines otherwise) and at the end."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import IO, Any

from tqdm import tqdm  # type: ignore[import-untyped]

__all__ = ["Progress", "Tally"]


@dataclass
class Tally:
    """The counts of one run, which make its summary and its exit status."""

    rows: int = 0
    invalid: int = 0
    invalid_lines: list[int] = field(default_factory=list)
    done_before: int = 0
    failed_before: int = 0
    completed: int = 0
    failed: int = 0
    conflicts: int = 0
    sent: int = 0
    resent: int = 0
    followed: int = 0
    in_flight: int = 0
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        """Rows with an outcome: known before this run or recorded by it."""
        return self.done_before + self.failed_before + self.completed + self.failed

    def exit_status(self) -> int:
        """0 when every row completed; 1 when rows failed, were invalid or conflicted; 130 when
        interrupted."""
        if self.interrupted:
            return 130
        return 1 if self.failed or self.failed_before or self.invalid or self.conflicts else 0

    def summary(self, *, queue: str, priority: int) -> str:
        """The lines printed at the end of a run."""
        elapsed = time.monotonic() - self.started
        rate = (self.completed + self.failed) / elapsed if elapsed > 0 else 0.0
        shown = ", ".join(str(n) for n in self.invalid_lines[:10]) + (", ..." if self.invalid > 10 else "")
        lines = [
            f"rows       {self.rows} valid, {self.invalid} invalid" + (f" (lines {shown})" if shown else ""),
            f"completed  {self.done_before + self.completed} ({self.done_before} before this run)",
            f"failed     {self.failed + self.failed_before} ({self.failed_before} before this run, "
            "not sent again without --retry-failed)",
            f"sent       {self.sent} to queue {queue} at priority {priority}; {self.followed} followed "
            "(sent by another run)"
            + (f"; {self.resent} sent again (lost by the broker)" if self.resent else ""),
            f"time       {_clock(elapsed)}, {rate:.1f} rows/s",
        ]
        if self.conflicts:
            lines.insert(
                3,
                f"conflict   {self.conflicts} (their task ids hold other requests: not recorded as done; "
                "pass --namespace NAME to keep this input apart)",
            )
        if self.interrupted:
            lines.append(
                f"stopped    with {self.in_flight} rows in flight: workers finish them; "
                "run the same command again to record them and send the rest"
            )
        return "\n".join(lines)


class Progress:
    """A tqdm bar with rate and ETA on a terminal; otherwise a plain line every `every_s` seconds."""

    def __init__(self, tally: Tally, *, stream: IO[str], tty: bool, every_s: float = 10.0) -> None:
        self.tally = tally
        self.stream = stream
        self.every_s = every_s
        self._logged_at = time.monotonic()
        self._base = tally.finished
        self._bar: Any = None
        if tty:
            self._bar = tqdm(
                total=tally.rows,
                initial=self._base,
                unit="row",
                file=stream,
                dynamic_ncols=True,
                smoothing=0.05,
            )

    def update(self) -> None:
        """Show the tally's current counts (cheap enough to call on every loop)."""
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"failed={self.tally.failed} in_flight={self.tally.in_flight}", refresh=False
            )
            self._bar.update(self.tally.finished - self._bar.n)
        elif time.monotonic() - self._logged_at >= self.every_s:
            self.log_line()

    def log_line(self) -> None:
        """One line: done/total, failures, in flight, rate and ETA."""
        self._logged_at = now = time.monotonic()
        tally, total = self.tally, max(self.tally.rows, 1)
        rate = (tally.finished - self._base) / max(now - tally.started, 1e-9)
        left = tally.rows - tally.finished
        eta = _clock(left / rate) if rate > 0 else "?"
        print(
            f"tts-backfill: {tally.finished}/{tally.rows} rows ({100 * tally.finished // total}%), "
            f"{tally.failed} failed, {tally.in_flight} in flight, {rate:.1f} rows/s, ETA {eta}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        """Finish the bar (or print a last line)."""
        if self._bar is not None:
            self.update()
            self._bar.close()
        else:
            self.log_line()


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))
