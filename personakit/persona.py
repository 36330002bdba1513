"""The adapter folder contract: adapters/<persona>/ with PEFT files, tokenizer and persona.json.

`PersonaMeta` is the only reader and writer of persona.json. Schema versions:
0 (no `schema_version` field): the first layout; 1: the same fields plus `schema_version`.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .data import Row, sha256_file
from .errors import UserError

PERSONA_FILE = "persona.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BaseRecord:
    id: str
    fingerprint: str


@dataclass(frozen=True)
class DataRecord:
    """The training file and what became of its rows."""

    path: str
    sha256: str
    rows: int
    train_rows: int
    val_rows: int
    dropped_too_long: int
    train_tokens: int  # replay rows included
    supervised_tokens: int
    replay_rows: int = 0  # the base's own answers mixed into training (llm.py --replay-fraction); absent before it existed


@dataclass(frozen=True)
class TrainResults:
    steps: int
    epochs_run: float
    trained_tokens: int
    train_loss: float
    val_loss: float | None  # the kept weights' token-weighted loss on the held-out replies
    val_loss_history: list[float]
    best_checkpoint: str | None
    base_val_ppl: float | None
    tuned_val_ppl: float | None
    train_seconds: float
    val_loss_standard_error: float | None = None  # across held-out rows; absent from files written before it existed
    steps_per_epoch: int | None = None  # optimizer steps per pass over the train rows, all processes together; absent before it existed


@dataclass(frozen=True)
class PersonaMeta:
    """What llm.py records about a trained persona; readers take the split and encoding settings from here."""

    persona: str
    system: str  # the system prompt used in training; inference must reuse it
    base: BaseRecord
    data: DataRecord
    hyperparameters: dict[str, Any]  # every resolved llm.py flag, for reproduction
    target_modules: list[str]
    seed: int
    device: str
    quantized_4bit: bool
    versions: dict[str, str]
    results: TrainResults
    created: str
    schema_version: int = SCHEMA_VERSION
    # Data-parallel processes (`accelerate launch`) and rows per optimizer step across them all
    # (batch size x grad accum x processes); absent from files written before they were recorded.
    world_size: int = 1
    effective_batch_size: int | None = None
    # precision.Precision.as_dict() of a CPU run (what training ran in and why); None on CUDA and in older files
    cpu_precision: dict[str, Any] | None = None

    # The settings readers need to redo training's held-out split and encoding.
    REQUIRED_HYPERPARAMETERS = ("val_fraction", "max_length")

    @property
    def val_fraction(self) -> float:
        return float(self.hyperparameters["val_fraction"])

    @property
    def max_length(self) -> int:
        return int(self.hyperparameters["max_length"])

    def heldout_split(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        """(train, val) rows exactly as llm.py split them, from the recorded fraction and seed."""
        from .training import split_rows

        if self.data.val_rows == 0:  # nothing was held out (an older llm.py held none out of this many rows)
            return rows, []
        return split_rows(rows, self.val_fraction, self.seed)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str | Path = PERSONA_FILE) -> PersonaMeta:
        """Parse persona.json of any known schema; a damaged, old or newer file is one UserError naming `source`."""
        try:
            raw = json.loads(text)
            version = raw.get("schema_version", 0)
            if not isinstance(version, int) or version > SCHEMA_VERSION:
                raise ValueError(f"schema_version {version!r} is newer than this personakit reads ({SCHEMA_VERSION}); update personakit")
            missing = [k for k in cls.REQUIRED_HYPERPARAMETERS if k not in raw["hyperparameters"]]
            if missing:
                raise KeyError(f"hyperparameters.{missing[0]}")
            meta = cls(**{
                **{f.name: raw[f.name] for f in fields(cls) if f.name != "schema_version" and (f.name in raw or f.default is MISSING)},
                "base": BaseRecord(**raw["base"]),
                "data": DataRecord(**raw["data"]),
                "results": TrainResults(**raw["results"]),
                "schema_version": version,
            })
            if not isinstance(meta.persona, str) or not isinstance(meta.system, str) or not isinstance(meta.seed, int):
                raise TypeError("persona, system and seed must be a string, a string and an integer")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{source} is damaged or from an unknown version ({type(exc).__name__}: {exc}); "
                            f"retrain the persona with llm.py --overwrite") from None
        return meta

    @classmethod
    def read(cls, path: str | Path) -> PersonaMeta:
        path = Path(path)
        return cls.from_json(path.read_text(encoding="utf-8"), path)


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    meta: PersonaMeta = field(repr=False)

    @property
    def system(self) -> str:
        return self.meta.system

    @property
    def base_id(self) -> str:
        return self.meta.base.id

    @property
    def base_fingerprint(self) -> str:
        return self.meta.base.fingerprint

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
    meta = PersonaMeta.read(path / PERSONA_FILE)
    return AdapterInfo(meta.persona, path, meta)


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
