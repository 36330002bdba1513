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

from personakit.comparison import CompareOptions, add_multi_compare_flags
from personakit.errors import run_cli
from personakit.flags import check_args, print_config
from personakit.report import command_line

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_multi_compare_flags(p, ROOT)
    args = p.parse_args(argv)
    args.command = command_line("multi_compare.py", sys.argv[1:] if argv is None else argv)
    return args


def main(args: argparse.Namespace) -> int:
    started = time.time()
    check_args(args)
    print_config(args)

    from personakit.comparison import compare_many
    from personakit.report import console_lines

    done = compare_many(CompareOptions.from_args(args, several=True), ROOT, log=lambda line: print(line, flush=True))
    for line in console_lines(done.evaluation):
        print(line)
    print(f"wrote {done.report} and {done.chart} in {time.time() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
