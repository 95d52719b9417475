"""CUTLASS Hopper GEMMs beside cuBLAS and the library's Triton matmul (GPU only, a probe).

    python bench/gpu/cutlass_probe.py [--cutlass DIR] [--only fused,linear,square]

Why: the two matmul goals still open on the H200 (bf16 4096^3 at >= 1.0x cuBLAS; matmul +
bias + GELU at >= 1.1x ``addmm`` + ``gelu``) need schedules Triton 3.6 does not generate for
sm_90: ping-pong consumer warp groups (one's epilogue overlapping the other's MMAs) and a
stream-K split of the tail wave. CUTLASS's collective builders instantiate exactly those, so
this probe measures what they are worth on our shapes before anything is built on them.

``bench/gpu/cutlass/*.cu`` (one tile/schedule a file, on the library's
``ryzen_opt/kernels/cutlass/csrc/linear_sm90.cuh``) are compiled with
``nvcc`` for ``sm_90a`` in parallel and linked into one shared library, loaded with ctypes.
CUTLASS's headers come from ``--cutlass``, ``$CUTLASS_DIR`` or the ``nvidia-cutlass`` wheel
in ``.whl/`` (unpacked under ``bench/gpu/cutlass/build/``). Every candidate is checked against
the fp32 product first (a wrong one is reported and not timed), then all candidates of a case
are timed in interleaved rounds on the same inputs (``ryzen_opt.timing.time_interleaved``,
CUDA events). Writes ``cutlass_probe.json`` and prints a table; ratios are baseline time /
candidate time (> 1: faster than the baseline).
"""

import argparse
import ctypes
import glob
import json
import os
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
import torch.nn.functional as F

from bench.common import environment
from ryzen_opt.kernels.cutlass import _build
from ryzen_opt.kernels.cutlass import matmul as cm
from ryzen_opt.kernels.triton import matmul as tm
from ryzen_opt.timing import time_interleaved

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "cutlass")
BUILD = os.path.join(SRC, "build")
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.environ.get("OUT", ".")
REPEAT = int(os.environ.get("CUTLASS_PROBE_REPEAT", "15"))
# The library's schedule, also timed with the persistent scheduler's tile swizzle at 2, 4, 8.
SWIZZLED = ("pp128x128c21", "pp128x128c21_kn")
# CUTLASS_PROBE_HOST=1: also the host time of one call of each candidate (see host_us).
HOST = os.environ.get("CUTLASS_PROBE_HOST") == "1"
# CUTLASS_PROBE_VARIANTS=a,b: build and time only these variant files.
ONLY_VARIANTS = [v for v in os.environ.get("CUTLASS_PROBE_VARIANTS", "").split(",") if v]
SWIZZLES = (2, 4, 8)
# Relative Frobenius error above this against the fp32 product: reported as wrong, not timed.
MAX_ERR = 2e-2
_SIGNATURES = {
    "run": (
        [ctypes.c_int]
        + [ctypes.c_void_p] * 4
        + [ctypes.c_int] * 3
        + [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p],
        ctypes.c_int,
    ),
    "workspace": ([ctypes.c_int] * 5, ctypes.c_size_t),
}
_ERRORS = {
    1: "cannot implement",
    2: "workspace too small",
    3: "initialize failed",
    4: "launch failed",
}


def cutlass_include(arg: str | None) -> list[str]:
    """Include directories of CUTLASS (``include`` and ``tools/util/include``)."""
    root = arg or os.environ.get("CUTLASS_DIR")
    if not root:
        wheels = sorted(glob.glob(os.path.join(REPO, ".whl", "nvidia_cutlass-*.whl")))
        if not wheels:
            sys.exit(
                "no CUTLASS: pass --cutlass DIR, set CUTLASS_DIR, or put the nvidia-cutlass "
                "wheel in .whl/ (pip download nvidia-cutlass --no-deps -d .whl)"
            )
        root = os.path.join(BUILD, "cutlass")
        if not os.path.isdir(root):
            with zipfile.ZipFile(wheels[-1]) as z:
                z.extractall(root)
        root = os.path.join(root, "cutlass_library", "source")
    dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    for d in dirs:
        if not os.path.isdir(d):
            sys.exit(f"CUTLASS include directory {d} not found")
    return dirs


def build(includes: list[str]) -> tuple[str, list[str]]:
    """Compile every variant in parallel and link them; returns the library and the names."""
    nvcc = _build.find_nvcc()
    if nvcc is None:
        sys.exit(f"cannot build: {_build.toolchain_reason()}")
    os.makedirs(BUILD, exist_ok=True)
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(SRC, "*.cu")))
    names = [n for n in names if not ONLY_VARIANTS or n in ONLY_VARIANTS]
    # The library's flags, compiling objects (linked into one library below).
    flags = [f for f in _build.FLAGS if f != "-shared"]
    flags += [f"-I{d}" for d in (*includes, _build.CSRC)]

    def compile_one(name):
        t0 = time.time()
        obj = os.path.join(BUILD, name + ".o")
        p = subprocess.run(
            [nvcc, *flags, "-c", os.path.join(SRC, name + ".cu"), "-o", obj],
            capture_output=True,
            text=True,
        )
        return name, p.returncode, p.stderr[-3000:], time.time() - t0

    ok = []
    with ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1))) as pool:
        for name, rc, err, dt in pool.map(compile_one, names):
            print(f"build {name}: rc {rc} in {dt:.0f} s", flush=True)
            if rc == 0:
                ok.append(name)
            else:
                print(err, flush=True)
    lib = os.path.join(BUILD, "libcutlass_probe.so")
    objs = [os.path.join(BUILD, n + ".o") for n in ok]
    subprocess.run([nvcc, "-shared", "-o", lib, *objs], check=True)
    return lib, ok


class Variant:
    """One CUTLASS kernel family from the library: ``call(x, w, bias, fused)``."""

    def __init__(self, lib, name):
        self.name = name
        self._run = getattr(lib, name + "_run")
        self._ws = getattr(lib, name + "_workspace")
        for fn, key in ((self._run, "run"), (self._ws, "workspace")):
            fn.argtypes, fn.restype = _SIGNATURES[key]
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count
        self.kn = name.endswith("_kn")

    def bind(self, x, w, bias, fused, swizzle=1):
        """A callable without arguments: out = [gelu](x @ w^T [+ bias]) (x @ w for _kn)."""
        m, k = x.shape
        n = w.shape[1] if self.kn else w.shape[0]
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
        size = self._ws(int(fused), m, n, k, self.sms)
        ws = torch.empty(max(size, 1), device=x.device, dtype=torch.uint8)
        ptr_bias = bias.data_ptr() if bias is not None else None

        def call():
            rc = self._run(
                int(fused),
                x.data_ptr(),
                w.data_ptr(),
                ptr_bias,
                out.data_ptr(),
                m,
                n,
                k,
                ws.data_ptr(),
                ws.numel(),
                self.sms,
                torch.cuda.current_stream().cuda_stream,
                swizzle,
            )
            if rc:
                raise RuntimeError(f"{self.name}: {_ERRORS.get(rc, rc)}")
            return out

        return call


def _bare(x, w, bias):
    """The library's nk GELU kernel called with its arguments prepared once (no Python checks):
    the kernel's own speed, for telling it apart from the per-call Python cost."""
    kern = _build.kernel("nk", "gelu")
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    size = kern.workspace(m, n, k, sms)
    ws = torch.empty(max(size, 1), device=x.device, dtype=torch.uint8)
    swz = 8 if m * n >= cm.SWIZZLE_FROM else 1
    stream = torch.cuda.current_stream().cuda_stream
    args = (x.data_ptr(), w.data_ptr(), bias.data_ptr(), out.data_ptr(), m, n, k,
            ws.data_ptr(), ws.numel(), sms, stream, swz)  # fmt: skip

    def call():
        if kern.run(*args):
            raise RuntimeError("bare cutlass call failed")
        return out

    return call


def host_us(fn, calls=60):
    """Median host time of one call in microseconds, with the GPU queue kept busy (the calls
    only enqueue work, so this is the Python + launch cost a caller pays per call)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e6


def _addmm_gelu(bias, x, wt):
    return F.gelu(torch.addmm(bias, x, wt))


def rel_err(y, ref):
    return float((y.float() - ref).norm() / ref.norm())


def run_case(label, flops, ref, cands, baseline, rows):
    """Check every candidate against ``ref``, time the right ones interleaved, print."""
    timed, errors = {}, {}
    for name, fn in cands.items():
        try:
            e = rel_err(fn(), ref)
        except Exception as exc:  # a variant that cannot run this shape: reported, not timed
            print(f"{label} | {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        errors[name] = e
        if e <= MAX_ERR:
            timed[name] = fn
        else:
            print(f"{label} | {name}: wrong, relative error {e:.2e}", flush=True)
    torch.cuda.synchronize()
    host = {name: host_us(fn) for name, fn in timed.items()} if HOST else {}
    res = time_interleaved(timed, repeat=REPEAT, warmup=3, device="cuda")
    base = res[baseline].median
    for name, t in res.items():
        row = {
            "case": label,
            "candidate": name,
            "ms": t.median * 1e3,
            "iqr_ms": t.iqr * 1e3,
            "TFLOPs": flops / t.median / 1e12,
            "x_baseline": base / t.median,
            "rel_error": errors[name],
            "baseline": baseline,
            "host_us": host.get(name),
        }
        rows.append(row)
        print(
            f"{label} | {name:38s} | {row['ms']:.3f} ms | {row['TFLOPs']:.0f} TFLOP/s | "
            f"{row['x_baseline']:.3f}x | err {row['rel_error']:.1e}"
            + (f" | host {row['host_us']:.0f} us" if HOST else ""),
            flush=True,
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cutlass", help="CUTLASS source root (with include/ and tools/)")
    ap.add_argument("--only", default="fused,linear,square")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cutlass_probe needs a CUDA GPU")
    major, _ = torch.cuda.get_device_capability()
    if major != 9:
        sys.exit("cutlass_probe builds sm_90a kernels: Hopper only")
    t0 = time.time()
    lib_path, names = build(cutlass_include(args.cutlass))
    print(f"built {len(names)} variants in {time.time() - t0:.0f} s", flush=True)
    lib = ctypes.CDLL(lib_path)
    variants = [Variant(lib, n) for n in names]
    library = cm.available()  # the library's own CUTLASS path, timed beside the variants
    print(f"ryzen_opt cutlass backend: {library or 'available'}", flush=True)
    only = set(args.only.split(","))
    dt = torch.bfloat16
    torch.manual_seed(0)
    rows = []
    if "fused" in only:
        # matmul + bias + GELU (erf), bench.triton_kernels' fused cases, nn.Linear layout.
        for m, k, n in ((8192, 4096, 16384), (8192, 1024, 8192)):
            x = torch.randn(m, k, device="cuda", dtype=dt)
            w = torch.randn(n, k, device="cuda", dtype=dt) * 0.02
            bias = torch.randn(n, device="cuda", dtype=dt)
            wt = w.t()
            ref = F.gelu(torch.addmm(bias.float(), x.float(), wt.float()))
            cands = {
                "torch.addmm + F.gelu": partial(_addmm_gelu, bias, x, wt),
                "torch._addmm_activation (cuBLASLt, tanh GELU)": partial(
                    torch._addmm_activation, bias, x, wt, use_gelu=True
                ),
                "triton (library)": partial(tm.matmul, x, wt, bias=bias, activation="gelu"),
            }
            for v in variants:
                if not v.kn:
                    cands[f"cutlass {v.name}"] = v.bind(x, w, bias, True)
                    for swz in SWIZZLES if v.name in SWIZZLED else ():
                        cands[f"cutlass {v.name} swizzle {swz}"] = v.bind(x, w, bias, True, swz)
            if library is None:
                cands["ryzen_opt cutlass backend"] = partial(
                    cm.matmul, x, wt, bias=bias, activation="gelu"
                )
                cands["ryzen_opt cutlass kernel, bare ctypes call"] = _bare(x, w, bias)
            run_case(
                f"x@w.t()+bias, gelu {m}x{k}->{n}",
                2 * m * n * k,
                ref,
                cands,
                "torch.addmm + F.gelu",
                rows,
            )
            del ref
    for mode in ("linear", "square"):
        if mode not in only:
            continue
        for s in (4096, 8192):
            x = torch.randn(s, s, device="cuda", dtype=dt)
            w = torch.randn(s, s, device="cuda", dtype=dt)
            if mode == "linear":  # x @ w.t(), w (N, K): the nn.Linear layout
                ref = x.float() @ w.float().t()
                cands = {
                    "cuBLAS": lambda x=x, w=w: x @ w.t(),
                    "triton (library)": lambda x=x, w=w: tm.matmul(x, w.t()),
                }
                pick = [v for v in variants if not v.kn]
            else:  # a @ b, b (K, N) contiguous: bench.triton_kernels' square case
                ref = x.float() @ w.float()
                cands = {
                    "cuBLAS": lambda x=x, w=w: x @ w,
                    "triton (library)": lambda x=x, w=w: tm.matmul(x, w),
                }
                pick = [v for v in variants if v.kn]
            for v in pick:
                cands[f"cutlass {v.name}"] = v.bind(x, w, None, False)
                for swz in SWIZZLES if v.name in SWIZZLED else ():
                    cands[f"cutlass {v.name} swizzle {swz}"] = v.bind(x, w, None, False, swz)
            if library is None:
                b = w.t() if mode == "linear" else w
                cands["ryzen_opt cutlass backend"] = partial(cm.matmul, x, b)
            run_case(f"{mode} {s}^3", 2 * s**3, ref, cands, "cuBLAS", rows)
            del ref
    env = environment("cuda")
    with open(os.path.join(OUT, "cutlass_probe.json"), "w") as f:
        json.dump(
            {
                "command": "python bench/gpu/cutlass_probe.py " + " ".join(sys.argv[1:]),
                "environment": env,
                "device": torch.cuda.get_device_name(),
                "repeat": REPEAT,
                "variants": names,
                "rows": rows,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
