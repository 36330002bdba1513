"""Prove every CUDA path in one command, on a GPU machine without internet that has torch.

    make gpu-bundle                          # where pip can reach PyPI: wheels into .gpu-bundle/
    # copy the repository, .gpu-bundle/ included, to the GPU machine; there:
    python -m bench.gpu_check                # or scripts/gpu_check.sh
    python -m bench.gpu_check --dry-run      # list what it would run

Installs the bundle offline into a virtual environment that sees the machine's own torch
(`<work>/venv`), then runs each step in its own process with a time limit: the CUDA-only tests,
the Qwen1.5-1.8B-shaped stand-in, llm.py QLoRA of it for 20 steps at length 512 with the
defaults, chat.py --once, compare.py --limit 4, serve.py (one request) and export.py --format
merged when they exist, and the speed benchmark's GPU section. One line per step, then a
summary table (result, seconds, peak VRAM: the device's used memory from nvidia-smi minus what
was in use before the step) and a JSON file (--json) to copy into BENCHMARKS.md. Exits 1 when a
step failed, 2 without a CUDA GPU.

Loaded as a pytest plugin (`pytest -p bench.gpu_check`), it keeps only the tests that skip
themselves without CUDA.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable

from bench.lock import read_lock

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_LIST = ROOT / "requirements-gpu-bundle.txt"
PERSONA = "gpucheck"
DATA = "data/girl.jsonl"
MESSAGE = "你好，最近怎么样？"
BUDGET_S = 480  # the whole run, install included, ends within 8 minutes
# Distributions the bundle does not carry because a CUDA machine with torch has them (torch's own
# dependencies, the scientific stack, and what any transformers 5.x install brought); checked
# before installing, so a machine without one gets a sentence, not a pip traceback.
ON_GPU_MACHINE = (
    "torch", "numpy", "filelock", "fsspec", "jinja2", "typing-extensions", "pandas", "pyarrow", "matplotlib",
    "pyyaml", "requests", "tqdm", "psutil", "packaging", "regex", "huggingface-hub", "tokenizers", "safetensors",
    "typer", "pygments", "pytest", "xxhash", "tiktoken",
)


def canonical(name: str) -> str:
    """PEP 503 name: what pip and wheel file names agree on."""
    return re.sub(r"[-_.]+", "-", name).lower()


def bundle_pins(path: Path = BUNDLE_LIST, lock: Path | None = None) -> dict[str, str]:
    """{canonical name: exact version}: the bundle's names, at the lock's versions."""
    locked = read_lock(lock)
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            pins[canonical(name)] = locked.get(canonical(name), "")
    return pins


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
    steps = [
        Step("install", f"pip install --no-index --find-links {rel(paths.bundle)} -r {rel(BUNDLE_LIST)} into {rel(paths.work / 'venv')}",
             120, run=install_bundle),
        Step("tests", "the CUDA-only tests", 150, [py, "-m", "pytest", "-q", "-rs", "-p", "bench.gpu_check", *cuda_test_files()],
             needs=("install",), check=tests_check(paths.work / "logs" / "tests.log")),
        Step("standin", "Qwen1.5-1.8B-shaped stand-in (random weights, real config and tokenizer)", 150,
             [py, "-m", "bench.standins", "qwen1.5-1.8b", "--out", str(paths.standin)], needs=("install",), clears=paths.standin,
             missing=None if (ROOT / "bench" / "standins.py").is_file()
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
             needs=("qlora",), optional=True, run=serve_once,
             missing=serve_missing()),
        Step("export", "export.py --format merged", 180,
             [py, "export.py", *on_adapter, "--format", "merged", "--out", str(paths.work / "export"), "--overwrite"],
             needs=("qlora",), optional=True, missing=None if (ROOT / "export.py").is_file() else "export.py not present"),
        Step("bench", "the speed benchmark's GPU section", 240, [*bench, "--sections", "gpu", "--out", str(paths.work / "BENCHMARKS.gpu.md")],
             needs=("install",), check=bench_check(paths.work / "logs" / "bench.log")),
    ]
    return steps


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


def run_logged(argv: list[str], limit: float, log: Path) -> tuple[int | None, str]:
    """Run argv from the repository root, output to log; (exit code or None on timeout, log tail)."""
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        try:
            code = proc.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, tail(log)


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def wheel_names(bundle: Path) -> set[str]:
    return {canonical(p.name.split("-")[0]) for p in bundle.glob("*.whl")}


def install_bundle(step: Step, limit: float, log: Path, ctx: dict) -> tuple[bool, str]:
    from importlib import metadata

    paths: Paths = ctx["paths"]
    if not paths.bundle.is_dir() or not any(paths.bundle.glob("*.whl")):
        return False, (f"no wheels in {paths.bundle}: run `make gpu-bundle` on a machine that can reach PyPI "
                       "and copy .gpu-bundle/ into this repository")
    have = wheel_names(paths.bundle)
    absent = []
    for name in ON_GPU_MACHINE:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            if canonical(name) not in have:
                absent.append(name)
    if absent:
        return False, (f"this machine lacks {', '.join(absent)}, which the bundle does not carry: run "
                       f"`make gpu-bundle GPU_BUNDLE_EXTRA=\"{' '.join(n + '==VERSION' for n in absent)}\"` (versions from "
                       "requirements.txt or your .venv) where pip can reach PyPI, and copy .gpu-bundle/ here again")
    venv = paths.work / "venv"
    stamp = venv / ".bundle-installed"
    pinned = "".join(f"{name}=={version}\n" for name, version in bundle_pins().items())
    digest = hashlib.sha256((pinned + " ".join(sorted(p.name for p in paths.bundle.glob("*.whl")))).encode()).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest:
        return True, f"already installed in {rel(venv)}"
    # --without-pip: the venv runs the system's pip (it sees system site-packages), no ensurepip needed
    commands = [[sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", "--clear", str(venv)],
                [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index", "--only-binary=:all:",
                 "--find-links", str(paths.bundle), "-r", str(paths.work / "bundle-requirements.txt")]]
    paths.work.mkdir(parents=True, exist_ok=True)
    (paths.work / "bundle-requirements.txt").write_text(pinned, encoding="utf-8")
    started = time.time()
    for i, argv in enumerate(commands):
        code, last = run_logged(argv, limit - (time.time() - started), log)
        if i == 0 and code == 0 and sys.prefix != sys.base_prefix:
            # torch lives in a venv here: --system-site-packages would see the base Python, not it
            outer = [p for p in sys.path if re.search(r"(site|dist)-packages", p) and Path(p).is_dir()]
            site_dir = next((venv / "lib").glob("python*/site-packages"))
            (site_dir / "gpu_check_outer.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in outer))
        if code != 0:
            missing = re.findall(r"No matching distribution found for ([^\s]+)", last)
            if missing:
                return False, (f"the bundle lacks {', '.join(missing)} that this machine does not have either: add it with "
                               "`make gpu-bundle GPU_BUNDLE_EXTRA=\"name==version\"` and copy .gpu-bundle/ here again")
            return False, "timed out" if code is None else f"`{shown(argv)}` failed:\n{last}"
    stamp.write_text(digest)
    return True, f"installed into {rel(venv)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_missing() -> str | None:
    """Why the serve step cannot run here, if it cannot: the server's packages are not in the bundle (it is
    kept small for bitsandbytes); a machine that wants the step adds them with GPU_BUNDLE_EXTRA."""
    if not (ROOT / "serve.py").is_file():
        return "serve.py not present"
    absent = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if absent:
        return (f"{' and '.join(absent)} not installed here: `make gpu-bundle GPU_BUNDLE_EXTRA=\"fastapi==VERSION uvicorn==VERSION ...\"` "
                "(versions from requirements.txt) adds the server")
    return None


def serve_once(step: Step, limit: float, log: Path, ctx: dict) -> tuple[bool, str]:
    """Start serve.py, send one chat completion for the trained persona, stop the server."""
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


# ---- the command ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=str(ROOT / ".gpu-bundle"), help="folder of wheels written by `make gpu-bundle`")
    p.add_argument("--work", default=str(ROOT / ".gpu-check"), help="folder for the venv, stand-in, adapter, reports and step logs")
    p.add_argument("--json", default=None, help="where the results go as JSON (default: <work>/gpu_check.json)")
    p.add_argument("--budget", type=int, default=BUDGET_S, help="seconds for the whole run; steps left when it is spent are skipped")
    p.add_argument("--no-install", action="store_true", help="run the steps with this Python as it is, without the bundle's venv")
    p.add_argument("--dry-run", action="store_true", help="list the steps and their commands, run nothing (needs no GPU)")
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


def summary_table(rows: list[dict]) -> str:
    lines = ["| step | result | time | peak VRAM | what |", "|---|---|---|---|---|"]
    for r in rows:
        vram = "—" if r["peak_vram_mib"] is None else f"{r['peak_vram_mib'] / 1024:.2f} GiB"
        lines.append(f"| {r['step']} | {r['result']} | {r['seconds']:.1f} s | {vram} | {r['what']} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    paths = resolve_paths(args)
    steps = make_steps(paths)
    json_path = Path(args.json) if args.json else paths.work / "gpu_check.json"
    if args.no_install:
        steps = [s for s in steps if s.name != "install"]
        for s in steps:
            s.needs = tuple(n for n in s.needs if n != "install")
    if args.dry_run:
        print(f"gpu check, dry run: {len(steps)} steps, {args.budget} s budget, steps run by {rel(paths.python)}")
        for i, s in enumerate(steps, 1):
            command = s.what if s.name == "install" else shown(s.argv)
            note = f"  [{'skipped' if s.optional else 'will fail'}: {s.missing}]" if s.missing else ""
            print(f"[{i}/{len(steps)}] {s.name} (up to {s.timeout} s): {command}{note}")
        print(f"results: {rel(json_path)}")
        return 0
    device, torch_version, cuda_version = cuda_device()
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
    failed = [r["step"] for r in rows if r["result"] in ("fail", "timeout")]
    bench_log = paths.work / "logs" / "bench.log"
    figures = [line for line in bench_log.read_text(encoding="utf-8").splitlines() if line.startswith("gpu")] if bench_log.is_file() else []
    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device, "torch": torch_version,
        "cuda": cuda_version, "python": sys.version.split()[0], "budget_s": args.budget,
        "total_seconds": round(time.time() - started, 1), "passed": not failed, "steps": rows, "gpu_benchmark": figures,
    }
    from personakit.data import write_text_atomic

    write_text_atomic(json_path, json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    print("\n" + summary_table(rows))
    if figures:
        print("\n" + "\n".join(figures))
    verdict = "every CUDA path passed" if not failed else f"failed: {', '.join(failed)} (logs in {rel(paths.work / 'logs')})"
    print(f"{verdict}; {results['total_seconds']:.0f} s in all; results in {rel(json_path)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    from personakit.errors import run_cli

    run_cli(lambda: main(parse_args()))
