"""The adapter folder contract: adapters/<persona>/ with PEFT files, tokenizer and persona.json."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import sha256_file
from .errors import UserError

PERSONA_FILE = "persona.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    meta: dict[str, Any]

    @property
    def system(self) -> str:
        return self.meta["system"]

    @property
    def base_id(self) -> str:
        return self.meta["base"]["id"]

    @property
    def base_fingerprint(self) -> str:
        return self.meta["base"]["fingerprint"]

    def weights_sha256(self) -> str:
        return sha256_file(self.path / "adapter_model.safetensors")


def read_adapter(path: str | Path) -> AdapterInfo:
    """Validate an adapter folder and read its persona.json."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"adapter folder {path} does not exist; train one with llm.py or pass an existing folder")
    missing = [f for f in (PERSONA_FILE, *ADAPTER_FILES) if not (path / f).is_file()]
    if missing:
        raise UserError(f"{path} is not a persona adapter folder (missing {', '.join(missing)}); point to a folder written by llm.py")
    try:
        meta = json.loads((path / PERSONA_FILE).read_text(encoding="utf-8"))
        name = meta["persona"]
        _ = meta["system"], meta["base"]["id"], meta["base"]["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path / PERSONA_FILE} is damaged ({type(exc).__name__}: {exc}); retrain the persona with llm.py --overwrite") from None
    return AdapterInfo(name, path, meta)


def list_adapters(root: str | Path) -> dict[str, Path]:
    """Persona name -> folder for every complete adapter folder directly under `root`."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / PERSONA_FILE).is_file()
    }


def find_persona(name: str, root: str | Path) -> AdapterInfo:
    """`--persona NAME` under the adapters root; unknown names list the personas found."""
    found = list_adapters(root)
    if name not in found:
        listing = ", ".join(found) if found else "none"
        raise UserError(f"no persona named {name!r} under {root} (found: {listing}); train it with llm.py --persona {name}")
    return read_adapter(found[name])
