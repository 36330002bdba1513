"""Flag groups shared by the scripts, each defined once, validated by `check_args` and printed by `print_config`.

A script builds its parser from the groups it needs, calls `check_args(args)` first thing in `main`
(every out-of-range value in one UserError, exit code 2), then `print_config(args)` once:

    group                          flags                                                  used by
    add_model_flags(p, base_help)  --base --cache-dir --load-in-4bit --trust-remote-code  every script that loads a base;
                                   --cpu-dtype (resolved by precision.cpu_precision)
                                                                                          ModelOptions.from_args(args).load()
    add_persona_flags(p, root, ..) --persona | --adapter, --adapters-root,                chat.py, compare.py;
                                   --allow-base-mismatch                                  export.py (one persona)
    add_personas_flags(p, root)    --personas | --adapters, --adapters-root,              multi_compare.py;
                                   --allow-base-mismatch                                  serve.py (the personas it serves)
    add_decoding_flags(p, sample)  --sample/--greedy --temperature ... --min-reply-chars  chat.py, compare.py, multi_compare.py,
                                                                                          serve.py (its defaults per request);
                                                                                          decoding_from_args(args) -> Decoding
    add_memory_flags(p, max_ctx)   --memory --memory-turns --retrieve-k --max-context     chat.py
    add_training_flags(p)          LoRA, optimisation and validation groups              llm.py; train.TrainConfig.from_args
    training_parser(root)          llm.py's whole parser (what to train + model + above)  llm.py, benchmarks that train
    add_run_flags(p, root)         --prompts --limit --batch-size --too-short-units ...   compare.py, multi_compare.py (through
                                                                                          comparison.add_*compare_flags)

`check_args` validates by destination name whatever flags a script has (table RANGES): a name has
one valid range everywhere (`--seed` seeds training in llm.py and sampling elsewhere, `--batch-size`
counts rows in both). A new flag with a range gets a RANGES entry. This module imports nothing
heavy, so `--help` stays instant.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, TextIO

from .errors import UserError
from .generation import Decoding

ON_OFF_AUTO = ["auto", "yes", "no"]


# ---- the groups ----------------------------------------------------------------------------

def add_model_flags(p: argparse.ArgumentParser, base_help: str = "(default: embedded SmolLM2-135M-Instruct)") -> None:
    """Which base model to load and how; `base_help` says what an absent --base means for this script."""
    g = p.add_argument_group("model loading")
    g.add_argument("--base", default=None, help=f"base model: Hugging Face id or local folder {base_help}")
    g.add_argument("--cache-dir", default=None, help="where the embedded base is converted (default: $PERSONAKIT_CACHE or ~/.cache/personakit)")
    g.add_argument("--load-in-4bit", default="auto", choices=ON_OFF_AUTO, help="nf4 4-bit base: auto = on CUDA with bitsandbytes")
    g.add_argument("--trust-remote-code", action="store_true", help="allow a base model that ships its own Python code")
    g.add_argument("--cpu-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="precision on a CPU (ignored on CUDA): auto = bf16 where a one-off matmul probe, cached per CPU, "
                        "finds it at least 1.5x faster than fp32 (AMX, AVX-512 BF16), else fp32. bf16 speeds up training "
                        "(autocast; LoRA weights and optimizer state stay fp32); generation stays fp32, so greedy replies "
                        "do not depend on the machine or the batch")


@dataclass(frozen=True)
class ModelOptions:
    """The add_model_flags values: which base to load and how."""

    base: str | None
    cache_dir: str | None
    load_in_4bit: str
    trust_remote_code: bool
    cpu_dtype: str = "auto"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelOptions:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def load(self, base: str | None = None, training: bool = False) -> Any:
        """The base (`base` overrides --base, e.g. with the one persona.json records) as a loading.LoadedBase."""
        from .loading import load_base

        return load_base(base or self.base, cache_dir=self.cache_dir, load_in_4bit=self.load_in_4bit,
                         trust_remote_code=self.trust_remote_code, cpu_dtype=self.cpu_dtype, training=training)


def add_persona_flags(p: argparse.ArgumentParser, root: Path, absent: str) -> None:
    """One persona by name or by folder; `absent` says what no --persona/--adapter means for this script."""
    g = p.add_argument_group("persona")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--persona", default=None, help=f"persona name under --adapters-root (default: {absent})")
    which.add_argument("--adapter", default=None, help="adapter folder written by llm.py, instead of --persona")
    _add_adapter_root(g, root)


def add_personas_flags(p: argparse.ArgumentParser, root: Path) -> None:
    """Several personas by name or by folder (default: every adapter under --adapters-root)."""
    g = p.add_argument_group("personas")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--personas", nargs="+", default=None, help="persona names under --adapters-root (default: every adapter there)")
    which.add_argument("--adapters", nargs="+", default=None, help="adapter folders written by llm.py")
    _add_adapter_root(g, root)


def _add_adapter_root(g: Any, root: Path) -> None:
    g.add_argument("--adapters-root", default=str(root / "adapters"), help="folder holding one adapter folder per persona")
    g.add_argument("--allow-base-mismatch", action="store_true", help="attach adapters whose recorded base fingerprint differs from the loaded base")


def add_decoding_flags(p: argparse.ArgumentParser, *, sample: bool) -> None:
    """One flag per `Decoding` field; `sample` picks the script's default mode (chat samples, reports are greedy)."""
    g = p.add_argument_group("decoding")
    g.add_argument("--sample", dest="do_sample", action="store_true", default=sample, help="sample with temperature/top-p/top-k")
    g.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding (deterministic)")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    # 1.15 from the quality benchmark (reply-only scope, the default adapters): every persona at 100%
    # persona markers and 12/13 keyword prompts; at 1.1 one persona fell to 9/13, at 1.0 markers
    # fell to 81% and a loop came back, at 1.2 still 12/13 but girl's markers fell to 94%.
    g.add_argument("--repetition-penalty", type=float, default=1.15, help="penalty on tokens already generated (1 = off)")
    # transformers applies both repetition controls to the prompt as well; a persona's system prompt
    # that names its habit ("I usually...") and every keyword of the user's message are then
    # penalised. Measured on the lr-3e-4 adapters at penalty 1.1 (quality benchmark): the reply only took
    # persona markers from 75% to 100% (jiangjian) and 81% to 94% (peixuan), and keyword coverage
    # from 62% to 85% (base), 77% to 92% (jiangjian) and 69% to 92% (peixuan).
    g.add_argument("--repetition-scope", choices=["reply", "all"], default="reply",
                   help="what the repetition controls look at: the reply so far, or prompt + reply (transformers' default)")
    # 4 blocks the sign-off loops small persona fine-tunes fall into while leaving ordinary
    # repeated words alone (see BENCHMARKS.md, Quality).
    g.add_argument("--no-repeat-ngram-size", type=int, default=4, help="forbid repeating any token n-gram of this size (0 = off)")
    g.add_argument("--max-new-tokens", type=int, default=160, help="reply length limit in tokens")
    g.add_argument("--seed", type=int, default=1234, help="random seed for sampling")
    g.add_argument("--min-reply-chars", type=int, default=0, help="regenerate once, asking for more, when a reply is shorter (0 = off)")


def decoding_from_args(args: argparse.Namespace) -> Decoding:
    return Decoding(**{f.name: getattr(args, f.name) for f in fields(Decoding)})


DEFAULT_MAX_CONTEXT = 2048  # tokens for prompt plus reply when --max-context is not given (capped by the base's own)


MEMORY_MODES = {
    "recent": "last N exchanges",
    "retrieval": "also bring back relevant earlier ones",
    "summary": "also a running note the model writes of older ones",
}


def add_memory_flags(p: argparse.ArgumentParser, default_max_context: int = DEFAULT_MAX_CONTEXT,
                     modes: tuple[str, ...] = ("recent", "retrieval")) -> None:
    """What a multi-turn conversation keeps in the prompt (`modes`: the --memory choices this script offers)."""
    g = p.add_argument_group("memory")
    g.add_argument("--memory", default="recent", choices=list(modes), help="; ".join(f"{m}: {MEMORY_MODES[m]}" for m in modes))
    g.add_argument("--memory-turns", type=int, default=4, help="how many recent exchanges go into the prompt")
    g.add_argument("--retrieve-k", type=int, default=2, help="earlier exchanges brought back by --memory retrieval")
    g.add_argument("--max-context", type=int, default=None, help=f"tokens for prompt plus reply; oldest memory is dropped to fit (default: the base's context, at most {default_max_context})")


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """LoRA, optimisation and validation flags of llm.py (what `train.TrainConfig.from_args` reads)."""
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=int, default=32, help="LoRA scaling alpha")
    # No dropout by default: on CPU it cost 14% of each step (profiled), and the held-out split
    # with early stopping and best-checkpoint selection already guards against memorising.
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    g.add_argument("--target-modules", nargs="+", default=None, help="linear layer names to adapt (default: every attention and MLP projection)")
    g = p.add_argument_group("optimisation")
    # Chosen with the quality benchmark (BENCHMARKS.md, Quality), on girl at penalty 1.1: 3e-4 gave 94%
    # persona markers but lost relevance (keyword coverage 77%, the base's 85%); 2e-4 kept it (85%)
    # but markers fell to 88%; 2.5e-4 gave 100% and 92%. The best held-out checkpoint is kept.
    g.add_argument("--learning-rate", type=float, default=2.5e-4, help="peak learning rate")
    g.add_argument("--epochs", type=float, default=3.0, help="passes over the training rows")
    # Small data (issue 15): on 130 jiangjian rows, 3 epochs (45 steps) still had its best val loss at the
    # last step and reached 81% persona markers; 75 steps (5 epochs, as 3 epochs of ~200 rows) gave 100%,
    # keyword coverage 85% (base 77%) and held-out perplexity ratio 0.43 instead of 0.49. Datasets of ~200 rows
    # and more already take 75 steps in 3 epochs, so the tuned defaults there are unchanged.
    g.add_argument("--min-steps", type=int, default=75,
                   help="with rows held out, train at least this many optimizer steps, so small datasets get more epochs "
                        "(the best held-out checkpoint is still the one kept; 0 = off)")
    g.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (overrides --epochs; -1 = none)")
    g.add_argument("--batch-size", type=int, default=8, help="rows per device batch")
    g.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    g.add_argument("--max-length", type=int, default=512, help="max tokens per example; oldest history is dropped to fit")
    g.add_argument("--warmup-ratio", type=float, default=0.05, help="share of steps with linear warmup")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--seed", type=int, default=42, help="seed for the split, LoRA init and data order")
    # Off (issue 15): on 130 jiangjian rows, 0.25 (9 rows kept; the base's other answers ran past the token
    # limit) left persona markers at 81%, keyword coverage at 92% and the ppl ratio at 0.49, attribution 81% -> 69%.
    g.add_argument("--replay-fraction", type=float, default=0.0,
                   help="mix in the base's own greedy answers to this share of the training prompts, to keep answering the question (0 = off)")
    g = p.add_argument_group("validation")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of rows held out, at least 10 (none below 50 rows)")
    g.add_argument("--eval-steps", type=int, default=0, help="evaluate and checkpoint every N steps (0 = about 6 times per run)")
    g.add_argument("--early-stopping-patience", type=int, default=2, help="stop after N evaluations without a better val loss (0 = never)")
    g.add_argument("--keep-last", action="store_true", help="keep the final weights instead of the best checkpoint by val loss")


def training_parser(root: Path, description: str | None = None) -> argparse.ArgumentParser:
    """llm.py's parser: what to train and where, model loading, and the training groups (train.TrainJob,
    ModelOptions and train.TrainConfig read its values)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--persona", required=True, help="persona name; the adapter goes to <output-root>/<persona>/")
    g.add_argument("--data", required=True, help="canonical JSONL written by clear_data.py")
    g.add_argument("--system", default=None, help="system prompt used in training and reused by chat/compare (default: a short neutral persona line)")
    g.add_argument("--output-root", default=str(root / "adapters"), help="folder that holds one adapter folder per persona")
    g.add_argument("--overwrite", action="store_true", help="replace an existing adapter folder of this persona")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    g.add_argument("--dry-run", action="store_true", help="print a rendered example, counts and LoRA modules, then exit")
    add_model_flags(p)
    add_training_flags(p)
    return p


def add_run_flags(p: argparse.ArgumentParser, root: Path) -> None:
    """Prompt set, batching and metric flags of the comparison runs (model and decoding flags are separate groups)."""
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts", default=str(root / "data" / "prompts.jsonl"), help="prompt set: JSONL rows with prompt, optional id, category, keywords, history")
    g.add_argument("--limit", type=int, default=None, help="use only the first N prompts (quick runs)")
    g = p.add_argument_group("run")
    # 16 rows cost 14 ms per reply token on 2 CPU cores against 20 ms for 8 (measured, embedded
    # model); for a 1.8B base on an 8 GB card 16 rows of ~400 tokens need ~1.3 GB of KV cache.
    g.add_argument("--batch-size", type=int, default=16, help="prompts generated together (and held-out replies scored together)")
    g.add_argument("--too-short-units", type=int, default=5, help="a reply under this many units (CJK characters + latin words) is too short")
    g.add_argument("--personas-json", default=str(root / "data" / "personas.json"), help="persona descriptions with marker regexes per language")


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
