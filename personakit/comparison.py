"""The two comparison runs behind compare.py (base vs one persona) and multi_compare.py (base vs several):
their flags, their options, and one call each that evaluates and writes the report. Benchmarks call the same functions.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .evaluation import BASE, Evaluation, ModelSpec, evaluate, pick_adapters
from .flags import add_decoding_flags, add_model_flags, add_options, add_persona_flags, add_personas_flags, add_run_flags
from .options import PROJECT_ROOT, Decoding, ModelOptions, Options, PersonaChoice, PersonasChoice, RunOptions, option
from .persona import AdapterInfo

BASE_HELP = "(default: the base the adapters were trained on)"
REPORT_HELP = "report path; the chart goes next to it as .png"


@dataclass
class Comparison:
    evaluation: Evaluation
    report: Path
    chart: Path


@dataclass(frozen=True, kw_only=True)
class CompareReport(Options):
    """compare.py's own flag."""

    out: str = option(str(PROJECT_ROOT / "compare_results.md"), REPORT_HELP, group="output")


@dataclass(frozen=True, kw_only=True)
class MultiCompareReport(Options):
    """multi_compare.py's own flags."""

    base_system: str | None = option(None, "system prompt for the base model (default: none)")
    out: str = option(str(PROJECT_ROOT / "multi_compare_results.md"), REPORT_HELP, group="output")


@dataclass(frozen=True)
class CompareOptions:
    """Everything a comparison run reads, group by group: compare.py's (one persona, CompareReport) or
    multi_compare.py's (several, MultiCompareReport); `command` is the command line the report header shows."""

    personas: PersonaChoice | PersonasChoice
    report: CompareReport | MultiCompareReport
    run: RunOptions = field(default_factory=RunOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    decoding: Decoding = field(default_factory=Decoding)
    command: str = ""

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, several: bool) -> CompareOptions:
        personas, report = (PersonasChoice, MultiCompareReport) if several else (PersonaChoice, CompareReport)
        return cls(personas.from_args(args), report.from_args(args), RunOptions.from_args(args), ModelOptions.from_args(args),
                   Decoding.from_args(args), args.command)

    def arguments(self) -> dict[str, Any]:
        """Every resolved flag by name, as the report header records them."""
        return {k: v for group in (self.personas, self.report, self.run, self.model, self.decoding) for k, v in group.as_dict().items()}


def add_compare_flags(p: argparse.ArgumentParser, root: Path) -> None:
    """compare.py's flags: one persona, the report path, prompts, model loading, metrics and greedy decoding."""
    add_persona_flags(p, root, "the only adapter there")
    add_options(p, CompareReport, root=root)
    _add_common(p, root)


def add_multi_compare_flags(p: argparse.ArgumentParser, root: Path) -> None:
    """multi_compare.py's flags: several personas, the base's system prompt, then as compare.py."""
    add_personas_flags(p, root)
    add_options(p, MultiCompareReport, root=root)
    _add_common(p, root)


def _add_common(p: argparse.ArgumentParser, root: Path) -> None:
    add_run_flags(p, root)
    add_model_flags(p, BASE_HELP)
    add_decoding_flags(p, sample=False)


def pick_one(choice: PersonaChoice) -> AdapterInfo:
    """The adapter folder, the persona by name, or the only adapter under adapters_root."""
    if choice.adapter:
        return pick_adapters(choice.adapters_root, paths=[choice.adapter])[0]
    if choice.persona:
        return pick_adapters(choice.adapters_root, names=[choice.persona])[0]
    found = pick_adapters(choice.adapters_root)
    if len(found) > 1:
        names = ", ".join(a.name for a in found)
        raise UserError(f"{choice.adapters_root} holds {len(found)} personas ({names}); pick one with --persona NAME or --adapter PATH, or use multi_compare.py")
    return found[0]


def compare_one(options: CompareOptions, root: Path = PROJECT_ROOT, log: Callable[[str], None] = print) -> Comparison:
    """Base vs one persona, the base with the persona's system prompt; writes the report and chart.
    Relative training-data paths in persona.json are tried from `root` too."""
    from .prompts import load_prompts

    started = time.time()
    adapter = pick_one(options.personas)
    prompts = load_prompts(options.run.prompts, options.run.limit)
    specs = [
        ModelSpec(BASE, None, adapter.system, adapter.name),
        ModelSpec(adapter.name, adapter.name, adapter.system, adapter.name),
    ]
    ev = _evaluate(options, [adapter], specs, prompts, root, with_attribution=False, log=log)
    return _write(options, ev, started, title=f"Base vs persona {adapter.name}", matrices=False,
                  base_note=f"the base gets {adapter.name}'s system prompt, so the adapter is the only difference")


def compare_many(options: CompareOptions, root: Path = PROJECT_ROOT, log: Callable[[str], None] = print) -> Comparison:
    """Base vs several personas, each with its own system prompt, with an attribution matrix; writes the report and chart."""
    from .prompts import load_prompts

    started = time.time()
    choice, base_system = options.personas, options.report.base_system
    adapters = pick_adapters(choice.adapters_root, names=choice.personas, paths=choice.adapters)
    prompts = load_prompts(options.run.prompts, options.run.limit)
    specs = [ModelSpec(BASE, None, base_system, None)]
    specs += [ModelSpec(a.name, a.name, a.system, a.name) for a in adapters]
    ev = _evaluate(options, adapters, specs, prompts, root, with_attribution=True, log=log)
    base_note = ("the base gets the --base-system prompt above" if base_system else
                 "the base gets no system prompt (pass --base-system to give it one); each persona keeps its own")
    return _write(options, ev, started, title="Base vs personas " + ", ".join(a.name for a in adapters), matrices=True, base_note=base_note)


def _evaluate(options: CompareOptions, adapters: list[AdapterInfo], specs: list[ModelSpec], prompts: Any, root: Path,
              *, with_attribution: bool, log: Callable[[str], None]) -> Evaluation:
    return evaluate(adapters, specs, prompts, options.decoding, options.run, options.model, with_attribution=with_attribution,
                    allow_base_mismatch=options.personas.allow_base_mismatch, project_root=root, log=log)


def _write(options: CompareOptions, ev: Evaluation, started: float, *, title: str, matrices: bool, base_note: str) -> Comparison:
    from .report import write_report

    report, chart = write_report(ev, options.report.out, title=title, command=options.command, arguments=options.arguments(),
                                 started=started, matrices=matrices, base_note=base_note)
    return Comparison(ev, report, chart)
