"""The two comparison runs behind compare.py (base vs one persona) and multi_compare.py (base vs several):
their flags, and one call each that evaluates and writes the report. Benchmarks call the same functions.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UserError
from .evaluation import BASE, Evaluation, ModelSpec, RunOptions, evaluate, pick_adapters
from .flags import add_decoding_flags, add_model_flags, add_persona_flags, add_personas_flags, add_run_flags, decoding_from_args
from .persona import AdapterInfo

BASE_HELP = "(default: the base the adapters were trained on)"


@dataclass
class Comparison:
    evaluation: Evaluation
    report: Path
    chart: Path


def add_compare_flags(p: argparse.ArgumentParser, root: Path) -> None:
    """compare.py's flags: one persona, the report path, prompts, model loading, metrics and greedy decoding."""
    add_persona_flags(p, root, "the only adapter there")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=str(root / "compare_results.md"), help="report path; the chart goes next to it as .png")
    _add_common(p, root)


def add_multi_compare_flags(p: argparse.ArgumentParser, root: Path) -> None:
    """multi_compare.py's flags: several personas, the base's system prompt, then as compare.py."""
    add_personas_flags(p, root)
    p.add_argument("--base-system", default=None, help="system prompt for the base model (default: none)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=str(root / "multi_compare_results.md"), help="report path; the chart goes next to it as .png")
    _add_common(p, root)


def _add_common(p: argparse.ArgumentParser, root: Path) -> None:
    add_run_flags(p, root)
    add_model_flags(p, BASE_HELP)
    add_decoding_flags(p, sample=False)


def pick_one(args: argparse.Namespace) -> AdapterInfo:
    """--adapter, --persona, or the only adapter under --adapters-root."""
    if args.adapter:
        return pick_adapters(args.adapters_root, paths=[args.adapter])[0]
    if args.persona:
        return pick_adapters(args.adapters_root, names=[args.persona])[0]
    found = pick_adapters(args.adapters_root)
    if len(found) > 1:
        names = ", ".join(a.name for a in found)
        raise UserError(f"{args.adapters_root} holds {len(found)} personas ({names}); pick one with --persona NAME or --adapter PATH, or use multi_compare.py")
    return found[0]


def compare_one(args: argparse.Namespace, root: Path, log: Callable[[str], None] = print) -> Comparison:
    """Base vs one persona, the base with the persona's system prompt; writes the report and chart."""
    from .prompts import load_prompts

    started = time.time()
    adapter = pick_one(args)
    prompts = load_prompts(args.prompts, args.limit)
    specs = [
        ModelSpec(BASE, None, adapter.system, adapter.name),
        ModelSpec(adapter.name, adapter.name, adapter.system, adapter.name),
    ]
    ev = evaluate([adapter], specs, prompts, decoding_from_args(args), RunOptions.from_args(args, root), with_attribution=False, log=log)
    return _write(args, ev, started, title=f"Base vs persona {adapter.name}", matrices=False,
                  base_note=f"the base gets {adapter.name}'s system prompt, so the adapter is the only difference")


def compare_many(args: argparse.Namespace, root: Path, log: Callable[[str], None] = print) -> Comparison:
    """Base vs several personas, each with its own system prompt, with an attribution matrix; writes the report and chart."""
    from .prompts import load_prompts

    started = time.time()
    adapters = pick_adapters(args.adapters_root, names=args.personas, paths=args.adapters)
    prompts = load_prompts(args.prompts, args.limit)
    specs = [ModelSpec(BASE, None, args.base_system, None)]
    specs += [ModelSpec(a.name, a.name, a.system, a.name) for a in adapters]
    ev = evaluate(adapters, specs, prompts, decoding_from_args(args), RunOptions.from_args(args, root), with_attribution=True, log=log)
    base_note = ("the base gets the --base-system prompt above" if args.base_system else
                 "the base gets no system prompt (pass --base-system to give it one); each persona keeps its own")
    return _write(args, ev, started, title="Base vs personas " + ", ".join(a.name for a in adapters), matrices=True, base_note=base_note)


def _write(args: argparse.Namespace, ev: Evaluation, started: float, *, title: str, matrices: bool, base_note: str) -> Comparison:
    from .report import write_report

    arguments = {k: v for k, v in vars(args).items() if k != "command"}
    report, chart = write_report(ev, args.out, title=title, command=args.command, arguments=arguments,
                                 started=started, matrices=matrices, base_note=base_note)
    return Comparison(ev, report, chart)
