"""Compare two pyperf result files: "faster", "slower" or "no change" per benchmark.

    python -m bench.compare OLD.json NEW.json [--min-effect 0.05] [--alpha 0.01]

A change is flagged only when it is both statistically significant (two-sided Mann-Whitney U
test on the two sets of values, normal approximation with tie correction, p < alpha) *and*
larger than a minimum effect (the ratio of medians differs from 1 by at least
``min_effect``, default 5%). Either alone is not enough: with many values a 0.5% shift is
"significant" but not worth reporting, and with few values a 10% difference can be noise.
Comparing a result with itself, or two runs of the same code, comes back "no change".

Exit status: 0 when nothing got slower, 1 when any benchmark is slower, 2 on bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Verdict:
    """One benchmark's comparison. ``ratio`` = new median / old median (time: < 1 is faster)."""

    name: str
    verdict: str  # "faster", "slower" or "no change"
    ratio: float
    p_value: float
    old_median: float
    new_median: float
    n_old: int
    n_new: int


def mann_whitney_p(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided p-value of the Mann-Whitney U test (normal approximation, tie-corrected)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples need at least one value")
    both = np.concatenate([x, y])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both), dtype=np.float64)
    sorted_vals = both[order]
    # Average ranks over ties.
    i = 0
    tie_term = 0.0
    while i < len(both):
        j = i
        while j + 1 < len(both) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        t = j - i + 1
        tie_term += t**3 - t
        i = j + 1
    u1 = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0
    mu = n1 * n2 / 2.0
    n = n1 + n2
    var = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return 1.0
    z = (abs(u1 - mu) - 0.5) / math.sqrt(var)  # continuity correction
    z = max(z, 0.0)
    return math.erfc(z / math.sqrt(2.0))


def compare_values(
    name: str,
    old: list[float] | np.ndarray,
    new: list[float] | np.ndarray,
    min_effect: float = 0.05,
    alpha: float = 0.01,
) -> Verdict:
    """Judge one benchmark from its two sets of timings (seconds; lower is better)."""
    if not 0 <= min_effect < 1:
        raise ValueError(f"min_effect must be in [0, 1), got {min_effect!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    old = np.asarray(old, dtype=np.float64)
    new = np.asarray(new, dtype=np.float64)
    if len(old) < 2 or len(new) < 2:
        raise ValueError(f"{name}: need at least 2 values on each side, got {len(old)}, {len(new)}")
    mo, mn = float(np.median(old)), float(np.median(new))
    ratio = mn / mo
    p = mann_whitney_p(old, new)
    verdict = "no change"
    if p < alpha and abs(ratio - 1.0) >= min_effect:
        verdict = "slower" if ratio > 1 else "faster"
    return Verdict(name, verdict, ratio, p, mo, mn, len(old), len(new))


def load_suite_values(path: str | Path) -> dict[str, list[float]]:
    """Benchmark name -> all its values (seconds) from a pyperf JSON file."""
    import pyperf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pyperf result file {str(path)!r} does not exist")
    try:
        suite = pyperf.BenchmarkSuite.load(str(path))
    except Exception as e:  # pyperf raises assorted errors on a bad file
        raise ValueError(f"{str(path)!r} is not a pyperf result file: {e}") from None
    return {b.get_name(): list(b.get_values()) for b in suite.get_benchmarks()}


def compare_files(
    old_path: str | Path, new_path: str | Path, min_effect: float = 0.05, alpha: float = 0.01
) -> tuple[list[Verdict], list[str], list[str]]:
    """Compare every benchmark present in both files.

    Returns:
        ``(verdicts, only_old, only_new)``: verdicts in the old file's order, and the names
        present in just one file.
    """
    old = load_suite_values(old_path)
    new = load_suite_values(new_path)
    verdicts = [compare_values(n, old[n], new[n], min_effect, alpha) for n in old if n in new]
    return verdicts, [n for n in old if n not in new], [n for n in new if n not in old]


def _print_table(verdicts: list[Verdict], only_old: list[str], only_new: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from ryzen_opt.timing import format_seconds

    table = Table(title="bench.compare (ratio = new/old time; change needs p < alpha and effect)")
    for col in ("benchmark", "old", "new", "new/old", "p", "verdict"):
        table.add_column(col, justify="left" if col in ("benchmark", "verdict") else "right")
    style = {"faster": "green", "slower": "red", "no change": ""}
    for v in verdicts:
        table.add_row(
            v.name,
            format_seconds(v.old_median),
            format_seconds(v.new_median),
            f"{v.ratio:.3f}",
            f"{v.p_value:.2g}",
            f"[{style[v.verdict]}]{v.verdict}[/]" if style[v.verdict] else v.verdict,
        )
    console = Console()
    console.print(table)
    for n in only_old:
        console.print(f"only in OLD: {n}")
    for n in only_new:
        console.print(f"only in NEW: {n}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument(
        "--min-effect",
        type=float,
        default=0.05,
        help="smallest relative change reported (default 0.05 = 5%%)",
    )
    ap.add_argument("--alpha", type=float, default=0.01, help="significance level (default 0.01)")
    args = ap.parse_args(argv)
    try:
        verdicts, only_old, only_new = compare_files(
            args.old, args.new, args.min_effect, args.alpha
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_table(verdicts, only_old, only_new)
    return 1 if any(v.verdict == "slower" for v in verdicts) else 0


if __name__ == "__main__":
    raise SystemExit(main())
