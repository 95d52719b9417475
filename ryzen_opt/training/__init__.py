"""``optimize_training()``: the training step with fused parts, verified and timed.

Public names::

    from ryzen_opt.training import optimize_training, TrainingConfig, causal_lm_loss
    from ryzen_opt.training import linear_cross_entropy   # the CPU fused head + loss

:func:`optimize_training` measures with ``optimize()``'s engine
(:mod:`ryzen_opt.optimization.engine`); :mod:`.candidates` lists what it tries,
:mod:`.families` what differs between the model families.
"""

from ryzen_opt.training.config import TrainingConfig
from ryzen_opt.training.families import causal_lm_loss
from ryzen_opt.training.lce import linear_cross_entropy
from ryzen_opt.training.optimize import optimize_training

__all__ = ["TrainingConfig", "causal_lm_loss", "linear_cross_entropy", "optimize_training"]
