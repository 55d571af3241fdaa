"""Command line: `peftkit demo | train | methods | merge | export`.

    peftkit demo [--task text|lm|vision] [--methods lora,dora] [--quick]
    peftkit train config.yaml [--key value ...] [--resume | --overwrite]   (`--help` documents every field)
    peftkit methods [--model PATH]
    peftkit merge --base PATH --adapter DIR --out DIR [--task T]
    peftkit export --adapter DIR --format peft --out DIR [--base PATH] [--task T]
    peftkit combine --adapter DIR --adapter DIR ... --weights 0.5,0.5 --how ties --density 0.5 --out DIR
    peftkit compress --adapter DIR --out DIR [--density 0.1] [--alpha 1.0] [--exclude classifier]

A user error (a bad config value, data row, adapter or checkpoint file, a missing path) prints one
line, `peftkit: error: <what was wrong and what to do>`, and exits with status 2; `--debug` shows the
traceback instead. Any other exception is a bug in peftkit: it keeps its traceback (status 1).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

USER_ERROR_EXIT = 2  # as argparse's usage errors: the input has to change, not peftkit


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception classes that report a person's mistake (shown as one line), not a peftkit bug.

    Imported lazily: `peftkit --help` should not pay for torch.
    """
    import yaml

    from .core.config import ConfigError
    from .core.io import AdapterFileError
    from .core.layer import MergeError
    from .train.checkpoint import CheckpointError
    from .train.loop import NonFiniteLossError
    from .train.records import DataError

    return (ConfigError, AdapterFileError, MergeError, CheckpointError, NonFiniteLossError, DataError,
            yaml.YAMLError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            FileExistsError)


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
    flags = {flag for flag in ("--resume", "--overwrite") if flag in extra}  # bare flags, not --key value pairs
    cfg = load_run_config(args.config, [e for e in extra if e not in flags])
    run(cfg, resume="--resume" in flags, overwrite="--overwrite" in flags)
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
    from peftkit.core.peft_convert import peft_converter

    lines = ["| method | config | paper | trainable parameters | Hugging Face peft type (both directions) |",
             "| --- | --- | --- | --- | --- |"]
    for name, method in peftkit.registered_methods().items():
        cls = method.config_cls
        converter = peft_converter(cls)
        interop = f"`{converter.peft_type}` {converter.variant or ''}".strip() if converter else "-"
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


def _load_base(name_or_path: str):
    """A base model for `peftkit methods --model`: its own task where it says, else a causal LM."""
    from .train.models import base_task, load_model

    return load_model(name_or_path, base_task(name_or_path) or "causal-lm")


def _base_for_adapter(adapter: Path, base: str | None, task: str | None):
    """The base model (and tokenizer) an adapter directory belongs to, built for the adapter's task."""
    from .train.models import load_model

    if not adapter.is_dir():
        raise FileNotFoundError(f"no adapter directory at {adapter}")
    if base is None:
        base = _recorded_base(adapter)
        if not base:
            raise _config_error(f"{adapter} does not record its base model; pass --base PATH")
    task, num_labels = adapter_task(adapter, base, task)
    return load_model(base, task, num_labels=num_labels)


def _recorded_base(adapter: Path) -> str | None:
    """The base model an adapter directory names (peftkit's `base_model`, peft's `base_model_name_or_path`)."""
    for name, key in (("peftkit_adapter.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        path = adapter / name
        if path.is_file():
            try:
                meta = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise _config_error(f"{path} is not valid JSON ({err}); pass --base PATH or save the adapter "
                                    "again") from err
            value = meta.get(key) if isinstance(meta, dict) else None
            return value if isinstance(value, str) else None
    return None


def adapter_task(adapter: Path, base: str, task: str | None) -> tuple[str, int | None]:
    """(task, head classes) of an adapter: `--task`, else the run's task.json, else the base's config.

    Guessing "causal-lm" for a classifier built the wrong model and failed later on the head's keys,
    or merged into a 2-class head what a 5-class run trained: the task and class count are read from
    what the run wrote, and where nothing tells, `--task` is required.
    """
    from .train.models import base_task, saved_task

    saved = saved_task(adapter)
    if task is not None and saved is not None and task != saved["task"]:
        raise _config_error(f"--task {task}, but {adapter} was trained for {saved['task']!r} (its task.json); "
                            "leave --task out or name that task")
    found = task or (saved or {}).get("task") or base_task(base)
    if found is None:
        raise _config_error(f"cannot tell which task {adapter} was trained for (no task.json, and {base!r} does not "
                            "say); pass --task classification, causal-lm or image-classification")
    return found, (saved or {}).get("num_labels") if found == (saved or {}).get("task") else None


def _config_error(message: str) -> Exception:
    from .core.config import ConfigError

    return ConfigError(message)


def _copy_task_file(adapter: Path, out: Path, model=None) -> None:
    """Keep the run's task.json with what was written, and its label names in a merged model's config."""
    from .train.models import TASK_FILE, saved_task

    saved = saved_task(adapter)
    if saved is None:
        return
    shutil.copyfile(adapter / TASK_FILE, out / TASK_FILE)
    names = saved.get("label_names")
    config = getattr(model, "config", None)
    if names and config is not None and hasattr(config, "id2label"):
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}


def _cmd_merge(args: argparse.Namespace) -> int:
    import peftkit

    model, tokenizer = _base_for_adapter(Path(args.adapter), args.base, args.task)
    peftkit.load(model, args.adapter, allow_different_base=args.allow_different_base)
    plain = peftkit.unload(peftkit.merge(model))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    _copy_task_file(Path(args.adapter), Path(args.out), plain)
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
    _copy_task_file(Path(args.adapter), Path(args.out))
    print(f"{args.format} adapter written to {args.out}")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from .core.io import WEIGHTS_FILE, read_adapter, write_adapter
    from .merging.compeft import compress, compression_ratio

    adapter = Path(args.adapter)
    if not adapter.is_dir():
        raise FileNotFoundError(f"no adapter directory at {adapter}")
    dense = read_adapter(adapter)
    config, meta, tensors = compress(dense, "compeft", density=args.density, alpha=args.alpha,
                                     exclude=args.exclude.split(",") if args.exclude else ())
    write_adapter(args.out, config, tensors, meta)
    _copy_task_file(adapter, Path(args.out))
    before, after = (Path(d, WEIGHTS_FILE).stat().st_size for d in (adapter, args.out))
    print(f"compeft adapter written to {args.out}: {before / 1e6:.3f} MB -> {after / 1e6:.3f} MB on disk "
          f"({before / after:.1f}x; tensors alone {compression_ratio(dense[2], tensors, meta['pack_ternary']):.1f}x)")
    return 0


def _cmd_combine(args: argparse.Namespace) -> int:
    from .core.io import write_adapter
    from .merging import combine

    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise _config_error(f"--weights takes comma-separated numbers (0.5,0.5), got {args.weights!r}") from None
    for adapter in args.adapter:
        if not Path(adapter).is_dir():
            raise FileNotFoundError(f"no adapter directory at {adapter}")
    config, meta, tensors = combine(args.adapter, weights, args.how, density=args.density, q=args.q,
                                    majority_sign_method=args.majority_sign_method, svd_rank=args.svd_rank,
                                    seed=args.seed, allow_different_base=args.allow_different_base)
    write_adapter(args.out, config, tensors, meta)
    _copy_task_file(Path(args.adapter[0]), Path(args.out))
    print(f"combined adapter ({args.how}, rank {config.r}) written to {args.out}")
    return 0


COMBINE_MODES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat", "svd", "ties_svd",
                 "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
"""peftkit.merging.MODES, spelled out so that `--help` does not import torch (a test keeps them equal)."""


def _add_combine(sub, debug) -> None:
    p = sub.add_parser("combine", parents=[debug], help="combine LoRA adapters into one (linear, cat, svd, ties, "
                       "dare_linear, dare_ties, magnitude_prune, ...)")
    p.add_argument("--adapter", action="append", required=True, help="an adapter directory; repeat for each")
    p.add_argument("--weights", required=True, help="one weight per adapter, comma-separated: 0.5,0.5")
    p.add_argument("--how", default="linear", help=f"one of {', '.join(COMBINE_MODES)} (default: linear)")
    p.add_argument("--density", type=float, default=1.0, help="kept fraction for ties/dare/magnitude_prune modes")
    p.add_argument("--majority-sign-method", default="total", choices=["total", "frequency"])
    p.add_argument("--svd-rank", type=int, help="rank of the *svd modes' result (default: the largest input rank)")
    p.add_argument("--q", type=float, help="DAREx-q: rescale dare modes by 1/q instead of 1/density")
    p.add_argument("--seed", type=int, default=0, help="seed of the dare masks")
    p.add_argument("--allow-different-base", action="store_true")
    p.add_argument("--out", required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description=__doc__.split("\n")[0])
    debug_help = "show the traceback of a user error instead of one line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    debug = argparse.ArgumentParser(add_help=False)  # also accepted after the command
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", parents=[debug], help="fine-tune several methods offline and compare them")
    demo.add_argument("--task", choices=["text", "lm", "vision"], default="text")
    demo.add_argument("--methods", help="comma-separated subset of the demo's methods, or 'all' (default: the task's default set)")
    demo.add_argument("--steps", type=int, help="training steps per method (default: the task's budget)")
    demo.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds)")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    train = sub.add_parser("train", parents=[debug], add_help=False, help="fine-tune a model from a YAML config")
    train.add_argument("config", nargs="?")
    train.add_argument("-h", "--help", action="store_true")
    methods = sub.add_parser("methods", parents=[debug], help="list registered methods")
    methods.add_argument("--model", help="also count trainable parameters on this model")
    methods.add_argument("--markdown", action="store_true", help="print the README's method table")
    for name, text in (("merge", "merge an adapter into its base"), ("export", "convert an adapter's format")):
        p = sub.add_parser(name, parents=[debug], help=text)
        p.add_argument("--adapter", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--base", help="base model: path, Hub name, minilm, smollm2, vit-fmnist or cnn-fmnist "
                       "(default: the one the adapter records)")
        p.add_argument("--allow-different-base", action="store_true")
        p.add_argument("--task", choices=["classification", "causal-lm", "image-classification"],
                       help="default: the task.json the run wrote, else the base's config; required when neither tells")
        if name == "export":
            p.add_argument("--format", default="peft", choices=["peft", "peftkit"])
    comp = sub.add_parser("compress", parents=[debug], help="compress an adapter (ComPEFT: top-k, ternary, one scalar)")
    comp.add_argument("--adapter", required=True)
    comp.add_argument("--out", required=True)
    comp.add_argument("--density", type=float, default=0.1, help="kept fraction of each tensor's entries, in (0, 1]")
    comp.add_argument("--alpha", type=float, default=1.0, help="kept entries become ±alpha·std(tensor)")
    comp.add_argument("--exclude", help="comma-separated key substrings kept dense, e.g. classifier")
    _add_combine(sub, debug)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handlers = {"demo": _cmd_demo, "methods": _cmd_methods, "merge": _cmd_merge, "export": _cmd_export,
                "compress": _cmd_compress, "combine": _cmd_combine}
    try:
        if args.command == "train":
            return _cmd_train(args, extra)
        return handlers[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("peftkit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug or not isinstance(err, user_errors()):
            raise
        print(f"peftkit: error: {one_line(err)}", file=sys.stderr)
        return USER_ERROR_EXIT


def one_line(err: BaseException) -> str:
    """The error's message on one line (no class name: the message says what was wrong)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError) and err.filename:
        text = f"{err.strerror}: {err.filename}"  # not "[Errno 2] No such file or directory: 'x'"
    return text


if __name__ == "__main__":
    sys.exit(main())
