"""Instant adapters: the task family, TextToLoRA, SVFExperts and their training loops."""

from __future__ import annotations

import pytest
import torch

from ryzen_opt.adapters import (
    AdapterError,
    AdapterRegistry,
    LoraConfig,
    SVFExperts,
    TextToLoRA,
)
from ryzen_opt.adapters.instant import (
    TaskPool,
    classifier_data,
    train_svf,
    train_t2l_recon,
    train_t2l_sft,
)
from ryzen_opt.adapters.t2l import delta_loss
from ryzen_opt.adapters.tasks import ALL, HELD_OUT, SEEN, FormattedTask, get_spec, get_task
from ryzen_opt.adapters.text import MAX_DESCRIPTION_CHARS, HashingTextEncoder
from ryzen_opt.models.tasks import Problem
from tests.adapters.conftest import fresh_copy, logits, make_stm


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: on a shared 2-core machine two OpenMP threads stall at every barrier
    (measured: the reconstruction test took 138 s with 2 threads under load, 8 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _t2l(seed: int = 0, rank: int = 4) -> TextToLoRA:
    """A hypernetwork with random heads (a fresh one makes B = 0 adapters)."""
    net = TextToLoRA.for_model(make_stm(), LoraConfig(rank=rank), encoder_dim=64, hidden=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net


# -- the task family ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "op, fmt, p, prompt, answer",
    [
        ("+", "plain", Problem(34, "+", 59), "34+59=", "93"),
        ("+", "reversed", Problem(34, "+", 59), "=34+59=", "39"),
        ("-", "reversed", Problem(10, "-", 130), "=010-130=", "-021"),
        ("+", "padded", Problem(34, "+", 5), "==34+05=", "039"),
        ("-", "padded", Problem(3, "-", 10), "==03-10=", "-07"),
    ],
)
def test_formats_write_the_answer_as_described(op, fmt, p, prompt, answer):
    digits = 3 if p.b >= 100 else 2
    t = FormattedTask(digits, op, fmt)
    assert t.prompt(p) == prompt and t.answer_text(p) == answer
    assert t.verify(prompt, answer) and not t.verify(prompt, str(p.answer)[::-1] + "1")
    assert len(t.tokenizer.encode(prompt)) == t.prompt_len
    assert len(answer) + 1 <= t.max_answer_len  # EOS included


def test_plain_task_is_arithmetic_task_unchanged():
    from ryzen_opt.models.tasks import ArithmeticTask

    a, b = ArithmeticTask(3, "+"), FormattedTask(3, "+", "plain")
    ps = a.sample("test", 20, seed=1)
    assert ps == b.sample("test", 20, seed=1)
    for x, y in zip(a.encode_training(ps), b.encode_training(ps), strict=True):
        assert torch.equal(x, y)


def test_held_out_tasks_recombine_seen_attributes_and_paraphrases_are_split():
    names = [s.name for s in ALL]
    assert len(set(names)) == len(names)
    seen_attrs = [(s.task.operators[0], s.task.digits, s.task.fmt) for s in SEEN]
    for s in HELD_OUT:
        op, d, f = s.task.operators[0], s.task.digits, s.task.fmt
        assert (op, d, f) not in seen_attrs
        assert any(x[0] == op for x in seen_attrs) and any(x[1] == d for x in seen_attrs)
        assert any(x[2] == f for x in seen_attrs)
    for s in ALL:
        assert s.train_descriptions and s.heldout_descriptions
        assert not set(s.train_descriptions) & set(s.heldout_descriptions)
    with pytest.raises(ValueError, match="name"):
        get_task("nope")


# -- descriptions ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, what",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("x" * (MAX_DESCRIPTION_CHARS + 1), "at most"),
        (None, "must be a str"),
        (17, "must be a str"),
        (b"add two numbers", "must be a str"),
        ("!!! ???", "no word"),
    ],
)
def test_bad_descriptions_raise_naming_the_argument(bad, what):
    net = _t2l()
    with pytest.raises(AdapterError, match=f"description.*{what}|{what}.*description"):
        net.generate(bad)
    with pytest.raises(AdapterError, match="description"):
        HashingTextEncoder(64)(bad)


def test_encoder_is_a_stable_unit_vector_that_separates_tasks():
    enc = HashingTextEncoder(256)
    v = enc("add two three-digit numbers")
    assert torch.equal(v, HashingTextEncoder(256)("add two three-digit numbers"))
    assert abs(float(v.norm()) - 1) < 1e-6
    # digits and number words meet; an operator word moves the vector more than digits do
    assert float(v @ enc("add two 3-digit numbers")) > 0.99
    assert float(v @ enc("subtract two three-digit numbers")) < 0.9


# -- TextToLoRA --------------------------------------------------------------------------------
def test_generate_is_deterministic_for_description_and_seed(tmp_path):
    net = _t2l()
    a = net.generate("add two 2-digit numbers", seed=3)
    b = net.generate("add two 2-digit numbers", seed=3)
    for p in a.weights:
        assert torch.equal(a.weights[p][0], b.weights[p][0])
        assert torch.equal(a.weights[p][1], b.weights[p][1])
    c = net.generate("subtract two 2-digit numbers", seed=3)
    assert any(not torch.equal(a.weights[p][1], c.weights[p][1]) for p in a.weights)
    # the seed only matters with temperature > 0, and then deterministically
    t1 = net.generate("add two 2-digit numbers", seed=1, temperature=0.5)
    t1b = net.generate("add two 2-digit numbers", seed=1, temperature=0.5)
    t2 = net.generate("add two 2-digit numbers", seed=2, temperature=0.5)
    p0 = next(iter(a.weights))
    assert torch.equal(t1.weights[p0][1], t1b.weights[p0][1])
    assert not torch.equal(t1.weights[p0][1], t2.weights[p0][1])
    # a saved and reloaded hypernetwork makes the same adapter
    loaded = TextToLoRA.load(net.save(tmp_path / "net"))
    d = loaded.generate("add two 2-digit numbers", seed=3)
    assert all(torch.equal(a.weights[p][1], d.weights[p][1]) for p in a.weights)
    assert a.num_parameters == sum(x.numel() + y.numel() for x, y in a.weights.values())


@pytest.mark.parametrize("seed, temperature", [(-1, 0.0), (1.5, 0.0), (0, -1.0), (0, "hot")])
def test_bad_seed_or_temperature_raise(seed, temperature):
    with pytest.raises(AdapterError, match="seed|temperature"):
        _t2l().generate("add numbers", seed=seed, temperature=temperature)


def test_load_refuses_missing_or_mismatched_files(tmp_path):
    with pytest.raises(AdapterError, match="t2l_config.json"):
        TextToLoRA.load(tmp_path)
    folder = _t2l().save(tmp_path / "a")
    other = TextToLoRA.for_model(make_stm(), LoraConfig(rank=2), encoder_dim=64, hidden=16)
    other.save(tmp_path / "b")
    (tmp_path / "b" / "t2l.safetensors").replace(folder / "t2l.safetensors")
    with pytest.raises(AdapterError, match="does not fit"):
        TextToLoRA.load(folder)


def test_registry_serves_a_generated_adapter_merged_unmerged_and_through_peft(tmp_path):
    adapter = _t2l(seed=5).generate("subtract two 2-digit numbers, zero-padded")
    folder = adapter.save(tmp_path / "gen")
    ids = torch.tensor([[1, 5, 6, 13, 7, 8, 16], [1, 9, 3, 14, 4, 4, 16]])
    base = make_stm()
    want = logits(base, ids)
    outs = {}
    for merged in (False, True):
        reg = AdapterRegistry(fresh_copy(base), merged=merged)
        reg.register("gen", folder)
        reg.activate("gen")
        outs[merged] = logits(reg.model, ids)
        gen = reg.generate(ids, adapter="gen", max_new_tokens=3)
        assert gen.shape == (2, 10)
    direct = adapter.load_into(fresh_copy(base), "g")
    from ryzen_opt.adapters import set_adapter

    set_adapter(direct, "g")
    outs["direct"] = logits(direct, ids)
    from peft import PeftModel

    peft_model = fresh_copy(base)
    PeftModel.from_pretrained(peft_model, str(folder)).eval()
    outs["peft"] = logits(peft_model, ids)
    ref = outs[False]
    assert (ref - want).norm() / want.norm() > 1e-3  # the adapter changes the model
    for k, v in outs.items():
        err = float((v - ref).norm() / ref.norm())
        assert err <= 1e-5, (k, err)


# -- SVF ---------------------------------------------------------------------------------------
def test_svf_all_ones_reproduces_the_base_logits():
    base = make_stm()
    ids = torch.tensor([[1, 5, 6, 13, 7, 8, 16]])
    want = logits(base, ids)
    svf = SVFExperts(base)
    svf.add_expert("ones", svf.ones())
    model = fresh_copy(base)
    svf.apply(model, "ones")
    got = logits(model, ids)
    assert float((got - want).norm() / want.norm()) <= 1e-6
    # a z away from ones changes the weights as U diag(s z) Vh (float64 reference)
    g = torch.Generator().manual_seed(0)
    z = {p: 1 + 0.3 * torch.randn(n, generator=g) for p, n in svf.sizes().items()}
    svf.add_expert("z", z)
    svf.apply(model, "z")
    for p in svf.paths:
        w = base.get_submodule(p).weight.double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        ref = u @ torch.diag(s * z[p].double()) @ vh
        got_w = model.get_submodule(p).weight.detach().double()
        assert float((got_w - ref).norm() / ref.norm()) <= 1e-5, p
    assert float((logits(model, ids) - want).norm() / want.norm()) > 1e-3
    svf.restore(model)
    assert torch.equal(logits(model, ids), want)
    assert svf.num_parameters == sum(svf.sizes().values())


def test_svf_mixture_is_the_weighted_sum_of_z_and_bad_tasks_raise(tmp_path):
    base = make_stm()
    svf = SVFExperts(base)
    g = torch.Generator().manual_seed(1)
    for name in ("a", "b"):
        svf.add_expert(
            name, {p: 1 + 0.2 * torch.randn(n, generator=g) for p, n in svf.sizes().items()}
        )
    mix = svf.weights({"a": 0.25, "b": 0.75})
    for p, (u, s, vh) in svf.svd.items():
        z = 0.25 * svf.experts["a"][p] + 0.75 * svf.experts["b"][p]
        ref = svf.base[p] + u @ torch.diag(s * (z - 1)) @ vh
        assert float((mix[p] - ref).norm() / ref.norm()) <= 1e-5
    for bad in ("c", {}, {"c": 1.0}, 3):
        with pytest.raises(AdapterError, match="task"):
            svf.apply(fresh_copy(base), bad)
    loaded = SVFExperts.load(svf.save(tmp_path / "svf"), base)
    assert loaded.names == ["a", "b"]
    assert all(torch.equal(loaded.experts["b"][p], svf.experts["b"][p]) for p in svf.paths)


def test_tiled_svf_scales_each_tiles_own_singular_values(tmp_path):
    from ryzen_opt.adapters.svf import svf_forward_hooks

    base = make_stm()
    ids = torch.tensor([[1, 5, 6, 13, 7, 8, 16]])
    want = logits(base, ids)
    svf = SVFExperts(base, block=16)
    # m x n / 16 scales a weight (qkv 96 x 32, proj 32 x 32, fc1 48 x 32, fc2 32 x 48)
    assert svf.sizes()["blocks.0.attn.qkv"] == 96 * 32 // 16
    assert svf.num_parameters == 2 * (96 * 32 + 32 * 32 + 48 * 32 + 32 * 48) // 16
    svf.add_expert("ones", svf.ones())
    model = fresh_copy(base)
    svf.apply(model, "ones")
    assert float((logits(model, ids) - want).norm() / want.norm()) <= 1e-6
    g = torch.Generator().manual_seed(0)
    z = {p: 1 + 0.3 * torch.randn(n, generator=g) for p, n in svf.sizes().items()}
    svf.add_expert("z", z)
    svf.apply(model, "z")
    for p in svf.paths:  # float64 reference, one 16 x 16 tile at a time, row-major
        w = base.get_submodule(p).weight.detach().double()
        ref, zs = torch.empty_like(w), z[p].double().split(16)
        for t, (r, c) in enumerate((r, c) for r in range(0, w.shape[0], 16)
                                   for c in range(0, w.shape[1], 16)):  # fmt: skip
            u, s, vh = torch.linalg.svd(w[r : r + 16, c : c + 16])
            ref[r : r + 16, c : c + 16] = u @ torch.diag(s * zs[t]) @ vh
        got_w = model.get_submodule(p).weight.detach().double()
        assert float((got_w - ref).norm() / ref.norm()) <= 1e-5, p
    # training's hooks (W' - W formed from a shared z) give the applied model's logits
    handles = svf_forward_hooks(base, svf, z)
    try:
        hooked = logits(base, ids)
    finally:
        for h in handles:
            h.remove()
    got = logits(model, ids)
    assert float((hooked - got).norm() / got.norm()) <= 1e-5
    assert float((got - want).norm() / want.norm()) > 1e-3
    with pytest.raises(AdapterError, match="one expert per row needs plain SVF"):
        svf_forward_hooks(base, svf, {p: v[None].expand(2, -1) for p, v in z.items()})
    loaded = SVFExperts.load(svf.save(tmp_path / "svf"), base)
    assert loaded.block == 16 and loaded.sizes() == svf.sizes()
    assert all(torch.equal(loaded.weights("z")[p], svf.weights("z")[p]) for p in svf.paths)
    for bad in (0, 5, True, 2.0):  # 5 divides no side; 0, True, 2.0 are no tile sides
        with pytest.raises(AdapterError, match="block"):
            SVFExperts(base, block=bad)


def test_svf_load_refuses_experts_of_another_base(tmp_path):
    base = make_stm()
    folder = SVFExperts(base).save(tmp_path / "svf")
    other = fresh_copy(base)
    with torch.no_grad():
        other.get_submodule(SVFExperts(base).paths[-1]).weight.mul_(1.001)
    with pytest.raises(AdapterError, match="model: the experts .* another base model"):
        SVFExperts.load(folder, other)
    assert SVFExperts.load(folder, fresh_copy(base)).paths == SVFExperts(base).paths


def test_skill_identification_accuracy_on_held_out_prompts():
    base = make_stm()
    svf = SVFExperts(base)
    specs = [s for s in SEEN if s.name in ("add2", "sub2", "add3_rev", "sub3_pad")]
    for s in specs:
        svf.add_expert(s.name, svf.ones())
    fx, fy = classifier_data(svf, base, "train", 48, specs)
    train_acc = svf.fit_classifier(fx, fy)
    tx, ty = classifier_data(svf, base, "test", 48, specs)
    got = [svf.identify(base, s.task.encode_prompts(s.task.sample("test", 16, 9))) for s in specs]
    acc = sum(g == s.name for gs, s in zip(got, specs, strict=True) for g in gs) / (16 * len(specs))
    print(f"skill identification on held-out prompts: {acc:.3f} (train {train_acc:.3f})")
    assert acc >= 0.9
    mix = svf.mixture(base, specs[0].task.encode_prompts(specs[0].task.sample("test", 4, 0)))
    assert abs(sum(mix.values()) - 1) < 1e-5 and max(mix, key=mix.get) == specs[0].name


# -- training loops ----------------------------------------------------------------------------
def test_task_pool_draws_rows_of_the_requested_tasks():
    tasks = [get_task("add2"), get_task("add3_rev")]
    pool = TaskPool(tasks, 16, seed=0)
    x, y = pool.batch([1, 0, 1], torch.Generator().manual_seed(0))
    assert x.shape == y.shape and x.shape[0] == 3
    assert int(x[0, 1]) == 16  # "=" marker of the reversed task, after BOS
    assert (y[1] != -100).sum() >= 2


def test_reconstruction_learns_library_updates(tmp_path):
    from ryzen_opt.adapters import add_lora, save_adapter
    from ryzen_opt.adapters.instant import library_weights
    from tests.adapters.conftest import randomize

    specs = [get_spec("add2"), get_spec("add3_rev")]  # descriptions differ in digits and format
    for i, s in enumerate(specs):
        m = add_lora(make_stm(), LoraConfig(rank=4))
        randomize(m, "default", seed=i)
        save_adapter(m, tmp_path / s.name)
    net = TextToLoRA.for_model(make_stm(), LoraConfig(rank=4), encoder_dim=64, hidden=16)
    res = train_t2l_recon(net, tmp_path, steps=100, lr=1e-2, specs=specs)
    lib, scaling = library_weights(tmp_path, specs)
    for s in specs:  # a held-out paraphrase gets its own task's update back
        target = {p: (a[None], b[None]) for p, (a, b) in lib[s.name].items()}
        with torch.no_grad():
            gen = net(net.embed([s.heldout_descriptions[0]]))
            err = float(delta_loss(gen, target, net.lora.scaling, scaling))
        assert err < 0.2, (s.name, err, res["losses"][::20])


def test_generalist_base_trains_every_weight_on_the_seen_mixture_and_refuses_bad_input():
    from ryzen_opt.adapters.generalist import train_generalist

    model = make_stm()
    before = [p.detach().clone() for p in model.parameters()]
    specs = SEEN[:2]
    res = train_generalist(model, specs, steps=3, batch=4, eval_every=2, eval_specs=specs,
                           eval_samples=2)  # fmt: skip
    assert len(res["losses"]) == 3 and [r["step"] for r in res["curve"]] == [0, 2, 3]
    assert set(res["curve"][0]) == {"step", *(s.name for s in specs)}
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    for kw, match in (({"steps": 0}, "steps"), ({"batch": 1.5}, "batch"), ({"specs": ()}, "specs"),
                      ({"lr": 0.0}, "lr"), ({"steps": 3, "stop_at": 4}, "stop_at")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            train_generalist(make_stm(), **{"specs": specs, **kw})


def test_sft_and_svf_training_lower_the_loss():
    base = make_stm()
    net = TextToLoRA.for_model(base, LoraConfig(rank=4), encoder_dim=64, hidden=16)
    before = [p.detach().clone() for p in base.parameters()]
    res = train_t2l_sft(net, base, steps=30, batch=16, lr=3e-3)
    assert sum(res["losses"][-5:]) < sum(res["losses"][:5])
    svf = SVFExperts(base)
    res = train_svf(svf, base, steps=30, batch=16, lr=3e-2)
    assert set(res["losses"]) == set(res["train_seconds"]) == {s.name for s in SEEN}
    for name, losses in res["losses"].items():  # each task trains alone, from all-ones
        assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5]), name
    assert svf.names == [s.name for s in SEEN]
    tiled = SVFExperts(base, block=16)
    specs = [get_spec("add2"), get_spec("sub3_pad")]
    res = train_svf(tiled, base, steps=30, batch=16, lr=3e-2, specs=specs)
    assert tiled.names == ["add2", "sub3_pad"]
    assert all(sum(v[-5:]) < sum(v[:5]) for v in res["losses"].values())
    assert all(torch.equal(a, b) for a, b in zip(before, base.parameters(), strict=True))


def test_train_adapter_learns_a_formatted_task_and_refuses_other_tasks():
    from ryzen_opt.adapters import AdapterTrainConfig, train_adapter

    cfg = AdapterTrainConfig(steps=2, batch_size=4, warmup_steps=1)
    out = train_adapter(make_stm(), LoraConfig(rank=2), cfg, task=get_task("add3_rev"))
    assert len(out["losses"]) == 2
    with pytest.raises(AdapterError, match="task must be an ArithmeticTask"):
        train_adapter(make_stm(), LoraConfig(rank=2), cfg, task="add3_rev")


def test_command_line_writes_every_checkpoint_with_its_command(tmp_path):
    import json

    from ryzen_opt.adapters.instant import main
    from ryzen_opt.models import save_checkpoint

    save_checkpoint(make_stm(), tmp_path / "ckpt")
    common = ["--checkpoint", str(tmp_path / "ckpt"), "--eval-samples", "2"]
    assert main(["base", "--out", str(tmp_path / "base"), "--steps", "2", "--eval-every", "1",
                 *common]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "base" / "metrics.json").read_text())
    assert set(metrics["test_exact_match"]) == {s.name for s in ALL}
    assert metrics["command"].startswith("python -m ryzen_opt.adapters.instant base")
    assert main(["library", "--out", str(tmp_path / "lib"), "--steps", "2", *common]) == 0
    argv = ["t2l", "--mode", "recon", "--library", str(tmp_path / "lib"), "--steps", "2"]
    assert main([*argv, "--out", str(tmp_path / "recon"), *common]) == 0
    assert (
        main(["svf", "--out", str(tmp_path / "svf"), "--steps", "2", "--batch", "7", *common]) == 0
    )
    for folder in [tmp_path / "lib" / s.name for s in SEEN] + [
        tmp_path / "recon",
        tmp_path / "svf",
    ]:
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["command"].startswith("python -m ryzen_opt.adapters.instant"), folder
    assert TextToLoRA.load(tmp_path / "recon").generate("add numbers").num_parameters > 0
    svf = SVFExperts.load(tmp_path / "svf", make_stm())
    assert svf.names == [s.name for s in SEEN] and svf.classifier is not None
    assert svf.feature_module == "blocks.0.ln1"  # the default first pass
    # refit the classifier on another module, z-vectors kept
    refit = ["svf-classifier", "--svf", str(tmp_path / "svf"), "--out", str(tmp_path / "svf2")]
    assert main([*refit, "--feature-module", "ln_f", *common]) == 0
    again = SVFExperts.load(tmp_path / "svf2", make_stm())
    assert again.feature_module == "ln_f" and again.classifier is not None
    assert all(torch.equal(again.experts[n][p], svf.experts[n][p]) for n in svf.names
               for p in svf.paths)
    assert not torch.equal(again.classifier["mean"], svf.classifier["mean"])
    metrics = json.loads((tmp_path / "svf2" / "metrics.json").read_text())
    assert metrics["feature_module"] == "ln_f" and "svf-classifier" in metrics["classifier_command"]


def test_svf_feature_module_stops_the_first_pass_and_drops_a_stale_classifier():
    base = make_stm()
    svf = SVFExperts(base, feature_module="blocks.1.ln1")
    ids = torch.randint(0, base.config.vocab_size, (2, 6))
    calls = []
    hook = base.blocks[1].attn.register_forward_hook(lambda *a: calls.append(1))
    try:
        f = svf.features(base, ids)
    finally:
        hook.remove()
    assert f.shape == (2, 2 * base.config.embedding_dim) and not calls  # stopped before it
    svf.classifier = {"weight": torch.zeros(1)}
    svf.set_feature_module(base, "blocks.1.ln1")
    assert svf.classifier is not None  # same module: kept
    svf.set_feature_module(base, "ln_f")
    assert svf.classifier is None and svf.feature_module == "ln_f"
    with pytest.raises(AdapterError, match="feature_module"):
        svf.set_feature_module(base, "blocks.9.ln1")
    with pytest.raises(AdapterError, match="feature_module"):
        SVFExperts(base, feature_module=3)


def test_svf_apply_skips_a_rewrite_only_of_what_it_wrote_last():
    base = make_stm()
    svf = SVFExperts(base)
    g = torch.Generator().manual_seed(2)
    svf.add_expert("a", {p: 1 + 0.3 * torch.randn(n, generator=g) for p, n in svf.sizes().items()})
    model = fresh_copy(base)
    svf.apply(model, "a")
    want = {p: svf.weights("a")[p].clone() for p in svf.paths}
    w = model.get_submodule(svf.paths[0]).weight
    with torch.no_grad():
        w.zero_()  # changed by other means: apply() cannot see it without force
    svf.apply(model, "a")
    assert float(w.abs().sum()) == 0
    svf.apply(model, "a", force=True)
    assert torch.equal(w, want[svf.paths[0]])
    other = fresh_copy(base)  # a new model is written, whatever address it has
    svf.apply(other, "a")
    assert torch.equal(other.get_submodule(svf.paths[0]).weight, want[svf.paths[0]])
    svf.restore(model)
    assert torch.equal(w, base.get_submodule(svf.paths[0]).weight)
