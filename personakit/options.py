"""Every flag group as a dataclass: each field's default and help, defined once.

Library code builds these directly (`TrainConfig(max_steps=2)`, `Decoding(do_sample=True)`); the
scripts' parsers are generated from them by flags.py, and `from_args` reads parsed flags back by
name. Why each tuned default has its value: BENCHMARKS.md ("Defaults"). Imports nothing heavy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Self

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ON_OFF_AUTO = ("auto", "yes", "no")
CPU_DTYPES = ("auto", "fp32", "bf16")
DEFAULT_MAX_CONTEXT = 2048  # tokens for prompt plus reply when --max-context is not given (capped by the base's own)
MEMORY_MODES = {
    "recent": "last N exchanges",
    "retrieval": "also bring back relevant earlier ones",
    "summary": "also a running note the model writes of older ones",
}
EXPORT_FORMATS = ("merged", "gguf", "ollama")
EXPORT_QUANTS = ("f16", "q8_0")
REQUIRED: Any = object()  # a field without a default: a required flag


def option(default: Any, help: str, *, group: str | None = None, **cli: Any) -> Any:
    """A dataclass field with its flag's help; `group` is the --help section, `cli` what flags.py needs beyond the
    field's type (choices, flag: another flag name, negative: (flag, help) of a second flag setting it False,
    one_of: mutually exclusive with the other one_of fields of its group)."""
    metadata = {"help": help, "group": group, **cli}
    return field(metadata=metadata) if default is REQUIRED else field(default=default, metadata=metadata)


class Options:
    """What every option group shares: built from parsed flags, and back to a flat dict."""

    @classmethod
    def from_args(cls, args: Any) -> Self:
        """The fields read by name from parsed flags (an argparse.Namespace); one the script lacks keeps its default."""
        values = vars(args)
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- model loading -------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ModelOptions(Options):
    """Which base to load and how."""

    base: str | None = option(None, "base model: Hugging Face id or local folder {base_help}", group="model loading")
    cache_dir: str | None = option(None, "where the embedded base is converted (default: $PERSONAKIT_CACHE or ~/.cache/personakit)",
                                   group="model loading")
    load_in_4bit: str = option("auto", "nf4 4-bit base: auto = on CUDA with bitsandbytes", group="model loading", choices=ON_OFF_AUTO)
    trust_remote_code: bool = option(False, "allow a base model that ships its own Python code", group="model loading")
    cpu_dtype: str = option(
        "auto", "precision on a CPU (ignored on CUDA): auto = bf16 where a one-off matmul probe, cached per CPU, "
                "finds it at least 1.5x faster than fp32 (AMX, AVX-512 BF16), else fp32. bf16 speeds up training "
                "(autocast; LoRA weights and optimizer state stay fp32); generation stays fp32, so greedy replies "
                "do not depend on the machine or the batch", group="model loading", choices=CPU_DTYPES)

    def load(self, base: str | None = None, training: bool = False) -> Any:
        """The base (`base` overrides --base, e.g. with the one persona.json records) as a loading.LoadedBase."""
        from .loading import load_base

        return load_base(base or self.base, cache_dir=self.cache_dir, load_in_4bit=self.load_in_4bit,
                         trust_remote_code=self.trust_remote_code, cpu_dtype=self.cpu_dtype, training=training)


# ---- which personas ------------------------------------------------------------------------

def _adapters_root(group: str) -> Any:
    return option(str(PROJECT_ROOT / "adapters"), "folder holding one adapter folder per persona", group=group)


def _allow_base_mismatch(group: str) -> Any:
    return option(False, "attach adapters whose recorded base fingerprint differs from the loaded base", group=group)


@dataclass(frozen=True, kw_only=True)
class PersonaChoice(Options):
    """One persona by name or by folder; none given means what the script says in `{absent}`."""

    persona: str | None = option(None, "persona name under --adapters-root (default: {absent})", group="persona", one_of=True)
    adapter: str | None = option(None, "adapter folder written by llm.py, instead of --persona", group="persona", one_of=True)
    adapters_root: str = _adapters_root("persona")
    allow_base_mismatch: bool = _allow_base_mismatch("persona")


@dataclass(frozen=True, kw_only=True)
class PersonasChoice(Options):
    """Several personas by name or by folder (default: every adapter under adapters_root)."""

    personas: list[str] | None = option(None, "persona names under --adapters-root (default: every adapter there)",
                                        group="personas", one_of=True)
    adapters: list[str] | None = option(None, "adapter folders written by llm.py", group="personas", one_of=True)
    adapters_root: str = _adapters_root("personas")
    allow_base_mismatch: bool = _allow_base_mismatch("personas")


# ---- decoding ------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Decoding(Options):
    """How replies are generated; greedy unless `do_sample` (chat.py and serve.py sample by default, reports do not)."""

    do_sample: bool = option(False, "sample with temperature/top-p/top-k", group="decoding", flag="--sample",
                             negative=("--greedy", "greedy decoding (deterministic)"))
    temperature: float = option(0.7, "sampling temperature", group="decoding")
    top_p: float = option(0.9, "nucleus sampling mass", group="decoding")
    top_k: int = option(50, "sample among the k most likely tokens (0 = all)", group="decoding")
    # 1.15, like the other tuned defaults, chosen with the quality benchmark (BENCHMARKS.md, Defaults).
    repetition_penalty: float = option(1.15, "penalty on tokens already generated (1 = off)", group="decoding")
    # "reply" (ours): transformers' "all" also penalises the system prompt's and the user's words,
    # exactly the ones a persona's reply should reuse.
    repetition_scope: str = option("reply", "what the repetition controls look at: the reply so far, or prompt + reply "
                                            "(transformers' default)", group="decoding", choices=("reply", "all"))
    no_repeat_ngram_size: int = option(4, "forbid repeating any token n-gram of this size (0 = off)", group="decoding")
    max_new_tokens: int = option(160, "reply length limit in tokens", group="decoding")
    seed: int = option(1234, "random seed for sampling", group="decoding")
    min_reply_chars: int = option(0, "regenerate once, asking for more, when a reply is shorter (0 = off)", group="decoding")


# ---- conversation memory -------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class MemoryOptions(Options):
    """What a multi-turn conversation keeps in the prompt."""

    memory: str = option("recent", "; ".join(f"{m}: {d}" for m, d in MEMORY_MODES.items()), group="memory",
                         choices=tuple(MEMORY_MODES))
    memory_turns: int = option(4, "how many recent exchanges go into the prompt", group="memory")
    retrieve_k: int = option(2, "earlier exchanges brought back by --memory retrieval", group="memory")
    max_context: int | None = option(None, "tokens for prompt plus reply; oldest memory is dropped to fit "
                                           "(default: the base's context, at most {default_max_context})", group="memory")


# ---- training ------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class TrainJob(Options):
    """Which persona to train from which data, and where its adapter folder goes."""

    persona: str = option(REQUIRED, "persona name; the adapter goes to <output-root>/<persona>/", group="what to train")
    data: str = option(REQUIRED, "canonical JSONL written by clear_data.py", group="what to train")
    system: str | None = option(None, "system prompt used in training and reused by chat/compare (default: a short neutral persona line)",
                                group="what to train")
    output_root: str = option(str(PROJECT_ROOT / "adapters"), "folder that holds one adapter folder per persona", group="what to train")
    overwrite: bool = option(False, "replace an existing adapter folder of this persona", group="what to train")
    resume: bool = option(False, "continue an interrupted run from its last checkpoint", group="what to train")
    dry_run: bool = option(False, "print a rendered example, counts and LoRA modules, then exit", group="what to train")

    @property
    def final_dir(self) -> Path:
        return Path(self.output_root) / self.persona

    @property
    def work_dir(self) -> Path:
        """Checkpoints of a run in progress; kept after a crash so that --resume can continue."""
        return Path(self.output_root) / f".{self.persona}.work"


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Options):
    """The hyperparameters of one run."""

    lora_r: int = option(16, "LoRA rank", group="LoRA")
    lora_alpha: int = option(32, "LoRA scaling alpha", group="LoRA")
    # Off: dropout costs step time on CPU, and the held-out split with early stopping and the
    # best checkpoint already guards against memorising.
    lora_dropout: float = option(0.0, "dropout on the LoRA input", group="LoRA")
    target_modules: list[str] | None = option(None, "linear layer names to adapt (default: every attention and MLP projection)", group="LoRA")
    learning_rate: float = option(2.5e-4, "peak learning rate", group="optimisation")
    epochs: float = option(3.0, "passes over the training rows", group="optimisation")
    min_steps: int = option(75, "with rows held out, train at least this many optimizer steps, so small datasets get more epochs "
                                "(the best held-out checkpoint is still the one kept; 0 = off)", group="optimisation")
    max_steps: int = option(-1, "stop after this many optimizer steps (overrides --epochs; -1 = none)", group="optimisation")
    batch_size: int = option(8, "rows per device batch", group="optimisation")
    grad_accum: int = option(1, "batches per optimizer step", group="optimisation")
    max_length: int = option(512, "max tokens per example; oldest history is dropped to fit", group="optimisation")
    warmup_ratio: float = option(0.05, "share of steps with linear warmup", group="optimisation")
    weight_decay: float = option(0.0, "AdamW weight decay", group="optimisation")
    seed: int = option(42, "seed for the split, LoRA init and data order", group="optimisation")
    replay_fraction: float = option(0.0, "mix in the base's own greedy answers to this share of the training prompts, "
                                         "to keep answering the question (0 = off)", group="optimisation")
    val_fraction: float = option(0.1, "share of rows held out, at least 10 (none below 50 rows)", group="validation")
    eval_steps: int = option(0, "evaluate and checkpoint every N steps (0 = about 6 times per run)", group="validation")
    early_stopping_patience: int = option(2, "stop after N evaluations without a better val loss (0 = never)", group="validation")
    keep_last: bool = option(False, "keep the final weights instead of the best checkpoint by val loss", group="validation")


# ---- comparison runs -----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class RunOptions(Options):
    """Prompt set, batching and metrics of a comparison run (compare.py, multi_compare.py)."""

    prompts: str = option(str(PROJECT_ROOT / "data" / "prompts.jsonl"),
                          "prompt set: JSONL rows with prompt, optional id, category, keywords, history", group="prompts")
    limit: int | None = option(None, "use only the first N prompts (quick runs)", group="prompts")
    # 16 rows: faster per reply token than 8 on a CPU, with a KV cache that fits an 8 GB card (BENCHMARKS.md, Defaults).
    batch_size: int = option(16, "prompts generated together (and held-out replies scored together)", group="run")
    too_short_units: int = option(5, "a reply under this many units (CJK characters + latin words) is too short", group="run")
    personas_json: str = option(str(PROJECT_ROOT / "data" / "personas.json"), "persona descriptions with marker regexes per language",
                                group="run")


# ---- export --------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ExportOptions(Options):
    """What export.py writes and how."""

    format: str = option(REQUIRED, "merged: Hugging Face folder; gguf: llama.cpp / LM Studio file; ollama: GGUF + Modelfile",
                         group="output", choices=EXPORT_FORMATS)
    out: str = option(REQUIRED, "export folder to create", group="output")
    overwrite: bool = option(False, "replace an existing export folder", group="output")
    quant: str = option("f16", "GGUF weight type", group="output", choices=EXPORT_QUANTS)
    lora_only: bool = option(False, "GGUF of the adapter alone (llama-server --lora), the base's GGUF written once beside the folder",
                             group="output")
    verify: bool = option(True, "skip the round-trip check", group="output", flag="--no-verify")
    cache_dir: str | None = option(None, "embedded base and llama.cpp converter cache (default: $PERSONAKIT_CACHE or ~/.cache/personakit)",
                                   group="output")
