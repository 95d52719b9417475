"""Model-level fast paths: whole-step replacements that ``optimize()`` measures like kernels.

Per-op kernels cannot win where a step is dominated by dispatch: a one-token decode step of
the baseline ``SimpleTransformerModel`` is ~30 small PyTorch ops per layer, each costing more
to launch than to run. The fast paths here replace the whole step:

* :mod:`.cpu`: ``numba_fused_decode[serial]`` / ``numba_fused_decode[pool]``, one Numba
  call per token (and per greedy generation);
* :mod:`.cuda_graph`: ``cuda_graph_decode``, ``triton_graph_decode`` and
  ``cuda_graph_prefill``, the step captured in CUDA graphs;
* :mod:`.layout`: the weight-layout contract the Numba and Triton step kernels read
  (:data:`~.layout.STM_LAYOUT`) and which models it describes (:func:`structure_reason`);
* :mod:`.routing`: the registry of paths by name (:data:`PATHS`), and
  :class:`FastPathTransformer`, which routes an optimized model's served shapes to them;
* :mod:`.decoder_layout`: the same contract for the Hugging Face decoder families, and
  :mod:`.decoder` (steppers over a static cache), :mod:`.generate` (HF's ``generate`` API
  over them) and :mod:`.hf_select` (their measurement through ``generate``).

``optimize()`` treats each path like a kernel candidate: it verifies the logits (two
consecutive decode steps, so the cache writes are checked too) against the model, times it
against the model with the same interleaved comparison, and installs it only where it is
faster beyond the noise.
"""

from ryzen_opt.optimization.fastpaths.cpu import NumbaFusedDecode
from ryzen_opt.optimization.fastpaths.cuda_graph import (
    CudaGraphDecode,
    CudaGraphPrefill,
    TritonGraphDecode,
)
from ryzen_opt.optimization.fastpaths.layout import (
    GLOBAL_PARAMS,
    LAYER_PARAMS,
    STM_LAYOUT,
    param_slots,
    structure_reason,
)
from ryzen_opt.optimization.fastpaths.routing import (
    FAST_PATHS,
    PATHS,
    FastPaths,
    FastPathTransformer,
    install,
    make_path,
)

__all__ = [
    "FAST_PATHS",
    "GLOBAL_PARAMS",
    "LAYER_PARAMS",
    "PATHS",
    "STM_LAYOUT",
    "CudaGraphDecode",
    "CudaGraphPrefill",
    "FastPathTransformer",
    "FastPaths",
    "NumbaFusedDecode",
    "TritonGraphDecode",
    "install",
    "make_path",
    "param_slots",
    "structure_reason",
]
