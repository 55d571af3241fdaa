"""peftkit.combine: DARE/DAREx faithfulness (methods.md §8.1), equality with peft's add_weighted_adapter,
refusals, the written adapter loading back, the CLI."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.cli import COMBINE_MODES, main
from peftkit.core.io import read_adapter, write_adapter
from peftkit.merging import MODES, CombineError, combine, dare, data_free_scale, tune_q
from peftkit.merging.prune import dare_mask
from peftkit.train.layer_inputs import collect_layer_inputs

from tiny_models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


# --- DARE / DAREx-q on one tensor (checks 1-4 of §8.1) ------------------------------------------------
def _monte_carlo(density: float, q: float | None, draws: int = 10_000) -> tuple[torch.Tensor, torch.Tensor]:
    delta = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples = dare(delta.expand(draws, -1).clone(), density, q, torch.Generator().manual_seed(1))  # 10k masks
    return delta, samples


def test_dare_mean_within_3_sigma_and_variance_matches():
    p = 0.7
    delta, samples = _monte_carlo(1 - p, None)
    sigma = (delta.abs() * (p / (1 - p)) ** 0.5) / samples.shape[0] ** 0.5  # std of the mean of 10k draws
    z = (samples.mean(0) - delta).abs() / sigma  # 64 entries: ~0.2 of them expected beyond 3 sigma
    assert (z <= 3).float().mean() >= 0.95 and z.max() < 5
    var = samples.var(0)
    expected = delta**2 * p / (1 - p)
    assert torch.allclose(var, expected, rtol=0.1)


def test_dare_kept_fraction():
    mask = dare_mask(torch.ones(200_000), 0.1, torch.Generator().manual_seed(0))
    assert abs(float(mask.mean()) - 0.1) < 0.003


def test_darex_q_mean_is_shrunk_by_density_over_q():
    density, q = 0.1, 0.4
    delta, samples = _monte_carlo(density, q, draws=20_000)
    assert torch.allclose(samples.mean(0), density / q * delta, atol=0.05 * float(delta.abs().max()))


def test_q_equal_density_is_dare_with_the_same_seed():
    t = torch.randn(40, 30)
    assert torch.equal(dare(t, 0.3, 0.3, torch.Generator().manual_seed(5)),
                       dare(t, 0.3, None, torch.Generator().manual_seed(5)))
    values = _peftkit_adapters()
    for how in ("dare_linear", "dare_ties_svd"):
        a = combine(values, [0.5, 0.5, 0.5], how, density=0.3, seed=3)[2]
        b = combine(values, [0.5, 0.5, 0.5], how, density=0.3, q=0.3, seed=3)[2]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_free_scale_is_the_least_squares_optimum():
    g = torch.Generator().manual_seed(0)
    delta, x = torch.randn(12, 20, generator=g) + 0.5, torch.randn(50, 20, generator=g)
    kept = delta * dare_mask(delta, 0.1, g)
    c = data_free_scale(delta, kept, x)

    def err(scale):
        return float(((x @ delta.T - scale * (x @ kept.T)) ** 2).sum())
    assert err(c) <= min(err(c * 0.99), err(c * 1.01), err(1 / 0.1))  # beats DARE's 1/density too


# --- against Hugging Face peft ------------------------------------------------------------------------
def _peft_model_and_values(ranks=(4, 4, 4), alphas=(8, 4, 16)):
    """A tiny Llama with three peft LoRA adapters of random factors, and the same adapters as peftkit values
    (tensors in the model's module order, as peft visits them)."""
    from peft import LoraConfig, get_peft_model

    configs = [LoraConfig(r=r, lora_alpha=a, target_modules=TARGETS) for r, a in zip(ranks, alphas, strict=True)]
    model = get_peft_model(tiny_llama(), configs[0], adapter_name="a0")
    for i, cfg in enumerate(configs[1:], start=1):
        model.add_adapter(f"a{i}", cfg)
    torch.manual_seed(1)
    values = []
    for i, (r, alpha) in enumerate(zip(ranks, alphas, strict=True)):
        tensors = {}
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and f"a{i}" in module.lora_A:
                for part in ("lora_A", "lora_B"):
                    weight = getattr(module, part)[f"a{i}"].weight
                    with torch.no_grad():
                        weight.normal_()
                    tensors[f"{name}.{part}"] = weight.detach().clone()
        values.append((peftkit.LoRAConfig(r=r, alpha=alpha, targets=TARGETS), {}, tensors))
    return model, values


def _peftkit_adapters():
    return _peft_model_and_values()[1]


@pytest.mark.parametrize("how", MODES)
def test_equal_to_peft_add_weighted_adapter(how):
    """The merged delta of every module equals peft's, random modes included: peft draws the new adapter's
    init before its masks, so torch is seeded right after that injection and our masks use the same seed."""
    model, values = _peft_model_and_values(ranks=(4, 2, 3) if how in ("cat", "svd") else (4, 4, 4))
    weights = [0.5, -0.3, 0.8]
    options = {"density": 0.5} if how not in ("linear", "cat", "svd") else {}
    if "ties" in how:
        options["majority_sign_method"] = "frequency"
    inject = model.base_model.inject_adapter

    def inject_then_seed(*args, **kwargs):
        inject(*args, **kwargs)
        torch.manual_seed(7)
    model.base_model.inject_adapter = inject_then_seed
    model.add_weighted_adapter(["a0", "a1", "a2"], weights, "merged", combination_type=how, **options)
    config, _, tensors = combine(values, weights, how, seed=7, **options)
    compared = 0
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            ours = config.scaling_for(name) * tensors[f"{name}.lora_B"] @ tensors[f"{name}.lora_A"]
            theirs = module.get_delta_weight("merged")
            assert torch.allclose(ours, theirs, atol=1e-5 * float(theirs.abs().max())), name
            compared += 1
    assert compared == 6


def test_svd_truncation_is_the_best_rank_k_approximation():
    values = _peftkit_adapters()
    config, _, t = combine(values, [1.0, 1.0, 1.0], "svd", svd_rank=2)
    name = "model.layers.0.self_attn.q_proj"
    full = sum(c.scaling_for(name) * v[f"{name}.lora_B"] @ v[f"{name}.lora_A"] for c, _, v in values)
    u, s, vh = torch.linalg.svd(full)
    assert t[f"{name}.lora_A"].shape[0] == 2
    assert torch.allclose(t[f"{name}.lora_B"] @ t[f"{name}.lora_A"], (u[:, :2] * s[:2]) @ vh[:2], atol=1e-4)


# --- as files and on a model --------------------------------------------------------------------------
def _saved_adapters(tmp_path, n=2, seed=0):
    dirs = []
    for i in range(n):
        model = peftkit.apply(tiny_llama(), peftkit.LoRAConfig(r=4 + 2 * i, alpha=8, targets=TARGETS))
        torch.manual_seed(seed + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(std=0.2)
        dirs.append(peftkit.save(model, tmp_path / f"a{i}"))
    return dirs


def test_cat_is_the_exact_weighted_sum_and_loads_back(tmp_path):
    dirs = _saved_adapters(tmp_path)
    weights = [0.7, -0.4]
    config, meta, tensors = combine(dirs, weights, "cat")
    write_adapter(tmp_path / "cat", config, tensors, meta)
    combined = peftkit.load(tiny_llama(), tmp_path / "cat")  # the base fingerprint carried over: no override needed
    reference = tiny_llama()
    with torch.no_grad():
        for cfg, _, t in (read_adapter(d) for d in dirs):
            for key in [k for k in t if k.endswith(".lora_A")]:
                name = key[: -len(".lora_A")]
                w = weights[0] if cfg.r == 4 else weights[1]
                reference.get_submodule(name).weight += w * cfg.scaling_for(name) * t[name + ".lora_B"] @ t[key]
    ids = torch.randint(0, 100, (2, 9))
    assert torch.allclose(combined(ids).logits, reference(ids).logits, atol=1e-4)
    assert config.r == 10 and config.scaling_for("model.layers.0.self_attn.q_proj") == 1.0


def test_data_free_q_from_collected_inputs_changes_outputs_less_than_dare(tmp_path):
    (directory,) = _saved_adapters(tmp_path, n=1)
    cfg, meta, t = read_adapter(directory)
    names = [k[: -len(".lora_A")] for k in t if k.endswith(".lora_A")]
    batches = [{"input_ids": torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    inputs = collect_layer_inputs(tiny_llama(), batches, names)
    assert all(inputs[n].shape == (128, t[n + ".lora_A"].shape[1]) for n in names)  # 2 batches x 4 x 16 tokens

    def output_change(adapter):
        _, _, pruned = adapter
        total = 0.0
        for n in names:
            delta = cfg.scaling_for(n) * t[n + ".lora_B"] @ t[n + ".lora_A"]
            new = adapter[0].scaling_for(n) * pruned[n + ".lora_B"] @ pruned[n + ".lora_A"]
            total += float(((inputs[n] @ (delta - new).T) ** 2).sum())
        return total
    for how in ("dare_linear_svd", "dare_linear"):
        rank = {"svd_rank": 32} if how.endswith("svd") else {}  # full rank: the pruned delta is kept whole
        plain = combine([directory], [1.0], how, density=0.1, **rank)
        darex = combine([directory], [1.0], how, density=0.1, q="data-free", inputs=inputs, **rank)
        assert output_change(darex) < output_change(plain)


def test_tune_q_picks_the_best_q_on_a_user_score():
    values = _peftkit_adapters()
    name = "model.layers.0.self_attn.q_proj.lora_A"

    def score(adapter):  # prefers the q whose result is closest to norm 3
        return -abs(float(adapter[2][name].norm()) - 3.0)
    q, adapter, scores = tune_q(values, [1, 1, 1], score, qs=[0.1, 0.3, 0.9], density=0.1)
    assert set(scores) == {0.1, 0.3, 0.9} and scores[q] == max(scores.values())
    assert torch.equal(adapter[2][name], combine(values, [1, 1, 1], "dare_linear", density=0.1, q=q)[2][name])


# --- refusals -----------------------------------------------------------------------------------------
def test_refuses_what_does_not_combine():
    values = _peftkit_adapters()
    with pytest.raises(CombineError, match="unknown combination 'mean'"):
        combine(values, [1, 1, 1], "mean")
    with pytest.raises(CombineError, match="one weight per adapter"):
        combine(values, [1, 1], "linear")
    other = (peftkit.LoRAConfig(r=4, alpha=8, targets=["q_proj"]), {}, values[1][2])
    with pytest.raises(CombineError, match="differs from adapter 0 in targets"):
        combine([values[0], other], [1, 1], "linear")
    ia3 = (peftkit.IA3Config(), {}, {})
    with pytest.raises(CombineError, match="multiplicatively"):
        combine([values[0], ia3], [1, 1], "linear")
    based = [(c, {"base_fingerprint": {"x": str(i)}}, t) for i, (c, _, t) in enumerate(values)]
    with pytest.raises(CombineError, match="different base model"):
        combine(based, [1, 1, 1], "linear")
    combine(based, [1, 1, 1], "linear", allow_different_base=True)
    with pytest.raises(CombineError, match="q \\(DAREx-q\\) applies to the dare modes"):
        combine(values, [1, 1, 1], "ties", density=0.5, q=0.5)
    with pytest.raises(CombineError, match="needs inputs"):
        combine(values, [1, 1, 1], "dare_linear", density=0.5, q="data-free")
    with pytest.raises(CombineError, match="density must be in"):
        combine(values, [1, 1, 1], "dare_ties", density=0.0)


def test_refuses_mixed_ranks_in_factor_space():
    _, values = _peft_model_and_values(ranks=(4, 2, 4))
    with pytest.raises(CombineError, match="needs one rank for all adapters"):
        combine(values, [1, 1, 1], "ties", density=0.5)
    combine(values, [1, 1, 1], "cat")


# --- command line -------------------------------------------------------------------------------------
def test_cli_combine_writes_a_loadable_adapter_and_reports_user_errors(tmp_path, capsys):
    dirs = [str(d) for d in _saved_adapters(tmp_path)]
    out = tmp_path / "out"
    code = main(["combine", "--adapter", dirs[0], "--adapter", dirs[1], "--weights", "0.5,0.5", "--how", "ties_svd",
                 "--density", "0.5", "--out", str(out)])
    assert code == 0 and "rank 6" in capsys.readouterr().out
    peftkit.load(tiny_llama(), out)
    assert main(["combine", "--adapter", dirs[0], "--weights", "0.5,x", "--out", str(out)]) == 2
    assert "--weights takes comma-separated numbers" in capsys.readouterr().err
    assert main(["combine", "--adapter", dirs[0], "--adapter", dirs[1], "--weights", "1,1", "--how", "ties",
                 "--density", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs one rank for all adapters" in err
    assert tuple(COMBINE_MODES) == tuple(MODES)


def test_magnitude_prune_keeps_exactly_k_like_peft_even_with_ties():
    from peft.utils.merge_utils import magnitude_based_pruning

    from peftkit.merging import magnitude_prune
    t = torch.randn(37, 11)
    for density in (0.01, 0.3, 0.99):
        assert torch.equal(magnitude_prune(t, density), magnitude_based_pruning(t, density))
    tied = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.5, 1.0])
    assert int((magnitude_prune(tied, 0.5) != 0).sum()) == 3


def test_the_package_does_not_shadow_peftkit_merge():
    """A subpackage named `peftkit/merge/` replaced the public `peftkit.merge(model)` function on import."""
    import peftkit.merging  # noqa: F401
    from peftkit.core.apply import merge

    assert peftkit.merge is merge


def test_combine_and_compress_read_peft_lora_directories(tmp_path):
    """A LoRA that Hugging Face peft saved combines (and compresses) as the same adapter saved by peftkit."""
    import peft

    from tiny_models import tiny_llama

    peft_dirs, ours = [], []
    for i in range(2):
        torch.manual_seed(i)
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
        theirs.save_pretrained(tmp_path / f"peft{i}")
        peft_dirs.append(tmp_path / f"peft{i}")
        peftkit.save(peftkit.load(tiny_llama(), tmp_path / f"peft{i}"), tmp_path / f"ours{i}")
        ours.append(tmp_path / f"ours{i}")
    for how, options in (("cat", {}), ("ties", {"density": 0.5})):
        _, _, from_peft = peftkit.combine(peft_dirs, [0.6, 0.4], how=how, **options)
        _, _, from_ours = peftkit.combine(ours, [0.6, 0.4], how=how, **options)
        assert from_peft.keys() == from_ours.keys()
        assert all(torch.equal(from_peft[k], from_ours[k]) for k in from_ours)
    _, _, small = peftkit.compress(peft_dirs[0], density=0.1)
    assert small.keys() == peftkit.compress(ours[0], density=0.1)[2].keys()


def test_peft_directories_that_need_their_model_are_refused_with_what_to_do(tmp_path):
    """DoRA's magnitude and an (IA)^3 vector depend on the base; such peft files are read with their model only."""
    import peft

    from tiny_models import tiny_llama

    configs = {"dora": peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
               "ia3": peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])}
    for name, cfg in configs.items():
        peft.get_peft_model(tiny_llama(), cfg).save_pretrained(tmp_path / name)
        with pytest.raises(peftkit.AdapterFileError, match="read with its base model only"):
            peftkit.compress(tmp_path / name, density=0.1)
