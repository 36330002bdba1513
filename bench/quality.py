"""Quality benchmark: our default recipe vs the plain LoRA recipe on the English demo personas.

    python -m bench.quality                 # writes the Quality section of BENCHMARKS.md (which says how long it took)
    python -m bench.quality --personas girl --max-steps 2 --limit 4 --max-new-tokens 24 --work-dir /tmp/q --out /tmp/B.md   # smoke run

Each persona is trained twice on the embedded base from data/en/<persona>.jsonl with the same
seeded 10% held-out split: once with llm.py's defaults, once with the plain recipe users
usually start from (3 epochs, lr 2e-4, rank 16, all linear layers, last weights kept). Both are
then decoded on the English prompt set with their own default decoding, and scored with the
same metrics the comparison reports use. The fresh personas (data/en/fresh/, never used to choose a
default) go through the same two recipes on their own prompt set and get their own table.
"""
from __future__ import annotations

import argparse
import shlex
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from personakit.errors import run_cli
from personakit.flags import as_flags, check_args, print_config
from personakit.options import Decoding, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PERSONAS = ("girl", "jiangjian", "peixuan")
# Written for issue 15 to judge the recipe on data it was never tuned on; choose nothing with them.
FRESH_DIR = ROOT / "data" / "en" / "fresh"
FRESH_PERSONAS = ("marco", "dana")
# What the plain recipe changes of llm.py's TrainConfig and multi_compare.py's Decoding.
PLAIN_TRAIN = dict(epochs=3.0, min_steps=0, learning_rate=2e-4, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                   early_stopping_patience=0, keep_last=True)
# The plain recipe decodes greedily with transformers' repetition penalty 1.1 (which also scores the prompt)
# and nothing else.
PLAIN_DECODING = dict(do_sample=False, repetition_penalty=1.1, repetition_scope="all", no_repeat_ngram_size=0, min_reply_chars=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--personas", nargs="+", default=list(PERSONAS), help="English demo personas to train and score")
    p.add_argument("--prompts", default=str(ROOT / "data" / "en" / "prompts.jsonl"), help="prompt set to decode")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts (smoke runs)")
    p.add_argument("--max-steps", type=int, default=-1, help="cap both recipes' training steps (smoke runs; -1 = none)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="reply length limit for both recipes (smoke runs; default: multi_compare.py's)")
    p.add_argument("--fresh-personas", nargs="*", default=list(FRESH_PERSONAS),
                   help="fresh personas (data/en/fresh/) scored on the fresh prompt set in a separate table; none to skip")
    p.add_argument("--work-dir", default=str(ROOT / ".bench" / "quality"), help="where the benchmark's adapters go")
    p.add_argument("--reuse", action="store_true", help="reuse adapters already in --work-dir instead of retraining")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file whose Quality section is replaced")
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "-m", "bench.quality", *(sys.argv[1:] if argv is None else argv)])
    return args


def train_all(args: argparse.Namespace, recipe: str, root: Path, data_dir: Path = ROOT / "data" / "en") -> None:
    import json

    from personakit.options import ModelOptions, TrainJob
    from personakit.train import train_persona

    systems = json.loads((ROOT / "data" / "personas.json").read_text(encoding="utf-8"))
    config = TrainConfig(**(PLAIN_TRAIN if recipe == "plain" else {}), **({"max_steps": args.max_steps} if args.max_steps > 0 else {}))
    for persona in args.personas:
        if args.reuse and (root / persona / "persona.json").is_file():
            continue
        job = TrainJob(persona=persona, data=str(data_dir / f"{persona}.jsonl"), system=systems[persona]["system"]["en"],
                       output_root=str(root), overwrite=True)
        print(f"train {recipe} {persona}", flush=True)
        train_persona(job, ModelOptions(), config, log=lambda line: print(line, flush=True))


def score(args: argparse.Namespace, recipe: str, root: Path) -> dict[str, dict[str, float | None]]:
    """Generate with the recipe's decoding and return per-persona quality figures (plus the base's)."""
    from personakit.data import write_jsonl
    from personakit.files import write_json
    from personakit.evaluation import BASE, ModelSpec, evaluate, pick_adapters
    from personakit.metrics import has_loop
    from personakit.options import ModelOptions, RunOptions
    from personakit.prompts import load_prompts

    # multi_compare.py's defaults but for the recipe's decoding and the smoke-run limits
    decoding = Decoding(**(PLAIN_DECODING if recipe == "plain" else {}),
                        **({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}))
    run = RunOptions(prompts=args.prompts, limit=args.limit)
    adapters = pick_adapters(root, args.personas)
    prompts = load_prompts(run.prompts, run.limit)
    specs = [ModelSpec(BASE, None, None, None)] + [ModelSpec(a.name, a.name, a.system, a.name) for a in adapters]
    ev = evaluate(adapters, specs, prompts, decoding, run, ModelOptions(), with_attribution=True, project_root=ROOT)
    table: dict[str, dict[str, float | None]] = {}
    dump = []
    for spec in ev.specs:
        m = ev.metrics[spec.name]
        replies = ev.replies[spec.name]
        # The loop rule: some 3-word sequence occurs 3+ times, or the reply hit the token limit.
        looping = sum(1 for r in replies if has_loop(r.text, n=3) or r.hit_limit)
        dump += [{"model": spec.name, "prompt": p.prompt, "keywords": p.keywords, "reply": r.text, "hit_limit": r.hit_limit}
                 for p, r in zip(prompts.prompts, replies)]
        ppl = ev.perplexity.get(spec.adapter) if spec.adapter else None
        predictions = (ev.attribution or {}).get(spec.name, [])
        own = spec.adapter or BASE
        table[spec.name] = {
            "markers": m.marker_rate if spec.adapter else None,
            "loops": looping / m.n,
            "keywords": m.keyword_any,
            "too_short": m.too_short / m.n,
            "ppl_base": ppl.base if ppl else None,
            "ppl_tuned": ppl.tuned if ppl else None,
            "ppl_ratio": ppl.tuned / ppl.base if ppl and ppl.base and ppl.tuned else None,
            "attribution": sum(p == own for p in predictions) / len(predictions) if predictions else None,
        }
    write_jsonl(root / "replies.jsonl", dump)
    write_json(root / "scores.json", table)  # unrounded: the targets are judged on these
    return table


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def targets(args: argparse.Namespace, results: dict[str, dict]) -> list[tuple[str, str, bool]]:
    """The targets our defaults must meet on every persona: (what, our figures, met)."""
    ours, plain, base = results["ours"], results["plain"], results["ours"]["base"]
    names = args.personas

    def figures(key: str, fmt) -> str:
        return " / ".join(fmt(ours[p][key]) for p in names)

    markers = [ours[p]["markers"] for p in names]
    loops = [ours[p]["loops"] for p in names]
    keywords = [ours[p]["keywords"] for p in names]
    ratios = [(ours[p]["ppl_ratio"], plain[p]["ppl_ratio"]) for p in names]
    return [
        ("persona markers on at least 90% of replies", figures("markers", _pct), all(m is not None and m >= 0.9 for m in markers)),
        ("no loops", figures("loops", _pct), all(x == 0 for x in loops)),
        (f"keyword coverage at least the base's ({_pct(base['keywords'])}, same decoding)", figures("keywords", _pct),
         all(k is not None and base["keywords"] is not None and k >= base["keywords"] for k in keywords)),
        ("held-out perplexity ratio no worse than the plain recipe's (" + " / ".join(_num(b) for _, b in ratios) + ")",
         figures("ppl_ratio", _num), all(a is not None and b is not None and a <= b for a, b in ratios)),
    ]


def training_runs(root: Path, personas: list[str]) -> dict[str, dict]:
    """What each adapter's persona.json says about its training run."""
    from personakit.persona import read_adapter

    runs = {}
    for persona in personas:
        meta = read_adapter(root / persona).meta
        r = meta.results
        runs[persona] = {"lr": meta.hyperparameters["learning_rate"], "steps": r.steps, "seconds": r.train_seconds,
                         "tokens_s": r.trained_tokens / max(r.train_seconds, 1e-9), "created": meta.created[:16]}
    return runs


def render(args: argparse.Namespace, results: dict[str, dict], training: dict[str, dict], seconds: float, command: str) -> str:
    lines = [
        "## Quality: our defaults vs the plain recipe",
        "",
        f"Command: `{command}` · {datetime.now(timezone.utc):%Y-%m-%d} · {platform.processor() or platform.machine()}, "
        f"embedded SmolLM2-135M-Instruct on CPU · {seconds / 60:.0f} min",
        "",
        "Plain recipe: " + " ".join(as_flags(TrainConfig, PLAIN_TRAIN)) + "; decoding " + " ".join(as_flags(Decoding, PLAIN_DECODING)) + ".",
        "Ours: llm.py and multi_compare.py defaults. Same data, same seeded 10% held-out split, same prompts.",
        "",
        "| persona | recipe | persona markers | loops | keyword coverage | too short | held-out ppl base → tuned (ratio) | attribution |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for persona in args.personas:
        for recipe in ("plain", "ours"):
            r = results[recipe][persona]
            lines.append(
                f"| {persona} | {recipe} | {_pct(r['markers'])} | {_pct(r['loops'])} | {_pct(r['keywords'])} | "
                f"{_pct(r['too_short'])} | {_num(r['ppl_base'])} → {_num(r['ppl_tuned'])} ({_num(r['ppl_ratio'])}) | "
                f"{_pct(r['attribution'])} |"
            )
    for recipe in ("plain", "ours"):
        b = results[recipe]["base"]
        lines.append(f"| base | {recipe} decoding | n/a | {_pct(b['loops'])} | {_pct(b['keywords'])} | {_pct(b['too_short'])} | | {_pct(b['attribution'])} |")
    lines += ["", "Targets, ours on every persona:", "", "| target | ours | met |", "|---|---|---|"]
    lines += [f"| {label} | {value} | {'yes' if ok else 'no'} |" for label, value, ok in targets(args, results)]
    lines += ["", "Training, from each adapter's persona.json:", ""]
    for recipe in ("plain", "ours"):
        runs = training[recipe]
        lines.append(f"- {recipe}: " + "; ".join(
            f"{p} lr {r['lr']:g}, {r['steps']} steps, {r['seconds']:.0f} s ({r['tokens_s']:.0f} tokens/s), {r['created']}"
            for p, r in runs.items()) + ".")
    lines += [
        "",
        "Loops: replies in which some 3-word sequence occurs 3 or more times (or a 1-3-word block repeats back to "
        "back over 12+ words; CJK characters count as words), or that hit the token limit without an end-of-turn. "
        "Keyword coverage: prompts with keywords whose reply contains at least one. "
        "Attribution: share of a model's replies that the character n-gram classifier assigns to its own persona. "
        "Every reply is kept in `<work-dir>/<recipe>/replies.jsonl` and the unrounded figures in `scores.json` beside it "
        "(default work-dir `.bench/quality`); the targets are judged on the unrounded figures.",
    ]
    return "\n".join(lines) + "\n"


def run_fresh(args: argparse.Namespace) -> list[str]:
    """Both recipes on the fresh personas and prompts, rendered as their own table and targets."""
    fargs = argparse.Namespace(**{**vars(args), "personas": args.fresh_personas, "prompts": str(FRESH_DIR / "prompts.jsonl")})
    results = {}
    for recipe in ("plain", "ours"):
        root = Path(args.work_dir) / "fresh" / recipe
        train_all(fargs, recipe, root, FRESH_DIR)
        results[recipe] = score(fargs, recipe, root)
        for name, r in results[recipe].items():
            print(f"fresh {recipe} {name}: " + ", ".join(f"{k} {_num(v)}" for k, v in r.items()), flush=True)
    return render_fresh(fargs, results)


def render_fresh(fargs: argparse.Namespace, results: dict[str, dict]) -> list[str]:
    lines = [
        "",
        "### Fresh personas, not used for tuning",
        "",
        "Hand-written for issue 15 (data/en/fresh/, 100-150 pairs each) and scored on their own prompt set "
        "(data/en/fresh/prompts.jsonl); no default was chosen with them. Same recipes and decoding as above.",
        "",
        "| persona | recipe | persona markers | loops | keyword coverage | too short | held-out ppl base → tuned (ratio) |",
        "|---|---|---|---|---|---|---|",
    ]
    for persona in fargs.personas:
        for recipe in ("plain", "ours"):
            r = results[recipe][persona]
            lines.append(f"| {persona} | {recipe} | {_pct(r['markers'])} | {_pct(r['loops'])} | {_pct(r['keywords'])} | "
                         f"{_pct(r['too_short'])} | {_num(r['ppl_base'])} → {_num(r['ppl_tuned'])} ({_num(r['ppl_ratio'])}) |")
    for recipe in ("plain", "ours"):
        b = results[recipe]["base"]
        lines.append(f"| base | {recipe} decoding | n/a | {_pct(b['loops'])} | {_pct(b['keywords'])} | {_pct(b['too_short'])} | |")
    lines += ["", "Targets on the fresh personas, ours:", "", "| target | ours | met |", "|---|---|---|"]
    lines += [f"| {label} | {value} | {'yes' if ok else 'no'} |" for label, value, ok in targets(fargs, results)]
    return lines


def main(args: argparse.Namespace) -> int:
    from bench.benchmarking import write_section

    check_args(args)
    print_config(args)
    started = time.time()
    results, training = {}, {}
    for recipe in ("plain", "ours"):
        root = Path(args.work_dir) / recipe
        train_all(args, recipe, root)
        training[recipe] = training_runs(root, args.personas)
        results[recipe] = score(args, recipe, root)
        for name, r in results[recipe].items():
            print(f"{recipe} {name}: " + ", ".join(f"{k} {_num(v)}" for k, v in r.items()), flush=True)
    fresh = run_fresh(args) if args.fresh_personas else []
    section = render(args, results, training, time.time() - started, args.command) + "".join(line + "\n" for line in fresh)
    write_section(args.out, "quality", section)
    print(section)
    print(f"wrote the Quality section of {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
