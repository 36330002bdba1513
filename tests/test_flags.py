"""The shared flag groups: every script rejects out-of-range values before any work, all problems in one sentence."""
from __future__ import annotations

import subprocess
import sys

import pytest

import chat
import clear_data
import compare
import llm
import multi_compare
from conftest import ROOT
from personakit.errors import run_cli
from personakit.flags import ModelOptions, check_args, decoding_from_args, training_parser
from personakit.generation import Decoding


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


def test_training_parser_is_llm_cli_and_feeds_the_typed_options():
    from personakit.errors import UserError
    from personakit.train import TrainConfig, TrainJob

    argv = ["--persona", "p", "--data", "d", "--lora-r", "8", "--base", "b"]
    args = training_parser(ROOT).parse_args(argv)
    assert vars(args) == vars(llm.parse_args(argv))
    assert TrainConfig.from_args(args).lora_r == 8 and TrainConfig.from_args(args).learning_rate == 2.5e-4
    assert ModelOptions.from_args(args).base == "b" and TrainJob.from_args(args).final_dir == ROOT / "adapters" / "p"
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        check_args(training_parser(ROOT).parse_args([*argv, "--batch-size", "0"]))
