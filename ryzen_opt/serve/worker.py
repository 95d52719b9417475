"""``ModelWorker``: the one thread that touches the model and the adapter registry.

``AdapterRegistry`` switches adapters by changing which LoRA weights every layer reads (or by
folding one into the base weights), so two requests for different adapters must never run
at the same time: the second switch would change the first one's output mid-generation.
Every job that reads or changes the model or the registry therefore runs here, one after
another, in the order submitted (control jobs such as registering an adapter first).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

# Lower runs first; equal priorities run in submission order.
PRIORITY_CONTROL = 0  # registering an adapter: quick, and a generate request may wait on it
PRIORITY_GENERATE = 1


class WorkerStopped(RuntimeError):
    """The worker was stopped: the job was not run."""


class ModelWorker:
    """A single thread that runs submitted jobs one at a time.

    Args:
        name: the thread's name (shown in tracebacks and ``py-spy``).

    Example:
        >>> w = ModelWorker()
        >>> w.start()
        >>> w.submit(lambda: 1 + 1).result()
        2
        >>> w.stop()
    """

    def __init__(self, name: str = "ryzen-opt-model") -> None:
        self.name = name
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self.jobs_run = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        """Jobs waiting (not counting the one running)."""
        return self._jobs.qsize()

    def start(self) -> None:
        """Start the thread (a second call while it runs does nothing)."""
        with self._lock:
            if self.running:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Finish the running job, fail the queued ones with :class:`WorkerStopped`, stop."""
        with self._lock:
            thread, self._stopping = self._thread, True
            if thread is None:
                return
            self._jobs.put((-1, -1, None))  # wakes the loop at once
        thread.join(timeout)
        with self._lock:
            self._thread = None

    def submit(self, fn: Callable[[], Any], priority: int = PRIORITY_GENERATE) -> Future:
        """Queue ``fn()`` to run on the worker thread.

        Args:
            fn: a callable of no arguments.
            priority: :data:`PRIORITY_CONTROL` jobs run before queued
                :data:`PRIORITY_GENERATE` ones.

        Returns:
            A :class:`concurrent.futures.Future` with ``fn``'s result or exception.

        Raises:
            WorkerStopped: the worker is not running.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        fut: Future = Future()
        with self._lock:
            if self._stopping or not self.running:
                raise WorkerStopped("the model worker is not running")
            self._jobs.put((priority, next(self._order), (fn, fut)))
        return fut

    def _loop(self) -> None:
        while True:
            _, _, item = self._jobs.get()
            if item is None or self._stopping:
                break
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                result = fn()
            except BaseException as e:  # handed to the caller, the thread goes on
                fut.set_exception(e)
            else:
                fut.set_result(result)
            self.jobs_run += 1
        if item is not None:  # stopped between jobs: fail what is left
            self._fail(item)
        while True:
            try:
                _, _, item = self._jobs.get_nowait()
            except queue.Empty:
                return
            self._fail(item)

    @staticmethod
    def _fail(item) -> None:
        if item is not None and item[1].set_running_or_notify_cancel():
            item[1].set_exception(WorkerStopped("the model worker stopped before this job ran"))
