"""Reading ahead and writing behind for whole-scene classification, so the model does not wait on the disk.

GDAL releases the GIL while it reads, decodes, compresses and writes, so one reader and
one writer thread overlap that work with the model's forward pass (on a GPU, the device
then never idles between strips). Each runs in a single-worker thread pool: reads come
back in order, and the writes of one dataset happen in the order they were queued, never
two at once (a GDAL dataset handle is not safe for concurrent use). An error in either
thread is raised in the caller, at the item that failed or at the latest when closing.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(fn: Callable[[T], R], items: Iterable[T], depth: int = 2) -> Iterator[R]:
    """``fn(item)`` for each item, in order, computed up to ``depth`` items ahead in a background thread.

    ``depth`` 0 computes each in the caller's thread, when it is asked for. Closing the
    iterator early (``break``, an error downstream) cancels what has not started and waits
    for the read under way, so the source can be closed safely afterwards.
    """
    if depth <= 0:
        yield from (fn(item) for item in items)
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="roadxfer-read")
    try:
        source = iter(items)
        pending: collections.deque[Future[R]] = collections.deque()
        for item in source:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                break
        while pending:
            result = pending.popleft().result()
            for item in source:  # keep ``depth`` reads in flight
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class WriteBehind(contextlib.AbstractContextManager):
    """Queue calls (e.g. ``dataset.write``) to run in order in a background thread, at most ``depth`` waiting.

    The caller must not change an array after queueing it. Leaving the context waits for
    every queued call and raises the first error; ``depth`` 0 runs each call at once.
    """

    def __init__(self, depth: int = 2) -> None:
        self.depth = depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="roadxfer-write") if depth > 0 else None
        self._pending: collections.deque[Future[Any]] = collections.deque()

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._pool is None:
            fn(*args, **kwargs)
            return
        while self._pending and (self._pending[0].done() or len(self._pending) >= self.depth):
            self._pending.popleft().result()  # raises a failed write here, before more is queued
        self._pending.append(self._pool.submit(fn, *args, **kwargs))

    def drain(self) -> None:
        """Wait for every queued call; raise the first error."""
        while self._pending:
            self._pending.popleft().result()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._pending.clear()
