"""Export a persona to run outside Python: a merged Hugging Face folder, a GGUF for llama.cpp / LM
Studio, or an Ollama folder, each proven by a round-trip check to answer like the trained model.

The GGUF is written by llama.cpp's own converter (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`),
which ships only in the source distribution of `llama-cpp-python`: its Python part (converter,
`conversion/`, `gguf-py/`, no C++) is unpacked once into the cache, for the installed version.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .files import publish_folder, write_json
from .options import EXPORT_FORMATS, EXPORT_QUANTS, Decoding, ExportOptions
from .persona import AdapterInfo

# chat.py's decoding defaults (it samples): what an exported model samples with unless told otherwise.
CHAT_DECODING = Decoding(do_sample=True)
# The llama-cpp-python release whose converter is used when the package itself is not installed
# (an export with --no-verify needs only the converter); keep in step with requirements-export.txt.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
_CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_SPACE_TEXT = ("No space left", "File too large", "Disk quota")
# Default system message: prepended when a conversation has none, so a loader that sends no system
# message gets the trained prompt; with one, the original template renders exactly as in training.
_DEFAULT_SYSTEM = (
    "{{% if not (messages and messages[0]['role'] == 'system') %}}"
    "{{% set messages = [{{'role': 'system', 'content': {system}}}] + messages %}}{{% endif %}}"
)

Log = Callable[[str], None]


@dataclass
class Check:
    """One line of the round-trip report."""

    name: str
    ok: bool
    detail: str


@dataclass
class ExportResult:
    out: Path
    files: list[Path]
    checks: list[Check] = field(default_factory=list)
    next_step: str = ""
    seconds: float = 0.0


# ---------------------------------------------------------------- chat template and generation config


def template_with_default_system(template: str, system: str) -> str:
    return _DEFAULT_SYSTEM.format(system=json.dumps(system, ensure_ascii=False)) + template


def probe_conversations(system: str) -> list[list[dict[str, str]]]:
    """Conversations the round-trip renders: a first turn, a turn with history, a Chinese turn."""
    sys_msg = {"role": "system", "content": system}
    return [
        [sys_msg, {"role": "user", "content": "Hi! What did you do today?"}],
        [sys_msg, {"role": "user", "content": "I failed my driving test."},
         {"role": "assistant", "content": "Oh no, that's rough. What happened?"},
         {"role": "user", "content": "I panicked at the roundabout. Any advice for next time?"}],
        [sys_msg, {"role": "user", "content": "最近工作好累，周末想去哪里放松一下？"}],
    ]


# ---------------------------------------------------------------- llama.cpp's converter


def llama_cpp_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("llama-cpp-python")
    except md.PackageNotFoundError:
        return LLAMA_CPP_PYTHON_VERSION


def converter_dir(cache_dir: Path, log: Log) -> Path:
    """llama.cpp's Python converter of the installed llama-cpp-python, unpacked once from its sdist."""
    version = llama_cpp_version()
    target = cache_dir / f"llama.cpp-convert-{version}"
    if (target / ".complete").is_file():
        return target
    sdist = cache_dir / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        log(f"fetching llama.cpp's converter: the llama-cpp-python {version} source distribution from PyPI (once)")
        sdist.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", str(sdist.parent)],
            capture_output=True, text=True,
        )
        if done.returncode != 0 or not sdist.is_file():
            raise UserError(
                f"could not get llama.cpp's converter (the llama-cpp-python=={version} source distribution) "
                f"from PyPI; run `make setup-export` on a machine with network, or put "
                f"llama_cpp_python-{version}.tar.gz into {sdist.parent}"
            )
    staging = Path(tempfile.mkdtemp(prefix=".convert-src-", dir=cache_dir))
    try:
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                rel = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                if (member.isfile() and rel.startswith(_CONVERTER_MEMBERS)) or rel in _CONVERTER_MEMBERS:
                    member.name = rel
                    tar.extract(member, staging, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise UserError(f"{sdist} has no vendor/llama.cpp/convert_hf_to_gguf.py; delete it and run the export again")
        (staging / ".complete").write_text(version + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _run_converter(script: Path, args: list[str], what: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(script.parent), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env)
    if done.returncode == 0:
        return
    log = done.stdout + done.stderr
    if any(s in log for s in _NO_SPACE_TEXT):
        raise OSError(errno.ENOSPC, f"no space left while llama.cpp's converter wrote {what}")
    arch = re.search(r"Model (\S+) is not supported|Architecture '([^']+)' not supported", log)
    if arch:
        raise UserError(
            f"llama.cpp's converter does not know the architecture {arch.group(1) or arch.group(2)} of this base; "
            f"export --format merged instead, or use a base llama.cpp supports"
        )
    if "BPE pre-tokenizer was not recognized" in log:
        raise UserError(
            "llama.cpp's converter does not recognise this base's tokenizer (its BPE pre-tokenizer hash is not "
            "in llama.cpp's list), so it cannot write a GGUF; export --format merged instead, or use a base llama.cpp supports"
        )
    tail = "; ".join(log.strip().splitlines()[-3:])
    raise UserError(f"llama.cpp's converter failed on {what}: {tail}")


# ---------------------------------------------------------------- export


def _is_no_space(exc: BaseException) -> bool:
    # safetensors' Rust writer reports a full disk as SafetensorError, not OSError: match the OS text too.
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    return any(s in str(exc) for s in _NO_SPACE_TEXT)


def check_free_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(
            f"not enough disk space in {folder}: the export needs about {need / 1e9:.2f} GB and "
            f"{free / 1e9:.2f} GB are free; free some space or choose another --out"
        )


def _model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def export(info: AdapterInfo, options: ExportOptions, *, allow_base_mismatch: bool = False, log: Log = print) -> ExportResult:
    """Write the export into a staging folder beside `options.out`, check it, then rename it into place."""
    from .base_model import default_cache_dir

    fmt, quant, lora_only, verify, overwrite = options.format, options.quant, options.lora_only, options.verify, options.overwrite

    started = time.time()
    user_log = log

    def log(line: str) -> None:
        user_log(f"[{time.time() - started:5.1f}s] {line}")

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    if quant not in EXPORT_QUANTS:
        raise UserError(f"--quant must be one of {', '.join(EXPORT_QUANTS)}, not {quant!r}")
    if lora_only and fmt == "merged":
        raise UserError("--lora-only writes a LoRA GGUF; use it with --format gguf or ollama")
    out = Path(options.out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not an export folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = default_cache_dir(options.cache_dir)
    converter = converter_dir(cache, log) if fmt != "merged" else None

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    shared_base: Path | None = None
    try:
        result = _export_into(info, fmt, staging, work, out, quant, lora_only, verify, cache, converter,
                              allow_base_mismatch, log)
        if lora_only:
            shared_base = result.pop("shared_base")
        checks = result["checks"]
        failed = [c for c in checks if not c.ok]
        if failed:
            for c in checks:
                log(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
            raise UserError(
                f"the export does not answer like the trained persona ({failed[0].name}: {failed[0].detail}); "
                f"nothing was written to {out} (re-run with --no-verify to write it anyway)"
            )
        publish_folder(staging, out, overwrite)
    except Exception as exc:
        if _is_no_space(exc):
            raise UserError(f"the disk filled up while writing the export ({exc}); nothing was written to {out}; free some space and run it again") from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    if shared_base is not None:
        files.append(shared_base)
    res = ExportResult(out, files, checks, seconds=time.time() - started)
    res.next_step = _next_step(info, fmt, out, files, shared_base)
    return res


def _next_step(info: AdapterInfo, fmt: str, out: Path, files: list[Path], shared_base: Path | None) -> str:
    ggufs = [f for f in files if f.suffix == ".gguf" and f != shared_base]
    if fmt == "ollama":
        return f"ollama create {info.name} -f {out / 'Modelfile'}\nollama run {info.name}"
    if fmt == "gguf" and shared_base is not None:
        return f"llama-server -m {shared_base} --lora {ggufs[0]} --jinja"
    if fmt == "gguf":
        return f"llama-server -m {ggufs[0]} --jinja   (or load it in LM Studio)"
    return f"AutoModelForCausalLM.from_pretrained('{out}') (or vllm serve {out})"


def _export_into(
    info: AdapterInfo, fmt: str, staging: Path, work: Path, out: Path, quant: str, lora_only: bool,
    verify: bool, cache: Path, converter: Path | None, allow_base_mismatch: bool, log: Log,
) -> dict[str, Any]:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .loading import attach_adapters, load_base
    from .template import require_chat_template, stop_token_ids

    hf_logging.disable_progress_bar()
    log(f"loading base {info.base_id} unquantized and the adapter {info.path}")
    loaded = load_base(info.base_id, cache_dir=cache, load_in_4bit="no")
    model = attach_adapters(loaded, [info], allow_base_mismatch)
    # The adapter folder holds the tokenizer and chat template used in training.
    train_tok = AutoTokenizer.from_pretrained(str(info.path))
    require_chat_template(train_tok)
    stops = stop_token_ids(train_tok)
    convs = probe_conversations(info.system)
    floor = 0.0 if str(loaded.dtype) == "torch.float32" else TOLERANCE["half"]
    checks: list[Check] = []
    result: dict[str, Any] = {"checks": checks}
    # The reference is the adapter merged into the weights in memory, as chat.py and the reports
    # generate (the unmerged LoRA path is much slower per token: BENCHMARKS.md, Defaults).
    log("merging the adapter into the weights")
    model = model.merge_and_unload()
    reference = _reference_replies(model, train_tok, convs, stops) if verify else []

    merged = staging if fmt == "merged" else work / "merged"
    # the round trip reloads the export where the reference ran (a GPU-trained persona on its GPU, not the CPU)
    device, dtype = next(model.parameters()).device, loaded.dtype
    if not lora_only:
        check_free_space(staging.parent, 3 * _model_bytes(Path(loaded.ref.folder)) + (1 << 26))
        _save_merged(model, train_tok, info, merged, stops)
    del model, loaded

    if verify and not lora_only:
        # For a GGUF the end-to-end check is llama.cpp's; the intermediate folder's tokenizer is still checked.
        checks += _verify_merged(merged, train_tok, convs, reference, stops, max(floor, TOLERANCE["merged"]), log,
                                 replies=fmt == "merged", device=device, dtype=dtype)
    if fmt != "merged":
        assert converter is not None
        if lora_only:
            base_gguf, lora_gguf = _convert_lora(info, out, staging, quant, converter, cache, log)
            result["shared_base"] = base_gguf
            gguf_files = (base_gguf, lora_gguf)
        else:
            target = staging / f"{info.name}-{quant}.gguf"
            log(f"converting to GGUF ({quant}) with llama.cpp's convert_hf_to_gguf.py")
            check_free_space(staging.parent, _model_bytes(merged) // (2 if quant == "f16" else 3) + (1 << 26))
            _run_converter(converter / "convert_hf_to_gguf.py", [str(merged), "--outfile", str(target), "--outtype", quant], "the merged model")
            gguf_files = (target, None)
        if fmt == "ollama":
            from .ollama import write_modelfile

            write_modelfile(staging, gguf_files, train_tok, info, CHAT_DECODING.as_dict(), out)
        if verify:
            checks += _verify_gguf(gguf_files, train_tok, convs, reference, stops, quant, max(floor, TOLERANCE[quant]), log)
    _write_export_json(staging, info, fmt, quant, lora_only, checks)
    return result


def _save_merged(model: Any, tokenizer: Any, info: AdapterInfo, folder: Path, stops: list[int]) -> None:
    import copy

    folder.mkdir(parents=True, exist_ok=True)
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template_with_default_system(tokenizer.chat_template, info.system)
    gen = model.generation_config
    gen.eos_token_id = stops
    gen.pad_token_id = tokenizer.pad_token_id
    d = CHAT_DECODING
    # Sampling defaults of chat.py; its repetition penalty is left out because transformers would
    # apply it to the prompt too (--repetition-scope all), which measurably hurt the persona.
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = True, d.temperature, d.top_p, d.top_k
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))


def _write_export_json(staging: Path, info: AdapterInfo, fmt: str, quant: str, lora_only: bool, checks: list[Check]) -> None:
    from .versions import library_versions

    write_json(staging / "export.json", {
        "persona": info.name, "system": info.system, "format": fmt,
        "quant": quant if fmt != "merged" else None, "lora_only": lora_only,
        "adapter": {"path": str(info.path), "weights_sha256": info.weights_sha256()},
        "base": {"id": info.base_id, "fingerprint": info.base_fingerprint}, "llama_cpp_python": llama_cpp_version() if fmt != "merged" else None,
        "round_trip": [c.__dict__ for c in checks] or "skipped (--no-verify)",
        "versions": library_versions(),
    })


def _convert_lora(info: AdapterInfo, out: Path, staging: Path, quant: str, converter: Path, cache: Path, log: Log) -> tuple[Path, Path]:
    """The adapter as a LoRA GGUF in the export, the base's GGUF once beside the export folder."""
    from .base_model import resolve_base

    base_folder = Path(resolve_base(info.base_id, cache).folder)
    base_gguf = out.parent / f"base-{info.base_fingerprint[:12]}-{quant}.gguf"
    if not base_gguf.is_file():
        log(f"converting the base to {base_gguf} (once for every persona of this base)")
        check_free_space(out.parent, _model_bytes(base_folder) + (1 << 26))
        tmp = base_gguf.with_name(f".{base_gguf.name}.partial")
        try:
            _run_converter(converter / "convert_hf_to_gguf.py", [str(base_folder), "--outfile", str(tmp), "--outtype", quant], "the base model")
            os.replace(tmp, base_gguf)
        finally:
            tmp.unlink(missing_ok=True)
    lora_gguf = staging / f"{info.name}-lora-{quant}.gguf"
    log("converting the adapter to a LoRA GGUF with llama.cpp's convert_lora_to_gguf.py")
    _run_converter(converter / "convert_lora_to_gguf.py",
                   [str(info.path), "--base", str(base_folder), "--outfile", str(lora_gguf), "--outtype", quant], "the adapter")
    return base_gguf, lora_gguf


# ---------------------------------------------------------------- round-trip check

# Greedy replies are compared token by token against the adapter merged into the unquantized base in memory. Weights
# rounded to f16 / q8_0 (or merged in fp32) move the logits a little, so two greedy decoders may
# part where the reference itself hesitated: a divergence is accepted only at a near-tie, where the
# reference's logit margin between its token and the export's token is at most TOLERANCE (logits).
# Everything up to that point must match exactly; a wrong template, a missing LoRA or the wrong
# weights diverge at large margins. A base loaded in bf16/fp16 (on a GPU) is itself that coarse: "half".
TOLERANCE = {"merged": 1e-3, "f16": 0.1, "q8_0": 0.5, "half": 0.5}
REPLY_TOKENS = 24


@dataclass
class Reference:
    prompt: list[int]
    reply: list[int]
    logits: Any  # reference logits at each reply position (teacher-forced), [len(reply), vocab]


def _reference_replies(model: Any, tokenizer: Any, convs: list[list[dict[str, str]]], stops: list[int]) -> list[Reference]:
    import torch

    from .template import prompt_ids

    refs = []
    for conv in convs:
        prompt = prompt_ids(tokenizer, conv)
        reply = _greedy_hf(model, prompt, stops)
        with torch.no_grad():
            ids = torch.tensor([prompt + reply], device=next(model.parameters()).device)
            logits = model(ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(reply)].float().cpu()
        refs.append(Reference(prompt, reply, logits))
    return refs


def _greedy_hf(model: Any, prompt: list[int], stops: list[int]) -> list[int]:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt], device=device), attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                             do_sample=False, max_new_tokens=REPLY_TOKENS, eos_token_id=stops,
                             pad_token_id=stops[0], repetition_penalty=1.0)
    reply = out[0, len(prompt):].tolist()
    end = next((i for i, t in enumerate(reply) if t in stops), None)
    return reply if end is None else reply[: end + 1]


def compare_reply(ref: Reference, got: list[int], tolerance: float) -> tuple[bool, str]:
    """Exact match, or a divergence at a near-tie of the reference (see TOLERANCE)."""
    n = min(len(ref.reply), len(got))
    i = next((k for k in range(n) if ref.reply[k] != got[k]), n)
    if i == len(ref.reply) == len(got):
        return True, f"all {i} tokens identical"
    if i == n:  # one stopped (or hit the limit) where the other went on
        return False, f"identical for {i} tokens, then one reply ended and the other did not"
    margin = float(ref.logits[i, ref.reply[i]] - ref.logits[i, got[i]])
    if margin <= tolerance:
        return True, f"identical for {i} tokens, then parted at a near-tie (reference margin {margin:.4f} <= {tolerance})"
    return False, f"identical for {i} tokens, then token {got[i]} instead of {ref.reply[i]} where the reference was sure (margin {margin:.3f} > {tolerance})"


def _replies_check(name: str, refs: list[Reference], replies: list[list[int]], tolerance: float) -> Check:
    results = [compare_reply(r, g, tolerance) for r, g in zip(refs, replies)]
    ok = all(r[0] for r in results)
    return Check(name, ok, "; ".join(f"#{k + 1} {r[1]}" for k, r in enumerate(results)))


def _verify_merged(folder: Path, train_tok: Any, convs: list[list[dict[str, str]]], refs: list[Reference], stops: list[int], tolerance: float, log: Log,
                   *, replies: bool, device: Any, dtype: Any) -> list[Check]:
    import json as _json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .template import prompt_ids, render_text

    tok = AutoTokenizer.from_pretrained(str(folder))
    checks = []
    same = [prompt_ids(tok, c) == prompt_ids(train_tok, c) for c in convs]
    full = [render_text(tok, c + [{"role": "assistant", "content": "ok"}], False) == render_text(train_tok, c + [{"role": "assistant", "content": "ok"}], False) for c in convs]
    checks.append(Check("merged prompt tokens", all(same) and all(full), f"{sum(same)}/{len(convs)} conversations render to the training token ids ({sum(full)}/{len(convs)} with the reply)"))
    no_sys = [prompt_ids(tok, c[1:]) == prompt_ids(train_tok, c) for c in convs]
    checks.append(Check("merged default system prompt", all(no_sys), f"{sum(no_sys)}/{len(convs)} conversations without a system message get the persona's system prompt"))
    gen = _json.loads((folder / "generation_config.json").read_text())
    eos = gen.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    checks.append(Check("merged end tokens", set(stops) <= set(eos), f"generation_config eos_token_id {eos}, end-of-turn {stops[0]}"))
    if replies:
        log(f"round-trip: reloading the merged folder in transformers on {device}")
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map={"": str(device)}).eval()
        got = [_greedy_hf(model, r.prompt, stops) for r in refs]
        checks.append(_replies_check("merged greedy replies (transformers)", refs, got, tolerance))
    return checks


def _verify_gguf(files: tuple[Path, Path | None], train_tok: Any, convs: list[list[dict[str, str]]], refs: list[Reference], stops: list[int], quant: str, tolerance: float, log: Log) -> list[Check]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UserError(
            "the round-trip check runs the GGUF in llama.cpp, but llama-cpp-python is not installed; "
            "run `make setup-export` (or `pip install -r requirements-export.txt`), or pass --no-verify"
        ) from None
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from .template import prompt_ids

    model_path, lora_path = files
    log(f"round-trip: running {(lora_path or model_path).name} in llama.cpp (llama-cpp-python {llama_cpp_version()})")
    llm = Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=1024,
                logits_all=True, verbose=False, seed=0, n_threads=max(1, min(4, os.cpu_count() or 1)))
    meta = llm.metadata
    template = meta.get("tokenizer.chat_template")
    checks = []
    eot_ok = _gguf_end_tokens(meta, stops)
    checks.append(Check("gguf end tokens", eot_ok[0], eot_ok[1]))
    if template is None:
        checks.append(Check("gguf chat template", False, "the GGUF carries no tokenizer.chat_template"))
        return checks

    def gguf_ids(conv: list[dict[str, str]]) -> list[int]:
        text = Jinja2ChatFormatter(template, eos_token=train_tok.eos_token or "", bos_token=train_tok.bos_token or "")(messages=conv).prompt
        # add_bos=True adds a BOS only when the GGUF asks for one, as llama-server does.
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    ours = [prompt_ids(train_tok, c) for c in convs]
    same = [gguf_ids(c) == o for c, o in zip(convs, ours)]
    checks.append(Check("gguf prompt tokens", all(same), f"{sum(same)}/{len(convs)} conversations rendered with the GGUF's own chat template and tokenizer give the training token ids"))
    if lora_path is None:
        no_sys = [gguf_ids(c[1:]) == o for c, o in zip(convs, ours)]
        checks.append(Check("gguf default system prompt", all(no_sys), f"{sum(no_sys)}/{len(convs)} conversations without a system message get the persona's system prompt"))
    else:
        checks.append(Check("gguf default system prompt", True, "not in a LoRA GGUF: the base GGUF (and its template) is shared by every persona, "
                                                                "so send the persona's system prompt (the Modelfile's SYSTEM does)"))
    replies, diffs = [], []
    for ref in refs:
        llm.reset()
        llm.eval(ref.prompt)
        first = np.asarray(llm.scores[len(ref.prompt) - 1], dtype=np.float64)
        diffs.append(float(np.max(np.abs(first - ref.logits[0].numpy()))))
        reply: list[int] = []
        while len(reply) < REPLY_TOKENS:
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            reply.append(token)
            if token in stops:
                break
            llm.eval([token])
        replies.append(reply)
    check = _replies_check(f"gguf greedy replies (llama.cpp, {quant})", refs, replies, tolerance)
    check.detail += f"; max logit difference at the first reply token {max(diffs):.4f}"
    checks.append(check)
    llm.close()
    return checks


def _gguf_end_tokens(meta: dict[str, str], stops: list[int]) -> tuple[bool, str]:
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    ids = {int(x) for x in (eos, eot) if x is not None}
    ok = stops[0] in ids
    return ok, f"GGUF eos {eos}, eot {eot}; the template's end-of-turn token is {stops[0]}"
