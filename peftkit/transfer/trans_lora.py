"""Trans-LoRA: move a trained LoRA to another base model with nearly no task data.

Wang et al. 2024, "Trans-LoRA: towards data-free transferable parameter efficient finetuning",
arXiv:2405.17258. A LoRA trained on a source base cannot be loaded into a target base of another size or
family, and the task data may be gone. Trans-LoRA re-trains it on the target by distillation on
synthetic inputs, given only a handful (~5) of seed inputs:

1. `generate_synthetic`: a model prompted with the seeds writes task-like inputs.
2. `train_discriminator`: a LoRA on the source base learns to tell seed (real) from synthetic inputs;
   `filter_realistic` keeps only the synthetic inputs it classifies as real.
3. `teacher_label`: the source base + source LoRA (the teacher) gives its answer distribution p_T(a|x).
4. `distill`: a new LoRA on the target base (the student) minimises the soft-label cross-entropy

       L(x) = - sum_a p_T(a|x) log p_S(a|x),   p(a|x) = prod_t p(a_t | x, a_<t)

   over a fixed answer set (class verbalizers such as " fresh" / " rotten"). The two bases have
   different vocabularies, so the distribution distilled is over answers, each scored with its own
   model's tokenizer. L = KL(p_T || p_S) + H(p_T) when p_S sums to one over the answers; mass that
   p_S puts elsewhere raises L, so the student also learns to answer with an answer string.
   `hard=True` uses the teacher's argmax answer instead (teacher-generated labels).

`transfer` runs the four steps and gets no task data but the seeds. Models are arguments (with their
LoRA applied by the caller, `peftkit.apply`), so the functions work on any causal LM.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

DISCRIMINATOR_TEMPLATE = "Text: {input}\nIs this text real or synthetic? Answer:"
DISCRIMINATOR_ANSWERS = (" synthetic", " real")
"""The discriminator's question; answer 1 (" real") means the input looks like seed data."""


def _encode(tokenizer, prompts: Sequence[str], answer: str, max_length: int) -> tuple[torch.Tensor, ...]:
    """prompt + answer token ids, left-padded: (ids, mask, positions), each (batch, seq), and len(answer)."""
    tail = tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
    rows = []
    for ids in tokenizer(list(prompts))["input_ids"]:
        rows.append(ids[max(len(ids) + len(tail) - max_length, 0):] + tail)  # keep the prompt's end
    longest = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):] = torch.tensor(r)
        mask[i, longest - len(r):] = 1
    # positions from the mask: left padding must not shift the real tokens' positions
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, len(tail)


def answer_logprobs(model: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                    max_length: int = 256) -> torch.Tensor:
    """log p(a | prompt) for every answer, shape (batch, len(answers)); differentiable.

    Only the logits of the answer positions are computed (`logits_to_keep`): the output head of a
    large vocabulary costs as much as the rest of a small model. Single-token answers share one pass.
    """
    device = next(model.parameters()).device
    firsts = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    if all(len(f) == 1 for f in firsts):
        ids, mask, pos, _ = _encode(tokenizer, prompts, "", max_length)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                       logits_to_keep=1).logits[:, -1]  # (batch, vocab)
        return logits.float().log_softmax(-1)[:, [f[0] for f in firsts]]
    scores = []
    for answer in answers:
        ids, mask, pos, k = _encode(tokenizer, prompts, answer, max_length)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                       logits_to_keep=k + 1).logits[:, :-1]  # (batch, k, vocab): the k answer tokens
        logp = logits.float().log_softmax(-1).gather(-1, ids[:, -k:, None].to(device)).squeeze(-1)
        scores.append(logp.sum(-1))
    return torch.stack(scores, dim=-1)


@torch.no_grad()
def answer_probs(model: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                 batch_size: int = 16, desc: str | None = None) -> torch.Tensor:
    """p(a | prompt) renormalised over the answers, (len(prompts), len(answers)), in batches."""
    model.eval()
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None):
        out.append(answer_logprobs(model, tokenizer, prompts[i:i + batch_size], answers).softmax(-1).cpu())
    return torch.cat(out) if out else torch.empty(0, len(answers))


def fit_answers(model: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                targets: torch.Tensor, steps: int, lr: float = 1e-3, batch_size: int = 8, seed: int = 0,
                desc: str = "train") -> list[float]:
    """Train the model's trainable parameters on L = -sum_a targets[a] log p(a | prompt), AdamW.

    One-hot `targets` make this plain supervised fine-tuning on the answer tokens. Batches walk
    through shuffled epochs; the learning rate decays linearly to zero after a 10% warmup.

    Returns:
        the loss of every step.
    """
    if not prompts:
        raise ValueError("no training prompts (did the discriminator reject every synthetic input?)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; apply a LoRA first (peftkit.apply)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(steps // 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(steps - s, 0) / max(steps - warmup, 1)))
    rng, order, losses = random.Random(seed), [], []
    model.train()
    for _ in (bar := tqdm(range(steps), desc=desc, unit="step")):
        if len(order) < batch_size:
            epoch = list(range(len(prompts)))
            rng.shuffle(epoch)
            order += epoch
        idx, order = order[:batch_size], order[batch_size:]
        logp = answer_logprobs(model, tokenizer, [prompts[i] for i in idx], answers)
        loss = -(targets[idx].to(logp.device) * logp).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def generate_synthetic(model: nn.Module, tokenizer, seeds: Sequence[str], n: int, prefix: str = "Input: ",
                       header: str = "", batch_size: int = 8, max_new_tokens: int = 48,
                       temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
                       max_rounds: int | None = None) -> list[str]:
    """Step 1: `n` new task-like inputs, sampled from a model prompted with the seed inputs.

    Each prompt is `header`, the seeds in a fresh random order, one per line after `prefix`, then
    `prefix` again; the model's continuation up to the first newline is one synthetic input. Empty
    lines, copies of a seed and repeats are dropped.

    Args:
        model, tokenizer: the generator (the source or the target base).
        seeds: the few real inputs (~5); their labels are not needed.
        n: synthetic inputs wanted; fewer come back if `max_rounds` batches do not yield them.
        prefix: what starts each example, e.g. "Review: ".
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    seen, out = {s.strip() for s in seeds}, []
    max_rounds = max_rounds or 4 * (n // batch_size + 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    bar = tqdm(total=n, desc="generate", unit="input")
    for _ in range(max_rounds):
        prompts = []
        for _ in range(batch_size):
            shots = list(seeds)
            rng.shuffle(shots)
            prompts.append(header + "".join(f"{prefix}{s.strip()}\n" for s in shots) + prefix.rstrip())
        ids, mask, _, _ = _encode(tokenizer, prompts, "", max_length=10_000)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                 top_p=top_p, max_new_tokens=max_new_tokens, pad_token_id=pad)
        for text in tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True):
            line = text.split("\n")[0].strip()
            if line and line not in seen and len(out) < n:
                seen.add(line)
                out.append(line)
                bar.update(1)
        if len(out) >= n:
            break
    bar.close()
    return out


def train_discriminator(model: nn.Module, tokenizer, real: Sequence[str], synthetic: Sequence[str],
                        steps: int = 40, lr: float = 1e-3, batch_size: int = 8, seed: int = 0) -> list[float]:
    """Step 2a: train the model's LoRA (on the source base) to answer " real" for seeds, " synthetic" else.

    The few real inputs are repeated until both classes are equally many, so the classifier is not
    pushed to the majority class. Returns the step losses; the model is trained in place.
    """
    reps = max(len(synthetic) // max(len(real), 1), 1)
    texts = list(real) * reps + list(synthetic)
    labels = torch.tensor([1] * (len(real) * reps) + [0] * len(synthetic))
    prompts = [DISCRIMINATOR_TEMPLATE.format(input=t) for t in texts]
    targets = nn.functional.one_hot(labels, 2).float()
    return fit_answers(model, tokenizer, prompts, DISCRIMINATOR_ANSWERS, targets, steps, lr, batch_size, seed,
                       desc="discriminator")


def discriminator_scores(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """p(real | text) under the discriminator, shape (len(texts),)."""
    prompts = [DISCRIMINATOR_TEMPLATE.format(input=t) for t in texts]
    return answer_probs(model, tokenizer, prompts, DISCRIMINATOR_ANSWERS, batch_size, desc="discriminate")[:, 1]


def filter_realistic(model: nn.Module, tokenizer, texts: Sequence[str], threshold: float = 0.5,
                     batch_size: int = 16) -> tuple[list[str], torch.Tensor]:
    """Step 2b: the synthetic inputs the discriminator classifies as real (p(real) > threshold), in order.

    Returns:
        (kept texts, p(real) of every input text).
    """
    scores = discriminator_scores(model, tokenizer, texts, batch_size)
    return [t for t, s in zip(texts, scores.tolist(), strict=True) if s > threshold], scores


def teacher_label(teacher: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                  batch_size: int = 16) -> torch.Tensor:
    """Step 3: the teacher's answer distribution p_T(a | prompt), (len(prompts), len(answers)), rows sum to 1."""
    return answer_probs(teacher, tokenizer, prompts, answers, batch_size, desc="teacher")


def distill(student: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str],
            teacher_probs: torch.Tensor, steps: int, lr: float = 1e-3, batch_size: int = 8, seed: int = 0,
            hard: bool = False) -> list[float]:
    """Step 4: train the student's LoRA on the teacher's answers (soft cross-entropy, or argmax if `hard`)."""
    targets = teacher_probs.float()
    if hard:
        targets = nn.functional.one_hot(targets.argmax(-1), len(answers)).float()
    return fit_answers(student, tokenizer, prompts, answers, targets, steps, lr, batch_size, seed, desc="distill")


def transfer(generator: tuple[nn.Module, object], discriminator: tuple[nn.Module, object],
             teacher: tuple[nn.Module, object], student: tuple[nn.Module, object], seeds: Sequence[str],
             template: str, answers: Sequence[str], n_synthetic: int = 256, n_discriminator: int = 64,
             prefix: str = "Input: ", disc_steps: int = 40, steps: int = 200, lr: float = 1e-3,
             batch_size: int = 8, threshold: float = 0.5, hard: bool = False, seed: int = 0,
             generation: dict | None = None) -> dict:
    """The whole pipeline from seed inputs only; each model comes with its own tokenizer.

    `n_discriminator` synthetic inputs train the discriminator (against the seeds); the other
    `n_synthetic` are filtered by it, labelled by the teacher, and distilled into the student (whose
    LoRA the caller applied). `template` formats an input into a prompt ("Review: {input}\\n...");
    `generation` holds further arguments of `generate_synthetic` (max_new_tokens, temperature ...).

    Returns:
        {"synthetic", "kept", "p_real", "teacher_probs", "disc_losses", "losses"}.
    """
    pool = generate_synthetic(*generator, seeds, n_synthetic + n_discriminator, prefix=prefix,
                              batch_size=batch_size, seed=seed, **(generation or {}))
    disc_texts, candidates = pool[:n_discriminator], pool[n_discriminator:]
    disc_losses = train_discriminator(*discriminator, seeds, disc_texts, disc_steps, lr, batch_size, seed)
    kept, p_real = filter_realistic(*discriminator, candidates, threshold)
    if not kept:
        raise RuntimeError(f"the discriminator rejected all {len(candidates)} synthetic inputs (max p(real) "
                           f"{p_real.max().item():.3f} <= threshold {threshold}); lower the threshold, train "
                           "it for fewer steps or generate more inputs")
    teacher_probs = teacher_label(*teacher, [template.format(input=t) for t in kept], answers)
    losses = distill(*student, [template.format(input=t) for t in kept], answers, teacher_probs, steps, lr,
                     batch_size, seed, hard)
    return {"synthetic": candidates, "kept": kept, "p_real": p_real, "teacher_probs": teacher_probs,
            "disc_losses": disc_losses, "losses": losses}


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                answers: Sequence[str] | None = None, batch_size: int = 16,
                max_new_tokens: int = 3) -> tuple[float, list[str], list[int] | None]:
    """Share of greedy continuations whose first word (lower-cased, punctuation stripped) equals the target's.

    With single-token `answers`, the first generated step's logits also give the argmax over the
    answers (the answer-set choice), at no extra forward pass.

    Returns:
        (accuracy, the predicted words, the answer-set choices or None).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids_of = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers or []]
    columns = [a[0] for a in ids_of] if ids_of and all(len(a) == 1 for a in ids_of) else None
    device = next(model.parameters()).device
    model.eval()
    preds, choices = [], []
    for i in tqdm(range(0, len(prompts), batch_size), desc="exact match"):
        ids, mask, _, _ = _encode(tokenizer, prompts[i:i + batch_size], "", max_length=10_000)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, output_scores=columns is not None,
                             return_dict_in_generate=True)
        if columns is not None:
            choices += gen.scores[0][:, columns].argmax(-1).tolist()  # scores[0]: (batch, vocab), step 1
        for text in tokenizer.batch_decode(gen.sequences[:, ids.shape[1]:], skip_special_tokens=True):
            words = text.split()
            preds.append(words[0].strip(".,!?:;\"'").lower() if words else "")
    correct = [p == t.strip().lower() for p, t in zip(preds, targets, strict=True)]
    return sum(correct) / max(len(correct), 1), preds, choices if columns is not None else None
