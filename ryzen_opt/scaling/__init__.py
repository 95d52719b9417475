"""Best-of-n sampling with verification, batched over one shared prompt prefill.

Example:
    >>> from ryzen_opt.models import ArithmeticTask, ModelConfig, SimpleTransformerModel
    >>> from ryzen_opt.scaling import InferenceScalingEngine, SamplingConfig
    >>> task = ArithmeticTask(digits=1)
    >>> model = SimpleTransformerModel(ModelConfig(vocab_size=32, embedding_dim=32,
    ...     num_heads=2, num_layers=1, ff_dim=64, max_seq_len=32))
    >>> engine = InferenceScalingEngine(model, task, sampler=SamplingConfig(seed=0))
    >>> results = engine.best_of_n(["3+4="], n=8, max_new_tokens=3)
    >>> len(results[0].candidates)
    8
"""

from ryzen_opt.scaling.config import SamplingConfig
from ryzen_opt.scaling.engine import BestOfNResult, Candidate, Counters, InferenceScalingEngine
from ryzen_opt.scaling.learned import LearnedVerifier
from ryzen_opt.scaling.selection import (
    STRATEGIES,
    select_majority,
    select_max,
    select_verified,
    select_weighted_vote,
)
from ryzen_opt.scaling.verifiers import TaskVerifier

__all__ = [
    "STRATEGIES",
    "BestOfNResult",
    "Candidate",
    "Counters",
    "InferenceScalingEngine",
    "LearnedVerifier",
    "SamplingConfig",
    "TaskVerifier",
    "select_majority",
    "select_max",
    "select_verified",
    "select_weighted_vote",
]
