"""``python -m ryzen_opt.kernels.numba [--ops NAME,...]``: compile the Numba kernels into the
disk cache (:func:`ryzen_opt.kernels.numba.warmup`), one line per op with its seconds.

Run it once when a machine or container image is set up, so that ``optimize()``'s time
budget is not spent compiling.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from ryzen_opt.kernels.numba import _OPS, warmup

    ap = argparse.ArgumentParser(
        prog="python -m ryzen_opt.kernels.numba",
        description="Compile the Numba kernels into the disk cache (a cold cache: ~45 s on 2 "
        "cores).",
    )
    ap.add_argument(
        "--ops",
        default=",".join(_OPS),
        help=f"comma-separated, any of {', '.join(_OPS)} (default: all)",
    )
    args = ap.parse_args(argv)
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    unknown = [o for o in ops if o not in _OPS]
    if not ops or unknown:
        ap.error(f"--ops must name ops from {', '.join(_OPS)}; got {args.ops!r}")
    seconds = warmup(ops, progress=True)
    print(f"warmup: {len(ops)} op(s) compiled or loaded in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
