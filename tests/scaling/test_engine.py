"""InferenceScalingEngine: shared prefill equals the naive ways, selection, reproducibility."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ryzen_opt import InferenceScalingEngine
from ryzen_opt.models import ArithmeticTask
from ryzen_opt.scaling import STRATEGIES, SamplingConfig
from ryzen_opt.scaling.sampling import raw_logprobs

from .conftest import EOS, make_tiny


def _tokens(results):
    return [[tuple(c.token_ids) for c in r.candidates] for r in results]


def _assert_same_candidates(a, b, what):
    for p, (ra, rb) in enumerate(zip(a, b, strict=True)):
        assert len(ra.candidates) == len(rb.candidates), f"{what}: prompt {p} count differs"
        for ca, cb in zip(ra.candidates, rb.candidates, strict=True):
            assert ca.token_ids == cb.token_ids, (
                f"{what}: prompt {p} candidate {ca.index}: {ca.token_ids} != {cb.token_ids}"
            )
            assert ca.logprob == pytest.approx(cb.logprob, abs=1e-4), (
                f"{what}: prompt {p} candidate {ca.index} log-prob {ca.logprob} != {cb.logprob}"
            )


@pytest.mark.parametrize(
    "sampler",
    [
        SamplingConfig(temperature=1.0, seed=3),
        SamplingConfig(temperature=0.7, top_k=5, seed=11),
        SamplingConfig(temperature=1.3, top_p=0.8, seed=5),
    ],
)
def test_shared_prefill_returns_the_same_candidates_as_repeated_prompt_and_separate_calls(
    tiny_model, letter_verifier, prompts, sampler
):
    eng = InferenceScalingEngine(tiny_model, letter_verifier, sampler=sampler)
    shared = eng.best_of_n(prompts, 8, 10)
    repeat = eng.best_of_n(prompts, 8, 10, mode="repeat")
    separate = eng.best_of_n(prompts, 8, 10, mode="separate")
    _assert_same_candidates(shared, repeat, "shared vs repeated prompt")
    _assert_same_candidates(shared, separate, "shared vs separate calls")
    # The shared prefill runs each prompt once; the naive ways run it n times.
    for s, r, q in zip(shared, repeat, separate, strict=True):
        assert s.counters.prefill_tokens == 5
        assert r.counters.prefill_tokens == q.counters.prefill_tokens == 8 * 5
    # The seeds must matter, or the equality above proves nothing.
    assert len({c for r in _tokens(shared) for c in r}) > len(prompts)


def test_candidates_do_not_depend_on_n_or_on_batching_prompts(tiny_model, letter_verifier, prompts):
    eng = InferenceScalingEngine(tiny_model, letter_verifier, sampler=SamplingConfig(seed=2))
    full = eng.best_of_n(prompts, 8, 10)
    fewer = eng.best_of_n(prompts, 3, 10)
    for f, s in zip(full, fewer, strict=True):
        assert [c.token_ids for c in f.candidates[:3]] == [c.token_ids for c in s.candidates]
    one_by_one = [eng.best_of_n([p], 8, 10, index_offset=i)[0] for i, p in enumerate(prompts)]
    _assert_same_candidates(full, one_by_one, "one call vs one prompt per call")
    small_batches = InferenceScalingEngine(
        tiny_model, letter_verifier, sampler=SamplingConfig(seed=2), max_batch_rows=8
    )
    _assert_same_candidates(full, small_batches.best_of_n(prompts, 8, 10), "max_batch_rows=8")


def test_sampling_is_reproducible_for_a_seed_and_changes_with_it(
    tiny_model, letter_verifier, prompts
):
    def run(seed):
        eng = InferenceScalingEngine(tiny_model, letter_verifier, sampler=SamplingConfig(seed=seed))
        return _tokens(eng.best_of_n(prompts, 6, 10))

    torch.manual_seed(123)  # the global RNG must not matter
    a = run(7)
    torch.manual_seed(456)
    assert run(7) == a
    assert run(8) != a


def test_greedy_candidates_equal_the_baseline_generate(tiny_model, letter_verifier, prompts):
    eng = InferenceScalingEngine(
        tiny_model, letter_verifier, sampler=SamplingConfig(temperature=0.0)
    )
    res = eng.best_of_n(prompts, 2, 10)
    ids = torch.tensor([letter_verifier.encode(p) for p in prompts])
    ref = tiny_model.generate(ids, 10, eos_id=EOS)[:, ids.shape[1] :]
    for r, row in zip(res, ref.tolist(), strict=True):
        end = row.index(EOS) + 1 if EOS in row else len(row)
        for c in r.candidates:
            assert c.token_ids == row[:end]


def test_log_probabilities_match_teacher_forcing(tiny_model, letter_verifier, prompts):
    eng = InferenceScalingEngine(
        tiny_model, letter_verifier, sampler=SamplingConfig(temperature=1.2, seed=1)
    )
    for r in eng.best_of_n(prompts, 4, 10):
        pid = letter_verifier.encode(r.prompt)
        for c in r.candidates:
            ids = torch.tensor([pid + c.token_ids])
            ref = raw_logprobs(tiny_model, ids, len(pid))[0]
            assert c.logprob == pytest.approx(float(ref.sum()), abs=1e-4)
            assert c.mean_logprob == pytest.approx(float(ref.mean()), abs=1e-5)


def test_rows_stop_at_eos_without_changing_the_candidates(tiny_model, letter_verifier, prompts):
    stop = InferenceScalingEngine(tiny_model, letter_verifier, sampler=SamplingConfig(seed=4))
    full = InferenceScalingEngine(
        tiny_model, letter_verifier, sampler=SamplingConfig(seed=4, stop_at_eos=False)
    )
    a, b = stop.best_of_n(prompts, 8, 12), full.best_of_n(prompts, 8, 12)
    ended = [c for r in a for c in r.candidates if c.eos]
    assert ended, "no candidate produced EOS: the test needs a model that does"
    for ra, rb in zip(a, b, strict=True):
        assert [c.token_ids for c in ra.candidates] == [c.token_ids for c in rb.candidates]
        assert all(
            c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1] for c in ra.candidates if c.eos
        )
        assert ra.counters.generated_tokens == sum(len(c.token_ids) for c in ra.candidates)
        assert rb.counters.generated_tokens == 8 * 12
    assert sum(r.counters.generated_tokens for r in a) < 8 * 12 * len(prompts)


def test_verifier_choice_is_correct_whenever_a_correct_candidate_exists(
    tiny_model, letter_verifier
):
    eng = InferenceScalingEngine(tiny_model, letter_verifier, sampler=SamplingConfig(seed=9))
    prompts = ["".join(chr(97 + (i * 7 + k * 3) % 26) for k in range(5)) for i in range(30)]
    res = eng.best_of_n(prompts, 6, 8)
    covered = [r for r in res if r.covered]
    assert 0 < len(covered) < len(res), "need prompts with and without a correct candidate"
    for r in res:
        assert r.strategy == "verifier"
        assert r.correct == r.covered
        assert r.completion == r.candidates[r.index].completion
        if not r.covered:  # nothing verified: the most likely candidate
            assert r.index == max(
                range(len(r.candidates)), key=lambda i: (r.candidates[i].mean_logprob, -i)
            )


def test_majority_vote_picks_the_mode_of_extracted_answers(tiny_model, letter_verifier, prompts):
    eng = InferenceScalingEngine(
        tiny_model, letter_verifier, strategy="majority", sampler=SamplingConfig(seed=6)
    )
    res = eng.best_of_n(prompts, 16, 6)
    nontrivial = 0
    for r in res:
        counts = Counter(c.answer for c in r.candidates if c.answer is not None)
        top = max(counts.values())
        chosen = r.candidates[r.index]
        assert r.index == r.choices["majority"]
        assert counts[chosen.answer] == top
        nontrivial += len(counts) > 1 and top > 1
    assert nontrivial, "every vote was unanimous or all distinct: the test proves nothing"


def test_every_strategy_is_computed_and_logprob_picks_the_most_likely(
    tiny_model, letter_verifier, prompts
):
    eng = InferenceScalingEngine(tiny_model, letter_verifier, sampler=SamplingConfig(seed=1))
    for r in eng.best_of_n(prompts, 5, 6):
        assert set(r.choices) == set(STRATEGIES) - {"learned"}
        lp = [c.mean_logprob for c in r.candidates]
        assert lp[r.choices["logprob"]] == max(lp)
        # Without a learned verifier the weighted vote weighs by the checker's verdict.
        assert r.candidates[r.choices["weighted_vote"]].verified == r.covered


def test_early_exit_stops_at_a_verified_candidate_with_the_same_seeds(
    tiny_model, letter_verifier, prompts
):
    eng = InferenceScalingEngine(tiny_model, letter_verifier, sampler=SamplingConfig(seed=3))
    full = eng.best_of_n(prompts, 16, 8)
    fast = eng.best_of_n(prompts, 16, 8, early_exit=True, early_exit_chunk=2)
    saved = 0
    for f, e in zip(full, fast, strict=True):
        assert e.correct == f.covered
        by_index = {c.index: c.token_ids for c in f.candidates}
        for c in e.candidates:  # every candidate kept is the one the full run drew
            assert c.token_ids == by_index[c.index]
        if e.counters.early_exit:
            assert len(e.candidates) < 16
            saved += f.counters.generated_tokens - e.counters.generated_tokens
    assert saved > 0


def test_works_with_any_model_with_the_same_forward_and_cache(tiny_model, letter_verifier, prompts):
    class Wrapped(torch.nn.Module):  # stands for an optimize(model) result
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def forward(self, idx, kv_cache=None):
            return self.inner(idx, kv_cache)

    cfg = SamplingConfig(seed=12)
    a = InferenceScalingEngine(tiny_model, letter_verifier, sampler=cfg).best_of_n(prompts, 4, 8)
    b = InferenceScalingEngine(Wrapped(tiny_model), letter_verifier, sampler=cfg).best_of_n(
        prompts, 4, 8
    )
    _assert_same_candidates(a, b, "wrapped model")


def test_arithmetic_task_is_accepted_as_the_verifier():
    task = ArithmeticTask(digits=1, operators="+")
    model = make_tiny(vocab_size=task.tokenizer.vocab_size)
    eng = InferenceScalingEngine(model, task, sampler=SamplingConfig(seed=0))
    [r] = eng.best_of_n(["3+4="], 4, task.max_answer_len)
    assert r.prompt == "3+4="
    assert all(c.verified == (c.completion == "7") for c in r.candidates)
    [r2] = eng.best_of_n([task.tokenizer.encode("3+4=")], 4, task.max_answer_len)
    assert r2.prompt == "3+4=" and _tokens([r2]) == _tokens([r])


def test_result_dicts_are_json_serialisable(tiny_model, letter_verifier):
    import json

    eng = InferenceScalingEngine(tiny_model, letter_verifier)
    [r] = eng.best_of_n("hello", 3, 4)
    d = json.loads(json.dumps(r.to_dict()))
    assert len(d["candidates"]) == 3 and d["counters"]["wall_s"] > 0
    assert json.loads(json.dumps(eng.sampler.to_dict()))["temperature"] == 1.0


@pytest.mark.gpu
def test_shared_prefill_on_gpu_matches_the_repeated_prompt(letter_verifier, prompts):
    model = make_tiny(sharpen=5.0).cuda()
    eng = InferenceScalingEngine(model, letter_verifier, sampler=SamplingConfig(seed=3))
    assert eng.device.type == "cuda"
    shared = eng.best_of_n(prompts, 8, 10)
    _assert_same_candidates(shared, eng.best_of_n(prompts, 8, 10, mode="repeat"), "cuda")
