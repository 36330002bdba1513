"""Speed and memory of training and comparison generation, against plain baselines measured in the same run.

    python -m bench.speed                                    # every section, on an idle machine
    python -m bench.speed --sections train,flops --steps 12
    python -m bench.speed --tiny --base /tmp/tiny-model --out /tmp/BENCHMARKS.md   # smoke run, no figures to keep

Prints the resolved config, one line per measurement and a summary table, then writes the
"## Speed" section of BENCHMARKS.md (between <!-- speed:start --> and <!-- speed:end -->) and
leaves every other section of that file as it was. Timings are wall time: run it on an idle machine.
"""
from __future__ import annotations

import argparse
import shlex
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from personakit.errors import UserError, run_cli
from personakit.flags import check_args, print_config
from personakit.options import TrainConfig
from personakit.report import command_line

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "en"
SECTIONS = ("train", "flops", "compare", "growth", "processes", "gpu")
PERSONAS = ("girl", "jiangjian", "peixuan")
VAL_FRACTION = 0.1
VAL_LOSS_SLACK = 0.01  # "equal" val loss: within this many nats per token
GROWTH_LINEAR = 1.25  # seconds per 100 pairs may differ by this factor and still count as linear
GPU_REPLY_SHARE = 0.25  # supervised share of each random GPU row (English persona rows: 20-40%)
VRAM_TARGET = 5e9
# The real Qwen1.5-1.8B-Chat shape (bench/standins.py) and a tiny one for smoke runs; both keep Qwen's
# 151,936-token vocabulary and real tokenizer, so the memory figure includes the real embedding and head.
QWEN15_18B: dict = {}
TINY_QWEN = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=128, max_position_embeddings=1024)


@dataclass(frozen=True)
class Plan:
    """What every measurement runs, resolved from the flags (full run or --tiny smoke run)."""

    base: str | None
    steps: int
    batch_size: int
    seed: int
    matmul_sizes: tuple[int, ...]
    matmul_seconds: float
    prompt_limit: int | None
    max_new_tokens: int | None  # None: the generating scripts' default
    adapter_steps: int
    growth_pairs: tuple[int, ...]
    process_pairs: int  # rows of the one epoch trained by 1 and by 2 processes
    gpu_shape: dict
    gpu_steps: int
    gpu_length: int
    gpu_sizes: tuple[int, ...]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to run
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of each training arm (default 12; 2 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="smoke run: 2 steps, small matmuls, 2 prompts, tiny GPU stand-in (tests; figures mean nothing)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file whose Speed section is written (other sections are kept)")
    # models and data
    p.add_argument("--base", default=None, help="base model folder or Hugging Face id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapters-root", default=None, help="folder with three adapters of this base for the comparison (default: adapters/ if it holds three, else train them here)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per training batch (the comparison uses multi_compare.py's own default)")
    p.add_argument("--seed", type=int, default=42, help="seed of the split, LoRA init, data order and random GPU data")
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "-m", "bench.speed", *(sys.argv[1:] if argv is None else argv)])
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    common = dict(base=args.base, batch_size=args.batch_size, seed=args.seed)
    if args.tiny:
        return Plan(**common, steps=args.steps or 2, matmul_sizes=(128,), matmul_seconds=0.05, prompt_limit=2, max_new_tokens=8,
                    adapter_steps=2, growth_pairs=(8, 16, 32), process_pairs=32, gpu_shape=TINY_QWEN, gpu_steps=2, gpu_length=64, gpu_sizes=(512,))
    return Plan(**common, steps=args.steps or 12, matmul_sizes=(1024, 2048), matmul_seconds=2.0, prompt_limit=None, max_new_tokens=None,
                adapter_steps=4, growth_pairs=(100, 200, 400), process_pairs=100, gpu_shape=QWEN15_18B, gpu_steps=6, gpu_length=512, gpu_sizes=(4096, 8192))


def main(args: argparse.Namespace) -> int:
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        raise UserError(f"--sections takes a comma-separated subset of {','.join(SECTIONS)}, not {args.sections!r}")
    check_args(args)
    plan = make_plan(args)
    print_config({**asdict(plan), "sections": ",".join(sections), "out": args.out})

    from bench.benchmarking import machine_info, md_table, write_section

    started = time.time()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        if "train" in sections:
            results["train"] = bench_train(plan)
        if "flops" in sections:
            results["flops"] = bench_flops(plan, results.get("train"))
        if "compare" in sections:
            results["compare"] = bench_compare(plan, args.adapters_root, Path(tmp))
        if "growth" in sections:
            results["growth"] = bench_growth(plan)
        if "processes" in sections:
            results["processes"] = bench_processes(plan, Path(tmp))
        if "gpu" in sections:
            results["gpu"] = bench_gpu(plan)
    summary = summary_rows(results)
    print("\n" + md_table(["measurement", "value", "target", "met"], summary), flush=True)
    body = render(args, plan, results, summary, machine_info(), time.time() - started)
    write_section(args.out, "speed", body)
    print(f"wrote the Speed section of {args.out}", flush=True)
    return 0


# ---- helpers shared by the measured arms (each arm runs in its own process) --------------------

def persona_system(persona: str) -> str:
    return json.loads((ROOT / "data" / "personas.json").read_text(encoding="utf-8"))[persona]["system"]["en"]


def train_config(plan: Plan, **changes) -> TrainConfig:
    """llm.py's defaults (LoRA r/alpha/dropout, learning rate, max length) with the benchmark's batch and seed, nothing held out."""
    return TrainConfig(batch_size=plan.batch_size, seed=plan.seed, val_fraction=0.0, **changes)


# ---- 1. training throughput -------------------------------------------------------------------

def train_arm(arm: str, plan: Plan) -> dict:
    """Train `plan.steps` steps with our path (precision `auto` as llm.py resolves it, or `fp32`) or the
    TRL baseline, then the val loss on the same held-out rows."""
    from bench.benchmarking import TrainMeter, linear_weights, supervised_table
    from personakit.data import read_jsonl
    from personakit.loading import load_base, resolve_target_modules
    from personakit.perplexity import perplexity
    from personakit.template import end_of_turn_id
    from personakit.train import run_training
    from personakit.training import EncodedSplit, encode_split, split_rows

    config = train_config(plan, max_steps=plan.steps)
    loaded = load_base(plan.base, cpu_dtype="fp32" if arm == "ours-fp32" else "auto", training=True)
    system = persona_system("girl")
    train_rows, val_rows = split_rows(read_jsonl(DATA / "girl.jsonl"), VAL_FRACTION, plan.seed)
    split = encode_split(loaded.tokenizer, train_rows, val_rows, system, config.max_length)
    targets = resolve_target_modules(loaded.model, None)
    body, head = linear_weights(loaded.model)
    meter = TrainMeter(supervised_table(split.train), end_of_turn_id(loaded.tokenizer))
    with tempfile.TemporaryDirectory() as work:
        if arm.startswith("ours"):
            model = run_training(config, loaded, EncodedSplit(split.train, [], 0), targets, Path(work),
                                 callbacks=[meter]).model
            loss_mode = "reply + end-of-turn tokens (llm.py)"
            dtype = loaded.cpu_precision.dtype if loaded.cpu_precision else "CUDA"
        else:
            model, loss_mode, bf16 = train_baseline(config, loaded, train_rows, system, targets, meter, Path(work))
            dtype = ("bf16" if bf16 else "fp32") if loaded.device == "cpu" else "CUDA"
    val_loss = math.log(perplexity(model, split.val, loaded.tokenizer.pad_token_id))
    return {**meter.as_dict(), "loss_mode": loss_mode, "val_loss": val_loss, "train_rows": len(split.train),
            "val_rows": len(split.val), "targets": targets, "body": body, "head": head, "base": loaded.ref.base_id,
            "lora": f"r={config.lora_r} alpha={config.lora_alpha} dropout={config.lora_dropout}", "lr": config.learning_rate,
            "precision": loaded.cpu_precision.as_dict() if loaded.cpu_precision else None, "dtype": dtype}


def training_arms(precision) -> tuple[str, ...]:
    """Ours in llm.py's `--cpu-dtype auto` choice, ours in fp32 beside it where that choice is bf16 (so the
    gain shows), and TRL's baseline."""
    return ("ours", "ours-fp32", "baseline") if precision.dtype == "bf16" else ("ours", "baseline")


def baseline_bf16(device: str, precision) -> bool | None:
    """The baseline's `SFTConfig(bf16=...)`: None keeps TRL's default (bf16 on) on CUDA and on a CPU where the
    probe finds bf16 fast; False on a CPU where it is slow, since bf16 autocast there is far slower than fp32."""
    return False if device == "cpu" and precision.dtype != "bf16" else None


def train_baseline(config: TrainConfig, loaded, rows, system, targets, meter, work: Path):
    """What a user would otherwise write: TRL's SFTTrainer on the conversations, its defaults but the settings that must match."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import get_training_chat_template

    from personakit.template import build_messages

    conversations = [build_messages(row, system, with_reply=True) for row in rows]
    try:
        get_training_chat_template(loaded.tokenizer)
        assistant_only = True
        dataset = Dataset.from_list([{"messages": c} for c in conversations])
        loss_mode = "assistant-only loss on a messages dataset (history replies supervised too)"
    except ValueError:
        # TRL has no {% generation %} version of this template, so it cannot mask assistant turns;
        # the same conversations split into prompt/completion get its completion-only loss instead.
        assistant_only = False
        dataset = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in conversations])
        loss_mode = "completion-only loss on a conversational prompt/completion dataset (TRL cannot mask assistant turns of this template)"
    sft_config = SFTConfig(
        output_dir=str(work), per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate,
        max_steps=config.max_steps, seed=config.seed, report_to="none", assistant_only_loss=assistant_only,
        bf16=baseline_bf16(loaded.device, loaded.cpu_precision),
        use_cpu=loaded.device == "cpu",
    )
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=loaded.model, args=sft_config, train_dataset=dataset, processing_class=loaded.tokenizer, peft_config=lora,
                         callbacks=[meter])
    trainer.train()
    return trainer.model, loss_mode, trainer.args.bf16


def bench_train(plan: Plan) -> dict:
    from bench.benchmarking import gib, run_isolated

    from personakit.base_model import default_cache_dir
    from personakit.precision import cpu_precision

    arms = {}
    for arm in training_arms(cpu_precision("auto", default_cache_dir())):
        r, rss = run_isolated(train_arm, arm, plan)
        r = arms[arm] = {**r, "rss": rss}
        unmatched = f" ({r['unmatched']} rows not matched to a reply)" if r["unmatched"] else ""
        print(f"train {arm} ({r['dtype']}): {plan.steps} steps, {r['rows']} rows, {r['tokens']} tokens ({r['supervised']} supervised{unmatched}) "
              f"in {r['seconds']:.1f}s: {r['tokens_s']:.1f} tokens/s, {r['supervised_s']:.1f} supervised tokens/s, "
              f"peak RSS {gib(rss)}, val loss {r['val_loss']:.4f}", flush=True)
    return arms


# ---- 2. the machine's limit -------------------------------------------------------------------

def bench_flops(plan: Plan, train: dict | None) -> dict:
    import torch

    from bench.benchmarking import FLOPS_FORMULA, matmul_rates

    out: dict = {"threads": torch.get_num_threads(), "rates": {}}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out["rates"][label] = matmul_rates(dtype, plan.matmul_sizes, "cpu", plan.matmul_seconds)
        for n, rate in out["rates"][label]:
            print(f"flops {label} {n}x{n} matmul, {out['threads']} threads: {rate / 1e9:.1f} GFLOP/s", flush=True)
    out["peaks"] = {label: max((rate for _, rate in rates), default=None) for label, rates in out["rates"].items()}
    if train:
        out["achieved"] = achieved_flops(train, out["peaks"])
        for arm, a in out["achieved"].items():
            print(f"flops achieved: {arm} ({a['dtype']}) {a['rate'] / 1e9:.1f} GFLOP/s = {a['share']:.1%} of the {a['dtype']} "
                  f"matmul peak ({FLOPS_FORMULA})", flush=True)
    return out


def achieved_flops(train: dict, peaks: dict[str, float | None]) -> dict[str, dict]:
    """Model FLOP/s of our CPU training arms, each as a share of the matmul peak in the precision it trained in
    (a bf16 arm measured against the fp32 peak would read as over 100% on an AMX CPU)."""
    from bench.benchmarking import lora_train_flops

    out = {}
    for arm in ("ours", "ours-fp32"):
        r = train.get(arm)
        if r and peaks.get(r["dtype"]):
            rate = lora_train_flops(r["body"], r["head"], r["tokens"], r["supervised"]) / r["seconds"]
            out[arm] = {"dtype": r["dtype"], "rate": rate, "share": rate / peaks[r["dtype"]]}
    return out


# ---- 3. comparison generation -----------------------------------------------------------------

def model_conversations(plan: Plan, infos: list) -> list[tuple[str | None, list]]:
    """(adapter name or None for the base, one conversation per prompt), as multi_compare.py builds them:
    each persona with its own system prompt, the base with none."""
    from personakit.prompts import load_prompts
    from personakit.template import build_messages

    prompts = load_prompts(DATA / "prompts.jsonl", plan.prompt_limit).prompts
    models = [(None, None)] + [(info.name, info.system) for info in infos]
    return [(name, [build_messages(p.as_row(), system) for p in prompts]) for name, system in models]


def compare_ours(plan: Plan, adapters: list[str], out: Path) -> dict:
    """multi_compare.py's run with its own flags and defaults (the package call the script makes); its
    evaluation gives the replies and the load + generation seconds."""
    from personakit.comparison import CompareOptions, MultiCompareReport, compare_many
    from personakit.flags import as_flags
    from personakit.options import Decoding, ModelOptions, PersonasChoice, RunOptions

    # what differs from multi_compare.py's defaults, group by group, in CompareOptions' order
    groups = {
        PersonasChoice: {"adapters": adapters},
        MultiCompareReport: {"out": str(out)},
        RunOptions: {"prompts": str(DATA / "prompts.jsonl"), **({"limit": plan.prompt_limit} if plan.prompt_limit else {})},
        ModelOptions: {"load_in_4bit": "no", **({"base": plan.base} if plan.base else {})},
        Decoding: {"max_new_tokens": plan.max_new_tokens} if plan.max_new_tokens else {},
    }
    command = command_line("multi_compare.py", [word for cls, values in groups.items() for word in as_flags(cls, values)])
    options = CompareOptions(*(cls(**values) for cls, values in groups.items()), command=command)
    start = time.perf_counter()
    ev = compare_many(options, ROOT, log=lambda line: print(line, flush=True)).evaluation
    return {"seconds": ev.seconds["load"] + ev.seconds["generation"], "cli_seconds": time.perf_counter() - start,
            "replies": {name: [r.text for r in rs] for name, rs in ev.replies.items()}, "decoding": ev.decoding.as_dict(),
            "batch_size": ev.batch_size}


def compare_naive(plan: Plan, adapters: list[str], decoding: dict) -> dict:
    """Without the shared loader: a fresh base per model, then one prompt at a time with the same decoding."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personakit.base_model import resolve_base
    from personakit.generation import Decoding, generate_kwargs
    from personakit.loading import compute_dtype, pick_device, quiet_libraries
    from personakit.persona import read_adapter
    from personakit.template import prompt_ids, stop_token_ids

    quiet_libraries()
    start = time.perf_counter()
    folder, device, dec = resolve_base(plan.base).folder, pick_device(), Decoding(**decoding)
    infos = [read_adapter(a) for a in adapters]
    paths = {info.name: str(info.path) for info in infos}
    replies = {}
    for name, conversations in model_conversations(plan, infos):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=compute_dtype(device)).to(device)
        if name:
            model = PeftModel.from_pretrained(model, paths[name])
        model.eval()
        stops, texts = set(stop_token_ids(tokenizer)), []
        for conversation in conversations:
            ids = torch.tensor([prompt_ids(tokenizer, conversation)], device=device)
            kwargs = generate_kwargs(tokenizer, dec, ids.shape[1])
            torch.manual_seed(dec.seed)
            with torch.no_grad():
                row = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1]:].tolist()
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
        replies[name or "base"] = texts
    return {"seconds": time.perf_counter() - start, "replies": replies}


def comparison_adapters(plan: Plan, root: str | None, tmp: Path) -> tuple[list[str], str]:
    """Three adapters of this base: from --adapters-root (or adapters/ when it holds three), else trained here briefly."""
    from personakit.base_model import fingerprint, resolve_base
    from personakit.persona import list_adapters, read_adapter

    base_fingerprint = fingerprint(Path(resolve_base(plan.base).folder))
    folder = Path(root) if root else ROOT / "adapters"
    found = [str(p) for p in list_adapters(folder).values() if read_adapter(p).base_fingerprint == base_fingerprint]
    if len(found) >= 3:
        return found[:3], f"existing adapters in {folder}"
    if root:
        raise UserError(f"{folder} holds {len(found)} adapter(s) of this base and the comparison needs three; "
                        f"train them with llm.py or leave out --adapters-root to train them here")
    from personakit.options import ModelOptions, TrainJob
    from personakit.train import train_persona

    for persona in PERSONAS:
        job = TrainJob(persona=persona, data=str(DATA / f"{persona}.jsonl"), system=persona_system(persona), output_root=str(tmp / "adapters"))
        train_persona(job, ModelOptions(base=plan.base), train_config(plan, max_steps=plan.adapter_steps))
    return [str(tmp / "adapters" / p) for p in PERSONAS], f"trained here for {plan.adapter_steps} steps each"


def bench_compare(plan: Plan, root: str | None, tmp: Path) -> dict:
    from bench.benchmarking import gib, run_isolated

    adapters, source = comparison_adapters(plan, root, tmp)
    ours, ours_rss = run_isolated(compare_ours, plan, adapters, tmp / "multi_compare_results.md")
    naive, naive_rss = run_isolated(compare_naive, plan, adapters, ours["decoding"])
    out = {"source": source, "decoding": ours["decoding"], "ours": {**ours, "rss": ours_rss}, "naive": {**naive, "rss": naive_rss}}
    shape = f"{len(ours['replies'])} models x {len(ours['replies']['base'])} prompts"
    print(f"compare ours (multi_compare.py): {shape}, load + generation {ours['seconds']:.1f}s (whole CLI {ours['cli_seconds']:.1f}s), "
          f"peak RSS {gib(ours_rss)}", flush=True)
    print(f"compare naive: {shape}, load + generation {naive['seconds']:.1f}s, peak RSS {gib(naive_rss)}", flush=True)
    pairs = [(a, b) for m, texts in ours["replies"].items() for a, b in zip(texts, naive["replies"][m])]
    out.update(replies=len(pairs), mismatches=sum(a != b for a, b in pairs), speedup=naive["seconds"] / ours["seconds"])
    print(f"compare: ours {out['speedup']:.2f}x faster than naive, {out['mismatches']}/{out['replies']} replies differ", flush=True)
    return out


# ---- 4. growth --------------------------------------------------------------------------------

def growth_rows(plan: Plan) -> list:
    from personakit.data import read_jsonl

    rows = read_jsonl(DATA / "girl.jsonl") + read_jsonl(DATA / "jiangjian.jsonl")
    random.Random(plan.seed).shuffle(rows)
    return rows


def growth_arm(plan: Plan, pairs: int) -> dict:
    """One epoch of our path over `pairs` rows of girl + jiangjian, shuffled so every size has the same mix."""
    from bench.benchmarking import TrainMeter, supervised_table
    from personakit.loading import load_base, resolve_target_modules
    from personakit.template import end_of_turn_id
    from personakit.train import run_training
    from personakit.training import encode_split

    rows = growth_rows(plan)
    config = train_config(plan, epochs=1.0)
    loaded = load_base(plan.base)
    split = encode_split(loaded.tokenizer, rows[:pairs], [], persona_system("girl"), config.max_length)
    meter = TrainMeter(supervised_table(split.train), end_of_turn_id(loaded.tokenizer))
    with tempfile.TemporaryDirectory() as work:
        run_training(config, loaded, split, resolve_target_modules(loaded.model, None), Path(work), callbacks=[meter])
    return {**meter.as_dict(), "pairs": pairs, "steps": math.ceil(len(split.train) / plan.batch_size)}


def bench_growth(plan: Plan) -> dict:
    from bench.benchmarking import run_isolated

    runs = []
    for pairs in plan.growth_pairs:
        r, _ = run_isolated(growth_arm, plan, pairs)
        r["per100"] = r["seconds"] / pairs * 100
        runs.append(r)
        print(f"growth {pairs} pairs: {r['steps']} steps in {r['seconds']:.1f}s ({r['per100']:.1f} s per 100 pairs)", flush=True)
    per100 = [r["per100"] for r in runs]
    spread = max(per100) / min(per100)
    print(f"growth: seconds per 100 pairs vary {spread:.2f}x ({'linear' if spread <= GROWTH_LINEAR else 'not linear'})", flush=True)
    return {"runs": runs, "spread": spread}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_arm(plan: Plan, data: Path, processes: int, out: Path) -> dict:
    """llm.py for one epoch of `data` as a user runs it: plain python for 1 process, `accelerate launch` for more.

    The CPU's cores are split between the processes and the effective batch is the same, so both do the same work.
    """
    import os
    import subprocess

    llm = [str(ROOT / "llm.py"), "--persona", "bench", "--data", str(data), "--output-root", str(out), "--epochs", "1",
           "--batch-size", str(plan.batch_size // processes), "--seed", str(plan.seed), "--val-fraction", "0",
           *(["--base", plan.base] if plan.base else [])]
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())] if processes > 1 else []
    threads = max(1, (os.cpu_count() or 1) // processes)
    started = time.time()
    proc = subprocess.run([sys.executable, *launcher, *llm], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode:
        raise RuntimeError(f"llm.py on {processes} process(es) failed:\n{proc.stderr[-3000:]}")
    meta = json.loads((out / "bench" / "persona.json").read_text(encoding="utf-8"))
    return {"processes": processes, "threads": threads, "batch": plan.batch_size // processes, "steps": meta["results"]["steps"],
            "train_seconds": meta["results"]["train_seconds"], "wall": time.time() - started}


def bench_processes(plan: Plan, tmp: Path) -> dict:
    """The same epoch (rows, effective batch, steps) on 1 process and on 2 data-parallel processes."""
    from personakit.data import write_jsonl

    data = tmp / "processes.jsonl"
    write_jsonl(data, growth_rows(plan)[:plan.process_pairs])
    runs = []
    for processes in (1, 2):
        r = process_arm(plan, data, processes, tmp / f"processes-{processes}")
        runs.append(r)
        print(f"growth {plan.process_pairs} pairs on {processes} process(es) x {r['threads']} thread(s): {r['steps']} steps, "
              f"training {r['train_seconds']:.1f}s, whole run {r['wall']:.1f}s", flush=True)
    return {"pairs": plan.process_pairs, "runs": runs, "ratio": runs[1]["train_seconds"] / runs[0]["train_seconds"]}


# ---- 5. GPU -----------------------------------------------------------------------------------

def gpu_arm(plan: Plan) -> dict:
    """QLoRA on a random-weight stand-in, loaded through load_base(load_in_4bit="yes") and trained by run_training."""
    import torch

    from bench.benchmarking import TrainMeter, linear_weights, lora_train_flops, matmul_rates, supervised_table
    from bench.standins import QWEN_VOCAB_SIZE, qwen2_config, save_random_model
    from personakit.loading import load_base, resolve_target_modules
    from personakit.template import IGNORE_INDEX, Encoded
    from personakit.train import run_training
    from personakit.training import EncodedSplit

    peak = max(rate for _, rate in matmul_rates(torch.bfloat16, plan.gpu_sizes, "cuda", 1.0))
    generator = torch.Generator().manual_seed(plan.seed)
    prompt_len = round(plan.gpu_length * (1 - GPU_REPLY_SHARE))
    examples = []
    for _ in range(plan.gpu_steps * plan.batch_size):
        ids = torch.randint(3, QWEN_VOCAB_SIZE, (plan.gpu_length,), generator=generator).tolist()
        examples.append(Encoded(ids, [IGNORE_INDEX] * prompt_len + ids[prompt_len:], prompt_len))
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_model(Path(tmp) / "standin", qwen2_config(**plan.gpu_shape), "qwen1.5", torch.bfloat16, "cuda")
        torch.cuda.empty_cache()
        loaded = load_base(str(folder), load_in_4bit="yes")
        body, head = linear_weights(loaded.model)
        config = train_config(plan, max_steps=plan.gpu_steps, max_length=plan.gpu_length)
        meter = TrainMeter(supervised_table(examples), None)
        torch.cuda.reset_peak_memory_stats()
        run_training(config, loaded, EncodedSplit(examples, [], 0), resolve_target_modules(loaded.model, None),
                     Path(tmp) / "work", callbacks=[meter])
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    r = meter.as_dict()
    flops = lora_train_flops(body, head, r["tokens"], r["supervised"]) / r["seconds"]
    config = qwen2_config(**plan.gpu_shape)
    shape = ", ".join(f"{k} {getattr(config, k)}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"))
    return {**r, "device": torch.cuda.get_device_name(0), "shape": shape, "peak": peak, "achieved": flops, "mfu": flops / peak,
            "allocated": allocated, "reserved": reserved, "quantized": loaded.quantized}


def bench_gpu(plan: Plan) -> dict | None:
    import torch

    from bench.benchmarking import gib, run_isolated

    if not torch.cuda.is_available():
        print("gpu: skipped (no CUDA device on this machine)", flush=True)
        return None
    r, _ = run_isolated(gpu_arm, plan)
    print(f"gpu bf16 matmul peak: {r['peak'] / 1e12:.1f} TFLOP/s", flush=True)
    print(f"gpu qlora: {plan.gpu_steps} steps x {plan.batch_size} rows x {plan.gpu_length} tokens in {r['seconds']:.1f}s: "
          f"{r['tokens_s']:.0f} tokens/s, peak VRAM {gib(r['allocated'])} allocated / {gib(r['reserved'])} reserved, "
          f"MFU {r['mfu']:.1%}", flush=True)
    return r


# ---- report -----------------------------------------------------------------------------------

def summary_rows(results: dict) -> list[list[str]]:
    """measurement | value | target | met, for every section that ran."""
    from bench.benchmarking import gib

    rows = []
    if train := results.get("train"):
        ours, base = train["ours"], train["baseline"]
        ratio = ours["supervised_s"] / base["supervised_s"]
        rows.append(["training supervised tokens/s, ours / baseline", f"{ratio:.2f}x ({ours['supervised_s']:.1f} vs {base['supervised_s']:.1f})",
                     "≥ 1.5x", _yes(ratio >= 1.5)])
        if fp32 := train.get("ours-fp32"):
            gain = ours["tokens_s"] / fp32["tokens_s"]
            rows.append([f"training tokens/s, ours {ours['dtype']} (auto) / ours fp32", f"{gain:.2f}x ({ours['tokens_s']:.1f} vs {fp32['tokens_s']:.1f})",
                         "-", "-"])
        rows.append(["val loss, ours vs baseline", f"{ours['val_loss']:.4f} vs {base['val_loss']:.4f}",
                     f"ours ≤ baseline + {VAL_LOSS_SLACK}", _yes(ours["val_loss"] <= base["val_loss"] + VAL_LOSS_SLACK)])
    if (flops := results.get("flops")) and flops.get("achieved"):
        rows.append(["CPU training FLOP/s, share of the matmul peak in the precision trained",
                     "; ".join(f"{arm} {a['rate'] / 1e9:.1f} GFLOP/s = {a['share']:.1%} of {a['dtype']}" for arm, a in flops["achieved"].items()),
                     "-", "-"])
    if compare := results.get("compare"):
        rows.append(["comparison time, naive / ours", f"{compare['speedup']:.2f}x ({compare['naive']['seconds']:.1f}s vs {compare['ours']['seconds']:.1f}s)",
                     "≥ 3x", _yes(compare["speedup"] >= 3)])
        rows.append(["comparison replies that differ", f"{compare['mismatches']}/{compare['replies']}", "0", _yes(compare["mismatches"] == 0)])
    if growth := results.get("growth"):
        per100 = " / ".join(f"{r['per100']:.1f}" for r in growth["runs"])
        rows.append(["training seconds per 100 pairs (growth)", f"{per100} ({growth['spread']:.2f}x spread)",
                     f"linear (spread ≤ {GROWTH_LINEAR}x)", _yes(growth["spread"] <= GROWTH_LINEAR)])
    if procs := results.get("processes"):
        one, two = procs["runs"]
        rows.append(["training time, 2 processes / 1 (same epoch and effective batch)", f"{procs['ratio']:.2f}x ({two['train_seconds']:.1f}s vs {one['train_seconds']:.1f}s)", "-", "-"])
    if "gpu" in results:
        gpu = results["gpu"]
        if gpu is None:
            rows.append(["GPU peak VRAM at length 512", "skipped: no CUDA device", "< 5 GB", "-"])
        else:
            rows.append(["GPU peak VRAM (reserved)", f"{gib(gpu['reserved'])} ({gib(gpu['allocated'])} allocated)", "< 5 GB (4.66 GiB)",
                         _yes(gpu["reserved"] < VRAM_TARGET)])
            rows.append(["GPU QLoRA MFU", f"{gpu['mfu']:.1%} ({gpu['tokens_s']:.0f} tokens/s)", "-", "-"])
    return rows


def bf16_note(flops: dict | None) -> str:
    """How fast bf16 matmuls ran against fp32 on this CPU, from the flops section when it ran."""
    if flops:
        fp32, bf16 = dict(flops["rates"]["fp32"]), dict(flops["rates"]["bf16"])
        common = sorted(set(fp32) & set(bf16))
        if common:
            n = common[0]
            return f"on this CPU a {n}x{n} bf16 matmul ran at {bf16[n] / fp32[n]:.3g}x the fp32 rate (the machine's limit, below)"
    return "run the flops section to measure bf16 against fp32 on this CPU"


def precision_note(ours: dict) -> str:
    """What llm.py's --cpu-dtype auto chose on this machine and from which probe figures."""
    p = ours["precision"]
    if not p:
        return "CUDA: the base's own dtype."
    side = ("the fp32 arm beside it is the same path with `--cpu-dtype fp32`" if p["dtype"] == "bf16"
            else "so ours is also what `--cpu-dtype fp32` runs, and no second arm is needed")
    return (f"llm.py's `--cpu-dtype auto` chose {p['dtype']} here ({p['reason']}; matmul probe on {p['probe']['threads']} threads, "
            f"{p['probe']['cpu']}); {side}. bf16 means autocast with the frozen base's linear weights stored in bf16 for the run and attention in fp32 "
            f"(personakit.training.cpu_bf16_training); LoRA weights, gradients and AdamW state in fp32.")


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def render(args, plan: Plan, results: dict, summary: list, info: dict, seconds: float) -> str:
    from bench.benchmarking import FLOPS_FORMULA, gib, md_table

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = [
        "## Speed", "",
        f"Measured {now} with `{args.command}` in {seconds / 60:.1f} min. Figures are wall time of one run; rerun the command on an idle machine to reproduce.",
        "",
        f"Machine: {info['cpu']}; {info['cores']}; {info['ram']} RAM; GPU: {info['gpu']}. "
        f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}, "
        f"trl {info['trl']}, accelerate {info['accelerate']}, bitsandbytes {info['bitsandbytes']}.",
        "", md_table(["measurement", "value", "target", "met"], summary),
    ]
    if train := results.get("train"):
        ours, base = train["ours"], train["baseline"]

        def row(label: str, r: dict) -> list:
            return [label, f"{r['seconds']:.1f}", r["rows"], f"{r['tokens_s']:.1f}", f"{r['supervised_s']:.1f}", gib(r["rss"]), f"{r['val_loss']:.4f}"]

        out += ["", "### Training throughput (CPU)", "",
                f"{plan.steps} optimizer steps of {plan.batch_size} rows of data/en/girl.jsonl on {ours['base']} ({ours['train_rows']} train rows, "
                f"{ours['val_rows']} held out), each arm in its own process; seconds = wall time of the training loop (a `TrainerCallback` from train begin to train end), warm-up included.", "",
                md_table(["arm", "seconds", "rows", "tokens/s", "supervised tokens/s", "peak RSS", "val loss"],
                         [row(f"ours (`personakit.train.run_training`, {ours['dtype']}, llm.py's auto choice)", ours),
                          *([row("ours in fp32 (`--cpu-dtype fp32`)", train["ours-fp32"])] if "ours-fp32" in train else []),
                          row(f"baseline (TRL `SFTTrainer`, {base['dtype']})", base),
                          ["ours / baseline", "", "", f"{ours['tokens_s'] / base['tokens_s']:.2f}x", f"{ours['supervised_s'] / base['supervised_s']:.2f}x",
                           f"{ours['rss'] / base['rss']:.2f}x", ""]]), "",
                f"- Precision: {precision_note(ours)}",
                f"- Both: LoRA {ours['lora']} on {', '.join(ours['targets'])}, learning rate {ours['lr']}, batch {plan.batch_size}, seed {plan.seed}. "
                "LoRA dropout is llm.py's default, kept equal in the baseline for fairness.",
                f"- Baseline: `SFTConfig` defaults except learning rate, batch size, max_steps, seed, `report_to=none`, no eval, `use_cpu` on CPU, "
                f"and its precision: TRL turns bf16 on by default, kept where the probe finds bf16 fast; elsewhere `bf16=False`, since "
                f"bf16 autocast on a CPU without AMX is far slower than fp32; {bf16_note(results.get('flops'))}; here it trained in {base['dtype']}. "
                f"Its loss: {base['loss_mode']}. Defaults it keeps: gradient checkpointing, linear schedule, fused AdamW, one checkpoint at the end.",
                f"- Ours: llm.py's path: length-grouped batches, LM head on supervised positions only, no activation checkpointing on CPU, "
                f"cosine schedule with warm-up, and its checkpoints (one every {math.ceil(plan.steps / 6)} step(s)) inside the timed loop.",
                "- Supervised tokens = reply + end-of-turn tokens of the rows trained; tokens = non-pad tokens. Val loss = mean NLL per supervised "
                "token of the held-out rows, measured after training by personakit.perplexity for both arms."]
    if flops := results.get("flops"):
        out += ["", "### The machine's limit", "",
                md_table(["dtype", "matmul", "GFLOP/s"], [[label, f"{n}x{n}", f"{rate / 1e9:.1f}"] for label, rs in flops["rates"].items() for n, rate in rs]),
                "", f"Square matmuls with torch on {flops['threads']} threads, the count training uses; a size whose single matmul "
                "would take over 5 s is skipped (bf16 on CPUs without AMX)."]
        if flops.get("achieved"):
            ours = results["train"]["ours"]
            reached = "; ".join(f"{a['rate'] / 1e9:.1f} GFLOP/s in {a['dtype']}, {a['share']:.1%} of the {a['dtype']} peak"
                                for a in flops["achieved"].values())
            out += ["", f"Our training reached {reached}. "
                    f"Model FLOPs = {FLOPS_FORMULA}: forward 2·N·T plus backward through activations 2·N·T (frozen weights get no weight "
                    "gradients; LoRA's own matmuls and attention scores left out; the head counted at supervised positions only). "
                    f"N_linear = {ours['body']:,}, N_head = {ours['head']:,}, T = {ours['tokens']:,}, T_sup = {ours['supervised']:,}."]
    if compare := results.get("compare"):
        dec, ours, naive = compare["decoding"], compare["ours"], compare["naive"]
        models = len(ours["replies"])
        out += ["", "### Comparison generation", "",
                f"{models} models (the base and {models - 1} adapters, {compare['source']}) x {compare['replies'] // models} prompts of "
                f"data/en/prompts.jsonl, greedy, max_new_tokens {dec['max_new_tokens']}, repetition penalty {dec['repetition_penalty']}, "
                "each persona with its own system prompt and the base with none; each arm in its own process. "
                "Seconds = loading the model(s) to the last reply, the part both arms do.", "",
                md_table(["arm", "seconds", "peak RSS"], [
                    [f"ours: `multi_compare.py` defaults (base loaded once, each adapter merged in turn, batches of similar prompt length with finished rows dropped, {ours['batch_size']} per batch)", f"{ours['seconds']:.1f}", gib(ours["rss"])],
                    ["naive: base loaded afresh per model, `model.generate` one prompt at a time", f"{naive['seconds']:.1f}", gib(naive["rss"])]]),
                "", f"Ours is {compare['speedup']:.2f}x faster; {compare['mismatches']} of {compare['replies']} replies differ between the arms. "
                f"The whole multi_compare.py run, with held-out perplexity, metrics, attribution, report and chart, took {ours['cli_seconds']:.1f}s."]
    if growth := results.get("growth"):
        out += ["", "### Growth", "", "One epoch of our path per size over shuffled girl + jiangjian rows, each in its own process.", "",
                md_table(["pairs", "steps", "seconds", "s per 100 pairs"],
                         [[r["pairs"], r["steps"], f"{r['seconds']:.1f}", f"{r['per100']:.1f}"] for r in growth["runs"]])]
    if procs := results.get("processes"):
        out += ["", "### Several processes", "",
                f"One epoch of {procs['pairs']} of the same rows, run by `llm.py` on 1 process (`python llm.py`) and on 2 data-parallel processes "
                "(`accelerate launch --multi_gpu --num_processes 2`, gloo on CPU), the CPU's cores split between them and the effective batch "
                "the same; the processes differ in one way: under DDP the loss is the library's, whose LM head runs on every position, not only on "
                "the supervised ones. Training = `train_seconds` of persona.json (base loading and imports left out); whole run = the command's wall time.", "",
                md_table(["processes", "threads each", "batch each", "steps", "training s", "whole run s"],
                         [[r["processes"], r["threads"], r["batch"], r["steps"], f"{r['train_seconds']:.1f}", f"{r['wall']:.1f}"] for r in procs["runs"]])]
    if "gpu" in results:
        gpu = results["gpu"]
        out += ["", "### GPU (QLoRA)", ""]
        if gpu is None:
            out.append("Skipped: no CUDA device on this machine.")
        else:
            out += [f"{gpu['device']}: random-weight stand-in of Qwen1.5-1.8B-Chat ({gpu['shape']}) with Qwen's real tokenizer "
                    f"saved and loaded through `load_base(..., load_in_4bit=\"yes\")` (nf4, double quant, bf16 compute), trained by `personakit.train.run_training` "
                    f"(paged_adamw_8bit, gradient checkpointing) for {plan.gpu_steps} steps of {plan.batch_size} random rows of {plan.gpu_length} tokens, "
                    f"the last {GPU_REPLY_SHARE:.0%} of each supervised.", "",
                    md_table(["peak VRAM allocated", "peak VRAM reserved", "tokens/s", "bf16 matmul peak", "achieved", "MFU"],
                             [[gib(gpu["allocated"]), gib(gpu["reserved"]), f"{gpu['tokens_s']:.0f}", f"{gpu['peak'] / 1e12:.1f} TFLOP/s",
                               f"{gpu['achieved'] / 1e12:.2f} TFLOP/s", f"{gpu['mfu']:.1%}"]]),
                    "", f"MFU uses the same {FLOPS_FORMULA} (recomputation by gradient checkpointing not counted) over the bf16 peak measured in this run."]
    return "\n".join(out)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
