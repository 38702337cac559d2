"""A one-line progress bar on stderr: step/total, rate, ETA and whatever numbers the caller adds.
On a terminal it redraws in place; into a log file or pipe (CI, nohup) it writes a line at most every
10 seconds and at the end, instead of thousands of carriage-return updates."""
import sys
import time


class Progress:
    def __init__(self, total: int, desc: str = "", enabled: bool = True, start: int = 0):
        self.total, self.desc, self.n, self.start_n = total, desc, start, start
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.stats: dict[str, float] = {}
        self.tty = sys.stderr.isatty()
        self.last_line = float("-inf")
        if enabled and total > start:  # at once: the first update of a slow phase may be minutes away
            self._draw()

    def update(self, n: int = 1, **stats):
        self.n += n
        self.stats.update(stats)
        if self.enabled:
            self._draw()

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return (self.n - self.start_n) / dt if dt > 0 else 0.0

    def _draw(self):
        rate = self.rate()
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        frac = self.n / max(self.total, 1)
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        extra = " ".join(f"{k}={v:.4g}" for k, v in self.stats.items())
        line = f"{self.desc} [{bar}] {self.n}/{self.total} {rate:.2f} it/s ETA {eta:4.0f}s {extra}"
        done = self.n >= self.total
        if self.tty:
            sys.stderr.write(f"\r{line}" + ("\n" if done else ""))
        elif done or time.perf_counter() - self.last_line >= 10:
            self.last_line = time.perf_counter()
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def write(self, line: str):
        """A line of its own above the bar (on a terminal the bar is drawn again by the next update)."""
        if self.enabled:
            sys.stderr.write(("\r\033[K" if self.tty else "") + line + "\n")
            sys.stderr.flush()

    def close(self):
        if self.enabled and self.tty and self.n < self.total:
            sys.stderr.write("\n")
