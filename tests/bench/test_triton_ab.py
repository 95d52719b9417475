"""bench.triton_ab: argument checks, the no-GPU message, and the per-call patch."""

import types

import pytest
import torch

from bench import triton_ab


def test_patched_sets_the_value_per_call_and_restores_it_on_error():
    mod = types.SimpleNamespace(flag=1)
    seen = []
    run = triton_ab._patched(mod, "flag", 7, lambda: seen.append(mod.flag) or mod.flag)
    assert run() == 7 and mod.flag == 1

    def boom():
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        triton_ab._patched(mod, "flag", 9, boom)()
    assert mod.flag == 1 and seen == [7]


@pytest.mark.parametrize("args, name", [(["splitk", "--repeat", "2"], "--repeat"),
                                        (["matmul"], "what")])  # fmt: skip
def test_bad_arguments_name_the_argument(args, name, capsys):
    with pytest.raises(SystemExit):
        triton_ab.main(args)
    assert name in capsys.readouterr().err


@pytest.mark.parametrize("what", sorted(triton_ab.RUNS))
def test_without_a_gpu_it_says_so(what, capsys):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the A/B runs for real (bench, not a test)")
    assert triton_ab.main([what]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_patched_all_sets_every_value_per_call():
    mod = types.SimpleNamespace(a=1, b=2)
    run = triton_ab._patched_all(mod, {"a": 10, "b": 20}, lambda: (mod.a, mod.b))
    assert run() == (10, 20) and (mod.a, mod.b) == (1, 2)


def test_the_backward_tiles_tried_are_whole_configs():
    from ryzen_opt.kernels.triton.training import attention_op

    assert "split" not in triton_ab.BWD_TILES and "before" in triton_ab.BWD_TILES
    for tiles in triton_ab.BWD_TILES.values():
        assert len(tiles) == 2
        for t in (t for t in tiles if t is not None):
            bm, bn, warps, stages = t
            assert bm % 16 == 0 and bn % 16 == 0 and warps in (4, 8) and stages >= 1
    lib = attention_op._bwd_blocks(64)
    assert len(lib) == 2 and all(len(t) == 4 for t in lib)
