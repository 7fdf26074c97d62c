"""A long per-image loop (ingest's hashing, the shard stage): its progress, on a terminal or in a log,
and its work fed to a pool a window at a time (`bounded_map`).

On a terminal a tqdm bar (with its ETA); when stderr is a log, CI or `dvc repro`'s pipe, a bar's
carriage returns make one unreadable line, so instead a plain line every `every` of the total:
`shard equalized: 4,241/84,818 (5%), 212 img/s, ETA 6m10s`. tqdm has no such mode (its
`mininterval` is time-based and still writes `\\r` frames), hence the few lines here.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from itertools import islice
from typing import Any, Callable, TextIO

from tqdm import tqdm


def duration(seconds: float) -> str:
    """6m10s, 1h02m, 45s: short, for an ETA."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(desc: str, done: int, total: int, elapsed: float, unit: str = "img") -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = f", ETA {duration((total - done) / rate)}" if rate > 0 and done < total else ""
    percent = (min(99, round(100 * done / total)) if done < total else 100) if total else 100
    return f"{desc}: {done:,}/{total:,} ({percent}%), {rate:,.0f} {unit}/s{eta}"


class Progress:
    """`update()` once per item; `close()` at the end (or use as a context manager)."""

    def __init__(self, total: int, desc: str, unit: str = "img", enabled: bool = True, stream: TextIO | None = None,
                 every: float = 0.05, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self._stream = stream if stream is not None else sys.stderr
        self._clock, self._start = clock, clock()
        self._bar = None
        self._plain = False
        if enabled and total > 0:
            if self._stream.isatty():
                self._bar = tqdm(total=total, desc=desc, unit=unit, file=self._stream, leave=False)
            else:
                self._plain = True
                self._step = max(1, int(total * every))
                self._next = self._step

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._plain and (self.done >= self._next or self.done == self.total):
            print(progress_line(self.desc, self.done, self.total, self._clock() - self._start, self.unit),
                  file=self._stream, flush=True)  # fmt: skip
            self._next = (self.done // self._step + 1) * self._step
            if self.done >= self.total:
                self._plain = False  # the last line is written once

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _apply_all(fn: Callable[[Any], Any], batch: list[Any]) -> list[Any]:
    return [fn(item) for item in batch]


def bounded_map(pool: Executor, fn: Callable[[Any], Any], items: Iterable[Any], ahead: int, chunk: int = 1) -> Iterator[Any]:
    """fn(item) for every item, in order, run by `pool` with at most `ahead` chunks in flight.

    `Executor.map` submits every item at once: a future per item (about 1.7 kB each, measured)
    held until the loop reaches it, 150 MB at COVIDx CXR-4's 84,818 images. Here memory stays
    that of `ahead` chunks whatever the dataset. `fn` must pickle for a process pool.
    """
    it = iter(items)

    def submit() -> Any:
        batch = list(islice(it, chunk))
        return pool.submit(_apply_all, fn, batch) if batch else None

    pending = deque(f for f in (submit() for _ in range(max(1, ahead))) if f is not None)
    try:
        while pending:
            done = pending.popleft().result()
            following = submit()
            if following is not None:
                pending.append(following)
            yield from done
    finally:
        for future in pending:  # an error or an abandoned loop: queued work is not started
            future.cancel()
