"""bench/speed.py in its --tiny configuration on the tiny model (a smoke run): figures printed, Speed section written.
No timing is asserted; a target's met column must agree with the figure beside it."""
from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

from bench import speed
from bench.benchmarking import lora_train_flops, replace_section
from personakit.errors import UserError
from personakit.precision import Probe, decide

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
        rf"^flops achieved: ours \((fp32|bf16)\) {NUMBER} GFLOP/s = {NUMBER}% of the \1 matmul peak",
        rf"^compare ours \(multi_compare.py\): 4 models x 2 prompts, load \+ generation {NUMBER}s \(whole CLI {NUMBER}s\)",
        rf"^compare naive: 4 models x 2 prompts, load \+ generation {NUMBER}s, peak RSS",
        rf"^compare: ours {NUMBER}x faster than naive, \d+/8 replies differ$",
        rf"^growth 32 pairs: 4 steps in {NUMBER}s \({NUMBER} s per 100 pairs\)$",
        rf"^growth 32 pairs on 1 process\(es\) x \d+ thread\(s\): 4 steps, training {NUMBER}s, whole run {NUMBER}s$",
        rf"^growth 32 pairs on 2 process\(es\) x \d+ thread\(s\): 4 steps, training {NUMBER}s, whole run {NUMBER}s$",
        rf"^\| training time, 2 processes / 1 \(same epoch and effective batch\) \| {NUMBER}x ",
        r"^\| measurement \| value \| target \| met \|$",
    ):
        assert re.search(pattern, printed, re.M), pattern
    # the GPU section runs exactly where there is a CUDA device, and says it skipped elsewhere
    ran = (rf"^gpu qlora: 2 steps x 8 rows x 64 tokens in {NUMBER}s: .* MFU {NUMBER}%$", rf"^\| GPU peak VRAM \(reserved\) \| {NUMBER} GiB ")
    skipped = (r"^gpu: skipped \(no CUDA device on this machine\)$", r"^\| GPU peak VRAM at length 512 \| skipped: no CUDA device \|")
    expected, absent = (ran, skipped) if torch.cuda.is_available() else (skipped, ran)
    assert all(re.search(p, printed, re.M) for p in expected) and not any(re.search(p, printed, re.M) for p in absent)
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


# Probe outcomes with mocked timings: an AMX Xeon (bf16 ~4.5x fp32) and an AVX2 CPU without bf16 units.
FAST_BF16 = Probe(cpu="AMX Xeon", torch="2.13", threads=2, fp32_gflops=220.0, bf16_gflops=1000.0)
SLOW_BF16 = Probe(cpu="AVX2 laptop", torch="2.13", threads=2, fp32_gflops=150.0, bf16_gflops=1.0)


@pytest.mark.parametrize("probe, dtype, arms, baseline_trains_bf16", [
    (FAST_BF16, "bf16", ("ours", "ours-fp32", "baseline"), True),
    (SLOW_BF16, "fp32", ("ours", "baseline"), False),
])
def test_arms_and_baseline_precision_follow_the_probe(probe, dtype, arms, baseline_trains_bf16, tmp_path):
    from trl import SFTConfig

    precision = decide("auto", lambda: probe)
    assert precision.dtype == dtype
    # ours trains in the auto choice, with an fp32 arm beside it only where that choice is bf16
    assert speed.training_arms(precision) == arms
    # the baseline keeps TRL's own default (bf16) where bf16 is fast, and fp32 where it is slow
    config = SFTConfig(output_dir=str(tmp_path), bf16=speed.baseline_bf16("cpu", precision), use_cpu=True, report_to="none")
    assert config.bf16 is baseline_trains_bf16
    # on CUDA TRL's default stays whatever the CPU probe said
    assert speed.baseline_bf16("cuda", precision) is None


def _train_arm(dtype: str, seconds: float) -> dict:
    return {"dtype": dtype, "body": 100_000_000, "head": 20_000_000, "tokens": 10_000, "supervised": 4_000, "seconds": seconds,
            "tokens_s": 10_000 / seconds, "supervised_s": 4_000 / seconds, "val_loss": 3.0}


def test_training_flops_are_a_share_of_the_peak_of_the_precision_trained():
    train = {"ours": _train_arm("bf16", 10.0), "ours-fp32": _train_arm("fp32", 20.0), "baseline": _train_arm("bf16", 30.0)}
    peaks = {"fp32": 220e9, "bf16": 1000e9}
    achieved = speed.achieved_flops(train, peaks)
    assert set(achieved) == {"ours", "ours-fp32"}
    flop = lora_train_flops(100_000_000, 20_000_000, 10_000, 4_000)
    assert achieved["ours"]["dtype"] == "bf16" and achieved["ours"]["share"] == pytest.approx(flop / 10.0 / 1000e9)
    assert achieved["ours-fp32"]["share"] == pytest.approx(flop / 20.0 / 220e9)
    row = next(r for r in speed.summary_rows({"train": train, "flops": {"achieved": achieved}}) if r[0].startswith("CPU training FLOP/s"))
    assert row[0] == "CPU training FLOP/s, share of the matmul peak in the precision trained"
    assert re.fullmatch(rf"ours {NUMBER} GFLOP/s = {NUMBER}% of bf16; ours-fp32 {NUMBER} GFLOP/s = {NUMBER}% of fp32", row[1])


def test_training_flops_skip_an_arm_without_a_measured_peak():
    # fp32 only (bf16 probe slow, ours trained in fp32) and no bf16 rate measured: ours against the fp32 peak
    achieved = speed.achieved_flops({"ours": _train_arm("fp32", 10.0), "baseline": _train_arm("fp32", 30.0)}, {"fp32": 150e9, "bf16": None})
    assert list(achieved) == ["ours"] and achieved["ours"]["dtype"] == "fp32"
    assert speed.achieved_flops({"ours": _train_arm("CUDA", 10.0)}, {"fp32": 150e9, "bf16": 1e9}) == {}
