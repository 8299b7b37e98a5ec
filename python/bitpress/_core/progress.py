"""Progress bars for the long steps (GPTQ / SparseGPT over layers, distillation, the demo).

A bar shows its description, a bar and ``n/total`` when the total is known, the elapsed time,
the rate (``12.3 it/s``, or ``4.1 s/it`` below one item per second), the time left at the
average rate so far (``ETA``, until done) and the postfix (``loss=2.31``), on stderr::

    GPTQ  45%|#########           | 9/20  00:12 elapsed  ETA 00:15  1.3 s/layer

On a terminal the line is redrawn in place (``\\r``) at most 10 times a second. Anywhere else
(a CI log, a file) redrawing would print every update on its own line, so a full line is
printed at most every 10 s (``BITPRESS_PROGRESS_INTERVAL`` seconds), and a final line when the
bar closes.

Quiet: :func:`set_quiet`, the :func:`quiet` context manager, or ``BITPRESS_QUIET=1`` in the
environment turn every bar created while it holds off (no output at all; the bar still counts).
:func:`set_quiet` wins over the environment; ``set_quiet(None)`` follows the environment again.

Only the standard library: the core layer imports no other package.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")

TTY_INTERVAL = 0.1  # s between redraws on a terminal: 10 per second is smooth and cheap
LOG_INTERVAL = 10.0  # s between lines in a log: enough to see it move, few enough to read
BAR_WIDTH = 20

_quiet: bool | None = None  # None: follow BITPRESS_QUIET


def set_quiet(value: bool | None) -> None:
    """Turn every progress bar created from now on off (True) or on (False); None: follow the
    ``BITPRESS_QUIET`` environment variable (the default)."""
    global _quiet
    _quiet = None if value is None else bool(value)


def is_quiet() -> bool:
    """Whether a bar created now stays silent."""
    if _quiet is not None:
        return _quiet
    return os.environ.get("BITPRESS_QUIET", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def quiet(value: bool = True) -> Iterator[None]:
    """``with quiet(): ...``: no progress output inside (``quiet(False)``: bars on inside, even
    under ``BITPRESS_QUIET=1``); the previous setting is restored on exit."""
    global _quiet
    previous = _quiet
    _quiet = bool(value)
    try:
        yield
    finally:
        _quiet = previous


def format_time(seconds: float) -> str:
    """``MM:SS``, or ``H:MM:SS`` from one hour on."""
    s = max(0, int(seconds + 0.5))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _number(x: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= limit:
            return f"{x / limit:.1f}{suffix}"
    return f"{x:.1f}"


def format_rate(n: float, elapsed: float, unit: str = "it") -> str:
    """``12.3 it/s``; ``4.1 s/it`` when slower than one ``unit`` per second; ``? it/s`` before
    the first item or any time has passed."""
    if n <= 0 or elapsed <= 0:
        return f"? {unit}/s"
    rate = n / elapsed
    if rate >= 1.0:
        return f"{_number(rate)} {unit}/s"
    return f"{_number(1.0 / rate)} s/{unit}"


def _postfix_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _interval_from_env() -> float:
    raw = os.environ.get("BITPRESS_PROGRESS_INTERVAL")
    if raw is None or not raw.strip():
        return LOG_INTERVAL
    try:
        value = float(raw)
    except ValueError as e:
        raise ValueError(
            f"BITPRESS_PROGRESS_INTERVAL must be a number of seconds, got {raw!r}"
        ) from e
    if value < 0:
        raise ValueError(f"BITPRESS_PROGRESS_INTERVAL must be >= 0, got {raw!r}")
    return value


def _isatty(file: IO[str]) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Progress:
    """A progress bar over ``iterable`` (iterate the bar) or over manual :meth:`update` calls;
    also a context manager that closes it. Made by :func:`progress`.

    Attributes: ``n`` (items done), ``total`` (None: unknown), ``desc``, ``unit``,
    ``postfix`` (dict), ``disabled`` (quiet: nothing is written).
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | float | None = None,
        desc: str = "",
        unit: str = "it",
        file: IO[str] | None = None,
        clock: Callable[[], float] | None = None,
        interval: float | None = None,
    ) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        if total is not None and total < 0:
            raise ValueError(f"progress: total must be >= 0, got {total}")
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.disabled = is_quiet()
        self.file = file if file is not None else sys.stderr
        self.clock = clock if clock is not None else time.monotonic
        self.tty = not self.disabled and _isatty(self.file)
        if interval is None:
            interval = TTY_INTERVAL if self.tty else _interval_from_env()
        self.interval = float(interval)
        self.start = self.clock()
        self._last_draw = self.start
        self._drawn_width = 0  # characters of the line now on the terminal
        self._closed = False
        encoding = (getattr(self.file, "encoding", None) or "").lower().replace("-", "")
        self._fill, self._empty = ("\u2588", " ") if encoding.startswith("utf") else ("#", " ")
        if self.tty:
            self._draw()  # a terminal shows the bar from the start; a log waits for progress

    # ---- counting ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("progress: no iterable to iterate (use update() for manual counts)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: int | float = 1, **postfix: Any) -> None:
        """``n`` more items done; ``postfix`` entries (``loss=2.31``) are added to those shown."""
        self.n += n
        if postfix:
            self.postfix.update(postfix)
        self._maybe_draw()

    def set_postfix(self, **postfix: Any) -> None:
        """Replace the ``key=value`` entries shown after the bar."""
        self.postfix = dict(postfix)
        self._maybe_draw()

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    # ---- output ------------------------------------------------------------------------------
    def format_line(self, now: float | None = None) -> str:
        """The line the bar shows at time ``now`` (default: the clock's now)."""
        elapsed = (self.clock() if now is None else now) - self.start
        parts = []
        if self.desc:
            parts.append(self.desc)
        if self.total:
            frac = min(max(self.n / self.total, 0.0), 1.0)
            filled = int(frac * BAR_WIDTH)
            bar = self._fill * filled + self._empty * (BAR_WIDTH - filled)
            parts.append(f"{int(frac * 100):3d}%|{bar}| {_count(self.n)}/{_count(self.total)}")
        elif self.total == 0:
            parts.append("0/0")
        else:
            parts.append(f"{_count(self.n)} {self.unit}")
        parts.append(f"{format_time(elapsed)} elapsed")
        if self.total and self.n < self.total:  # done: nothing left to estimate
            if self.n > 0 and elapsed > 0:
                left = (self.total - self.n) * elapsed / self.n
                parts.append(f"ETA {format_time(left)}")
            else:
                parts.append("ETA ?")
        parts.append(format_rate(self.n, elapsed, self.unit))
        if self.postfix:
            parts.append(", ".join(f"{k}={_postfix_value(v)}" for k, v in self.postfix.items()))
        return "  ".join(parts)

    def _maybe_draw(self) -> None:
        if self.disabled or self._closed:
            return
        if self.clock() - self._last_draw >= self.interval:
            self._draw()

    def _draw(self, final: bool = False) -> None:
        now = self.clock()
        self._last_draw = now
        line = self.format_line(now)
        if self.tty:
            # A line longer than the terminal wraps, and \r then only returns to the last row.
            columns = shutil.get_terminal_size((100, 20)).columns
            line = line[: max(columns - 1, 10)]
            pad = " " * max(self._drawn_width - len(line), 0)
            self.file.write("\r" + line + pad + ("\n" if final else ""))
            self._drawn_width = 0 if final else len(line)
        else:
            self.file.write(line + "\n")
        self.file.flush()

    def refresh(self) -> None:
        """Draw the bar now, whatever the time since the last line."""
        if not self.disabled and not self._closed:
            self._draw()

    def clear(self) -> None:
        """Erase the bar from the terminal (before printing something else there); the next
        update draws it again. Nothing to erase in a log."""
        if self.disabled or self._closed or not self.tty or not self._drawn_width:
            return
        self.file.write("\r" + " " * self._drawn_width + "\r")
        self.file.flush()
        self._drawn_width = 0
        self._last_draw = float("-inf")

    def close(self) -> None:
        """Write the final line (always, unless quiet); further calls do nothing."""
        if self._closed:
            return
        if not self.disabled:
            self._draw(final=True)
        self._closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Progress({self.format_line()!r})"


def _count(x: int | float) -> str:
    return str(x) if isinstance(x, int) or not float(x).is_integer() else str(int(x))


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | float | None = None,
    desc: str = "",
    unit: str = "it",
    file: IO[str] | None = None,
    clock: Callable[[], float] | None = None,
    interval: float | None = None,
) -> Progress:
    """A progress bar on stderr (see the module docstring for what it shows and when).

    Parameters
    ----------
    iterable : iterate the returned bar to iterate this, counting one item per step; the bar
        closes (final line) when the loop ends, breaks or raises.
    total : number of items expected (default ``len(iterable)`` when it has one); None: no bar
        and no ETA, only the count and rate.
    desc : label in front of the bar.
    unit : name of one item (``it``, ``layer``, ``step``), in the count and the rate.
    file : the stream (default ``sys.stderr``); a stream that is a terminal gets in-place
        redraws.
    clock : seconds as a float (default ``time.monotonic``); tests pass a fake one.
    interval : minimum seconds between two lines; default 0.1 on a terminal, else
        ``BITPRESS_PROGRESS_INTERVAL`` or 10.

    Examples
    --------
    >>> for layer in progress(layers, desc="GPTQ", unit="layer"): ...  # doctest: +SKIP
    >>> with progress(total=steps, desc="train", unit="step") as bar:  # doctest: +SKIP
    ...     for step in range(steps):
    ...         bar.update(loss=loss)
    """
    return Progress(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=file,
        clock=clock,
        interval=interval,
    )
