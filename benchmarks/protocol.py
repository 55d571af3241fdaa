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
