"""Forward-only (inference) cost of one configuration, merged and unmerged against the base model, and
the adapter file overhead; run inside a worker process (worker.py)."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from protocol import MERGEABLE, peft_config, peftkit_config
from worker import adapt, autocast, build_model, make_batch, timed


def adapter_children(root, lib: str) -> list[tuple]:
    """(parent, name, wrapper, wrapped module) for every adapter layer of the library below `root`."""
    found = []
    for parent in list(root.modules()):
        for name, child in parent.named_children():
            if lib == "peftkit":
                from peftkit.core.layer import AdapterLayer

                inner = child.base if isinstance(child, AdapterLayer) else None
            else:  # peft's tuner layers hold `base_layer`; its LLaMA-Adapter attention holds `model`
                inner = getattr(child, "base_layer", None)
                if inner is None and type(child).__name__ == "AdaptedAttention":
                    inner = child.model
            if inner is not None:
                found.append((parent, name, child, inner))
    return found


class InferenceStates:
    """One adapted model (every trainable tensor moved off its init, so that the adapter changes the
    output and merging changes the weights) put into each variant before a timed forward.

    All variants run on the same weight tensors, so the comparison is free of the few-percent
    differences that separately built, identical models show on CPU (where their memory lands):
    "base" swaps every adapter layer in its parent for the module it wraps (no wrapper left; peftkit's
    layers are also disabled, which turns the soft-prompt hooks off; peft's prompt methods run the
    base model they wrap), "unmerged" is the adapter as trained, "merged" is `peftkit.merge` / peft's
    `merge_adapter()` (both keep their layers, so the adapter can be unmerged). In the merged state
    the base variant runs on the merged weights, which cost the same.
    """

    def __init__(self, spec: dict) -> None:
        import torch

        self.lib, self.mergeable = spec["lib"], spec["config"] in MERGEABLE
        self.model = adapt(build_model(spec), spec).eval()
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in self.model.parameters():
                if p.requires_grad:
                    p.add_((torch.randn(p.shape, generator=gen) * 0.02).to(p.device, p.dtype))
        self.plain = self.model if self.lib == "peftkit" else self.model.get_base_model()
        self.swaps = adapter_children(self.plain, self.lib)
        self.merged = False

    def set_merged(self, merged: bool) -> None:
        if merged == self.merged:
            return
        import peftkit

        if self.lib == "peftkit":
            (peftkit.merge if merged else peftkit.unmerge)(self.model)
        else:
            self.model.merge_adapter() if merged else self.model.unmerge_adapter()
        self.merged = merged

    def model_for(self, variant: str):
        """The module to call for `variant`, after putting the weights and wrappers in place ("original":
        the base model on its original weights, to check that the adapter changes the output)."""
        for parent, name, wrapper, _ in self.swaps:  # wrappers back first: merge/unmerge look for them
            setattr(parent, name, wrapper)
            if self.lib == "peftkit":
                wrapper.enabled = True
        self.set_merged(variant == "merged" or (variant == "base" and self.mergeable))
        if variant in ("base", "original"):
            for parent, name, wrapper, inner in self.swaps:
                if self.lib == "peftkit":
                    wrapper.enabled = False  # a soft prompt's model hook checks its layer
                setattr(parent, name, inner)
            return self.plain
        return self.model


def infer_job(spec: dict) -> dict:
    """Forward-only (no grad) time of base / unmerged / merged (mergeable configurations), interleaved."""
    import torch

    states = InferenceStates(spec)
    ids = make_batch(spec, states.plain.config.vocab_size)
    variants = ["base", "unmerged"] + (["merged"] if states.mergeable else [])
    logits = {}
    times: dict[str, list[float]] = {k: [] for k in variants}

    def forward(model, name: str) -> None:
        with torch.no_grad(), autocast(spec):
            logits[name] = model(input_ids=ids, use_cache=False).logits[:, -ids.shape[1]:]

    order, cpu, wall = list(variants), [], []
    for i in range(spec["warmup"] + spec["steps"]):
        order = order[1:] + order[:1]  # rotate, so no variant always runs first
        for name in order:
            model = states.model_for(name)
            t = timed(lambda model=model, name=name: forward(model, name), spec["device"], cpu)
            wall.append(t)
            if i >= spec["warmup"]:
                times[name].append(t)
    diff = ((logits["merged"].float() - logits["unmerged"].float()).abs().max().item()
            if states.mergeable else None)
    forward(states.model_for("original"), "original")
    changed = (logits["unmerged"].float() - logits["original"].float()).abs().max().item()
    return {"forward_ms": {k: statistics.median(v) for k, v in times.items()}, "forward_ms_all": times,
            "cpu_util": statistics.median(c / t for c, t in zip(cpu, wall, strict=True)),
            "merged_vs_unmerged_max_abs_logit_diff": diff, "adapter_vs_base_max_abs_logit_diff": changed}


def file_job(spec: dict) -> dict:
    """Adapter file overhead of LoRA r16 all-linear: file bytes minus raw tensor bytes (both libraries)."""
    import peft

    import peftkit

    with tempfile.TemporaryDirectory() as tmp:
        path = peftkit.save(peftkit.apply(build_model(spec), peftkit_config("lora16-all")), Path(tmp) / "peftkit")
        out = {"peftkit": _file_sizes(path / "adapter.safetensors", path / "peftkit_adapter.json")}
        out["peftkit"]["json_text"] = (path / "peftkit_adapter.json").read_text()
        peft.get_peft_model(build_model(spec), peft_config("lora16-all")).save_pretrained(Path(tmp) / "peft")
        path = Path(tmp) / "peft"
        out["peft"] = _file_sizes(path / "adapter_model.safetensors", path / "adapter_config.json")
    return out


def _file_sizes(weights: Path, config: Path) -> dict:
    """Sizes of an adapter's two files; overhead = bytes beyond the raw tensor data."""
    from safetensors.torch import load_file

    tensor_bytes = sum(t.numel() * t.element_size() for t in load_file(str(weights)).values())
    st, js = weights.stat().st_size, config.stat().st_size
    return {"tensor_bytes": tensor_bytes, "safetensors_bytes": st, "json_bytes": js,
            "safetensors_overhead": st - tensor_bytes, "total_overhead": st - tensor_bytes + js}
