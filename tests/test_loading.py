"""One loading path: base on CPU, 4-bit refusal, LoRA targets, adapters switchable on one base."""
from __future__ import annotations

import pytest
import torch

from personakit.errors import UserError
from personakit.generation import Decoding, generate_replies
from personakit.loading import attach_adapters, load_base, quantization_config, resolve_target_modules, use_adapter
from personakit.persona import find_persona, read_adapter


def test_cpu_load_is_plain_fp32(tiny_model_dir):
    loaded = load_base(str(tiny_model_dir))
    assert loaded.device == "cpu" and not loaded.quantized
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.ref.base_id == str(tiny_model_dir.resolve())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_forcing_4bit_without_cuda_is_a_clear_error():
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        quantization_config("yes", "cpu")
    assert quantization_config("auto", "cpu") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_load_is_nf4_double_quant(tiny_model_dir):
    config = quantization_config("auto", "cuda")
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant


def test_auto_targets_cover_attention_and_mlp(tiny_model_dir):
    model = load_base(str(tiny_model_dir)).model
    assert resolve_target_modules(model, None) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert resolve_target_modules(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]


def test_unknown_target_module_lists_the_linear_layers(tiny_model_dir):
    model = load_base(str(tiny_model_dir)).model
    with pytest.raises(UserError, match="its linear layers are: down_proj, gate_proj"):
        resolve_target_modules(model, ["query_key_value"])


def test_adapters_switch_on_one_base(tiny_model_dir, tiny_adapters):
    loaded = load_base(str(tiny_model_dir))
    infos = [find_persona(name, tiny_adapters) for name in ("girl", "peixuan")]
    model = attach_adapters(loaded, infos)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    logits = {}
    for name in (None, "girl", "peixuan", None):
        with use_adapter(model, name), torch.no_grad():
            logits.setdefault(name, []).append(model(input_ids=ids).logits)
    assert torch.equal(logits[None][0], logits[None][1])
    assert not torch.allclose(logits["girl"][0], logits[None][0])
    assert not torch.allclose(logits["girl"][0], logits["peixuan"][0])


def test_adapter_from_another_base_is_refused(tiny_model_dir, tiny_adapters, tmp_path):
    from conftest import build_tiny_model

    other = load_base(str(build_tiny_model(tmp_path / "other", seed=1)))
    info = read_adapter(tiny_adapters / "girl")
    with pytest.raises(UserError, match="was trained on base"):
        attach_adapters(other, [info])
    assert attach_adapters(other, [info], allow_mismatch=True) is not None


def test_unknown_persona_lists_those_found(tiny_adapters):
    with pytest.raises(UserError, match="found: girl, peixuan"):
        find_persona("bob", tiny_adapters)


def test_embedded_model_generates_a_reply(embedded_dir):
    loaded = load_base(str(embedded_dir))
    decoding = Decoding(do_sample=False, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1, no_repeat_ngram_size=0,
                        max_new_tokens=24, seed=0, min_reply_chars=0)
    conversation = [{"role": "system", "content": "You are a friendly assistant."},
                    {"role": "user", "content": "What is a good breakfast before an exam?"}]
    reply = generate_replies(loaded.model, loaded.tokenizer, [conversation], decoding)[0]
    assert len(reply.text.split()) >= 3 and reply.new_tokens > 0
