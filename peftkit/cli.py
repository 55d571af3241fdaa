"""Command line: `peftkit demo | train | methods | merge | export`.

    peftkit demo [--task text|lm|vision] [--methods lora,dora] [--quick]
    peftkit train config.yaml [--key value ...] [--resume]   (`--help` documents every field)
    peftkit methods [--model PATH]
    peftkit merge --base PATH --adapter DIR --out DIR
    peftkit export --adapter DIR --format peft --out DIR [--base PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_demo(args: argparse.Namespace) -> int:
    from .train.demo import run_demo

    methods = args.methods.split(",") if args.methods else None
    run_demo(task=args.task, methods=methods, quick=args.quick, output_dir=args.out, steps=args.steps)
    return 0


def _cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from .train.run import config_help, load_run_config, run

    if args.help or args.config is None:
        print(config_help())
        return 0
    resume = "--resume" in extra
    cfg = load_run_config(args.config, [e for e in extra if e != "--resume"])
    run(cfg, resume=resume)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    import peftkit
    from peftkit.core.config import field_docs

    if args.markdown:
        print(method_table())
        return 0
    model = _load_base(args.model)[0] if args.model else None
    print(f"{'method':<15} {'config':<20} {'trainable on model' if model is not None else 'fields'}")
    for name, method in peftkit.registered_methods().items():
        detail = ", ".join(f for f in field_docs(method.config_cls) if f not in ("exclude", "layers"))
        if model is not None:
            detail = _count_on(model, method.config_cls)
        print(f"{name:<15} {method.config_cls.__name__:<20} {detail}")
    return 0


def method_table() -> str:
    """The README's method table, generated from the registry."""
    import peftkit

    lines = ["| method | config | paper | trainable parameters | Hugging Face peft type (both directions) |",
             "| --- | --- | --- | --- | --- |"]
    for name, method in peftkit.registered_methods().items():
        cls = method.config_cls
        peft_type = getattr(cls, "peft_type", None)
        interop = f"`{peft_type}` {getattr(cls, 'peft_variant', {}) or ''}".strip() if peft_type else "-"
        lines.append(f"| `{name}` | `{cls.__name__}` | {cls.paper} | {cls.trainable} | {interop} |")
    return "\n".join(lines)


def _count_on(model, config_cls) -> str:
    import peftkit

    try:
        peftkit.apply(model, config_cls())  # inside: a method whose defaults need more (SPT's budget) is reported
        count = str(peftkit.trainable_parameters(model))
    except Exception as err:  # report per method; one unsupported method must not end the listing
        count = f"n/a ({str(err).split(';')[0]})"
    finally:
        if peftkit.has_adapter(model):
            peftkit.unload(model)
    return count


def _load_base(name_or_path: str, task: str | None = None):
    from .train.models import load_model
    from .train.vision import is_vision_model_dir

    if task is None and is_vision_model_dir(name_or_path):
        task = "image-classification"
    task = task or ("classification" if name_or_path == "minilm" else "causal-lm")
    return load_model(name_or_path, task)


def _base_for_adapter(adapter: Path, base: str | None, task: str | None):
    if base is None:
        meta_path = adapter / "peftkit_adapter.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        base = meta.get("base_model")
        if not base:
            raise SystemExit(f"{adapter} does not record its base model; pass --base PATH")
    return _load_base(base, task)


def _cmd_merge(args: argparse.Namespace) -> int:
    import peftkit

    model, tokenizer = _base_for_adapter(Path(args.adapter), args.base, args.task)
    peftkit.load(model, args.adapter, allow_different_base=args.allow_different_base)
    plain = peftkit.unload(peftkit.merge(model))
    plain.save_pretrained(args.out)
    if tokenizer is not None:  # vision models have none
        tokenizer.save_pretrained(args.out)  # the merged directory loads on its own
    print(f"merged model written to {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import peftkit

    model, _ = _base_for_adapter(Path(args.adapter), args.base, args.task)
    peftkit.load(model, args.adapter, allow_different_base=args.allow_different_base)
    peftkit.save(model, args.out, format=args.format)
    print(f"{args.format} adapter written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fine-tune several methods offline and compare them")
    demo.add_argument("--task", choices=["text", "lm", "vision"], default="text")
    demo.add_argument("--methods", help="comma-separated subset of the demo's methods, or 'all' (default: the task's default set)")
    demo.add_argument("--steps", type=int, help="training steps per method (default: the task's budget)")
    demo.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds)")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    train = sub.add_parser("train", add_help=False, help="fine-tune a model from a YAML config")
    train.add_argument("config", nargs="?")
    train.add_argument("-h", "--help", action="store_true")
    methods = sub.add_parser("methods", help="list registered methods")
    methods.add_argument("--model", help="also count trainable parameters on this model")
    methods.add_argument("--markdown", action="store_true", help="print the README's method table")
    for name, text in (("merge", "merge an adapter into its base"), ("export", "convert an adapter's format")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--adapter", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--base", help="base model: path, Hub name, minilm, smollm2, vit-fmnist or cnn-fmnist "
                       "(default: the one the adapter records)")
        p.add_argument("--allow-different-base", action="store_true")
        p.add_argument("--task", choices=["classification", "causal-lm", "image-classification"],
                       help="default: guessed from the base")
        if name == "export":
            p.add_argument("--format", default="peft", choices=["peft", "peftkit"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra and args.command != "train":
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    handlers = {"demo": _cmd_demo, "methods": _cmd_methods, "merge": _cmd_merge, "export": _cmd_export}
    if args.command == "train":
        return _cmd_train(args, extra)
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
