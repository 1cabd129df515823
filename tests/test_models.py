"""Model presets: SmolLM2 GGUF conversion (once per module), tiny random presets, the build cache, tokenizer loading."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from minirec.io import DataError
from minirec.models import PRESETS, SMOLLM2, cache_root, load_tokenizer, resolve_pretrained

TINY = ["tiny-random-qwen2", "tiny-random-llama", "tiny-random-gemma2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """A fresh preset cache with SmolLM2 converted into it once for this module (~30 s)."""
    root = tmp_path_factory.mktemp("minirec-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIREC_CACHE", str(root))
        start = time.perf_counter()
        path = resolve_pretrained(SMOLLM2)
        print(f"SmolLM2 GGUF conversion: {time.perf_counter() - start:.1f} s")
        assert Path(path) == root / "models" / SMOLLM2
        yield root


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in (root / "models").iterdir() if p.name.endswith(".tmp")]


def test_cache_root_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIREC_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("MINIREC_CACHE")
    assert cache_root() == Path.home() / ".cache" / "minirec"


def test_smollm2_is_a_plain_working_model(cache):
    folder = Path(resolve_pretrained(SMOLLM2))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (folder / "model.safetensors").is_file()
    tok = load_tokenizer(SMOLLM2)
    assert tok.padding_side == "left" and tok.pad_token_id is not None and tok.chat_template
    assert tok("<answer>", add_special_tokens=False)["input_ids"] == [44, 11247, 46]
    model = AutoModelForCausalLM.from_pretrained(folder)  # no gguf_file: a plain folder
    assert getattr(model, "hf_quantizer", None) is None and model.dtype == torch.float32
    # The dequantised weights are a real instruct model: it answers a factual question.
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_builds_once_and_reloads(cache, name, tmp_path):
    folder = Path(resolve_pretrained(name))
    assert folder == cache / "models" / name
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_pretrained(name) == str(folder)  # from the cache, not rebuilt
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    config = AutoConfig.from_pretrained(folder)
    tok = load_tokenizer(name)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size) == (64, 2, 2, 1, 128)
    assert config.vocab_size == len(tok) and config.eos_token_id == tok.eos_token_id
    assert tok.get_vocab() == load_tokenizer(SMOLLM2).get_vocab() and tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == name.removeprefix("tiny-random-")
    # Seeded: building again gives the same weights.
    PRESETS[name](tmp_path / "again")
    a, b = load_file(folder / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not _leftovers(cache)


def test_concurrent_resolves_build_once(cache, monkeypatch):
    calls = []

    def slow_build(folder: Path) -> None:
        calls.append(folder)
        time.sleep(0.5)
        (folder / "done.txt").write_text("ok")

    monkeypatch.setitem(PRESETS, "test-concurrent", slow_build)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_pretrained("test-concurrent"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3
    assert (Path(results[0]) / "done.txt").read_text() == "ok"
    assert not _leftovers(cache)


def test_failed_build_leaves_nothing(cache, monkeypatch):
    def broken_build(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setitem(PRESETS, "test-broken", broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_pretrained("test-broken")
    assert not (cache / "models" / "test-broken").exists()
    assert not _leftovers(cache)


def test_passthrough_and_hub_presets(tmp_path):
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)
    assert resolve_pretrained("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"
    assert resolve_pretrained("gemma-2-2b-it") == "google/gemma-2-2b-it"
    assert resolve_pretrained("qwen2.5-3b-instruct") == "Qwen/Qwen2.5-3B-Instruct"


@pytest.mark.parametrize("name", ["tiny-random-qwen3", "./no/such/model/folder"])
def test_unknown_name_lists_presets(name):
    with pytest.raises(DataError, match="tiny-random-qwen2") as e:
        resolve_pretrained(name)
    assert name in str(e.value)


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DataError, match="no tokenizer") as e:
        load_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def _copy_tokenizer(cache: Path, dest: Path) -> Path:
    src = cache / "models" / "tiny-random-llama"
    resolve_pretrained("tiny-random-llama")
    dest.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / f, dest / f)
    return dest


def test_tokenizer_without_chat_template(cache, tmp_path):
    folder = _copy_tokenizer(cache, tmp_path / "tok")
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(DataError, match="chat template") as e:
        load_tokenizer(str(folder))
    assert str(folder) in str(e.value)


def test_missing_pad_token_becomes_eos(cache, tmp_path):
    folder = _copy_tokenizer(cache, tmp_path / "tok")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["pad_token"]
    cfg_path.write_text(json.dumps(cfg))
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    tok = load_tokenizer(str(folder))
    assert tok.pad_token == tok.eos_token and tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"
