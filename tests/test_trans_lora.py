"""Trans-LoRA (methods.md 11.2) on a toy task with tiny random models: filter, data isolation, distillation.

Toy task: an input is three words drawn from 12 "positive" and 12 "negative" words; the answer is
" yes" when the last word is positive. The teacher is a tiny Llama with a LoRA trained on real data;
the student a tiny Gemma 2 (another family); the generator a tiny random Llama over the toy vocabulary,
so its samples are word salad that only partly looks like the task.
"""

from __future__ import annotations

import random

import pytest
import torch

import peftkit
from peftkit.transfer import trans_lora as tl

from tiny_models import tiny_gemma2, tiny_llama

POS = [f"p{i}" for i in range(12)]
NEG = [f"n{i}" for i in range(12)]
WORDS = ["[PAD]", "[EOS]", "[UNK]", *POS, *NEG, "Input:", "Answer:", "yes", "no",
         "Text:", "Is", "this", "text", "real", "or", "synthetic?", "synthetic"]
JUNK = ["Answer:", "yes", "no", "Is", "this", "text"]
TEMPLATE = "Input: {input} Answer:"
ANSWERS = (" no", " yes")
LORA = dict(r=8, alpha=16.0, targets="all-linear")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine it costs 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="[PAD]", eos_token="[EOS]",
                                   unk_token="[UNK]")


def examples(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    words = [[rng.choice(POS + NEG) for _ in range(3)] for _ in range(n)]
    return [(" ".join(ws), int(ws[-1] in POS)) for ws in words]


def generator(junk: bool = True):
    """A random tiny Llama over the toy vocabulary that samples the 24 task words (and 6 junk words).

    Prompting alone cannot teach a random model the task's format; suppressing the other tokens
    stands in for a pretrained generator that has picked it up from the seeds. With `junk`, about
    half of its samples hold a junk word, which a discriminator would learn to reject.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      vocab_size=len(WORDS), max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                      bos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.suppress_tokens = [i for i, w in enumerate(WORDS) if w not in POS + NEG + (JUNK if junk else [])]
    return model


def accuracy(model, tok, data) -> float:
    probs = tl.answer_probs(model, tok, [TEMPLATE.format(input=t) for t, _ in data], ANSWERS, batch_size=64)
    return (probs.argmax(-1) == torch.tensor([y for _, y in data])).float().mean().item()


@pytest.fixture(scope="module")
def teacher(tok):
    """Source base + source LoRA, trained on real labelled data (the only place real data is used)."""
    model = peftkit.apply(tiny_llama(0), peftkit.LoRAConfig(**LORA))
    train = examples(400, seed=0)
    targets = torch.nn.functional.one_hot(torch.tensor([y for _, y in train]), 2).float()
    tl.fit_answers(model, tok, [TEMPLATE.format(input=t) for t, _ in train], ANSWERS, targets, steps=200,
                   lr=1e-2, batch_size=32)
    return model


def test_answer_logprobs_match_a_manual_forward(tok):
    """Left padding with mask-derived positions scores an answer as an unpadded forward does."""
    model = tiny_llama(1)
    prompts = ["Input: p1 Answer:", "Input: p1 n2 n3 p4 Answer:"]
    got = tl.answer_logprobs(model, tok, prompts, [" yes", " no p2"])
    for row, prompt in enumerate(prompts):
        for col, answer in enumerate([" yes", " no p2"]):
            ids = tok(prompt + answer)["input_ids"]
            k = len(tok(answer, add_special_tokens=False)["input_ids"])
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            want = sum(logp[len(ids) - k - 1 + j, ids[len(ids) - k + j]] for j in range(k))
            torch.testing.assert_close(got[row, col], want, atol=1e-5, rtol=1e-5)


def test_filter_removes_every_sample_the_discriminator_rejects(tok):
    """Check 1: kept == exactly the inputs with p(real) > threshold, in order; the rest are gone."""
    disc = peftkit.apply(tiny_llama(2), peftkit.LoRAConfig(**LORA))
    seeds = [t for t, _ in examples(5, seed=1)]
    synthetic = tl.generate_synthetic(generator(), tok, seeds, 40, prefix="Input: ", max_new_tokens=3)
    tl.train_discriminator(disc, tok, seeds, synthetic[:20], steps=15, lr=1e-2)
    candidates = synthetic[20:] + seeds  # seeds mixed in: the filter must keep what it scores real
    scores = tl.discriminator_scores(disc, tok, candidates)
    threshold = scores.median().item()  # some kept, some rejected whatever the training did
    kept, p_real = tl.filter_realistic(disc, tok, candidates, threshold=threshold)
    torch.testing.assert_close(p_real, scores)
    rejected = [t for t, s in zip(candidates, scores.tolist(), strict=True) if s <= threshold]
    assert rejected and kept
    assert not set(rejected) & set(kept)
    assert kept == [t for t, s in zip(candidates, scores.tolist(), strict=True) if s > threshold]


def test_student_sees_no_task_data_beyond_the_seeds(tok, teacher, monkeypatch):
    """Check 2: `transfer` takes only seeds, and every prompt distilled is a generated, kept input."""
    seen = {}
    generate, distill = tl.generate_synthetic, tl.distill

    def spy_generate(*args, **kwargs):
        seen["generated"] = generate(*args, **kwargs)
        return seen["generated"]

    def spy_distill(student, tokenizer, prompts, *args, **kwargs):
        seen["distilled"] = list(prompts)
        return distill(student, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(tl, "generate_synthetic", spy_generate)
    monkeypatch.setattr(tl, "distill", spy_distill)
    seeds = [t for t, _ in examples(5, seed=1)]
    student = peftkit.apply(tiny_gemma2(0), peftkit.LoRAConfig(**LORA))
    disc = peftkit.apply(tiny_llama(2), peftkit.LoRAConfig(**LORA))
    # threshold 0: keep everything, so that the data flow is tested whatever the discriminator learned
    out = tl.transfer((generator(), tok), (disc, tok), (teacher, tok), (student, tok), seeds, TEMPLATE, ANSWERS,
                      n_synthetic=48, n_discriminator=16, prefix="Input: ", disc_steps=3, steps=3, lr=1e-2,
                      batch_size=16, threshold=0.0, generation={"max_new_tokens": 3})
    assert seen["distilled"] == [TEMPLATE.format(input=t) for t in out["kept"]]
    assert out["kept"] == seen["generated"][16:]  # the discriminator's 16 are not distilled either
    assert not set(out["kept"]) & set(seeds)  # generate_synthetic drops copies of the seeds


def test_student_on_filtered_teacher_labels_reaches_teacher_accuracy(tok, teacher):
    """Check 3: a student of another family (Gemma 2), distilled on filtered synthetic inputs only.

    Five seeds do not calibrate a tiny random discriminator (its p(real) bunches near its training
    prior), so the toy keeps the more-real half by its ranking: the median as threshold. The generator
    writes task words only here, and the student learns the teacher's argmax labels (`hard=True`):
    the tiny teacher's answer probabilities stay near 0.5 (a random head gives small logits).
    """
    seeds = [t for t, _ in examples(5, seed=1)]
    pool = tl.generate_synthetic(generator(junk=False), tok, seeds, 352, prefix="Input: ", max_new_tokens=3, batch_size=64)
    disc = peftkit.apply(tiny_llama(2), peftkit.LoRAConfig(**LORA))
    tl.train_discriminator(disc, tok, seeds, pool[:32], steps=20, lr=1e-2, batch_size=16)
    scores = tl.discriminator_scores(disc, tok, pool[32:], batch_size=64)
    kept, _ = tl.filter_realistic(disc, tok, pool[32:], threshold=scores.median().item(), batch_size=64)
    prompts = [TEMPLATE.format(input=t) for t in kept]
    student = peftkit.apply(tiny_gemma2(0), peftkit.LoRAConfig(**LORA))
    tl.distill(student, tok, prompts, ANSWERS, tl.teacher_label(teacher, tok, prompts, ANSWERS), steps=200,
               lr=1e-2, batch_size=32, hard=True)
    test = examples(300, seed=7)
    teacher_acc, student_acc = accuracy(teacher, tok, test), accuracy(student, tok, test)
    assert teacher_acc > 0.85, f"the toy teacher did not learn the task ({teacher_acc:.3f})"
    assert student_acc >= teacher_acc - 0.05, f"student {student_acc:.3f} vs teacher {teacher_acc:.3f}"
