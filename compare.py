"""Base vs one persona on a fixed prompt set, side by side, with metrics that show what the adapter changed.

    python compare.py --persona girl
    python compare.py --adapter adapters/girl --prompts data/en/prompts.jsonl --limit 4 --max-new-tokens 64

Writes compare_results.md and its chart compare_results.png next to it. The base gets the persona's
own system prompt, so the adapter is the only difference. The same command twice writes the same
report except the two lines marked `timing:`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from personakit.errors import UserError, run_cli
from personakit.evaluation import add_run_args
from personakit.generation import add_decoding_args
from personakit.report import command_line

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to compare
    g = p.add_argument_group("what to compare")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--persona", default=None, help="persona name under --adapters-root (default: the only adapter there)")
    which.add_argument("--adapter", default=None, help="adapter folder written by llm.py")
    g.add_argument("--adapters-root", default=str(ROOT / "adapters"), help="folder with one adapter folder per persona")
    # output
    g = p.add_argument_group("output")
    g.add_argument("--out", default=str(ROOT / "compare_results.md"), help="report path; the chart goes next to it as .png")
    # prompts, model loading, metrics, decoding
    add_run_args(p, ROOT)
    add_decoding_args(p, sample=False)
    args = p.parse_args(argv)
    args.command = command_line("compare.py", sys.argv[1:] if argv is None else argv)
    return args


def pick_adapter(args: argparse.Namespace):
    from personakit.evaluation import pick_adapters

    if args.adapter:
        return pick_adapters(args.adapters_root, paths=[args.adapter])[0]
    if args.persona:
        return pick_adapters(args.adapters_root, names=[args.persona])[0]
    found = pick_adapters(args.adapters_root)
    if len(found) > 1:
        names = ", ".join(a.name for a in found)
        raise UserError(f"{args.adapters_root} holds {len(found)} personas ({names}); pick one with --persona NAME or --adapter PATH, or use multi_compare.py")
    return found[0]


def main(args: argparse.Namespace) -> int:
    started = time.time()
    arguments = {k: v for k, v in vars(args).items() if k != "command"}
    print("config: " + " ".join(f"{k}={v}" for k, v in sorted(arguments.items())), flush=True)

    from personakit.evaluation import BASE, ModelSpec, evaluate, run_options
    from personakit.generation import decoding_from_args
    from personakit.prompts import load_prompts
    from personakit.report import console_lines, write_report

    adapter = pick_adapter(args)
    prompts = load_prompts(args.prompts, args.limit)
    specs = [
        ModelSpec(BASE, None, adapter.system, adapter.name),
        ModelSpec(adapter.name, adapter.name, adapter.system, adapter.name),
    ]
    ev = evaluate([adapter], specs, prompts, decoding_from_args(args), **run_options(args, ROOT),
                  with_attribution=False, log=lambda line: print(line, flush=True))
    report, chart = write_report(
        ev, args.out, title=f"Base vs persona {adapter.name}", command=args.command, arguments=arguments,
        started=started, matrices=False,
        base_note=f"the base gets {adapter.name}'s system prompt, so the adapter is the only difference",
    )
    for line in console_lines(ev):
        print(line)
    print(f"wrote {report} and {chart} in {time.time() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
