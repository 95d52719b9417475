"""The instant-adapter goals computed from ``bench.instant_adapters``' accuracy table.

Per seen task: Text-to-LoRA (reconstruction, from a training paraphrase) and the SVF expert
(oracle) as a fraction of the trained LoRA's accuracy (the goals: >= 95% and >= 90%), and the
share of the LoRA's gain over the base model each recovers, ``(x - base) / (LoRA - base)``:
where the base already solves a task, a ratio of accuracies says little, and the share says
what the adapter added. Per held-out task: Text-to-LoRA from the held-out description minus
the base model and minus the nearest library LoRA, with the standard error of the difference
(the two standard errors combined as if independent: the problems are the same for every
method, so this overstates the error of a paired difference).

Example:
    >>> head, rows, data = goal_rows({"add2": {"base": 0.5, "LoRA (trained)": 1.0,
    ...     "T2L recon, train desc": 1.0, "SVF oracle": 0.75}}, 100, {"add2"})
    >>> data["seen"]["add2"]["SVF oracle"]["share_of_gain"]
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Mapping

SEEN_METHODS = ("T2L recon, train desc", "SVF oracle")
HELD_METHODS = ("T2L recon, held-out desc", "T2L SFT, held-out desc")


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def _frac(x: float, ref: float) -> float | None:
    return None if ref <= 0 else x / ref


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:+.3f}"


def goal_rows(
    acc: Mapping[str, Mapping[str, float | None]], n: int, seen: set[str]
) -> tuple[list[str], list[list[str]], dict]:
    """Rows of the goals table, and the same figures as a dict for the JSON."""
    data: dict = {"seen": {}, "held_out": {}}
    rows: list[list[str]] = []
    sums = {m: [0.0, 0.0, 0.0] for m in SEEN_METHODS}  # the method's, the LoRA's, the base's
    for task, row in acc.items():
        if task not in seen or row.get("LoRA (trained)") is None:
            continue
        base, lora = row["base"], row["LoRA (trained)"]
        d = {}
        for m in SEEN_METHODS:
            x = row.get(m)
            if x is None:
                continue
            d[m] = {
                "of_lora": _frac(x, lora),
                "share_of_gain": None if lora - base <= 0 else (x - base) / (lora - base),
            }
            sums[m] = [sums[m][0] + x, sums[m][1] + lora, sums[m][2] + base]
            rows.append([task, m, f"{x:.3f}", f"{lora:.3f}", f"{base:.3f}",
                         _fmt(d[m]["of_lora"]), _fmt(d[m]["share_of_gain"])])  # fmt: skip
        data["seen"][task] = d
    summed = data["seen"]["summed"] = {}
    for m in SEEN_METHODS:
        x, lora, base = sums[m]
        share = None if lora - base <= 0 else (x - base) / (lora - base)
        summed[m] = {"of_lora": _frac(x, lora), "share_of_gain": share}
        rows.append(["summed (seen)", m, f"{x:.3f}", f"{lora:.3f}", f"{base:.3f}",
                     _fmt(_frac(x, lora)), _fmt(share)])  # fmt: skip
    for task, row in acc.items():
        if task in seen:
            continue
        base, near = row["base"], row.get("nearest library LoRA")
        d = {}
        for m in HELD_METHODS:
            x = row.get(m)
            if x is None:
                continue
            d[m] = {"minus_base": x - base, "se_vs_base": math.hypot(_se(x, n), _se(base, n))}
            cells = [f"{x - base:+.3f} ± {d[m]['se_vs_base']:.3f}"]
            if near is not None:
                d[m]["minus_nearest"] = x - near
                d[m]["se_vs_nearest"] = math.hypot(_se(x, n), _se(near, n))
                cells.append(f"{x - near:+.3f} ± {d[m]['se_vs_nearest']:.3f}")
            else:
                cells.append("-")
            rows.append([task, m, f"{x:.3f}", "vs base: " + cells[0], f"{base:.3f}",
                         "vs nearest: " + cells[1], "-"])  # fmt: skip
        data["held_out"][task] = d
    head = ["task", "method", "accuracy", "LoRA (or difference)", "base", "of LoRA",
            "share of gain"]  # fmt: skip
    return head, rows, data
