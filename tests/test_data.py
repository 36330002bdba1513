"""The one JSONL reader (both error policies) and its two schema users: training rows and prompt sets."""
from __future__ import annotations

import pytest

from personakit.data import BadLine, parse_jsonl, read_jsonl, validate_row
from personakit.errors import UserError
from personakit.prompts import load_prompts

LINES = [
    '{"instruction": "hi", "output": "hey"}\n',
    "\n",
    "{not json\n",
    '{"instruction": "hi", "output": ""}\n',
    '{"instruction": "again", "output": "yes"}\n',
]


def test_collect_returns_every_good_and_every_bad_line_with_its_number():
    records, bad = parse_jsonl(LINES, validate_row, on_error="collect")
    assert [n for n, _ in records] == [1, 5]
    assert records[1][1] == {"instruction": "again", "output": "yes"}
    assert [(b.lineno, b.text) for b in bad] == [(3, "{not json"), (4, '{"instruction": "hi", "output": ""}')]
    assert bad[0].reason.startswith("invalid JSON (") and bad[1].reason == "'output' must be a non-empty string"


def test_stop_raises_at_the_first_bad_line_naming_source_and_line():
    with pytest.raises(UserError, match=r"^rows\.jsonl line 3: invalid JSON \(.*\); fix that line$"):
        parse_jsonl(LINES, validate_row, on_error="stop", source="rows.jsonl")


def test_without_a_schema_only_json_is_checked():
    records, bad = parse_jsonl(['"a string"', "[1, 2]", "nope"], on_error="collect")
    assert records == [(1, "a string"), (2, [1, 2])] and bad == [BadLine(3, "nope", bad[0].reason)]


def test_read_jsonl_reports_every_bad_row_at_once(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(LINES), encoding="utf-8")
    with pytest.raises(UserError, match=r"has 2 invalid row\(s\) \(line 3: invalid JSON .*; line 4: 'output' must be"):
        read_jsonl(path)


def test_read_jsonl_normalises_good_rows_and_reads_a_bom(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('\ufeff{"output": "hey", "instruction": "hi", "history": [], "extra": 1}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"instruction": "hi", "output": "hey"}]


def test_prompt_sets_stop_at_the_first_bad_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "keywords": "x"}\n{broken\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"prompts\.jsonl line 2: 'keywords' must be a list of non-empty strings; fix that line"):
        load_prompts(path)


def test_prompt_ids_default_to_the_position_and_must_be_unique(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": " a "}\n\n{"prompt": "b", "id": "x"}\n{"prompt": "c"}\n', encoding="utf-8")
    ps = load_prompts(path)
    assert [(p.id, p.prompt) for p in ps.prompts] == [("p01", "a"), ("x", "b"), ("p03", "c")]
    path.write_text('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2 repeats id 'x' of line 1"):
        load_prompts(path)
