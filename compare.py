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
from personakit.flags import add_decoding_flags, add_model_flags, add_persona_flags, add_run_flags, check_args, decoding_from_args, print_config
from personakit.report import command_line

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to compare
    add_persona_flags(p, ROOT, "the only adapter there")
    # output
    g = p.add_argument_group("output")
    g.add_argument("--out", default=str(ROOT / "compare_results.md"), help="report path; the chart goes next to it as .png")
    # prompts, model loading, metrics, decoding
    add_run_flags(p, ROOT)
    add_model_flags(p, "(default: the base the adapters were trained on)")
    add_decoding_flags(p, sample=False)
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
    check_args(args)
    print_config(args)
    arguments = {k: v for k, v in vars(args).items() if k != "command"}

    from personakit.evaluation import BASE, ModelSpec, RunOptions, evaluate
    from personakit.prompts import load_prompts
    from personakit.report import console_lines, write_report

    adapter = pick_adapter(args)
    prompts = load_prompts(args.prompts, args.limit)
    specs = [
        ModelSpec(BASE, None, adapter.system, adapter.name),
        ModelSpec(adapter.name, adapter.name, adapter.system, adapter.name),
    ]
    ev = evaluate([adapter], specs, prompts, decoding_from_args(args), RunOptions.from_args(args, ROOT),
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
