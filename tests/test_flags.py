"""The shared flag groups: every script rejects out-of-range values before any work, all problems in one sentence."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields, replace

import pytest

import chat
import clear_data
import compare
import export
import llm
import multi_compare
from conftest import ROOT
from personakit.comparison import CompareOptions, CompareReport, MultiCompareReport
from personakit.errors import run_cli
from personakit.flags import check_args, decoding_from_args, training_parser
from personakit.options import Decoding, ExportOptions, MemoryOptions, ModelOptions, PersonaChoice, PersonasChoice, RunOptions, TrainConfig, TrainJob


def fail(script, argv: list[str], capsys) -> str:
    """Run a script as its __main__ does: exit code 2 and one `error:` line on stderr."""
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: script.main(script.parse_args(argv)))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_llm_rejects_every_bad_value_at_once_even_in_a_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "llm.py"), "--persona", "p", "--data", str(tmp_path / "none.jsonl"),
                           "--learning-rate", "-1", "--lora-r", "0", "--val-fraction", "1", "--dry-run"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    err = proc.stderr
    # the range problems come before the missing data file, all of them in one sentence
    assert "--learning-rate must be positive (got -1)" in err and "--lora-r must be at least 1 (got 0)" in err
    assert "--val-fraction must be at least 0 and below 1 (got 1)" in err and err.rstrip().endswith("fix them and run again")


@pytest.mark.parametrize("script, argv, problems", [
    (chat, ["--memory-turns", "-1", "--top-p", "0", "--max-context", "100", "--max-new-tokens", "100"],
     ["--top-p must be above 0 and at most 1 (got 0)", "--memory-turns must be at least 0 (got -1)",
      "--max-context 100 must leave room for a prompt beside --max-new-tokens 100"]),
    (compare, ["--limit", "0", "--batch-size", "0", "--temperature", "0"],
     ["--batch-size must be at least 1 (got 0)", "--temperature must be positive (got 0)", "--limit must be at least 1 (got 0)"]),
    (multi_compare, ["--max-new-tokens", "0", "--too-short-units", "-2"],
     ["--max-new-tokens must be at least 1 (got 0)", "--too-short-units must be at least 0 (got -2)"]),
    (clear_data, ["in.jsonl", "--near-dup", "1.5", "--merge-minutes", "0", "--max-reply-chars", "0"],
     ["--merge-minutes must be positive (got 0)", "--near-dup must be between 0 and 1 (got 1.5)",
      "--max-reply-chars must be at least 1 (got 0)"]),
])
def test_each_script_lists_every_out_of_range_value(script, argv, problems, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is read or written: the check comes first
    err = fail(script, argv, capsys)
    for problem in problems:
        assert problem in err, problem
    assert err.count(" must ") == len(problems)


def test_decoding_takes_every_field_from_the_flags():
    args = chat.parse_args(["--greedy", "--top-k", "7", "--repetition-scope", "all"])
    decoding = decoding_from_args(args)
    assert isinstance(decoding, Decoding) and not decoding.do_sample
    assert (decoding.top_k, decoding.repetition_scope, decoding.seed) == (7, "all", 1234)


def test_llm_cli_without_flags_gives_the_defaults_library_code_gets_without_argparse():
    args = llm.parse_args(["--persona", "p", "--data", "d"])
    for group in (TrainJob, ModelOptions, TrainConfig):
        assert {f.name for f in fields(group)} <= set(vars(args)), group  # every field is a flag of llm.py
    assert TrainConfig.from_args(args) == TrainConfig()
    assert ModelOptions.from_args(args) == ModelOptions()
    assert TrainJob.from_args(args) == TrainJob(persona="p", data="d")
    # the tuned defaults the README and BENCHMARKS.md describe
    assert (TrainConfig().learning_rate, TrainConfig().lora_r, TrainConfig().min_steps, TrainConfig().lora_dropout) == (2.5e-4, 16, 75, 0.0)


def test_llm_flags_feed_the_typed_options():
    from personakit.errors import UserError

    argv = ["--persona", "p", "--data", "d", "--lora-r", "8", "--base", "b", "--keep-last", "--target-modules", "q_proj", "v_proj"]
    args = llm.parse_args(argv)
    assert TrainConfig.from_args(args) == replace(TrainConfig(), lora_r=8, keep_last=True, target_modules=["q_proj", "v_proj"])
    assert ModelOptions.from_args(args) == ModelOptions(base="b") and TrainJob.from_args(args).final_dir == ROOT / "adapters" / "p"
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        check_args(training_parser(ROOT).parse_args([*argv, "--batch-size", "0"]))


def test_every_script_defaults_to_the_option_classes_defaults():
    one = CompareOptions.from_args(compare.parse_args([]), several=False)
    assert one == CompareOptions(PersonaChoice(), CompareReport(), RunOptions(), ModelOptions(), Decoding(), command="python compare.py")
    many = CompareOptions.from_args(multi_compare.parse_args(["--base-system", "hi"]), several=True)
    assert many.personas == PersonasChoice() and many.report == MultiCompareReport(base_system="hi") and many.decoding == Decoding()
    assert many.report.out == str(ROOT / "multi_compare_results.md") and RunOptions().prompts == str(ROOT / "data" / "prompts.jsonl")
    talk = chat.parse_args([])
    # chat samples by default, the reports decode greedily: the one default that differs by script
    assert Decoding.from_args(talk) == Decoding(do_sample=True) and MemoryOptions.from_args(talk) == MemoryOptions()
    assert PersonaChoice.from_args(talk) == PersonaChoice() and ModelOptions.from_args(talk) == ModelOptions()
    out = export.parse_args(["--format", "gguf", "--out", "o", "--no-verify"])
    assert ExportOptions.from_args(out) == ExportOptions(format="gguf", out="o", verify=False)
