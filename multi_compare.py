"""Base vs several personas on a fixed prompt set, side by side, with an attribution matrix.

    python multi_compare.py
    python multi_compare.py --personas girl jiangjian peixuan --prompts data/prompts.jsonl
    python multi_compare.py --adapters adapters/girl adapters/peixuan --limit 4 --max-new-tokens 64

Writes multi_compare_results.md and its chart multi_compare_results.png next to it. Every persona
speaks with its own system prompt; the base gets none unless --base-system is given. The same
command twice writes the same report except the two lines marked `timing:`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from personakit.errors import run_cli
from personakit.flags import add_decoding_flags, add_model_flags, add_personas_flags, add_run_flags, check_args, decoding_from_args, print_config
from personakit.report import command_line

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to compare
    add_personas_flags(p, ROOT)
    p.add_argument("--base-system", default=None, help="system prompt for the base model (default: none)")
    # output
    g = p.add_argument_group("output")
    g.add_argument("--out", default=str(ROOT / "multi_compare_results.md"), help="report path; the chart goes next to it as .png")
    # prompts, model loading, metrics, decoding
    add_run_flags(p, ROOT)
    add_model_flags(p, "(default: the base the adapters were trained on)")
    add_decoding_flags(p, sample=False)
    args = p.parse_args(argv)
    args.command = command_line("multi_compare.py", sys.argv[1:] if argv is None else argv)
    return args


def main(args: argparse.Namespace) -> int:
    started = time.time()
    check_args(args)
    print_config(args)
    arguments = {k: v for k, v in vars(args).items() if k != "command"}

    from personakit.evaluation import BASE, ModelSpec, RunOptions, evaluate, pick_adapters
    from personakit.prompts import load_prompts
    from personakit.report import console_lines, write_report

    adapters = pick_adapters(args.adapters_root, names=args.personas, paths=args.adapters)
    prompts = load_prompts(args.prompts, args.limit)
    specs = [ModelSpec(BASE, None, args.base_system, None)]
    specs += [ModelSpec(a.name, a.name, a.system, a.name) for a in adapters]
    ev = evaluate(adapters, specs, prompts, decoding_from_args(args), RunOptions.from_args(args, ROOT),
                  with_attribution=True, log=lambda line: print(line, flush=True))
    base_note = ("the base gets the --base-system prompt above" if args.base_system else
                 "the base gets no system prompt (pass --base-system to give it one); each persona keeps its own")
    report, chart = write_report(
        ev, args.out, title="Base vs personas " + ", ".join(a.name for a in adapters), command=args.command,
        arguments=arguments, started=started, matrices=True, base_note=base_note,
    )
    for line in console_lines(ev):
        print(line)
    print(f"wrote {report} and {chart} in {time.time() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
