"""A small progress line with rate and ETA on stderr, for long data and training loops.

On a terminal the line is redrawn in place. Elsewhere (CI logs, pipes) it prints a
plain line at each quarter of the work and one at the end. Work that ends within
`delay` seconds prints nothing, so quick runs and early errors stay quiet.
"""

import sys
import time

_REDRAW_INTERVAL = 0.2  # seconds between redraws on a terminal


class Progress:
    """Count `total` units of work and report the count, rate and ETA to `stream`.

    Also usable as pooch's custom progress bar: pooch sets `total`, then calls
    `update`, `reset` and `close`.
    """

    def __init__(self, total, desc, unit="items", stream=None, enabled=True, delay=1.0):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.delay = delay  # seconds of silence before the first line
        self.is_tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self._printed = False
        self._last_draw = 0.0
        self.reset()

    def reset(self):
        """Set the count back to zero; the clock keeps running.

        pooch calls this before its final update, and again before a retry.
        """
        self.count = 0
        self._last_quarter = 0
        self._closed = False

    def update(self, n=1):
        """Add `n` finished units and redraw when due."""
        self.count += n
        if not self.enabled or self._closed:
            return
        now = time.monotonic()
        if now - self.start < self.delay:
            return
        if self.is_tty:
            if now - self._last_draw >= _REDRAW_INTERVAL:
                self._last_draw = now
                self._write("\r" + self._line())
        elif self.total:
            quarter = min(4, 4 * self.count // self.total)
            if quarter > self._last_quarter and quarter < 4:
                self._last_quarter = quarter
                self._write(self._line() + "\n")

    def close(self):
        """Print the final line unless the work ended within `delay`; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if not self._printed and time.monotonic() - self.start < self.delay:
            return
        prefix = "\r" if self.is_tty else ""
        self._write(prefix + self._line(final=True) + "\n")

    def _write(self, text):
        self._printed = True
        self.stream.write(text)
        self.stream.flush()

    def _line(self, final=False):
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.count / elapsed
        scale, unit = (1e6, f"M{self.unit}") if self.unit == "B" else (1.0, self.unit)
        count = f"{self.count / scale:.1f}" if scale > 1 else f"{self.count}"
        total = f"{self.total / scale:.1f}" if scale > 1 else f"{self.total}"
        line = f"{self.desc}: {count}/{total} {unit}"
        if self.total:
            line += f" ({100 * self.count / self.total:3.0f}%)"
        line += f", {rate / scale:.1f} {unit}/s"
        if final:
            return line + f", {elapsed:.1f} s"
        if self.total and rate > 0:
            line += f", ETA {max(self.total - self.count, 0) / rate:.0f} s"
        return line
