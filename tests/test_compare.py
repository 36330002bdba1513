"""compare.py and multi_compare.py end to end: reproducible reports, complete headers, clear errors."""
from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import compare
import multi_compare
from conftest import head_rows, train_persona
from personakit.errors import run_cli
from personakit.report import TIMING_PREFIX
from personakit.versions import library_versions

ROOT = Path(__file__).resolve().parents[1]

EN_PROMPTS = ROOT / "data" / "en" / "prompts.jsonl"
ZH_PROMPTS = ROOT / "data" / "prompts.jsonl"
QUICK = ["--max-new-tokens", "8"]
DECODING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size",
                 "max_new_tokens", "seed", "min_reply_chars", "batch_size")


@pytest.fixture(scope="session")
def val_adapters(tiny_model_dir, tmp_path_factory) -> Path:
    """A persona trained with a held-out split (half of 60 rows), so held-out perplexity exists."""
    tmp = tmp_path_factory.mktemp("val_adapters")
    data = head_rows(ROOT / "data" / "en" / "girl.jsonl", 60, tmp / "girl.jsonl")
    train_persona(tiny_model_dir, data, tmp / "adapters", "girl", "--val-fraction", "0.5")
    return tmp / "adapters"


def run(script, argv: list[str]) -> str:
    """Run a script's real CLI; return the report it wrote."""
    assert script.main(script.parse_args(argv)) == 0
    return Path(argv[argv.index("--out") + 1]).read_text(encoding="utf-8")


def fail(script, argv: list[str], capsys) -> str:
    """Run a script as its __main__ does; it must exit non-zero with one sentence on stderr."""
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: script.main(script.parse_args(argv)))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # progress bars of model loading may come first
    assert last.startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err
    return last


def body(report: str) -> str:
    return "\n".join(line for line in report.splitlines() if not line.startswith(TIMING_PREFIX))


def table_after(report: str, title: str) -> list[dict[str, str]]:
    """The first Markdown table after the heading `title`, as dicts keyed by column header."""
    lines = report.split(f"\n{title}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    header = rows[0]
    return [dict(zip(header, r)) for r in rows[2:]]


def summary(report: str) -> dict[str, dict[str, str]]:
    return {row["model"].split(" ")[0]: row for row in table_after(report, "## Summary")}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_header(report: str, script: str, argv: list[str], adapters: list[Path], prompts: Path) -> None:
    head = report.split("\n## Summary\n")[0]
    timing = [line for line in head.splitlines() if line.startswith(TIMING_PREFIX)]
    assert len(timing) == 2 and "generated" in timing[0] and "wall time" in timing[1]
    assert f"- command: `{shlex.join(['python', script, *argv])}`" in head
    meta = json.loads((adapters[0] / "persona.json").read_text(encoding="utf-8"))
    assert meta["base"]["id"] in head and meta["base"]["fingerprint"] in head
    for adapter in adapters:
        meta = json.loads((adapter / "persona.json").read_text(encoding="utf-8"))
        assert str(adapter) in head
        assert sha256(adapter / "adapter_model.safetensors") in head
        assert meta["data"]["sha256"] in head
        assert meta["system"] in head
    assert sha256(prompts) in head
    decoding = next(line for line in head.splitlines() if line.startswith("- decoding: "))
    for key in DECODING_KEYS:
        assert f"{key}=" in decoding
    assert "- seeds: generation seed 1234" in head
    assert "- device: cpu" in head
    for package, version in library_versions().items():
        assert f"{package} {version}" in head


# ---- compare.py ----------------------------------------------------------------------------

def test_compare_writes_the_same_report_twice(tiny_adapters, tmp_path):
    out = tmp_path / "compare_results.md"
    argv = ["--persona", "girl", "--adapters-root", str(tiny_adapters), "--out", str(out), "--limit", "6", *QUICK,
            "--min-reply-chars", "3"]
    first = run(compare, argv)
    first_png = out.with_suffix(".png").read_bytes()
    second = run(compare, argv)
    assert body(first) == body(second)
    assert first.count(TIMING_PREFIX) == 2
    assert out.with_suffix(".png").read_bytes() == first_png
    assert "![reply lengths and metrics per model](compare_results.png)" in second
    assert not list(tmp_path.glob(".*.tmp"))


def test_compare_report_has_header_summary_readings_and_every_reply(tiny_adapters, tmp_path):
    out = tmp_path / "compare_results.md"
    argv = ["--persona", "girl", "--adapters-root", str(tiny_adapters), "--out", str(out), *QUICK, "--min-reply-chars", "3"]
    report = run(compare, argv)
    assert_header(report, "compare.py", argv, [tiny_adapters / "girl"], ZH_PROMPTS)
    assert "the base gets girl's system prompt" in report
    rows = summary(report)
    assert set(rows) == {"base", "girl"} and rows["base"]["model"] == "base (vs girl)"
    for row in rows.values():
        assert row["replies"] == "16"
        assert {"mean len", "median len", "too short", "keyword hit", "keyword share", "distinct-2", "loops", "cut off",
                "retried", "style dist", "exact copies", "near copies", "marker rate", "held-out ppl base → tuned"} <= set(row)
    assert "Legend." in report and "## Style distance components" in report
    assert "- **girl**: " in report.split("## Reading")[1]
    # Every retried reply is both counted in the summary and flagged under its prompt.
    replies = report.split("## Replies")[1]
    assert int(rows["girl"]["retried"]) + int(rows["base"]["retried"]) == replies.count("regenerated (too short)")
    for prompt in (json.loads(line) for line in ZH_PROMPTS.read_text(encoding="utf-8").splitlines()):
        section = replies.split(f"### {prompt['id']} · {prompt['category']}\n")[1].split("\n### ")[0]
        assert prompt["prompt"] in section
        assert section.count("\n**base** · ") == 1 and section.count("\n**girl** · ") == 1
        if prompt.get("history"):
            assert prompt["history"][0][0] in section
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_reports_heldout_perplexity_of_the_training_split(val_adapters, tmp_path):
    out = tmp_path / "c.md"
    report = run(compare, ["--adapter", str(val_adapters / "girl"), "--prompts", str(EN_PROMPTS), "--limit", "2",
                           "--out", str(out), *QUICK])
    results = json.loads((val_adapters / "girl" / "persona.json").read_text(encoding="utf-8"))["results"]
    base_ppl, tuned_ppl = map(float, summary(report)["girl"]["held-out ppl base → tuned"].split(" → "))
    # Same split, same encoding, same weights as llm.py measured at the end of training.
    assert base_ppl == pytest.approx(results["base_val_ppl"], abs=0.01)
    assert tuned_ppl == pytest.approx(results["tuned_val_ppl"], abs=0.01)
    assert "girl seed 42 val_fraction 0.5" in report
    assert "2 of 16 prompts" in report and report.count("\n### en-") == 2


def test_missing_or_changed_training_data_is_reported_not_fatal(val_adapters, tmp_path):
    adapter = tmp_path / "adapters" / "girl"
    shutil.copytree(val_adapters / "girl", adapter)
    meta_path = adapter / "persona.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    changed = tmp_path / "girl.jsonl"
    original = Path(meta["data"]["path"]).read_text(encoding="utf-8")
    changed.write_text(original + '{"instruction": "hi", "output": "hey"}\n', encoding="utf-8")
    for data_path, expected in ((tmp_path / "gone.jsonl", "not found"), (changed, "changed since training")):
        meta["data"]["path"] = str(data_path)
        meta_path.write_text(json.dumps(meta), encoding="utf-8")
        report = run(compare, ["--adapter", str(adapter), "--limit", "1", "--out", str(tmp_path / "c.md"), *QUICK])
        assert expected in report.split("## Summary")[0]
        row = summary(report)["girl"]
        assert row["style dist"] == row["exact copies"] == row["held-out ppl base → tuned"] == "—"
        assert f"no held-out perplexity: training data {data_path}" in report


# ---- multi_compare.py ----------------------------------------------------------------------

def test_multi_compare_is_reproducible_and_attributes_every_model(tiny_adapters, tmp_path):
    out = tmp_path / "multi_compare_results.md"
    # Sampling hot makes the random tiny model say something; the seed makes it say the same thing twice.
    argv = ["--adapters-root", str(tiny_adapters), "--prompts", str(EN_PROMPTS), "--limit", "4", "--out", str(out), *QUICK,
            "--sample", "--temperature", "1.5"]
    first = run(multi_compare, argv)
    second = run(multi_compare, argv)
    assert body(first) == body(second)
    assert float(summary(second)["base"]["mean len"]) > 0
    assert_header(second, "multi_compare.py", argv, [tiny_adapters / "girl", tiny_adapters / "peixuan"], EN_PROMPTS)
    assert "the base gets no system prompt" in second
    assert set(summary(second)) == {"base", "girl", "peixuan"}
    matrix = table_after(second, "## Attribution")
    assert [r["model"] for r in matrix] == ["base", "girl", "peixuan"]
    for row in matrix:
        assert sum(int(row[c]) for c in ("base", "girl", "peixuan")) == 4 and row["accuracy"].endswith("%")
    style = table_after(second, "## Persona matrices")
    assert [r["model"] for r in style] == ["base", "girl", "peixuan"] and set(style[0]) == {"model", "girl", "peixuan"}
    assert "Persona marker rate" in second
    reading = second.split("## Reading")[1].split("## Chart")[0]
    assert "- **girl**: " in reading and "- **peixuan**: " in reading and "attributed to itself on" in reading
    assert "![reply lengths and metrics per model](multi_compare_results.png)" in second
    assert out.with_suffix(".png").is_file()


def test_multi_compare_selects_personas_and_base_system(tiny_adapters, tmp_path):
    out = tmp_path / "m.md"
    report = run(multi_compare, ["--personas", "peixuan", "--adapters-root", str(tiny_adapters), "--base-system", "Be brief.",
                                 "--limit", "1", "--out", str(out), *QUICK])
    assert set(summary(report)) == {"base", "peixuan"}
    assert "  - base: `Be brief.`" in report
    report = run(multi_compare, ["--adapters", str(tiny_adapters / "girl"), "--limit", "1", "--out", str(out), *QUICK])
    assert set(summary(report)) == {"base", "girl"}


# ---- the embedded model --------------------------------------------------------------------

def test_compare_on_the_embedded_model(embedded_adapter, tmp_path):
    out = tmp_path / "compare_results.md"
    argv = ["--adapter", str(embedded_adapter), "--prompts", str(EN_PROMPTS), "--limit", "2", "--batch-size", "2",
            "--max-new-tokens", "12", "--out", str(out)]
    report = run(compare, argv)
    assert_header(report, "compare.py", argv, [embedded_adapter], EN_PROMPTS)
    assert "`embedded:SmolLM2-135M-Instruct`" in report
    rows = summary(report)
    assert float(rows["base"]["mean len"]) > 0 and float(rows["girl"]["mean len"]) > 0
    assert rows["girl"]["style dist"] != "—" and rows["girl"]["marker rate"].endswith("%")
    assert "> *(empty reply)*" not in report


# ---- bad input -----------------------------------------------------------------------------

def test_bad_adapters_fail_with_one_sentence(tiny_adapters, tmp_path, capsys):
    out = ["--out", str(tmp_path / "r.md")]
    assert "does not exist" in fail(compare, ["--adapter", str(tmp_path / "nope"), *out], capsys)
    (tmp_path / "empty").mkdir()
    assert "is not a persona adapter folder" in fail(compare, ["--adapter", str(tmp_path / "empty"), *out], capsys)
    assert "no persona named 'bob'" in fail(compare, ["--persona", "bob", "--adapters-root", str(tiny_adapters), *out], capsys)
    assert "--persona NAME" in fail(compare, ["--adapters-root", str(tiny_adapters), *out], capsys)
    assert "no adapters found" in fail(multi_compare, ["--adapters-root", str(tmp_path / "empty"), *out], capsys)
    assert not (tmp_path / "r.md").exists()


def test_adapters_of_different_bases_fail_with_one_sentence(tiny_adapters, tiny_model_dir, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_adapters / "peixuan", other)
    meta = json.loads((other / "persona.json").read_text(encoding="utf-8"))
    meta["persona"], meta["base"] = "other", {"id": "Qwen/Qwen1.5-1.8B-Chat", "fingerprint": "0123456789abcdef"}
    (other / "persona.json").write_text(json.dumps(meta), encoding="utf-8")
    out = ["--out", str(tmp_path / "r.md")]
    err = fail(multi_compare, ["--adapters", str(tiny_adapters / "girl"), str(other), *out], capsys)
    assert "different bases" in err and "Qwen/Qwen1.5-1.8B-Chat" in err
    err = fail(compare, ["--adapter", str(other), "--base", str(tiny_model_dir), "--limit", "1", *out], capsys)
    assert "--allow-base-mismatch" in err


def test_malformed_prompt_file_names_the_line(tiny_adapters, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    argv = ["--persona", "girl", "--adapters-root", str(tiny_adapters), "--prompts", str(prompts), "--out", str(tmp_path / "r.md")]
    prompts.write_text('{"prompt": "hi"}\n{"prompt": "oops"\n', encoding="utf-8")
    assert "line 2: invalid JSON" in fail(compare, argv, capsys)
    prompts.write_text('{"prompt": "hi", "keywords": "hello"}\n', encoding="utf-8")
    assert "line 1: 'keywords' must be a list" in fail(compare, argv, capsys)
    prompts.write_text('{"id": "a", "prompt": "hi"}\n\n{"id": "a", "prompt": "yo"}\n', encoding="utf-8")
    assert "line 3 repeats id 'a'" in fail(multi_compare, argv[2:], capsys)
    assert "does not exist" in fail(compare, [*argv[:5], str(tmp_path / "none.jsonl"), *argv[6:]], capsys)


# ---- the scripts themselves ----------------------------------------------------------------

def test_help_is_instant_and_starts_with_the_commands():
    code = ("import sys, compare, multi_compare; compare.parse_args(['--persona', 'x']); multi_compare.parse_args([]); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    for script in ("compare.py", "multi_compare.py"):
        text = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert f"python {script}" in text and "--max-new-tokens" in text and "--limit" in text


def test_default_prompt_set_covers_every_category():
    rows = [json.loads(line) for line in ZH_PROMPTS.read_text(encoding="utf-8").splitlines()]
    english = [json.loads(line) for line in EN_PROMPTS.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [f"zh-{i:02d}" for i in range(1, 17)]
    assert [r["category"] for r in rows] == [r["category"] for r in english]
    assert rows[0]["prompt"] == "我准备考研但很焦虑。给我一个今晚能做的最小行动，再说一句鼓励的话。"
    assert rows[0]["keywords"] == ["考研", "焦虑", "今晚"] and rows[1]["keywords"] == ["刷手机", "停不下来", "现在"]
    assert {"emotional", "action", "advice", "teasing", "short", "multiturn"} <= {r["category"] for r in rows}


def _evaluation_with_keyword_hits(persona_hits: int, base_hits: int):
    """A two-model Evaluation over 12 prompts with keywords, scored by the real metrics on fixed replies."""
    from personakit.evaluation import BASE, Evaluation, ModelSpec, Perplexity, PersonaData
    from personakit.metrics import summarize

    keywords = [[f"topic{i}"] for i in range(12)]

    def metrics(hits: int):
        texts = [f"Here is what to do about topic{i}." if i < hits else "Chef's orders." for i in range(12)]
        return summarize(texts, keywords, hit_limit=[False] * 12, retried=[False] * 12, reference=None,
                         markers=None, too_short_units=0)

    specs = [ModelSpec(BASE, None, None, None), ModelSpec("marco", "marco", "sys", "marco")]
    return Evaluation(
        base_id="tiny", fingerprint="f", device="cpu", dtype="float32", quantized=False, adapters=[],
        data={"marco": PersonaData(None, None, "persona.json records no training data file")}, prompts=None,
        specs=specs, decoding=None, batch_size=1, too_short_units=0, markers_file=Path("none"), markers={},
        replies={}, metrics={BASE: metrics(base_hits), "marco": metrics(persona_hits)},
        perplexity={"marco": Perplexity(None, None, 0, "no data")},
        style_matrix={BASE: {"marco": None}, "marco": {"marco": None}}, marker_matrix={BASE: {"marco": None}},
        attribution=None, seconds={},
    )


def test_reading_says_plainly_when_a_persona_answers_fewer_prompts_than_the_base():
    from personakit.report import reading_lines

    worse = reading_lines(_evaluation_with_keyword_hits(persona_hits=6, base_hits=10))
    assert worse == [worse[0]] and worse[0].startswith("- **marco**: ignores the question on 6/12 prompts; the base answered 10/12;")
    as_good = reading_lines(_evaluation_with_keyword_hits(persona_hits=10, base_hits=10))[0]
    assert "the base answered" not in as_good and "ignores the question (no keyword) on 2/12 prompts with keywords (base 2/12)" in as_good
