"""Canonical dataset I/O: JSONL rows of instruction/output/history/system, read with every bad line named, written atomically."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import UserError
from .files import write_text_atomic

Row = dict[str, Any]


def validate_row(row: Any) -> str | None:
    """Return why `row` is not a canonical row, or None when it is valid."""
    if not isinstance(row, dict):
        return "row is not a JSON object"
    for key in ("instruction", "output"):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            return f"'{key}' must be a non-empty string"
    history = row.get("history", [])
    if history is None:
        history = []
    if not isinstance(history, list):
        return "'history' must be a list of [user, reply] pairs"
    for i, turn in enumerate(history):
        if (not isinstance(turn, (list, tuple)) or len(turn) != 2
                or not all(isinstance(t, str) and t.strip() for t in turn)):
            return f"'history' item {i} must be a pair of two non-empty strings"
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        return "'system' must be a string"
    return None


@dataclass(frozen=True)
class BadLine:
    """A JSONL line that is not JSON or fails its schema check."""

    lineno: int
    text: str
    reason: str


def parse_jsonl(
    lines: Iterable[str],
    validate: Callable[[Any], str | None] | None = None,
    *,
    on_error: Literal["collect", "stop"],
    source: str = "input",
) -> tuple[list[tuple[int, Any]], list[BadLine]]:
    """(line number, object) of every valid JSONL line, blank lines skipped, and the bad lines.

    `validate(obj)` returns why an object breaks the schema, or None. on_error="collect" reads
    every line and returns every bad one; "stop" raises a UserError at the first, naming `source`
    and the line number.
    """
    records: list[tuple[int, Any]] = []
    bad: list[BadLine] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            reason: str | None = f"invalid JSON ({exc.msg})"
        else:
            reason = validate(obj) if validate else None
        if reason is None:
            records.append((lineno, obj))
            continue
        if on_error == "stop":
            raise UserError(f"{source} line {lineno}: {reason}; fix that line")
        bad.append(BadLine(lineno, line.rstrip("\r\n"), reason))
    return records, bad


def read_jsonl(path: str | Path) -> list[Row]:
    """Read a canonical JSONL file; every bad line is reported at once with its line number."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; run clear_data.py first or pass an existing --data file")
    with path.open(encoding="utf-8-sig") as fh:
        records, bad = parse_jsonl(fh, validate_row, on_error="collect", source=str(path))
    if bad:
        problems = [f"line {b.lineno}: {b.reason}" for b in bad]
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UserError(f"{path} has {len(problems)} invalid row(s) ({shown}); fix them or re-run clear_data.py")
    rows = [normalize_row(row) for _, row in records]
    if not rows:
        raise UserError(f"{path} has no rows; it needs JSONL lines with non-empty 'instruction' and 'output'")
    return rows


def normalize_row(row: Row) -> Row:
    """Keep only canonical keys, in canonical order; drop empty optional fields."""
    out: Row = {"instruction": row["instruction"], "output": row["output"]}
    if row.get("history"):
        out["history"] = [[u, a] for u, a in row["history"]]
    if row.get("system"):
        out["system"] = row["system"]
    return out


def dumps_row(row: Row) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(", ", ": "))


def write_jsonl(path: str | Path, rows: Iterable[Row]) -> None:
    write_text_atomic(path, "".join(dumps_row(r) + "\n" for r in rows))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
