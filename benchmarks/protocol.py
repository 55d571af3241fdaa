"""What the benchmark runs: the configurations, model sizes and inference variants (shared by
bench_step.py, which runs them, and report.py, which summarises them)."""

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
}
ISSUE3 = ["adalora", "increlora", "triadaptlora", "randlora", "bone", "kron", "svfit16", "loldu16", "hydra8",
          "dsee16", "pego4x4"]
"""The configurations the weight-update issue sets targets for (1.3x the floor, 1.1x LoRA r16's memory)."""
QV = ["q_proj", "v_proj"]
INFER_VARIANTS = ["base", "lora16-unmerged", "lora16-merged"]

MODEL_SIZES = {  # LlamaConfig keyword arguments
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=6, vocab_size=8000, tie_word_embeddings=False),
    # TinyLlama-1.1B's shape: 1.10B parameters
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}


def peftkit_config(name: str, total_steps: int = 0):
    import peftkit

    return {
        "lora8-qv": lambda: peftkit.LoRAConfig(targets=["q_proj", "v_proj"], r=8, alpha=16),
        "lora16-all": lambda: peftkit.LoRAConfig(targets=ALL_LINEAR, r=16, alpha=32),
        "dora8-all": lambda: peftkit.DoRAConfig(targets=ALL_LINEAR, r=8, alpha=16),
        "ia3": lambda: peftkit.IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
        "prompt20": lambda: peftkit.PromptTuningConfig(num_virtual_tokens=20),
        "adalora": lambda: method("adalora", targets=QV, init_r=12, target_r=8, total_steps=total_steps),
        "increlora": lambda: method("increlora", targets=QV, target_rank=8, total_steps=total_steps, top_h=12,
                                    init_warmup=1, incre_interval=1),
        "triadaptlora": lambda: method("triadaptlora", targets=QV, target_rank=8, total_steps=total_steps,
                                       init_warmup=1, incre_interval=1),
        "randlora": lambda: method("randlora", targets=ALL_LINEAR, r=32),
        "bone": lambda: method("bone", targets=ALL_LINEAR, r=64),
        "kron": lambda: method("diffusekrona", targets=ALL_LINEAR),
        "svfit16": lambda: method("svfit", targets=ALL_LINEAR, r=16),
        "loldu16": lambda: method("loldu", targets=ALL_LINEAR, r=16),
        "hydra8": lambda: method("hydra", targets=ALL_LINEAR, r=8),
        "dsee16": lambda: method("dsee", targets=ALL_LINEAR, r=16, num_sparse=64),
        "pego4x4": lambda: method("pego", targets=ALL_LINEAR, r=4, num_modules=4),
    }[name]()


def method(name: str, **fields):
    """A registered method's config by name (the benchmark needs no import per method)."""
    import peftkit

    return peftkit.get_method(name).config_cls(**fields)


def peft_config(name: str, total_steps: int = 0):
    import peft

    return {
        "lora8-qv": lambda: peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                                            r=8, lora_alpha=16),
        "lora16-all": lambda: peft.LoraConfig(task_type="CAUSAL_LM", target_modules=ALL_LINEAR, r=16, lora_alpha=32),
        "dora8-all": lambda: peft.LoraConfig(task_type="CAUSAL_LM", target_modules=ALL_LINEAR, r=8, lora_alpha=16,
                                             use_dora=True),
        "ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]),
        "prompt20": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
        "adalora": lambda: peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=QV, init_r=12, target_r=8,
                                              total_step=total_steps),
        "randlora": lambda: peft.RandLoraConfig(task_type="CAUSAL_LM", target_modules=ALL_LINEAR, r=32),
        "bone": lambda: peft.MissConfig(task_type="CAUSAL_LM", target_modules=ALL_LINEAR, r=64, init_weights="bat"),
        "kron": lambda: peft.LoKrConfig(task_type="CAUSAL_LM", target_modules=ALL_LINEAR, r=8),
    }[name]()


class PerStepWork:
    """What a user runs besides forward/backward/step for a method with a schedule: peftkit's
    `MethodSchedule` (regularizer in the loss, rank allocation after backward) or peft AdaLoRA's
    `update_and_allocate` (peft adds AdaLoRA's regularizer inside the forward itself)."""

    def __init__(self, model, lib: str) -> None:
        self.schedule, self.peft_allocate = None, None
        if lib == "peftkit":
            import peftkit

            self.schedule = peftkit.schedule_for(model) if peftkit.has_adapter(model) else None
        elif lib == "peft" and hasattr(getattr(model, "base_model", None), "update_and_allocate"):
            self.peft_allocate = model.base_model.update_and_allocate
        self.model, self.step = model, 0

    def loss(self, loss):
        term = self.schedule.extra_loss(self.model) if self.schedule is not None else None
        return loss if term is None else loss + term

    def after_backward(self, optimizer) -> None:
        self.step += 1
        if self.schedule is not None:
            self.schedule.on_after_backward(self.step, self.model, optimizer)
        if self.peft_allocate is not None:
            self.peft_allocate(self.step)
