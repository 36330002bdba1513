"""bench/gpu_check.py on a machine without a GPU: the bundle's package list against the
requirements, the dry run, the no-CUDA refusal and the pytest plugin that picks CUDA-only tests."""
from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.markers import default_environment
from packaging.requirements import Requirement

from bench.gpu_check import ON_GPU_MACHINE, bundle_pins, canonical, cuda_test_files

ROOT = Path(__file__).resolve().parents[1]
# requirements.txt lines the GPU check never runs: the embedded base's one-time conversion and
# tokenizers of non-Qwen bases.
# Not needed for the CUDA path: the embedded base's conversion, lint, retrieval memory, the SDK of the
# server's tests; the server itself is optional there (its step says how to add it).
NOT_ON_GPU_PATH = {"gguf", "sentencepiece", "ruff", "bm25s", "openai", "fastapi", "uvicorn"}
# the lent GPU machines run Python 3.12 on Linux x86_64
TARGET = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.0",
          "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}


def requirements() -> dict[str, Requirement]:
    reqs = {}
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            req = Requirement(spec)
            reqs[canonical(req.name)] = req
    return reqs


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120, check=False)


def test_every_requirement_is_in_the_bundle_or_on_the_gpu_machine():
    carried = set(bundle_pins()) | {canonical(n) for n in ON_GPU_MACHINE} | NOT_ON_GPU_PATH
    unplaced = sorted(set(requirements()) - carried)
    assert not unplaced, (f"{unplaced} in requirements.txt: add each to requirements-gpu-bundle.txt (exact version) or, "
                          "if every CUDA machine with torch has it, to ON_GPU_MACHINE in bench/gpu_check.py")


def test_bundle_pins_are_exact_and_inside_the_requirement_ranges():
    pins, reqs = bundle_pins(), requirements()
    for name in ("bitsandbytes", "transformers", "peft", "trl", "datasets", "accelerate"):
        assert name in pins, f"{name} is missing from the bundle"
    for name, version in pins.items():
        assert version, f"{name} has no exact ==version in requirements-gpu-bundle.txt"
        if name in reqs:
            assert reqs[name].specifier.contains(version), f"{name}=={version} is outside requirements.txt's {reqs[name].specifier}"


def test_what_the_bundle_needs_is_in_the_bundle_or_on_the_gpu_machine():
    available = set(bundle_pins()) | {canonical(n) for n in ON_GPU_MACHINE}
    for name in bundle_pins():
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(TARGET):
                assert canonical(req.name) in available, f"{name} needs {req.name}, which neither the bundle nor ON_GPU_MACHINE has"


def test_dry_run_lists_every_step_without_a_gpu():
    out = run("-m", "bench.gpu_check", "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    steps = {line.split("]", 1)[1].split()[0]: line for line in lines if line.startswith("[")}
    assert list(steps) == ["install", "tests", "standin", "qlora", "chat", "compare", "serve", "export", "bench"]
    assert "pip install --no-index --find-links .gpu-bundle" in steps["install"]
    assert all(f in steps["tests"] for f in cuda_test_files())
    assert "bench.standins qwen1.5-1.8b --out .gpu-check/standin" in steps["standin"]
    assert "llm.py" in steps["qlora"] and "--max-steps 20 --max-length 512" in steps["qlora"] and "--load-in-4bit" not in steps["qlora"]
    assert "--once" in steps["chat"] and "--limit 4" in steps["compare"] and "--format merged" in steps["export"]
    assert "--sections gpu" in steps["bench"]
    for script in ("serve", "export"):
        assert (f"skipped: {script}.py not present" in steps[script]) != (ROOT / f"{script}.py").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_without_cuda_it_says_so_in_one_sentence_and_exits_non_zero(tmp_path):
    out = run("-m", "bench.gpu_check", "--work", str(tmp_path / "work"), env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2
    assert out.stderr.startswith("error: no CUDA GPU is visible") and out.stderr.count("\n") == 1
    assert not (tmp_path / "work").exists()


def test_plugin_keeps_only_the_tests_that_skip_without_cuda():
    out = run("-m", "pytest", "--collect-only", "-q", "-p", "bench.gpu_check", "tests/test_loading.py")
    assert out.returncode == 0, out.stdout + out.stderr
    collected = [line for line in out.stdout.splitlines() if "::" in line]
    assert collected == ["tests/test_loading.py::test_cuda_load_is_nf4_double_quant"]
    assert "tests/test_loading.py" in cuda_test_files()


def test_every_step_command_parses_with_the_scripts_own_flags(tmp_path):
    import importlib

    from bench.gpu_check import Paths, make_steps

    steps = make_steps(Paths(work=tmp_path, bundle=tmp_path / "bundle", python=sys.executable))
    checked = []
    for step in steps:
        if len(step.argv) < 2 or step.missing:
            continue
        module, rest = (step.argv[2], step.argv[3:]) if step.argv[1] == "-m" else (step.argv[1].removesuffix(".py"), step.argv[2:])
        if module == "pytest":
            continue
        if step.name == "serve":
            rest = [*rest, "--port", "8000"]  # added at run time on a free port
        importlib.import_module(module).parse_args(rest)  # an unknown flag exits here
        checked.append(step.name)
    assert {"qlora", "chat", "compare", "bench"} <= set(checked)
