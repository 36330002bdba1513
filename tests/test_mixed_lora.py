"""serve.py's mixed batches: rows of different personas in one forward pass, each with its own adapter."""
from __future__ import annotations

import pytest
import torch

from personakit.evaluation import pick_adapters
from personakit.loading import attach_adapters, load_base, use_adapter
from personakit.mixed_lora import MixedLora


@pytest.fixture()
def two_personas(tiny_model_dir, tiny_adapters):
    loaded = load_base(str(tiny_model_dir), cpu_dtype="fp32")
    return attach_adapters(loaded, pick_adapters(tiny_adapters))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_each_row_of_a_mixed_batch_gets_its_own_persona(two_personas):
    model = two_personas
    ids = torch.randint(5, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    rows = ["girl", "peixuan", None, "girl"]
    alone = []
    for i, name in enumerate(rows):  # PEFT's own path, one row at a time
        with use_adapter(model, name) as m:
            alone.append(logits(m, ids[i:i + 1])[0])
    assert (alone[0] - alone[1]).abs().max() > 1e-3 and (alone[0] - alone[2]).abs().max() > 1e-3  # the personas really differ
    with use_adapter(model, "peixuan") as m:
        peft_batch = logits(m, ids[:2])

    mixed = MixedLora.for_model(model)
    assert mixed is not None
    with mixed.rows(rows) as m:
        together = logits(m, ids)
    for i in range(len(rows)):
        torch.testing.assert_close(together[i], alone[i], atol=1e-5, rtol=1e-5)
    with mixed.rows(["peixuan", "peixuan"]) as m:  # one persona: PEFT's own operations, bit for bit
        assert torch.equal(logits(m, ids[:2]), peft_batch)
    with mixed.rows([None]) as m:
        torch.testing.assert_close(logits(m, ids[2:3])[0], alone[2], atol=0, rtol=0)


def test_adapters_that_are_not_plain_lora_are_left_to_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_base(str(tiny_model_dir), cpu_dtype="fp32").model,
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True), adapter_name="dora")
    ids = torch.tensor([[5, 6, 7, 8]])
    before = logits(model, ids)
    assert MixedLora.for_model(model) is None
    assert torch.equal(logits(model, ids), before)  # nothing was switched off
