"""bench_quality.py in a smoke configuration on the embedded base: both recipes trained, scored, and written."""
from __future__ import annotations

import contextlib
import io
import json
import re

import bench_quality

OTHER = "# Benchmarks\n\n<!-- speed:start -->\n## Speed\nowned by the speed benchmark\n<!-- speed:end -->\n"


def test_smoke_run_writes_both_recipes_and_keeps_every_reply(embedded_dir, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(OTHER, encoding="utf-8")
    work = tmp_path / "work"
    argv = ["--personas", "girl", "--fresh-personas", "marco", "--max-steps", "2", "--limit", "3", "--max-new-tokens", "24",
            "--work-dir", str(work), "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench_quality.main(bench_quality.parse_args(argv)) == 0
    text = out.read_text(encoding="utf-8")
    assert "owned by the speed benchmark" in text  # the other section is kept
    for target in ("persona markers on at least 90% of replies", "no loops", "keyword coverage at least the base's",
                   "held-out perplexity ratio no worse than the plain recipe's"):
        assert re.search(rf"\| {re.escape(target)}[^|]* \| [^|]+ \| (yes|no) \|", text), target
    assert re.search(r"- ours: girl lr [\d.e-]+, 2 steps, \d+ s", text)
    pct = r"(?:\d+%|n/a)"
    for recipe in ("plain", "ours"):
        assert re.search(rf"\| girl \| {recipe} \| {pct} \| {pct} \| {pct} \| {pct} \| [\d.]+ → [\d.]+ \([\d.]+\) \| {pct} \|", text), recipe
        assert re.search(rf"\| base \| {recipe} decoding \| n/a \| {pct} \|", text)
        replies = [json.loads(line) for line in (work / recipe / "replies.jsonl").read_text(encoding="utf-8").splitlines()]
        assert sorted(r["model"] for r in replies) == ["base"] * 3 + ["girl"] * 3
        # the two recipes really train differently: the plain one keeps its last weights
        meta = json.loads((work / recipe / "girl" / "persona.json").read_text(encoding="utf-8"))
        assert meta["hyperparameters"]["keep_last"] == (recipe == "plain")
    fresh = text.split("### Fresh personas, not used for tuning")[1]
    for recipe in ("plain", "ours"):
        assert re.search(rf"\| marco \| {recipe} \| {pct} \| {pct} \| {pct} \| {pct} \| [\d.]+ → [\d.]+ \([\d.]+\) \|", fresh), recipe
        meta = json.loads((work / "fresh" / recipe / "marco" / "persona.json").read_text(encoding="utf-8"))
        assert meta["data"]["path"].endswith("data/en/fresh/marco.jsonl") and meta["data"]["val_rows"] >= 10
    assert re.search(r"\| keyword coverage at least the base's[^|]* \| [^|]+ \| (yes|no) \|", fresh)
