"""Work on a stream of items in worker processes, ahead of its consumer, with the results in the stream's order.

Stage one's forward must not wait on the CPU: the samples after the ones being forwarded are decoded, resampled and
turned into features by worker processes meanwhile. ``Prefetcher.map`` keeps up to ``ahead`` items in flight
and yields ``(item, result)`` in input order, so the consumer sees exactly the sequence a plain loop would give.

The mechanism is the standard library's ``ProcessPoolExecutor``. Where the platform has it, workers are forked: the
work function reaches them by inheritance, not pickling, in milliseconds (a spawned worker imports torch and
transformers again, tens of seconds on a loaded machine). They never touch CUDA, run torch on one thread (the
cores are theirs to share), ignore Ctrl-C (the parent stops them) and, on Linux, die with their parent
(``PR_SET_PDEATHSIG``): a dump killed with ``kill -9`` leaves no orphan behind holding its cache lock.

A worker that dies (a decoder that crashes the process on one file) breaks the whole pool, and every item in flight
with it, not only the guilty one. The pool is then restarted and the item at the head retried alone: if it breaks
the pool again it is the culprit and ``on_crash`` turns it into a result (the dump rejects it with the reason); the
items after it are submitted again. A long job loses one sample, not its run.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Generic, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_work: Callable | None = None  # the work function, in a worker process


class Prefetcher(Generic[T, R]):
    """``map`` runs ``fn`` over items in ``workers`` processes (0: in this process, when each item is asked for),
    at most ``ahead`` items ahead of the consumer. ``wait_seconds``: how long the consumer waited for results (with
    no workers: the time ``fn`` itself took), i.e. how long the work held the consumer up. ``on_crash(item, error)``
    gives the result of an item whose worker process died on it (None: ``BrokenProcessPool`` is raised)."""

    def __init__(
        self,
        fn: Callable[[T], R],
        workers: int,
        ahead: int,
        on_crash: Callable[[T, BaseException], R] | None = None,
    ):
        if workers < 0 or ahead < 1:
            raise ValueError(f"workers must be >= 0 and ahead >= 1, got {workers} and {ahead}")
        self.fn, self.workers, self.ahead = fn, workers, max(ahead, workers)
        self.on_crash = on_crash
        self.crashes = 0  # items whose worker died on them
        self.wait_seconds = 0.0
        self._pool: ProcessPoolExecutor | None = None

    def map(self, items: Iterable[T]) -> Iterator[tuple[T, R]]:
        """``(item, fn(item))`` in the order of ``items``. An exception raised while reading ``items`` comes after
        the results of the items read before it; one raised by ``fn`` comes at its item."""
        if self.workers == 0:
            yield from self._inline(items)
            return
        pending: deque[tuple[T, Future]] = deque()
        source, error = iter(items), None
        try:
            while True:
                while error is None and len(pending) < self.ahead:
                    try:
                        item = next(source)
                    except StopIteration:
                        break
                    except Exception as err:  # noqa: BLE001 - re-raised once the items before it are through
                        error = err
                        break
                    pending.append((item, self._executor().submit(_call, item)))
                if not pending:
                    break
                item, future = pending.popleft()
                start = time.perf_counter()
                try:
                    result = future.result()
                except BrokenProcessPool:  # this item or another in flight killed its worker: find out which
                    result = self._alone(item)
                    pending = deque((later, self._executor().submit(_call, later)) for later, _ in pending)
                self.wait_seconds += time.perf_counter() - start
                yield item, result
        finally:
            for _, future in pending:  # the consumer stopped early: nothing more is needed
                future.cancel()
        if error is not None:
            raise error

    def _inline(self, items: Iterable[T]) -> Iterator[tuple[T, R]]:
        for item in items:
            start = time.perf_counter()
            result = self.fn(item)
            self.wait_seconds += time.perf_counter() - start
            yield item, result

    def _alone(self, item: T) -> R:
        """``item`` in a fresh pool, on its own: its result, or ``on_crash``'s if its worker dies again."""
        self._discard_pool()
        try:
            return self._executor().submit(_call, item).result()
        except BrokenProcessPool as err:
            self._discard_pool()
            if self.on_crash is None:
                raise
            self.crashes += 1
            return self.on_crash(item, err)

    def _discard_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_install, initargs=(self.fn, os.getpid())
            )
        return self._pool

    def close(self) -> None:
        """Stop the workers (work not started is dropped)."""
        self._discard_pool()

    def __enter__(self) -> Prefetcher[T, R]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _install(fn: Callable, parent: int) -> None:
    """A worker's start: the work function, one torch thread, no Ctrl-C, death with the parent."""
    global _work
    _work = fn
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)
    torch.set_num_threads(1)


def _call(item):
    return _work(item)
