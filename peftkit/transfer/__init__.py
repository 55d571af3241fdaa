"""Moving a trained adapter to another base model.

`trans_lora`: Trans-LoRA (Wang et al. 2024, arXiv:2405.17258), nearly data-free transfer of a LoRA by
distillation on filtered synthetic inputs. `gemma_asset`: the Gemma-3-270M base its benchmark uses.
"""

from .trans_lora import (
    answer_logprobs,
    answer_probs,
    discriminator_scores,
    distill,
    exact_match,
    filter_realistic,
    fit_answers,
    generate_synthetic,
    teacher_label,
    train_discriminator,
    transfer,
)

__all__ = ["answer_logprobs", "answer_probs", "discriminator_scores", "distill", "exact_match", "filter_realistic",
           "fit_answers", "generate_synthetic", "teacher_label", "train_discriminator", "transfer"]
