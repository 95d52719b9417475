"""Tiny Hugging Face decoders of each family, built from config classes (random weights, no
downloads), shared by the family, fast-path and generate tests."""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 97


def tiny(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A small random model of ``family`` (``llama``, ``qwen2``, ``mistral``, ``gpt2``)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB)
    if family == "gpt2":
        kw = dict(n_embd=64, n_layer=2, n_head=4, n_positions=96, **common)
        cfg = transformers.GPT2Config(**{**kw, **overrides})
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        kw = dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=96,
            **common,
        )
        if family == "qwen2":
            kw["tie_word_embeddings"] = True
        if family == "llama":
            kw["rope_theta"] = 500.0
        classes = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        }
        cfg_cls, model_cls = classes[family]
        cfg = cfg_cls(**{**kw, **overrides})
        model = model_cls(cfg)
    return model.to(dtype).eval()


def left_padded(batch: int, length: int, pads: list[int], seed: int = 1):
    """``(input_ids, attention_mask)`` with ``pads[i]`` pad positions on the left of row i."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = (torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask
