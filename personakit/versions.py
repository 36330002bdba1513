"""The library versions a run records (persona.json, report headers, export.json, benchmarks)."""
from __future__ import annotations

import importlib.metadata as md
import platform


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    return versions
