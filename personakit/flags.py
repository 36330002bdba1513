"""The scripts' flag groups, generated from the option dataclasses of options.py, validated by `check_args`
and printed by `print_config`.

A script builds its parser from the groups it needs, calls `check_args(args)` first thing in `main`
(every out-of-range value in one UserError, exit code 2), then `print_config(args)` once, and hands
the package typed options (`TrainConfig.from_args(args)`):

    group                          flags                                                  options
    add_model_flags(p, base_help)  --base --cache-dir --load-in-4bit --trust-remote-code  ModelOptions (every script that
                                   --cpu-dtype (resolved by precision.cpu_precision)      loads a base)
    add_persona_flags(p, root, ..) --persona | --adapter, --adapters-root,                PersonaChoice (chat.py, compare.py,
                                   --allow-base-mismatch                                  export.py)
    add_personas_flags(p, root)    --personas | --adapters, --adapters-root,              PersonasChoice (multi_compare.py,
                                   --allow-base-mismatch                                  serve.py)
    add_decoding_flags(p, sample)  --sample/--greedy --temperature ... --min-reply-chars  Decoding (chat.py, compare.py,
                                                                                          multi_compare.py, serve.py)
    add_memory_flags(p, max_ctx)   --memory --memory-turns --retrieve-k --max-context     MemoryOptions (chat.py, serve.py)
    add_training_flags(p)          LoRA, optimisation and validation groups              TrainConfig (llm.py)
    training_parser(root)          llm.py's whole parser (what to train + model + above)  TrainJob, ModelOptions, TrainConfig
    add_run_flags(p, root)         --prompts --limit --batch-size --too-short-units ...   RunOptions (compare.py,
                                                                                          multi_compare.py)

`check_args` validates by destination name whatever flags a script has (table RANGES): a name has
one valid range everywhere (`--seed` seeds training in llm.py and sampling elsewhere, `--batch-size`
counts rows in both). A new flag with a range gets a RANGES entry. This module imports nothing
heavy, so `--help` stays instant.
"""
from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Callable, TextIO

from .errors import UserError
from .options import DEFAULT_MAX_CONTEXT, MEMORY_MODES, PROJECT_ROOT, Decoding, MemoryOptions, ModelOptions, PersonaChoice, PersonasChoice, RunOptions, TrainConfig, TrainJob

# ---- flags from option dataclasses ---------------------------------------------------------

def _flag_kind(hint: Any) -> Any:
    """The type a field's flag parses: `X | None` parses X."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    (kind,) = (a for a in typing.get_args(hint) if a is not type(None))
    return kind


def _rooted(value: Any, root: Path | None) -> Any:
    if root is None or not isinstance(value, str) or not value.startswith(str(PROJECT_ROOT)):
        return value
    return str(Path(root) / Path(value).relative_to(PROJECT_ROOT))


def add_options(p: argparse.ArgumentParser, cls: type, *, root: Path | None = None, fill: dict[str, Any] | None = None,
                overrides: dict[str, dict[str, Any]] | None = None) -> None:
    """One flag per field of the option dataclass `cls`, under the --help section its metadata names: a field without a default is a required flag, a bool an on/off switch, a list takes one or more
    values. A default path inside the project is moved under the script's `root`; `fill` completes help texts
    with placeholders, `overrides` replaces a field's argparse keywords."""
    hints = typing.get_type_hints(cls)
    sections: dict[str | None, Any] = {None: p}
    exclusive: dict[str | None, Any] = {}
    for f in fields(cls):
        meta = f.metadata
        title = meta["group"]
        if title not in sections:
            sections[title] = p.add_argument_group(title)
        target = sections[title]
        if meta.get("one_of"):
            if title not in exclusive:
                exclusive[title] = target.add_mutually_exclusive_group()
            target = exclusive[title]
        kwargs: dict[str, Any] = {"help": meta["help"].format(**fill) if fill else meta["help"]}
        kind = _flag_kind(hints[f.name])
        if kind is bool:
            kwargs["action"] = "store_false" if f.default else "store_true"
        else:
            if f.default is MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = _rooted(f.default, root)
            if typing.get_origin(kind) is list:
                kwargs["nargs"] = "+"
            elif kind in (int, float):
                kwargs["type"] = kind
            if "choices" in meta:
                kwargs["choices"] = list(meta["choices"])
        kwargs.update((overrides or {}).get(f.name, {}))
        target.add_argument(meta.get("flag", flag(f.name)), dest=f.name, **kwargs)
        if meta.get("negative"):
            negative, negative_help = meta["negative"]
            target.add_argument(negative, dest=f.name, action="store_false", help=negative_help)


def as_flags(cls: type, values: dict[str, Any]) -> list[str]:
    """The flags a user types to give these fields of the option dataclass `cls` these values (for reports and commands)."""
    by_name = {f.name: f for f in fields(cls)}
    words: list[str] = []
    for name, value in values.items():
        meta = by_name[name].metadata
        on = meta.get("flag", flag(name))
        if isinstance(value, bool):
            if meta.get("negative"):
                words.append(on if value else meta["negative"][0])
            elif value != by_name[name].default:  # a switch: its flag turns the default around
                words.append(on)
        elif isinstance(value, list):
            words += [on, *map(str, value)]
        else:
            words += [on, f"{value:g}" if isinstance(value, float) else str(value)]
    return words


# ---- the groups ----------------------------------------------------------------------------

def add_model_flags(p: argparse.ArgumentParser, base_help: str = "(default: embedded SmolLM2-135M-Instruct)") -> None:
    """Which base model to load and how; `base_help` says what an absent --base means for this script."""
    add_options(p, ModelOptions, fill={"base_help": base_help})


def add_persona_flags(p: argparse.ArgumentParser, root: Path, absent: str) -> None:
    """One persona by name or by folder; `absent` says what no --persona/--adapter means for this script."""
    add_options(p, PersonaChoice, root=root, fill={"absent": absent})


def add_personas_flags(p: argparse.ArgumentParser, root: Path) -> None:
    """Several personas by name or by folder (default: every adapter under --adapters-root)."""
    add_options(p, PersonasChoice, root=root)


def add_decoding_flags(p: argparse.ArgumentParser, *, sample: bool) -> None:
    """One flag per `Decoding` field; `sample` picks the script's default mode (chat samples, reports are greedy)."""
    add_options(p, Decoding, overrides={"do_sample": {"default": sample}})


def decoding_from_args(args: argparse.Namespace) -> Decoding:
    return Decoding.from_args(args)


def add_memory_flags(p: argparse.ArgumentParser, default_max_context: int = DEFAULT_MAX_CONTEXT,
                     modes: tuple[str, ...] = ("recent", "retrieval")) -> None:
    """What a multi-turn conversation keeps in the prompt (`modes`: the --memory choices this script offers)."""
    add_options(p, MemoryOptions, fill={"default_max_context": default_max_context},
                overrides={"memory": {"choices": list(modes), "help": "; ".join(f"{m}: {MEMORY_MODES[m]}" for m in modes)}})


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """LoRA, optimisation and validation flags of llm.py (the fields of TrainConfig)."""
    add_options(p, TrainConfig)


def training_parser(root: Path, description: str | None = None) -> argparse.ArgumentParser:
    """llm.py's parser: what to train and where, model loading, and the training groups (TrainJob,
    ModelOptions and TrainConfig read its values)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, TrainJob, root=root)
    add_model_flags(p)
    add_training_flags(p)
    return p


def add_run_flags(p: argparse.ArgumentParser, root: Path) -> None:
    """Prompt set, batching and metric flags of the comparison runs (model and decoding flags are separate groups)."""
    add_options(p, RunOptions, root=root)


# ---- validation ----------------------------------------------------------------------------

def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"at least {low:g}"


POSITIVE = (lambda v: v > 0), "positive"
NOT_NEGATIVE = _at_least(0)
ONE_OR_MORE = _at_least(1)
SHARE = (lambda v: 0 <= v <= 1), "between 0 and 1"

# dest -> (accepts, what it must be); a flag a script does not have is not checked. None means "unset".
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # training
    "lora_r": ONE_OR_MORE,
    "lora_alpha": POSITIVE,
    "lora_dropout": ((lambda v: 0 <= v < 1), "at least 0 and below 1"),
    "learning_rate": POSITIVE,
    "epochs": POSITIVE,
    "max_steps": ((lambda v: v == -1 or v >= 1), "-1 (none) or at least 1"),
    "min_steps": NOT_NEGATIVE,
    "batch_size": ONE_OR_MORE,
    "grad_accum": ONE_OR_MORE,
    "max_length": ONE_OR_MORE,
    "warmup_ratio": SHARE,
    "weight_decay": NOT_NEGATIVE,
    "val_fraction": ((lambda v: 0 <= v < 1), "at least 0 and below 1"),
    "eval_steps": NOT_NEGATIVE,
    "early_stopping_patience": NOT_NEGATIVE,
    "replay_fraction": SHARE,
    # decoding
    "temperature": POSITIVE,
    "top_p": ((lambda v: 0 < v <= 1), "above 0 and at most 1"),
    "top_k": NOT_NEGATIVE,
    "repetition_penalty": POSITIVE,
    "no_repeat_ngram_size": NOT_NEGATIVE,
    "max_new_tokens": ONE_OR_MORE,
    "min_reply_chars": NOT_NEGATIVE,
    # memory
    "memory_turns": NOT_NEGATIVE,
    "retrieve_k": NOT_NEGATIVE,
    "max_context": ONE_OR_MORE,
    "summary_tokens": _at_least(8),
    # comparison runs
    "limit": ONE_OR_MORE,
    "too_short_units": NOT_NEGATIVE,
    # data cleaning
    "merge_minutes": POSITIVE,
    "reply_minutes": POSITIVE,
    "session_minutes": POSITIVE,
    "history_turns": NOT_NEGATIVE,
    "max_reply_chars": ONE_OR_MORE,
    "near_dup": SHARE,
    # serving
    "port": ((lambda v: 0 < v < 65536), "a TCP port from 1 to 65535"),
    "max_batch": ONE_OR_MORE,
    "max_body_bytes": ONE_OR_MORE,
    "max_messages": ONE_OR_MORE,
    "max_message_chars": ONE_OR_MORE,
    "max_queue": ONE_OR_MORE,
    "request_timeout": POSITIVE,
    "shutdown_grace": NOT_NEGATIVE,
    "max_open_users": ONE_OR_MORE,
    # benchmarks
    "steps": ONE_OR_MORE,
}


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_args(args: argparse.Namespace) -> None:
    """Every out-of-range flag value of `args`, reported together as one UserError."""
    values = vars(args)
    problems = [
        f"{flag(dest)} must be {what} (got {values[dest]:g})"
        for dest, (accepts, what) in RANGES.items()
        if values.get(dest) is not None and not accepts(values[dest])
    ]
    max_context, max_new = values.get("max_context"), values.get("max_new_tokens")
    if max_context is not None and max_new is not None and max_context >= 1 and max_context <= max_new:
        problems.append(f"--max-context {max_context} must leave room for a prompt beside --max-new-tokens {max_new}")
    if problems:
        raise UserError("; ".join(problems) + "; fix " + ("it" if len(problems) == 1 else "them") + " and run again")


def print_config(args: argparse.Namespace | dict[str, Any], file: TextIO | None = None) -> None:
    """The resolved configuration as one `config: key=value ...` line, keys sorted (the command line itself left out)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    line = " ".join(f"{k}={v}" for k, v in sorted(values.items()) if k != "command")
    print("config: " + line, file=file or sys.stdout, flush=True)
