"""How far two runs of the same training drift apart from rounding alone (GPU).

    python -m bench.train_noise_floor [--lrs 1e-2,1e-3,3e-4] [--steps 12]

The real-size convergence test (``tests/training/test_convergence.py``, GPU) compares the
original model's training with ``optimize_training``'s (every Triton candidate forced) step by
step at Liger-Kernel's tolerances. Whether a difference there says anything about the kernels
depends on how much the training itself amplifies rounding. This measures that floor on the
same models and batches: the original trained from its weights, and the original trained from
weights moved by one unit in the last place (every element, a random direction, fixed seed):
a difference no larger than one rounding of the weights. Next to it, the forced Triton path
against the original. For each family (the test's Llama at 1024 hidden / 8 layers and GPT-2
small, vocabulary 32000, 2 x 1024 tokens), dtype (fp32, bf16) and AdamW learning rate it
prints the largest loss difference over the steps (absolute and relative) and the final
logits' largest absolute difference on a held-out batch. Also run twice, the original is
checked against itself (``repeat``): 0 means the baseline's kernels are deterministic here.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

REAL = {  # the real-size convergence test's models
    "llama": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=1024, vocab_size=32000, rope_theta=500.0,
    ),
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=32000),
}  # fmt: skip
CANDIDATES = ("triton_lce", "triton_gelu", "triton_swiglu", "triton_norm_residual", "triton_norm")


def _build(family: str, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**REAL[family]))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**REAL[family]))
    return model.to(dtype).cuda()


def _batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 32000, (2, 1024), generator=g).cuda()
        out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": ids.ne(-1).long()})
    return out


def _ulp_nudge(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with every weight moved one unit in the last place up or down (seeded)."""
    m = copy.deepcopy(model)
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for p in m.parameters():
            g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(1))
            up = torch.rand(p.shape, generator=g, device=p.device) < 0.5
            inf = torch.full_like(p, float("inf"))
            p.copy_(torch.where(up, torch.nextafter(p, inf), torch.nextafter(p, -inf)))
    return m


def _train(model, data, lr):
    from ryzen_opt.training import causal_lm_loss

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step, batch in enumerate(data):
        torch.manual_seed(step)
        loss = causal_lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        logits = model(_batches(1, 7)[0]["input_ids"]).logits.float()
    return torch.tensor(losses, dtype=torch.float64), logits


def _row(name, ref, other) -> str:
    dl = (other[0] - ref[0]).abs()
    rel = dl / ref[0].abs()
    dlog = float((other[1] - ref[1]).abs().max())
    return (f"  {name:<14} max|dloss| {float(dl.max()):.3e}  max rel {float(rel.max()):.3e}  "
            f"first step > 0: {int((dl > 0).nonzero()[0]) if bool((dl > 0).any()) else '-'}  "
            f"final logits max|d| {dlog:.3e}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lrs", default="1e-2,1e-3,3e-4")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--families", default="llama,gpt2")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    from ryzen_opt import optimize_training
    from ryzen_opt.training import TrainingConfig

    data = _batches(2, 0) * (a.steps // 2)
    cfg = TrainingConfig(candidates=CANDIDATES, force=CANDIDATES)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {a.steps} AdamW steps")
    for family in a.families.split(","):
        for dtype in (torch.float32, torch.bfloat16):
            base = _build(family, dtype)
            fast0 = optimize_training(base, _batches(1, 99)[0], config=cfg)
            for lr in (float(x) for x in a.lrs.split(",")):
                ref = _train(copy.deepcopy(base), data, lr)
                print(f"{family} {str(dtype).removeprefix('torch.')} lr {lr:g}: "
                      f"loss {ref[0][0]:.5f} -> {ref[0][-1]:.5f}")  # fmt: skip
                print(_row("repeat", ref, _train(copy.deepcopy(base), data, lr)))
                print(_row("1-ulp weights", ref, _train(_ulp_nudge(base), data, lr)))
                print(_row("triton forced", ref, _train(copy.deepcopy(fast0), data, lr)))
                sys.stdout.flush()
            del base, fast0
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
