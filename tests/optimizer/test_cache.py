"""The decision cache: unwritable folders, invalid entries, concurrent writers.

Root may write into a chmod 0o555 folder (these tests may run as root), so an unwritable
cache is simulated by a file standing where the folder should be, by ``decisions.json``
being a folder, and by ``os.replace`` raising ``PermissionError``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import warnings

import pytest

from ryzen_opt import optimize
from ryzen_opt.optimization import cache as cache_mod
from ryzen_opt.optimization.cache import DecisionCache
from tests.optimizer.fakes import (
    CountingLauncher,
    fast_config,
    one_thread,
    reference_layer_norm,
    reference_matmul,
    registered,
    tiny_model,
)

GOOD = {"speedup": 1.5, "ci": [1.2, 1.8], "baseline_s": 2e-4, "candidate_s": 1.3e-4, "n": 7}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _optimize_with_cache(cfg):
    with registered("layer_norm", "fake_ln", CountingLauncher(reference_layer_norm)):
        return optimize(tiny_model(), config=cfg)


def _unwritable_by_file(cfg):
    cfg.resolved_cache_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg.resolved_cache_dir.write_text("a file where the cache folder should be")


def _unwritable_by_folder(cfg):
    (cfg.resolved_cache_dir / "decisions.json").mkdir(parents=True)


def _unwritable_by_permission(cfg, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(cache_mod.os, "replace", refuse)


@pytest.mark.parametrize("how", ["path-is-a-file", "decisions-is-a-folder", "read-only"])
def test_unwritable_cache_warns_once_and_still_returns_the_result(how, tmp_path, monkeypatch):
    cfg = fast_config(tmp_path, backends=("fake_ln",), ops=("layer_norm",))
    if how == "path-is-a-file":
        _unwritable_by_file(cfg)
    elif how == "decisions-is-a-folder":
        _unwritable_by_folder(cfg)
    else:
        _unwritable_by_permission(cfg, monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _optimize_with_cache(cfg)
        second = _optimize_with_cache(cfg)
    unsaved = [w for w in caught if "could not be written" in str(w.message)]
    assert len(unsaved) == 1, [str(w.message) for w in caught]  # once, not per call
    for out in (first, second):
        report = out.optimization_report
        assert report.sites and any(
            c.status for s in report.sites for k in s.cases for c in k.candidates
        )
        assert any("could not be written" in n for n in report.notes), report.notes
    leftovers = [p.name for p in tmp_path.rglob("*.tmp")]
    assert leftovers == []


def test_invalid_entries_are_dropped_with_a_warning_and_re_measured(tmp_path):
    cfg = fast_config(tmp_path, backends=("fake_ln",), ops=("layer_norm",))
    _optimize_with_cache(cfg)
    path = cfg.resolved_cache_dir / "decisions.json"
    data = json.loads(path.read_text())
    keys = sorted(data["entries"])
    bad = {"speedup": "fast"}  # used to raise KeyError: 'ci'
    data["entries"][keys[0]] = bad
    data["entries"]["another"] = {**GOOD, "ci": [2.0, 1.0]}
    path.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match="dropped 2 invalid entries"):
        out = _optimize_with_cache(cfg)
    report = out.optimization_report
    assert any("dropped 2 invalid entries" in n for n in report.notes)
    cands = [c for s in report.sites for k in s.cases for c in k.candidates]
    assert any(not c.cached for c in cands) and all(c.speedup is not None for c in cands)
    fixed = json.loads(path.read_text())["entries"]
    assert "another" not in fixed and cache_mod.entry_problem(fixed[keys[0]]) is None


@pytest.mark.parametrize(
    "entry, field",
    [
        ({"speedup": "fast"}, "speedup"),
        ({**GOOD, "speedup": float("nan")}, "speedup"),
        ({**GOOD, "speedup": 0}, "speedup"),
        ({**GOOD, "ci": [1.0]}, "ci"),
        ({**GOOD, "ci": [1.0, float("inf")]}, "ci"),
        ({**GOOD, "baseline_s": -1.0}, "baseline_s"),
        ({**GOOD, "n": True}, "n"),
        ([1, 2], "object"),
    ],
)
def test_entry_problem_names_the_field(entry, field):
    assert field in cache_mod.entry_problem(entry)
    assert cache_mod.entry_problem(GOOD) is None


def test_forged_speedups_are_caught_by_the_whole_model_check(tmp_path):
    # A slow backend recorded as 50x faster: the per-site decision trusts the cache (only
    # timings are cached), the whole-model check times the real thing and reverts it.
    cfg = fast_config(tmp_path, backends=("fake_slow",), ops=("linear",))
    slow = CountingLauncher(reference_matmul, sleep_s=2e-3)
    with registered("matmul", "fake_slow", slow):
        optimize(tiny_model(), config=cfg)
        path = cfg.resolved_cache_dir / "decisions.json"
        data = json.loads(path.read_text())
        forged = {
            "speedup": 50.0,
            "ci": [45.0, 55.0],
            "baseline_s": 1e-3,
            "candidate_s": 2e-5,
            "n": 7,
        }
        data["entries"] = {k: forged for k in data["entries"]}
        path.write_text(json.dumps(data))
        out = optimize(tiny_model(), config=cfg)
    report = out.optimization_report
    cands = [c for s in report.sites for k in s.cases for c in k.candidates]
    assert cands and all(c.cached and c.status == "faster" for c in cands)
    assert not report.changed
    assert any("reverted every swap" in n and "slower" in n for n in report.notes), report.notes


def _writer(directory, tag, barrier, rounds):
    caches = DecisionCache(directory)  # loaded before the other process saved anything
    barrier.wait()
    for i in range(rounds):
        caches.put(f"{tag}-{i}", {**GOOD, "n": i + 1})
        caches.save()


def test_two_processes_saving_at_once_keep_both_sets_of_decisions(tmp_path):
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    barrier = ctx.Barrier(2)
    # Re-read and merge without the lock lost entries in 2 of 3 runs at 10 rounds, 5 of 5 at
    # 40 (measured): the lock is what makes the merge safe.
    rounds = 40
    procs = [
        ctx.Process(target=_writer, args=(tmp_path / "cache", tag, barrier, rounds))
        for tag in ("a", "b")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    entries = json.loads((tmp_path / "cache" / "decisions.json").read_text())["entries"]
    want = {f"{tag}-{i}" for tag in "ab" for i in range(rounds)}
    assert set(entries) == want
    assert not [p for p in os.listdir(tmp_path / "cache") if p.endswith(".tmp")]
