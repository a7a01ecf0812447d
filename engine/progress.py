"""Progress lines for long loops of known length (training epochs and steps, images, queries).

`Progress(stage, log, total)` prints through the workflows' `log` callable at most one line every
`every_s` seconds, thinning out on long stages (never more often than every 5% of the time elapsed so
far), and the last line when the loop closes:

      attribute_autoencoder: epoch 3/10, step 120/400, loss 0.0421, 41 s, ETA 1 min 35 s

Plain lines, no carriage returns, so logs and CI read the same as a terminal. `bar=True` draws a tqdm bar
instead when stderr is a terminal (the audit's query bar). With `log=None` nothing prints. A Progress only
observes: it never touches an RNG, a tensor or the loop's order. Imports no engine module (layer order).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional

Log = Optional[Callable[[str], Any]]


def format_seconds(seconds: float) -> str:
    """`41 s`, `4 min 52 s`, `1 h 05 min`."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _figure(name: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{name} {value:.4g}"
    return f"{name} {value}"


class Progress:
    """Throttled progress of one stage: `update(n, **figures)` per step, `close()` after the loop.

    total: steps of the whole loop. epochs: when given, `total` is epochs x steps per epoch and lines read
    `epoch e/E, step s/S`; else `<unit> done/total`. done: steps already done before this run (a resumed
    training): the ETA counts only this run's pace. figures: values shown after the counts (`loss 0.0421`);
    the latest given are kept until replaced.
    """

    def __init__(self, stage: str, log: Log, total: int, *, epochs: Optional[int] = None, unit: str = "step",
                 done: int = 0, every_s: float = 5.0, bar: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stage, self.log, self.total, self.unit = stage, log, max(0, int(total)), unit
        self.epochs = int(epochs) if epochs else None
        self.done = self.start_done = int(done)
        self.every_s, self.clock = float(every_s), clock
        self.figures: dict[str, Any] = {}
        self.start = self.last = clock()
        self.closed = False
        self._bar = None
        if bar and log is not None and sys.stderr.isatty():
            from tqdm import tqdm  # deferred: tqdm loads only when a terminal shows a bar

            self._bar = tqdm(total=self.total, initial=self.done, desc=stage.strip(), unit=unit,
                             dynamic_ncols=True)

    def update(self, n: int = 1, **figures: Any) -> None:
        self.done += n
        if figures:
            self.figures.update(figures)
        if self.log is None:
            return
        if self._bar is not None:
            self._bar.update(n)
            if figures:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in figures.items()},
                                      refresh=False)
            return
        now = self.clock()
        elapsed = now - self.start
        if now - self.last >= max(self.every_s, 0.05 * elapsed) and self.done < self.total:
            self._emit(now)

    def close(self) -> None:
        """The last line (or the bar's end); idempotent."""
        if self.closed or self.log is None:
            self.closed = True
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
            return
        self._emit(self.clock())

    def line(self, now: Optional[float] = None) -> str:
        """The progress line at clock time `now` (default: the clock's now)."""
        now = self.clock() if now is None else now
        parts = [self._counts()]
        parts += [_figure(k, v) for k, v in self.figures.items()]
        elapsed = now - self.start
        parts.append(format_seconds(elapsed))
        ran = self.done - self.start_done
        if 0 < ran and self.done < self.total:
            parts.append(f"ETA {format_seconds(elapsed / ran * (self.total - self.done))}")
        return f"  {self.stage}: " + ", ".join(parts)

    def _counts(self) -> str:
        if self.epochs:
            per_epoch = max(1, -(-self.total // self.epochs))
            epoch = min(self.epochs, max(0, self.done - 1) // per_epoch + 1)  # a full epoch reads S/S, not 0/S
            step = self.done - (epoch - 1) * per_epoch
            return f"epoch {epoch}/{self.epochs}, step {step}/{per_epoch}"
        return f"{self.unit} {self.done}/{self.total}"

    def _emit(self, now: float) -> None:
        self.last = now
        self.log(self.line(now))
