"""bench/speed.py in its --tiny configuration on the tiny model (a smoke run): figures printed, Speed section written.
No timing is asserted; a target's met column must agree with the figure beside it."""
from __future__ import annotations

import contextlib
import io
import re

import pytest

from bench import speed
from bench.benchmarking import replace_section
from personakit.errors import UserError

OTHER = "# Benchmarks\n\n<!-- quality:start -->\n## Quality\nowned by the quality benchmark\n<!-- quality:end -->\n"
NUMBER = r"\d+(?:\.\d+)?"


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    out.write_text(OTHER, encoding="utf-8")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = speed.main(speed.parse_args(["--tiny", "--base", str(tiny_model_dir), "--out", str(out)]))
    return code, printed.getvalue(), out.read_text(encoding="utf-8")


def test_smoke_run_prints_every_section_and_a_summary(tiny_run):
    code, printed, _ = tiny_run
    assert code == 0
    assert printed.startswith("config: ")
    for pattern in (
        rf"^train ours \((fp32|bf16)\): 2 steps, \d+ rows, .* {NUMBER} supervised tokens/s, peak RSS {NUMBER} GiB, val loss {NUMBER}$",
        rf"^train baseline \((fp32|bf16)\): 2 steps, .* supervised tokens/s, .* val loss {NUMBER}$",
        rf"^flops fp32 128x128 matmul, \d+ threads: {NUMBER} GFLOP/s$",
        r"^flops bf16 128x128 matmul",
        rf"^flops achieved: ours {NUMBER} GFLOP/s = {NUMBER}% of the fp32 matmul peak",
        rf"^compare ours \(multi_compare.py\): 4 models x 2 prompts, load \+ generation {NUMBER}s \(whole CLI {NUMBER}s\)",
        rf"^compare naive: 4 models x 2 prompts, load \+ generation {NUMBER}s, peak RSS",
        rf"^compare: ours {NUMBER}x faster than naive, \d+/8 replies differ$",
        rf"^growth 32 pairs: 4 steps in {NUMBER}s \({NUMBER} s per 100 pairs\)$",
        rf"^growth 32 pairs on 1 process\(es\) x \d+ thread\(s\): 4 steps, training {NUMBER}s, whole run {NUMBER}s$",
        rf"^growth 32 pairs on 2 process\(es\) x \d+ thread\(s\): 4 steps, training {NUMBER}s, whole run {NUMBER}s$",
        rf"^\| training time, 2 processes / 1 \(same epoch and effective batch\) \| {NUMBER}x ",
        r"^gpu: skipped \(no CUDA device on this machine\)$|^gpu qlora: ",
        r"^\| measurement \| value \| target \| met \|$",
    ):
        assert re.search(pattern, printed, re.M), pattern
    ratio, met = re.search(rf"^\| training supervised tokens/s, ours / baseline \| ({NUMBER})x .* \| ≥ 1.5x \| (yes|no) \|$", printed, re.M).groups()
    assert met == ("yes" if float(ratio) >= 1.5 else "no")
    differ, total, met = re.search(r"^\| comparison replies that differ \| (\d+)/(\d+) \| 0 \| (yes|no) \|$", printed, re.M).groups()
    assert total == "8" and met == ("yes" if differ == "0" else "no")


def test_speed_section_is_written_between_markers_and_other_sections_are_kept(tiny_run):
    _, _, text = tiny_run
    assert text.startswith(OTHER.rstrip("\n"))
    assert text.count("<!-- speed:start -->") == 1 and text.count("<!-- speed:end -->") == 1
    section = text.split("<!-- speed:start -->")[1].split("<!-- speed:end -->")[0]
    assert section.lstrip().startswith("## Speed")
    assert "`python -m bench.speed --tiny --base " in section
    # the bf16 rate is this run's measurement, not a fixed figure; the precision llm.py chose is named
    assert re.search(rf"a 128x128 bf16 matmul ran at {NUMBER}x the fp32 rate", section) and "150x" not in section
    for needle in ("torch ", "transformers ", "peft ", "trl ", " RAM", "### Training throughput (CPU)", "### The machine's limit",
                   "### Comparison generation", "### Growth", "### Several processes", "### GPU (QLoRA)", "completion-only loss",
                   "`--cpu-dtype auto` chose"):
        assert needle in section, needle


def test_rewriting_replaces_only_the_speed_section():
    once = replace_section(OTHER, "speed", "## Speed\nfirst")
    twice = replace_section(once, "speed", "## Speed\nsecond")
    assert twice == once.replace("first", "second")
    assert twice.startswith(OTHER) and "first" not in twice


def test_unknown_section_is_refused():
    with pytest.raises(UserError, match="--sections"):
        speed.main(speed.parse_args(["--sections", "train,speed"]))
