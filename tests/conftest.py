"""Fixtures: a tiny randomly initialised model with a real tokenizer trained here, and the embedded base."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# The tiny tokenizer's training text: a fixed set of files, so that adding data elsewhere (such as
# data/en/fresh/) does not change every tiny model's vocabulary and the replies tests compare.
CORPUS_GLOBS = ("*.jsonl", "en/*.jsonl", "raw/*.jsonl")


def _corpus() -> list[str]:
    texts = []
    for path in sorted(p for pattern in CORPUS_GLOBS for p in (ROOT / "data").glob(pattern)):
        texts.append(path.read_text(encoding="utf-8"))
    texts.append("Hello there! How are you? I usually study at night. 你好，最近怎么样？加油！（其实我也是）")
    return texts


def build_tiny_model(out: Path, chat_template: str | None = CHATML, seed: int = 0) -> Path:
    """A real Llama-architecture model (random weights) plus a byte-level BPE tokenizer trained here."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The embedded model's converted folder is shared by the whole suite (and the user's cache)."""
    return Path(os.environ.get("PERSONAKIT_CACHE", Path.home() / ".cache" / "personakit"))


@pytest.fixture(scope="session")
def embedded_dir(cache_dir) -> Path:
    from personakit.base_model import ensure_embedded

    return ensure_embedded(cache_dir)


def train_persona(base: Path, data: Path, root: Path, persona: str, *extra: str) -> Path:
    """Run the real llm.py CLI for a few steps; returns the adapter folder."""
    import llm

    code = llm.main(llm.parse_args([
        "--persona", persona, "--data", str(data), "--base", str(base), "--output-root", str(root),
        "--max-steps", "2", "--batch-size", "4", "--val-fraction", "0", "--learning-rate", "1e-3", *extra,
    ]))
    assert code == 0
    return root / persona


def head_rows(src: Path, n: int, out: Path) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()[:n]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> Path:
    """adapters/ root with two personas (girl, peixuan) trained for two steps on the tiny model."""
    tmp = tmp_path_factory.mktemp("tiny_adapters")
    root = tmp / "adapters"
    for persona in ("girl", "peixuan"):
        data = head_rows(ROOT / "data" / "en" / f"{persona}.jsonl", 24, tmp / f"{persona}.jsonl")
        train_persona(tiny_model_dir, data, root, persona)
    return root


@pytest.fixture(scope="session")
def embedded_adapter(embedded_dir, tmp_path_factory) -> Path:
    """An adapter of the English girl persona trained for a few steps on the embedded base."""
    tmp = tmp_path_factory.mktemp("embedded_adapter")
    data = head_rows(ROOT / "data" / "en" / "girl.jsonl", 40, tmp / "girl.jsonl")
    return train_persona(Path("embedded"), data, tmp / "adapters", "girl", "--max-steps", "4")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 with Qwen's real tokenizer (151,936-row vocabulary) and Qwen1.5's chat template."""
    from bench.standins import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("qwen") / "tiny-qwen2", "qwen1.5")


@pytest.fixture(autouse=True)
def _saved_sessions_stay_out_of_the_repository(monkeypatch, tmp_path):
    """chat.py saves every exchange by default: in tests it goes to the test's own folder, so a test run
    leaves nothing in conversations/ and the next run's `chat.py --once` resumes nothing."""
    import chat

    monkeypatch.setattr(chat, "CONVERSATIONS", tmp_path / "saved-conversations")
