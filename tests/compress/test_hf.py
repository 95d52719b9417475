"""Optimum path on a tiny Llama built offline from a config (nothing downloaded)."""

from __future__ import annotations

import onnx
import pytest
import torch

pytest.importorskip("optimum.onnxruntime")

from ryzen_opt.compress.hf import export_hf_onnx, quantize_hf_onnx  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("llama")
    model.save_pretrained(d / "hf")
    onnx_dir = export_hf_onnx(d / "hf", d / "onnx")
    q_dir = quantize_hf_onnx(onnx_dir, d / "q")
    return model, onnx_dir, q_dir


def test_optimum_export_matches_transformers(llama):
    from optimum.onnxruntime import ORTModelForCausalLM

    model, onnx_dir, _ = llama
    ort_model = ORTModelForCausalLM.from_pretrained(onnx_dir)
    ids = torch.randint(0, 128, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        out = ort_model(input_ids=ids, attention_mask=mask).logits
        assert_close_rel(out, ref, TOL[torch.float32], "optimum logits")
        g_ref = model.generate(
            ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0
        )
        g_out = ort_model.generate(
            ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0
        )
    assert torch.equal(g_ref, g_out)


def test_avx512_vnni_quantization_writes_int8_model(llama):
    from optimum.onnxruntime import ORTModelForCausalLM

    model, onnx_dir, q_dir = llama
    qfile = q_dir / "model_quantized.onnx"
    ops = {n.op_type for n in onnx.load(str(qfile)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}, ops
    # 0.55x measured: the fp32 embedding table (128 x 64) stays, as the VNNI preset
    # quantizes matmuls only.
    assert qfile.stat().st_size < 0.7 * (onnx_dir / "model.onnx").stat().st_size
    q = ORTModelForCausalLM.from_pretrained(q_dir, file_name="model_quantized.onnx")
    ids = torch.randint(0, 128, (2, 5))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        out = q(input_ids=ids, attention_mask=mask).logits
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.15, rel  # int8 weights and activations: ~5% on a random tiny model
    assert q.generate(
        ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
    ).shape == (2, 9)


def test_hf_paths_reject_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_dir"):
        export_hf_onnx(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_dir"):
        export_hf_onnx(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="onnx_dir"):
        quantize_hf_onnx(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(TypeError, match="onnx_dir"):
        quantize_hf_onnx(3, tmp_path / "out")
