"""``OptimizeConfig``: the validated settings of :class:`ryzen_opt.KernelOptimizer`."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ryzen_opt.kernels.reference import TOLERANCE

# DESIGN.md, rule 2: relative error ||out - ref|| / ||ref|| allowed for a kernel that may
# reorder the reduction (fp32) or accumulates in a wider type than it stores (bf16/fp16).
DEFAULT_TOLERANCE = {str(dt).removeprefix("torch."): tol for dt, tol in TOLERANCE.items()}

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: Any, name: str = "dtype") -> torch.dtype | None:
    """``None``, a floating ``torch.dtype`` or one of its names; raise naming ``name``."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES.values():
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    raise ValueError(
        f"{name} must be a torch.dtype or one of {sorted(_DTYPE_NAMES)}, got {dtype!r}"
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# The synthetic prefill (OptimizeConfig.prefill_shape_for): 16 x 128 where that is cheap; on
# the CPU at most this many token-parameters (8e9: a 0.5B model gets 16 tokens, GPT-2 small
# 64, the 1.6M-parameter seed model keeps 16 x 128), never under 1 x 16 tokens; its logits at
# most an eighth of the weight bytes, or 64 MiB where that is more (small models keep theirs).
DEFAULT_PREFILL_SHAPE = (16, 128)
CPU_PREFILL_WORK = 8e9
MIN_PREFILL_SEQ = 16
MAX_LOGIT_SHARE = 0.125
MIN_LOGIT_BOUND = 64 * 2**20


def default_cache_dir() -> Path:
    """``$RYZEN_OPT_CACHE_DIR`` if set, else ``~/.cache/ryzen_opt``."""
    env = os.environ.get("RYZEN_OPT_CACHE_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/ryzen_opt").expanduser()


@dataclass
class OptimizeConfig:
    """Settings of :class:`ryzen_opt.KernelOptimizer` / :func:`ryzen_opt.optimize`.

    Args:
        backends: backend names allowed to replace an op (``None``: every registered one).
        ops: which kinds of site to consider: ``"linear"``, ``"layer_norm"``, ``"attention"``.
        tolerance: relative error allowed per dtype name (``"float32"``, ...).
        tf32_tolerance: fp32 tolerance on CUDA when TF32 matmuls are enabled.
        repeat: timing samples per side in each baseline/candidate comparison.
        warmup: untimed calls per side before timing (JIT compilation, autotuning).
        min_sample_s: each timing sample lasts at least this long.
        min_speedup: the measured median speed-up must also reach this.
        confidence: level of the bootstrap interval on the speed-up.
        model_check: compare the whole optimized model against the original (outputs and
            end-to-end time) and return the original if it is wrong or slower.
        cache_dir: where timing decisions are cached (``None``: ``$RYZEN_OPT_CACHE_DIR`` or
            ``~/.cache/ryzen_opt``).
        use_cache: read and write the decision cache.
        prefill_shape: ``(batch, seq)`` of the synthetic prefill when no example input is given
            (``None``: sized to the model by :meth:`prefill_shape_for`: 16 x 128 where that
            is cheap, fewer tokens for a large model on the CPU).
        decode_batches: batch sizes of the synthetic one-token decode steps.
        fast_paths: model-level fast paths to try (``None``: every default one that runs on
            the model's device; ``()``: none). ``SimpleTransformerModel``:
            ``numba_fused_decode[serial]``, ``numba_fused_decode[pool]`` (CPU),
            ``cuda_graph_decode``, ``triton_graph_decode``, ``cuda_graph_prefill`` (CUDA).
            Hugging Face decoders (Llama/Qwen2/Mistral, GPT-2): ``torch_static_decode``,
            ``numba_decoder[fp32]`` (CPU), ``cuda_graph_decode``, ``triton_graph_decode``
            (CUDA), and the opt-in ``numba_decoder[int8]`` / ``numba_decoder[bf16]`` (weights
            in int8 or bfloat16: not numerically equal, so they are tried only when named
            here; their error is reported).
        decode_tokens: greedy tokens each decode path is checked over (step by step against
            the original) when choosing a Hugging Face decoder's decode path.
        decode_timed_tokens: greedy tokens of each timed ``generate`` call of that choice
            (``None``: ``decode_tokens`` on a CPU, twice as many on a GPU, so the decode loop
            and not the prefill dominates what is compared).
        lossy_tolerance: relative logit error allowed for an opt-in lossy decode path
            (``numba_decoder[int8]``, ``numba_decoder[bf16]``), which cannot meet the dtype
            tolerance by design.
        time_budget_s: the seconds ``optimize()`` may spend measuring: a measurement (a
            decode path at one batch size, a group of identical sites, the whole-model
            check) starts only when its estimated cost fits in what is left, with the
            whole-model check's share set aside for it; what is not measured keeps the
            original code and the report names it (``None``: no bound). Finding the sites
            and capturing their inputs (a few forward passes) is not bounded.
        progress: show a progress bar (``None``: only when standard error is a terminal).

    Example:
        >>> from ryzen_opt import OptimizeConfig
        >>> OptimizeConfig(backends=("numba",), repeat=10).to_dict()["repeat"]
        10
    """

    # None = every backend the registry knows; a name that is not registered is an error at
    # optimize() time (it names the registered ones), so a typo does not silently do nothing.
    backends: tuple[str, ...] | None = None
    ops: tuple[str, ...] = ("linear", "layer_norm", "attention")
    # DESIGN.md rule 2 tolerances (reordered fp32 kernels 1e-4; bf16/fp16 1e-2).
    tolerance: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    # DESIGN.md: fp32 through TF32 tensor cores; used only where the caller already enabled
    # TF32 (torch.backends.cuda.matmul.allow_tf32), so the original runs in TF32 as well.
    tf32_tolerance: float = 1e-3
    # 20 interleaved samples per side: the bootstrap CI of a 5% effect is then about +-2% on a
    # quiet machine; fewer samples widen it until real wins are rejected as noise.
    repeat: int = 20
    # JIT backends (Numba, Triton) compile on the first call; 3 calls also settle the allocator.
    warmup: int = 3
    # 2 ms per sample keeps timer resolution and Python dispatch jitter small against it.
    min_sample_s: float = 2e-3
    # A margin on top of "CI above 1": a borderline kernel is not worth a swap no one notices.
    min_speedup: float = 1.05
    confidence: float = 0.95
    # A per-site win that does not survive in the whole model must not be shipped.
    model_check: bool = True
    cache_dir: str | Path | None = None
    use_cache: bool = True
    # Typical serving shapes: a 16 x 128 prefill and decode at batch 1 (chat) and 16 (batched);
    # None sizes the prefill to the model (prefill_shape_for): every measurement and the
    # whole-model check run it dozens of times, 16 s a call for a 0.5B model on 2 cores.
    prefill_shape: tuple[int, int] | None = None
    decode_batches: tuple[int, ...] = (1, 16)
    fast_paths: tuple[str, ...] | None = None
    # Long enough that the decode loop, not the prefill, dominates what is timed (eager HF
    # decode costs 10+ ms a token on a GPU, 90 ms for a 0.5B model on 2 CPU cores); short
    # enough that the original's batch-16 turn stays near a second or two on 2 cores.
    decode_tokens: int = 8
    # The generate call timed when choosing a decode path: None times decode_tokens on a CPU
    # and twice as many on a GPU, where a fused token costs about a millisecond and 8 tokens
    # leave the prefill (once a call) deciding between two decode loops: GPT-2 at batch 16
    # on an H200 measured its Triton and CUDA-graph loops at 12.8 and 13.8 ms (2.98x and
    # 3.04x eager) over 8 tokens, and the one chosen then decoded 128 tokens at half the
    # other's rate (0.6 against 1.2 ms a step). Twice, not more: every comparison also runs
    # the original's eager generate (~12 ms a token for a 1.2B Llama), which is most of
    # what optimize() spends on a GPU.
    decode_timed_tokens: int | None = None
    # The bound on an opt-in lossy path's relative logit error (weight-only int8 measured
    # 0.9-1.2% on small Llama/Qwen2/GPT-2 configs): numerically different by design, so it
    # is held to this instead of the dtype tolerance, and its error is in the report.
    lossy_tolerance: float = 2e-2
    # A bound, not a target: the seed model optimizes in well under a minute on 2 cores; a
    # 0.5B-parameter decoder (Qwen2-0.5B's shape) gets its decode loop chosen within it on 2
    # cores, and everything in seconds on a GPU. Unbounded, that model once took 15 minutes.
    time_budget_s: float | None = 60.0
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.backends is not None:
            if isinstance(self.backends, str) or not all(
                isinstance(b, str) and b for b in self.backends
            ):
                raise ValueError(
                    f"backends must be None or a sequence of backend names, got {self.backends!r}"
                )
            self.backends = tuple(self.backends)
        known_ops = ("linear", "layer_norm", "attention")
        if isinstance(self.ops, str) or any(o not in known_ops for o in self.ops):
            raise ValueError(f"ops must be a sequence drawn from {known_ops}, got {self.ops!r}")
        self.ops = tuple(self.ops)
        if not isinstance(self.tolerance, dict):
            raise ValueError(
                f"tolerance must be a dict of dtype name -> float, got {self.tolerance!r}"
            )
        tol = dict(DEFAULT_TOLERANCE)
        for k, v in self.tolerance.items():
            key = dtype_name(parse_dtype(k, "tolerance key"))
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ValueError(f"tolerance[{k!r}] must be a float in (0, 1), got {v!r}")
            tol[key] = float(v)
        self.tolerance = tol
        t = self.tf32_tolerance
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1:
            raise ValueError(f"tf32_tolerance must be a float in (0, 1), got {t!r}")
        for name, lo in (("repeat", 3), ("warmup", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not isinstance(self.min_sample_s, (int, float)) or not 0 < self.min_sample_s <= 1:
            raise ValueError(f"min_sample_s must be in (0, 1] seconds, got {self.min_sample_s!r}")
        if not isinstance(self.min_speedup, (int, float)) or self.min_speedup < 1.0:
            raise ValueError(f"min_speedup must be a number >= 1.0, got {self.min_speedup!r}")
        if not isinstance(self.confidence, float) or not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be a float in (0, 1), got {self.confidence!r}")
        for name in ("model_check", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, Path)):
            raise ValueError(f"cache_dir must be None, a str or a Path, got {self.cache_dir!r}")
        p = self.prefill_shape
        if p is not None:
            if (
                not isinstance(p, (tuple, list))
                or len(p) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in p)
            ):
                raise ValueError(
                    f"prefill_shape must be None or (batch, seq) positive ints, got {p!r}"
                )
            self.prefill_shape = (int(p[0]), int(p[1]))
        d = self.decode_batches
        if isinstance(d, (str, bytes)) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in d
        ):
            raise ValueError(f"decode_batches must be positive ints, got {d!r}")
        self.decode_batches = tuple(d)
        lt = self.lossy_tolerance
        if isinstance(lt, bool) or not isinstance(lt, (int, float)) or not 0 < lt < 1:
            raise ValueError(f"lossy_tolerance must be a float in (0, 1), got {lt!r}")
        n = self.decode_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"decode_tokens must be an int >= 2, got {n!r}")
        t = self.decode_timed_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 2):
            raise ValueError(f"decode_timed_tokens must be None or an int >= 2, got {t!r}")
        b = self.time_budget_s
        if b is not None and (
            isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < math.inf
        ):
            raise ValueError(f"time_budget_s must be None or a number > 0 seconds, got {b!r}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ValueError(f"progress must be None or a bool, got {self.progress!r}")
        if self.fast_paths is not None:
            from ryzen_opt.optimization.fastpaths import FAST_PATHS
            from ryzen_opt.optimization.fastpaths.decoder import DECODER_PATHS

            known = tuple(dict.fromkeys(FAST_PATHS + DECODER_PATHS))
            f = self.fast_paths
            if isinstance(f, str) or any(x not in known for x in f):
                raise ValueError(f"fast_paths must be None or drawn from {known}, got {f!r}")
            self.fast_paths = tuple(f)

    @property
    def resolved_cache_dir(self) -> Path:
        """The cache directory in use (``cache_dir`` or the default)."""
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def prefill_shape_for(
        self,
        params: int,
        device: torch.device,
        logit_row_bytes: int = 0,
        last_logits_only: bool = True,
        weight_bytes: int = 0,
    ) -> tuple[int, int]:
        """The synthetic prefill's ``(batch, seq)`` for a model of ``params`` parameters.

        ``prefill_shape`` when set; else :data:`DEFAULT_PREFILL_SHAPE` (16 x 128), with the
        batch halved, then the length, down to 1 x :data:`MIN_PREFILL_SEQ`, while

        * on the CPU, ``tokens x params`` exceeds :data:`CPU_PREFILL_WORK` (a prefill is
          run some 50 times by the whole-model check alone: 16 x 128 tokens of a
          0.5B-parameter model take 5-16 s a call on 2 cores, 16 tokens 0.1-0.3 s);
        * its logits (``logit_row_bytes`` a row: one row per sequence when the model returns
          the last position's only, else one per token) exceed :data:`MAX_LOGIT_SHARE` of
          the weights' ``weight_bytes`` and :data:`MIN_LOGIT_BOUND`.

        A small model (the seed model, the test configurations) keeps 16 x 128.
        """
        if self.prefill_shape is not None:
            return self.prefill_shape
        b, t = DEFAULT_PREFILL_SHAPE

        def too_big(b: int, t: int) -> bool:
            if device.type == "cpu" and b * t * params > CPU_PREFILL_WORK:
                return True
            rows = b if last_logits_only else b * t
            return rows * logit_row_bytes > max(MAX_LOGIT_SHARE * weight_bytes, MIN_LOGIT_BOUND)

        while b > 1 and too_big(b, t):
            b //= 2
        while t > MIN_PREFILL_SEQ and too_big(b, t):
            t //= 2
        return b, t

    def tolerance_for(self, dtype: torch.dtype, device: torch.device | None = None) -> float:
        """The relative error allowed for outputs of ``dtype`` (TF32-aware on CUDA)."""
        tol = self.tolerance.get(dtype_name(dtype), DEFAULT_TOLERANCE["float32"])
        if (
            dtype == torch.float32
            and device is not None
            and device.type == "cuda"
            and torch.backends.cuda.matmul.allow_tf32
        ):
            tol = max(tol, self.tf32_tolerance)
        return tol

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view (for the report)."""
        d = dataclasses.asdict(self)
        d["cache_dir"] = str(self.resolved_cache_dir)
        for k in ("backends", "ops", "prefill_shape", "decode_batches", "fast_paths"):
            d[k] = None if d[k] is None else list(d[k])
        return d
