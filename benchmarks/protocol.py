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
}
INFER_VARIANTS = ["base", "lora16-unmerged", "lora16-merged"]

MODEL_SIZES = {  # LlamaConfig keyword arguments
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=6, vocab_size=8000, tie_word_embeddings=False),
    # TinyLlama-1.1B's shape: 1.10B parameters
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}
