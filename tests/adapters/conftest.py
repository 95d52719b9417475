"""Tiny base models for the adapter tests: ``SimpleTransformerModel`` and an HF Llama with
random weights (no downloads), and helpers shared by the test modules."""

from __future__ import annotations

import copy

import pytest
import torch

from ryzen_opt.adapters import lora_parameters
from ryzen_opt.models import ModelConfig, SimpleTransformerModel

STM_CONFIG = ModelConfig(
    vocab_size=64, embedding_dim=32, num_heads=2, num_layers=2, ff_dim=48, max_seq_len=32
)
STM_TARGETS = ("qkv", "proj", "fc1", "fc2")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_stm(seed: int = 0) -> SimpleTransformerModel:
    torch.manual_seed(seed)
    return SimpleTransformerModel(STM_CONFIG).eval()


def make_llama(seed: int = 0, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def make_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg).eval()


GPT2_TARGETS = ("c_attn", "c_fc", "c_proj")  # transformers' Conv1D (weight stored in x out)
MODELS = {
    "stm": (make_stm, STM_TARGETS),
    "llama": (make_llama, LLAMA_TARGETS),
    "gpt2": (make_gpt2, GPT2_TARGETS),
}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits of a forward over ``ids``, for ours and HF / PEFT models alike."""
    with torch.no_grad():
        out = model(ids)
    return out[0] if isinstance(out, tuple) else out.logits


def randomize(model, name: str, seed: int, std: float = 0.2) -> None:
    """Give adapter ``name`` non-zero ``A`` and ``B`` so it changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(params=sorted(MODELS))
def family(request):
    """``(make_model, target_modules)`` of each covered model family."""
    return MODELS[request.param]


def fresh_copy(model):
    return copy.deepcopy(model)
