"""The run both comparison scripts share: load the base once, attach every adapter, generate the same
prompts for the base and each persona with the same decoding, then score everything.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .data import Row, read_jsonl, sha256_file
from .errors import UserError
from .generation import Reply
from .metrics import ModelMetrics, Reference, attribute, compile_markers, marker_rate, style_distance, summarize
from .options import PROJECT_ROOT, Decoding, ModelOptions, RunOptions
from .persona import AdapterInfo, find_persona, list_adapters, read_adapter
from .prompts import PromptSet

BASE = "base"


@dataclass
class PersonaData:
    """A persona's training data as llm.py split it; `status` says why it is unusable, else 'verified'."""

    recorded_path: str
    recorded_sha256: str
    status: str
    train_replies: list[str] = field(default_factory=list)
    val_rows: list[Row] = field(default_factory=list)
    val_fraction: float | None = None
    split_seed: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "verified"


@dataclass(frozen=True)
class ModelSpec:
    """One row of the report: `adapter` None is the base; `reference` names the persona it is measured against."""

    name: str
    adapter: str | None
    system: str | None
    reference: str | None


@dataclass
class Perplexity:
    base: float | None
    tuned: float | None
    replies: int
    note: str | None = None


@dataclass
class Evaluation:
    """Everything a report shows, in report order; no timing except `seconds`."""

    base_id: str
    fingerprint: str
    device: str
    dtype: str
    quantized: bool
    adapters: list[AdapterInfo]
    data: dict[str, PersonaData]
    prompts: PromptSet
    specs: list[ModelSpec]
    decoding: Decoding
    batch_size: int
    too_short_units: int
    markers_file: Path
    markers: dict[str, list[str]]
    replies: dict[str, list[Reply]]
    metrics: dict[str, ModelMetrics]
    perplexity: dict[str, Perplexity]
    style_matrix: dict[str, dict[str, float | None]]
    marker_matrix: dict[str, dict[str, float | None]]
    attribution: dict[str, list[str]] | None
    seconds: dict[str, float]
    cpu_precision: str | None = None  # precision.Precision.describe() on CPU, None on CUDA


# ---- choosing adapters and base ------------------------------------------------------------

def pick_adapters(root: str | Path, names: list[str] | None = None, paths: list[str] | None = None) -> list[AdapterInfo]:
    """Adapters by folder (`paths`), by persona name under `root` (`names`), or every one under `root`."""
    if paths:
        adapters = [read_adapter(p) for p in paths]
    elif names:
        adapters = [find_persona(n, root) for n in names]
    else:
        found = list_adapters(root)
        if not found:
            raise UserError(f"no adapters found under {root}; train one with llm.py, or point --adapters-root, --adapter or --adapters at adapter folders")
        adapters = [read_adapter(p) for p in found.values()]
    if any(a.name == BASE for a in adapters):
        raise UserError(f"a persona is named {BASE!r}, which the reports use for the base model; retrain it under another --persona name")
    return adapters


def base_for(adapters: list[AdapterInfo], base: str | None) -> str | None:
    """`--base` when given, else the base every adapter records (they must agree)."""
    if base:
        return base
    by_fingerprint: dict[str, list[AdapterInfo]] = {}
    for a in adapters:
        by_fingerprint.setdefault(a.base_fingerprint, []).append(a)
    if len(by_fingerprint) > 1:
        listing = "; ".join(f"{', '.join(a.name for a in group)} on {group[0].base_id} ({fp})" for fp, group in by_fingerprint.items())
        raise UserError(f"the adapters were trained on different bases ({listing}); compare adapters of one base at a time")
    return adapters[0].base_id


# ---- training data -------------------------------------------------------------------------

def read_persona_data(info: AdapterInfo, project_root: Path) -> PersonaData:
    """Re-read the persona's training file and redo llm.py's held-out split; never raises for bad data."""
    meta = info.meta
    path_text, sha = meta.data.path, meta.data.sha256
    candidates = [Path(path_text)] if Path(path_text).is_absolute() else [Path(path_text), project_root / path_text]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return PersonaData(path_text, sha, f"training data {path_text} not found, so data-based metrics are skipped")
    actual = sha256_file(path)
    if actual != sha:
        return PersonaData(path_text, sha, f"training data {path_text} changed since training (sha256 {actual[:12]}, recorded {sha[:12]}), so data-based metrics are skipped")
    try:
        rows = read_jsonl(path)
    except UserError as exc:
        return PersonaData(path_text, sha, f"training data {path_text} is unreadable ({exc})")
    train, val = meta.heldout_split(rows)
    return PersonaData(path_text, sha, "verified", [r["output"] for r in train], val, meta.val_fraction, meta.seed)


def load_markers(path: Path, names: list[str], language: str) -> dict[str, list[str]]:
    """Marker regexes per persona name for `language` from personas.json; a missing file means none."""
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix it or pass another --personas-json") from None
    out = {}
    for name in names:
        patterns = ((table.get(name) or {}).get("markers") or {}).get(language) or []
        try:
            compile_markers(patterns)
        except re.error as exc:
            raise UserError(f"{path}: a {language} marker of {name} is not a valid regex ({exc}); fix it") from None
        if patterns:
            out[name] = list(patterns)
    return out


# ---- the run -------------------------------------------------------------------------------

def _perplexity(model: Any, tokenizer: Any, info: AdapterInfo, data: PersonaData, batch_size: int) -> Perplexity:
    from .loading import use_adapter
    from .perplexity import perplexity
    from .training import encode_fitting

    if not data.ok:
        return Perplexity(None, None, 0, data.status)
    if not data.val_rows:
        rows = len(data.train_replies)
        return Perplexity(None, None, 0, f"llm.py held out no replies from its {rows} rows (val_fraction {data.val_fraction})")
    max_length = info.meta.max_length
    encoded = [e for e in (encode_fitting(tokenizer, r, info.system, max_length) for r in data.val_rows) if e is not None]
    if not encoded:
        return Perplexity(None, None, 0, f"every held-out reply is longer than max_length {max_length}")
    scores = []
    for name in (None, info.name):
        with use_adapter(model, name) as m:
            scores.append(perplexity(m, encoded, tokenizer.pad_token_id, batch_size))
    return Perplexity(scores[0], scores[1], len(encoded))


def _combined(texts: list[str], reference: Reference | None) -> float | None:
    distance = style_distance(texts, reference.profile) if reference else None
    return distance.combined if distance else None


def evaluate(
    adapters: list[AdapterInfo],
    specs: list[ModelSpec],
    prompts: PromptSet,
    decoding: Decoding,
    run: RunOptions,
    loading: ModelOptions,
    *,
    with_attribution: bool,
    allow_base_mismatch: bool = False,
    project_root: Path = PROJECT_ROOT,
    log: Callable[[str], None] = print,
) -> Evaluation:
    """Generate every spec's replies on one base load, then compute all metrics. `loading.base` None means the
    base the adapters record; relative training-data paths in persona.json are tried from `project_root` too."""
    from .generation import generate_replies
    from .loading import attach_adapters, generating_with
    from .template import build_messages, require_chat_template

    seconds: dict[str, float] = {}
    data = {a.name: read_persona_data(a, project_root) for a in adapters}
    markers_file = Path(run.personas_json)
    markers = load_markers(markers_file, [a.name for a in adapters], prompts.language)

    t = time.time()
    loaded = loading.load(base_for(adapters, loading.base))
    require_chat_template(loaded.tokenizer)
    model = attach_adapters(loaded, adapters, allow_base_mismatch)
    seconds["load"] = time.time() - t
    log(f"loaded {loaded.ref.base_id} on {loaded.device} with {len(adapters)} adapter(s) in {seconds['load']:.1f}s")

    t = time.time()
    replies: dict[str, list[Reply]] = {}
    for spec in specs:
        started = time.time()
        conversations = [build_messages(p.as_row(), spec.system) for p in prompts.prompts]
        with generating_with(model, spec.adapter, loaded.quantized) as m:
            replies[spec.name] = generate_replies(m, loaded.tokenizer, conversations, decoding, run.batch_size)
        retried = sum(r.retried for r in replies[spec.name])
        log(f"generate {spec.name}: {len(conversations)} prompts, {retried} retried, {time.time() - started:.1f}s")
    seconds["generation"] = time.time() - t

    t = time.time()
    perplexity = {a.name: _perplexity(model, loaded.tokenizer, a, data[a.name], run.batch_size) for a in adapters}
    for name, p in perplexity.items():
        log(f"perplexity {name}: " + (p.note or f"{p.replies} held-out replies, base {p.base:.2f} -> tuned {p.tuned:.2f}"))
    seconds["perplexity"] = time.time() - t

    t = time.time()
    references = {name: Reference.of(d.train_replies) for name, d in data.items() if d.ok}
    patterns = {name: compile_markers(p) for name, p in markers.items()}
    texts = {name: [r.text for r in rs] for name, rs in replies.items()}
    keywords = [p.keywords for p in prompts.prompts]
    metrics = {
        spec.name: summarize(
            texts[spec.name], keywords,
            hit_limit=[r.hit_limit for r in replies[spec.name]], retried=[r.retried for r in replies[spec.name]],
            reference=references.get(spec.reference), markers=patterns.get(spec.reference),
            too_short_units=run.too_short_units,
        )
        for spec in specs
    }
    style_matrix = {s.name: {a.name: _combined(texts[s.name], references.get(a.name)) for a in adapters} for s in specs}
    marker_matrix = {s.name: {a.name: marker_rate(texts[s.name], patterns.get(a.name, [])) for a in adapters} for s in specs}
    attribution = None
    if with_attribution:
        # The base class learns from the base's own replies, scored leave-one-out (see metrics.attribute).
        training = {BASE: texts[BASE], **{name: data[name].train_replies for name in references}}
        attribution = attribute(training, texts)
    seconds["scoring"] = time.time() - t
    return Evaluation(
        base_id=loaded.ref.base_id, fingerprint=loaded.fingerprint, device=loaded.device,
        dtype=str(loaded.dtype).replace("torch.", ""), quantized=loaded.quantized,
        adapters=adapters, data=data, prompts=prompts, specs=specs, decoding=decoding, batch_size=run.batch_size,
        too_short_units=run.too_short_units, markers_file=markers_file, markers=markers, replies=replies,
        metrics=metrics, perplexity=perplexity, style_matrix=style_matrix, marker_matrix=marker_matrix,
        attribution=attribution, seconds=seconds,
        cpu_precision=loaded.cpu_precision.describe() if loaded.cpu_precision else None,
    )
