"""Bad input raises an error naming the argument."""

from __future__ import annotations

import pytest
import torch

from ryzen_opt.scaling import InferenceScalingEngine, SamplingConfig


@pytest.fixture
def engine(tiny_model, letter_verifier):
    return InferenceScalingEngine(tiny_model, letter_verifier)


@pytest.mark.parametrize("n", [0, -1, 2.0, "4", True])
def test_n_below_one_or_not_an_int_raises(engine, n):
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        engine.best_of_n(["hello"], n, 4)


@pytest.mark.parametrize(
    "prompts, match",
    [
        ([""], r"prompts\[0\] is an empty string"),
        (["hello", []], r"prompts\[1\] encodes to zero tokens"),
        ([torch.zeros(0, dtype=torch.long)], r"prompts\[0\] encodes to zero tokens"),
        ([], "non-empty sequence"),
        ([torch.zeros(2, 3, dtype=torch.long)], r"prompts\[0\] must be 1-D"),
        ([3.5], r"prompts\[0\] must be a str or a sequence of int"),
    ],
)
def test_empty_or_malformed_prompts_raise(engine, prompts, match):
    with pytest.raises((ValueError, TypeError), match=match):
        engine.best_of_n(prompts, 2, 4)


def test_prompt_longer_than_the_context_raises(engine):
    with pytest.raises(ValueError, match=r"prompts\[1\] has 40 tokens, longer than .*=32"):
        engine.best_of_n(["hello", "a" * 40], 2, 1)


def test_prompt_plus_max_new_tokens_beyond_the_context_raises(engine):
    engine.best_of_n(["a" * 28], 2, 4)  # 28 + 4 = 32 fits
    with pytest.raises(ValueError, match=r"prompts\[0\] length 28 \+ max_new_tokens 5 exceeds"):
        engine.best_of_n(["a" * 28], 2, 5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
        (dict(strategy="best"), "strategy must be one of"),
        (dict(strategy="learned"), "needs a learned_verifier"),
        (dict(mode="fast"), "mode must be one of"),
        (dict(early_exit=True, mode="repeat"), "early_exit needs mode='shared'"),
        (dict(early_exit=True, early_exit_chunk=0), "early_exit_chunk"),
        (dict(index_offset=-1), "index_offset"),
    ],
)
def test_bad_keyword_arguments_raise(engine, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        engine.best_of_n(["hello"], 2, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(seed=-1), "seed"),
        (dict(eos_id=-2), "eos_id"),
        (dict(stop_at_eos=1), "stop_at_eos"),
    ],
)
def test_sampling_config_validates_every_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_engine_arguments_are_checked(tiny_model, letter_verifier):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        InferenceScalingEngine(object(), letter_verifier)
    with pytest.raises(TypeError, match="verifier task must have"):
        InferenceScalingEngine(tiny_model, object())
    with pytest.raises(TypeError, match="sampler must be a SamplingConfig"):
        InferenceScalingEngine(tiny_model, letter_verifier, sampler={"temperature": 1.0})
    with pytest.raises(ValueError, match="max_batch_rows"):
        InferenceScalingEngine(tiny_model, letter_verifier, max_batch_rows=0)
