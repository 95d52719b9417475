"""``ModelWorker``: one thread, jobs in order (control first), errors to the caller."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("pydantic", reason="needs the 'serve' extra")

from ryzen_opt.serve.worker import (  # noqa: E402
    PRIORITY_CONTROL,
    ModelWorker,
    WorkerStopped,
)


def test_jobs_run_one_at_a_time_on_one_thread_in_order_control_first():
    w = ModelWorker()
    w.start()
    gate, started, order, threads, running = threading.Event(), threading.Event(), [], set(), [0]

    def job(tag):
        def run():
            running[0] += 1
            assert running[0] == 1, "two jobs ran at once"
            threads.add(threading.get_ident())
            if tag == "first":
                started.set()
                gate.wait(5)
            order.append(tag)
            running[0] -= 1
            return tag

        return run

    futs = [w.submit(job("first"))]  # holds the worker while the rest queue up
    assert started.wait(5)
    futs += [w.submit(job(f"g{i}")) for i in range(5)]
    futs.append(w.submit(job("control"), PRIORITY_CONTROL))
    gate.set()
    assert [f.result(5) for f in futs] == ["first", *[f"g{i}" for i in range(5)], "control"]
    assert order == ["first", "control", *[f"g{i}" for i in range(5)]]
    assert len(threads) == 1 and threading.get_ident() not in threads
    w.stop()


def test_a_failing_job_reaches_its_caller_and_the_worker_goes_on():
    w = ModelWorker()
    w.start()
    with pytest.raises(ZeroDivisionError):
        w.submit(lambda: 1 / 0).result(5)
    assert w.submit(lambda: 7).result(5) == 7
    w.stop()


def test_stop_fails_queued_jobs_and_refuses_new_ones():
    w = ModelWorker()
    w.start()
    gate, started = threading.Event(), threading.Event()
    busy = w.submit(lambda: started.set() or gate.wait(5))
    assert started.wait(5)
    queued = w.submit(lambda: "never")
    stopper = threading.Thread(target=w.stop)
    stopper.start()
    gate.set()
    stopper.join(5)
    assert busy.result(5) is True
    with pytest.raises(WorkerStopped):
        queued.result(5)
    with pytest.raises(WorkerStopped, match="not running"):
        w.submit(lambda: 1)
    with pytest.raises(TypeError, match="fn must be callable"):
        ModelWorker().submit(3)
