"""Best-of-n sampling with verification, batched over one shared prompt prefill."""


class InferenceScalingEngine:
    """Best-of-n sampling with verification (not implemented yet: raises)."""

    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError("InferenceScalingEngine is not implemented in this version")


__all__ = ["InferenceScalingEngine"]
