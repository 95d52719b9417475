"""``python -m ryzen_opt.kernels.cutlass [--jobs N] [--only matmul|attention]``: build every
CUTLASS kernel now (the matmul's and every attention schedule's)."""

import argparse
import logging
import sys
import time

from ryzen_opt.kernels.cutlass import _build


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build the CUTLASS sm_90a kernels into the cache.")
    ap.add_argument("--jobs", type=int, default=None, help="parallel nvcc runs (default: all)")
    ap.add_argument("--only", choices=("matmul", "attention"), default=None)
    args = ap.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    reason = _build.toolchain_reason()
    if reason is not None:
        print(f"cannot build: {reason}", file=sys.stderr)
        return 1
    t0 = time.time()
    try:
        built = {}
        if args.only in (None, "matmul"):
            built.update(_build.build(jobs=args.jobs))
        if args.only in (None, "attention"):
            built.update(_build.build_attention(jobs=args.jobs))
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    for name, path in built.items():
        print(f"{name}: {path}")
    print(f"{len(built)} kernels ready in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
