"""What the benchmark runs: the configurations, model sizes, suites and which configurations merge
(shared by bench_step.py and scaling.py, which run them, worker.py, which builds them, and report.py).

A configuration is a name in CONFIGS with a peftkit builder (`peftkit_config`) and, where Hugging Face
peft 0.21.2 has the method, a peft builder (`peft_config`) for the same adapter. Builders may read the
run's context: total steps (rank schedules), sequence length (DePT), the model's shape (P-tuning,
LLaMA-Adapter, LoFiT) and `rank`, which overrides the configuration's rank (or bottleneck size) for the
scaling study; RANKED lists the configurations that have one.
"""

UNCONTENDED = 0.9
"""A job whose CPU time / wall time is below this x threads lost a core to another process."""

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# config name -> (label, libraries it runs for). "torch" jobs are library-free references.
CONFIGS = {
    "full": ("full fine-tuning", ["torch"]),
    "floor": ("floor", ["torch"]),
    "lora8-qv": ("LoRA r8 on q,v", ["peft", "peftkit"]),
    "lora16-all": ("LoRA r16 on all 7 linear", ["peft", "peftkit"]),
    "dora8-all": ("DoRA r8 on all linear", ["peft", "peftkit"]),
    "ia3": ("(IA)3 default targets", ["peft", "peftkit"]),
    "prompt20": ("prompt tuning, 20 tokens", ["peft", "peftkit"]),
    # weight-update methods (issue 3); peft runs where it has the method
    "adalora": ("AdaLoRA init_r 12, target_r 8 (q,v)", ["peft", "peftkit"]),
    "increlora": ("IncreLoRA to rank 8 (q,v)", ["peftkit"]),
    "triadaptlora": ("TriAdaptLoRA to rank 8 (q,v)", ["peftkit"]),
    "randlora": ("RandLoRA r32 all linear", ["peft", "peftkit"]),
    "bone": ("Bone (MiSS bat) r64 all linear", ["peft", "peftkit"]),
    "kron": ("Kronecker: LoKr r8 / DiffuseKronA all linear", ["peft", "peftkit"]),
    "svfit16": ("SVFit r16 all linear", ["peftkit"]),
    "loldu16": ("LoLDU r16 all linear", ["peftkit"]),
    "hydra8": ("Hydra r8 all linear", ["peftkit"]),
    "dsee16": ("DSEE r16 + 64 sparse all linear", ["peftkit"]),
    "pego4x4": ("PEGO 4 x r4 all linear", ["peftkit"]),
    # additive, prompt and selective methods (issue 4); peft has LN tuning, prefix, P-tuning, LLaMA-Adapter
    "houlsby": ("Houlsby adapters m 64 (after attn + MLP)", ["peftkit"]),
    "pfeiffer": ("Pfeiffer adapters m 64 (after MLP)", ["peftkit"]),
    "parallel": ("parallel adapters m 64 (alongside MLP)", ["peftkit"]),
    "ssf": ("SSF default targets", ["peftkit"]),
    "difffit": ("DiffFit (biased Llama)", ["peftkit"]),
    "ln-tuning": ("LN tuning", ["peft", "peftkit"]),
    "bitfit": ("BitFit (biased Llama)", ["peftkit"]),
    "lofit-s1": ("LoFiT stage 1, all heads", ["peftkit"]),
    "lofit16": ("LoFiT stage 2, 16 heads", ["peftkit"]),
    "prefix20": ("prefix tuning, 20 tokens", ["peft", "peftkit"]),
    "ptuning20": ("P-tuning, 20 tokens, MLP", ["peft", "peftkit"]),
    "dept": ("DePT m 10 + r 6", ["peftkit"]),
    "llama-adapter": ("LLaMA-Adapter 20 tokens, all layers", ["peft", "peftkit"]),
}
ISSUE3 = ["adalora", "increlora", "triadaptlora", "randlora", "bone", "kron", "svfit16", "loldu16", "hydra8",
          "dsee16", "pego4x4"]
"""The configurations the weight-update issue sets targets for (1.3x the floor, 1.1x LoRA r16's memory)."""
ISSUE4 = ["houlsby", "pfeiffer", "parallel", "ssf", "difffit", "ln-tuning", "bitfit", "lofit-s1", "lofit16",
          "prompt20", "prefix20", "ptuning20", "dept", "llama-adapter"]
"""The additive, prompt and selective methods of issue 4 (targets in report.py: 1.15x / 1.25x the floor)."""
PROMPT_LIKE = ["prompt20", "prefix20", "ptuning20", "dept", "llama-adapter"]
"""Methods that lengthen the sequence or the attention (issue 4 allows them 1.25x the floor)."""
NEEDS_BIAS = ["bitfit", "difffit"]
"""Configurations that train biases: they run on the "-bias" variant of the model size, against its own floor."""
ADAPTERS = ["houlsby", "pfeiffer", "parallel"]
ISSUE5 = ["floor", "full", "lora8-qv", "lora16-all", "dora8-all", "ia3", "prompt20", "adalora", "randlora", "bone",
          "kron", *ADAPTERS]
"""The benchmark suite's configurations (issue 5): training and inference at sequence 256 and 1024."""
SUITES = {
    "issue5": ISSUE5,
    "issue3": ["floor", "lora16-all", *ISSUE3],  # LoRA r16: the memory reference of issue 3's targets
    "issue4": ["floor", *ISSUE4],
    "all": list(CONFIGS),
}
NOT_MERGEABLE = [*ADAPTERS, *PROMPT_LIKE]
"""Nonlinear or sequence-lengthening: inference is timed unmerged only."""
NO_INFERENCE = ["floor", "full", "bitfit", "ln-tuning", "difffit"]
"""No inference timing: references, and the selection methods, whose trained tensors are the model's own
(there are no adapter layers to swap out, so the base model would need a second copy)."""
MERGEABLE = [c for c in CONFIGS if c not in NOT_MERGEABLE + NO_INFERENCE]
RANKED = ["lora8-qv", "lora16-all", "dora8-all", "adalora", "increlora", "triadaptlora", "randlora", "bone",
          "svfit16", "loldu16", "hydra8", "dsee16", "pego4x4", *ADAPTERS]
"""Configurations whose rank (bottleneck size for the adapters) `rank` overrides."""
QV = ["q_proj", "v_proj"]

MODEL_SIZES = {  # LlamaConfig keyword arguments
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=6, vocab_size=8000, tie_word_embeddings=False),
    # the same shape with biases in every projection (BitFit and DiffFit have nothing to train without them)
    "small-bias": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                       num_key_value_heads=6, vocab_size=8000, tie_word_embeddings=False, attention_bias=True,
                       mlp_bias=True),
    # TinyLlama-1.1B's shape: 1.10B parameters
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}
MODEL_SIZES["1b-bias"] = {**MODEL_SIZES["1b"], "attention_bias": True, "mlp_bias": True}


def model_size_for(config: str, size: str) -> str:
    """The model size a configuration runs on: the "-bias" variant of `size` for the bias-training ones."""
    return f"{size}-bias" if config in NEEDS_BIAS and not size.endswith("-bias") else size


def spread_heads(model: dict, k: int) -> list[list[int]]:
    """k (layer, head) pairs spread over the layers: head 0 of every layer, then head 1, ... (LoFiT stage 2)."""
    layers = model["num_hidden_layers"]
    return [[i % layers, i // layers] for i in range(k)]


def peftkit_config(name: str, total_steps: int = 0, seq: int = 256, model: dict | None = None,
                   rank: int | None = None):
    """peftkit's configuration `name` for a run of `total_steps` steps on `seq` tokens of the model `model`
    (LlamaConfig keyword arguments; the "small" size by default), with rank `rank` if given."""
    import peftkit

    model = model or MODEL_SIZES["small"]

    def r(default: int) -> int:
        return rank or default

    return {
        "lora8-qv": lambda: peftkit.LoRAConfig(targets=QV, r=r(8), alpha=2 * r(8)),
        "lora16-all": lambda: peftkit.LoRAConfig(targets=ALL_LINEAR, r=r(16), alpha=2 * r(16)),
        "dora8-all": lambda: peftkit.DoRAConfig(targets=ALL_LINEAR, r=r(8), alpha=2 * r(8)),
        "ia3": lambda: peftkit.IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
        "prompt20": lambda: peftkit.PromptTuningConfig(num_virtual_tokens=20),
        # rank = the rank schedules' target (AdaLoRA starts from 1.5 x it, as 12 -> 8)
        "adalora": lambda: method("adalora", targets=QV, init_r=r(8) * 3 // 2, target_r=r(8), total_steps=total_steps),
        "increlora": lambda: method("increlora", targets=QV, target_rank=r(8), total_steps=total_steps, top_h=12,
                                    init_warmup=1, incre_interval=1),
        "triadaptlora": lambda: method("triadaptlora", targets=QV, target_rank=r(8), total_steps=total_steps,
                                       init_warmup=1, incre_interval=1),
        "randlora": lambda: method("randlora", targets=ALL_LINEAR, r=r(32)),
        "bone": lambda: method("bone", targets=ALL_LINEAR, r=r(64)),
        "kron": lambda: method("diffusekrona", targets=ALL_LINEAR),
        "svfit16": lambda: method("svfit", targets=ALL_LINEAR, r=r(16)),
        "loldu16": lambda: method("loldu", targets=ALL_LINEAR, r=r(16)),
        "hydra8": lambda: method("hydra", targets=ALL_LINEAR, r=r(8)),
        "dsee16": lambda: method("dsee", targets=ALL_LINEAR, r=r(16), num_sparse=64),
        "pego4x4": lambda: method("pego", targets=ALL_LINEAR, r=r(4), num_modules=4),
        # bottleneck m = 64 (peftkit's default; LLM-Adapters' 256 is for d = 4096), relu, default placements
        "houlsby": lambda: method("adapter", kind="houlsby", bottleneck=r(64)),
        "pfeiffer": lambda: method("adapter", kind="pfeiffer", bottleneck=r(64)),
        "parallel": lambda: method("adapter", kind="parallel", bottleneck=r(64)),
        "ssf": lambda: method("ssf"),
        "difffit": lambda: method("difffit"),
        "ln-tuning": lambda: method("ln-tuning"),
        "bitfit": lambda: method("bitfit"),
        "lofit-s1": lambda: method("lofit"),
        # the heads would come from stage 1; which 16 does not change the cost, so they are fixed here
        "lofit16": lambda: method("lofit", heads=spread_heads(model, 16)),
        "prefix20": lambda: method("prefix-tuning", num_virtual_tokens=20),
        "ptuning20": lambda: method("p-tuning", num_virtual_tokens=20, encoder="mlp"),
        # prompt20's parameter budget at seq 256 (20 d = 10 d + 6 (256 + d) at d = 384); the update covers
        # every position (s = seq), as the reference pads every input to s
        "dept": lambda: method("dept", num_virtual_tokens=10, r=6, max_length=seq),
        "llama-adapter": lambda: method("llama-adapter", adapter_len=20,
                                        adapter_layers=model["num_hidden_layers"]),
    }[name]()


def method(name: str, **fields):
    """A registered method's config by name (the benchmark needs no import per method)."""
    import peftkit

    return peftkit.get_method(name).config_cls(**fields)


def peft_config(name: str, total_steps: int = 0, seq: int = 256, model: dict | None = None,
                rank: int | None = None):
    """Hugging Face peft's counterpart of `peftkit_config(name, ...)` (KeyError where peft has none)."""
    import peft

    model = model or MODEL_SIZES["small"]
    lm = {"task_type": "CAUSAL_LM"}

    def r(default: int) -> int:
        return rank or default

    return {
        "lora8-qv": lambda: peft.LoraConfig(**lm, target_modules=QV, r=r(8), lora_alpha=2 * r(8)),
        "lora16-all": lambda: peft.LoraConfig(**lm, target_modules=ALL_LINEAR, r=r(16), lora_alpha=2 * r(16)),
        "dora8-all": lambda: peft.LoraConfig(**lm, target_modules=ALL_LINEAR, r=r(8), lora_alpha=2 * r(8),
                                             use_dora=True),
        "ia3": lambda: peft.IA3Config(**lm, target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]),
        "prompt20": lambda: peft.PromptTuningConfig(**lm, num_virtual_tokens=20),
        "adalora": lambda: peft.AdaLoraConfig(**lm, target_modules=QV, init_r=r(8) * 3 // 2, target_r=r(8),
                                              total_step=total_steps),
        "randlora": lambda: peft.RandLoraConfig(**lm, target_modules=ALL_LINEAR, r=r(32)),
        "bone": lambda: peft.MissConfig(**lm, target_modules=ALL_LINEAR, r=r(64), init_weights="bat"),
        "kron": lambda: peft.LoKrConfig(**lm, target_modules=ALL_LINEAR, r=8),
        "ln-tuning": lambda: peft.LNTuningConfig(**lm),  # Llama default: input/post-attention norms and the final norm
        "prefix20": lambda: peft.PrefixTuningConfig(**lm, num_virtual_tokens=20),
        "ptuning20": lambda: peft.PromptEncoderConfig(**lm, num_virtual_tokens=20, encoder_reparameterization_type="MLP",
                                                      encoder_hidden_size=model["hidden_size"]),
        "llama-adapter": lambda: peft.AdaptionPromptConfig(**lm, adapter_len=20,
                                                           adapter_layers=model["num_hidden_layers"]),
    }[name]()
