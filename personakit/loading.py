"""One loading path for every script: base model (4-bit on CUDA, plain on CPU), LoRA targets, adapters."""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

from .base_model import BaseRef, fingerprint, resolve_base
from .distributed import local_rank
from .errors import UserError
from .persona import AdapterInfo
from .precision import Precision


@dataclass
class LoadedBase:
    model: Any
    tokenizer: Any
    ref: BaseRef
    fingerprint: str
    device: str
    dtype: Any
    quantized: bool
    # On CPU, what training runs in (--cpu-dtype resolved by the probe); None on CUDA, where `dtype` decides.
    cpu_precision: Precision | None = None


@dataclass(frozen=True)
class BaseOptions:
    """Which base to load and how, and whether adapters of another base may join it (the model flags)."""

    base: str | None
    cache_dir: str | None
    load_in_4bit: str
    trust_remote_code: bool
    cpu_dtype: str
    allow_base_mismatch: bool

    @classmethod
    def from_args(cls, args: Any) -> BaseOptions:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


_NO_KERNELS_NOTICE = _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community")


def quiet_libraries() -> None:
    """Silence the library messages known to be noise for our users, each by module and message.

    Everything else (a new deprecation after an upgrade, a real problem) still shows. Call it
    before peft or trl is imported: importing peft imports bitsandbytes.
    """
    # bitsandbytes logs this at import on CPUs with AVX512-bf16 when the optional `kernels`
    # package is absent; it only concerns 4-bit matmuls on CPU, which we never run.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NO_KERNELS_NOTICE)
    # peft (0.21) reads the deprecated `is_gradient_checkpointing` when wrapping a model for
    # training; the warning is about peft's code, not ours, and repeats on every run.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                            module="transformers.modeling_utils")


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(device: str) -> Any:
    """bf16 where the GPU supports it, else fp16; fp32 on CPU.

    Measured on the CI CPU (AVX2, no AMX): fp32 matmul 146 GFLOP/s, bf16 0.9 GFLOP/s.
    """
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def bitsandbytes_ready() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def quantization_config(load_in_4bit: str, device: str) -> Any | None:
    """nf4 + double quantization when asked ('yes') or possible ('auto'); None for a plain load."""
    if load_in_4bit not in ("auto", "yes", "no"):
        raise UserError(f"--load-in-4bit must be auto, yes or no, not {load_in_4bit!r}")
    if load_in_4bit == "no" or (load_in_4bit == "auto" and not (device == "cuda" and bitsandbytes_ready())):
        return None
    if device != "cuda" or not bitsandbytes_ready():
        raise UserError("--load-in-4bit yes needs a CUDA GPU with bitsandbytes installed; use --load-in-4bit auto or no on this machine")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(device),
    )


def refuse_original_qwen(ref: BaseRef) -> None:
    """The first Qwen generation (model_type "qwen", e.g. Qwen-1.8B-Chat, the original write-up's base)
    has no chat template and runs only through its own remote code, written for transformers 4.x."""
    import json

    if json.loads((Path(ref.folder) / "config.json").read_text(encoding="utf-8")).get("model_type") == "qwen":
        raise UserError(
            f"{ref.base_id} is a first-generation Qwen model (model_type 'qwen', like Qwen-1.8B-Chat), which needs "
            f"its own code written for transformers 4.x and has no chat template; use Qwen/Qwen1.5-1.8B-Chat instead "
            f"(same size, same 151,936-token vocabulary and ChatML format, supported by transformers itself)"
        )


def load_base(
    base: str | None,
    *,
    cache_dir: str | Path | None = None,
    load_in_4bit: str = "auto",
    trust_remote_code: bool = False,
    cpu_dtype: str = "fp32",
    training: bool = False,
) -> LoadedBase:
    """Load tokenizer and causal LM for `--base` (None = embedded SmolLM2) on the best device.

    On CPU `cpu_dtype` is resolved here (one line on stderr): training keeps fp32 weights and uses it
    as autocast (train.run_training); generation loads bf16 weights only for an explicit bf16.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    ref = resolve_base(base, cache_dir)
    refuse_original_qwen(ref)
    device = pick_device()
    dtype = compute_dtype(device)
    precision = None
    if device == "cpu":
        import sys

        import torch

        from .base_model import default_cache_dir
        from .precision import cpu_precision

        precision = cpu_precision(cpu_dtype, default_cache_dir(cache_dir))
        print(precision.describe(), file=sys.stderr, flush=True)
        if precision.generation == "bf16" and not training:
            dtype = torch.bfloat16
    quant = quantization_config(load_in_4bit, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            ref.folder,
            dtype=dtype,
            quantization_config=quant,
            # each process of `accelerate launch` on its own GPU (LOCAL_RANK), not all on GPU 0
            device_map={"": local_rank()} if device == "cuda" else None,
            trust_remote_code=trust_remote_code,
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"{ref.base_id} needs custom code; re-run with --trust-remote-code if you trust its source") from None
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedBase(model, tokenizer, ref, fingerprint(Path(ref.folder)), device, dtype, quant is not None, precision)


def load_for_chat(options: BaseOptions, adapters: list[AdapterInfo], base: str | None = None) -> tuple[LoadedBase, Any]:
    """The base (`options.base`, else `base`) with a chat template, and the model with `adapters` attached (the base alone for none)."""
    from .template import require_chat_template

    loaded = load_base(options.base or base, cache_dir=options.cache_dir, load_in_4bit=options.load_in_4bit,
                       trust_remote_code=options.trust_remote_code, cpu_dtype=options.cpu_dtype)
    require_chat_template(loaded.tokenizer)
    return loaded, attach_adapters(loaded, adapters, options.allow_base_mismatch) if adapters else loaded.model


def linear_layer_names(model: Any) -> list[str]:
    """Distinct leaf names of the model's linear layers (plain or 4-bit), output head excluded."""
    import torch

    names: set[str] = set()
    output = model.get_output_embeddings()
    for full_name, module in model.named_modules():
        if module is output:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_target_modules(model: Any, requested: list[str] | None) -> list[str]:
    """Every attention and MLP projection by default; user names must each match a linear layer."""
    available = linear_layer_names(model)
    if not available:
        raise UserError(f"{type(model).__name__} has no linear layers to put LoRA on; pick another base model")
    if not requested:
        return available
    missing = [name for name in requested if name not in available]
    if missing:
        raise UserError(
            f"--target-modules {', '.join(missing)} match no linear layer of this model; "
            f"its linear layers are: {', '.join(available)}"
        )
    return list(requested)


def check_base_match(info: AdapterInfo, loaded: LoadedBase, allow_mismatch: bool = False) -> None:
    if info.base_fingerprint == loaded.fingerprint or allow_mismatch:
        return
    raise UserError(
        f"adapter {info.path} was trained on base {info.base_id} (fingerprint {info.base_fingerprint}) "
        f"but the loaded base is {loaded.ref.base_id} (fingerprint {loaded.fingerprint}); pass "
        f"--base {info.base_id} or --allow-base-mismatch if you know they are the same weights"
    )


def attach_adapters(loaded: LoadedBase, adapters: list[AdapterInfo], allow_mismatch: bool = False) -> Any:
    """Put every adapter onto the one loaded base; returns the PeftModel (switch with `use_adapter`)."""
    from peft import PeftModel

    if not adapters:
        raise UserError("no adapters to attach")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise UserError(f"two adapters share a persona name ({', '.join(names)}); rename one adapter folder's persona")
    for info in adapters:
        check_base_match(info, loaded, allow_mismatch)
    model = PeftModel.from_pretrained(loaded.model, str(adapters[0].path), adapter_name=adapters[0].name)
    for info in adapters[1:]:
        model.load_adapter(str(info.path), adapter_name=info.name)
    model.eval()
    return model


@contextlib.contextmanager
def use_adapter(model: Any, name: str | None) -> Iterator[Any]:
    """Run the block with persona `name` active, or with every adapter disabled for None (the base)."""
    if not hasattr(model, "peft_config"):
        if name is not None:
            raise UserError(f"persona {name} is not loaded")
        yield model
        return
    if name is None:
        with model.disable_adapter():
            yield model
        return
    if name not in model.peft_config:
        raise UserError(f"persona {name} is not loaded; loaded: {', '.join(model.peft_config)}")
    model.set_adapter(name)
    yield model


@contextlib.contextmanager
def generating_with(model: Any, name: str | None, quantized: bool) -> Iterator[Any]:
    """Like `use_adapter`, but on an unquantized base the adapter is merged into the weights for
    the block: generation then runs at the base's speed (the unmerged LoRA path costs ~15% per
    decoding step on CPU, measured). 4-bit weights cannot take a merge without requantizing, so
    they keep the unmerged path. The merge is undone on the way out.
    """
    if name is None or quantized or not hasattr(model, "peft_config"):
        with use_adapter(model, name) as m:
            yield m
        return
    with use_adapter(model, name) as m:
        m.merge_adapter([name])
        try:
            yield m
        finally:
            m.unmerge_adapter()
