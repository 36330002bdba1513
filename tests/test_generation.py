"""Decoding shared by chat and the reports: reply-only repetition controls, merged adapters, the greedy search that drops finished rows."""
from __future__ import annotations

import torch

from personakit.generation import Decoding, generate_kwargs
from personakit.loading import load_base


def _decoding(**over) -> Decoding:
    base = dict(do_sample=False, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.5,
                no_repeat_ngram_size=2, max_new_tokens=12, seed=0, min_reply_chars=0)
    return Decoding(**{**base, **over})


def _apply(kwargs: dict, ids: list[int], vocab: int = 20) -> torch.Tensor:
    scores = torch.ones(1, vocab)
    for processor in kwargs["logits_processor"]:
        scores = processor(torch.tensor([ids]), scores)
    return scores[0]


def test_repetition_controls_leave_prompt_tokens_alone(tiny_model_dir):
    tokenizer = load_base(str(tiny_model_dir)).tokenizer
    prompt, reply = [3, 4, 5, 6], [7, 8, 7]
    kwargs = generate_kwargs(tokenizer, _decoding(), prompt_width=len(prompt))
    scores = _apply(kwargs, prompt + reply)
    # prompt tokens keep their score: a persona may say what its system prompt or the user said
    assert scores[[3, 4, 5, 6]].tolist() == [1.0] * 4
    # tokens of the reply so far are penalised, and "7 8" may not be repeated after "7"
    assert scores[7].item() < 1.0 and scores[8].item() == float("-inf")
    # nothing to do before the first reply token
    assert torch.equal(_apply(kwargs, prompt), torch.ones(20))


def test_repetition_scope_all_is_transformers_own_behaviour(tiny_model_dir):
    tokenizer = load_base(str(tiny_model_dir)).tokenizer
    kwargs = generate_kwargs(tokenizer, _decoding(repetition_scope="all"), prompt_width=4)
    assert kwargs["repetition_penalty"] == 1.5 and kwargs["no_repeat_ngram_size"] == 2
    assert "logits_processor" not in kwargs


def test_merged_generation_matches_the_adapter_and_is_undone(tiny_model_dir, tiny_adapters):
    from personakit.generation import generate_replies
    from personakit.loading import attach_adapters, generating_with, use_adapter
    from personakit.persona import read_adapter

    loaded = load_base(str(tiny_model_dir))
    model = attach_adapters(loaded, [read_adapter(tiny_adapters / "girl")])
    # two optimizer steps leave the tiny adapter close to zero; give it a clearly visible effect
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    conversations = [[{"role": "user", "content": "what should I eat tonight"}], [{"role": "user", "content": "I can't sleep"}]]
    decoding = _decoding(repetition_penalty=1.1, no_repeat_ngram_size=0, max_new_tokens=16)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad(), use_adapter(model, None) as m:
        base_logits = m(input_ids=ids).logits
    with use_adapter(model, "girl") as m:
        unmerged = [r.text for r in generate_replies(m, loaded.tokenizer, conversations, decoding)]
        with torch.no_grad():
            adapter_logits = m(input_ids=ids).logits
    with generating_with(model, "girl", quantized=False) as m:
        assert all(layer.merged for layer in m.modules() if hasattr(layer, "merged_adapters"))
        merged = [r.text for r in generate_replies(m, loaded.tokenizer, conversations, decoding)]
    assert merged == unmerged and any(merged)
    assert (base_logits - adapter_logits).abs().max() > 1e-3  # the adapter does change the model
    assert not any(layer.merged for layer in model.modules() if hasattr(layer, "merged_adapters"))
    with torch.no_grad(), use_adapter(model, None) as m:
        assert torch.allclose(m(input_ids=ids).logits, base_logits, atol=1e-5)


def test_greedy_batches_drop_finished_rows_and_match_generate(embedded_dir):
    from personakit.generation import generate_replies
    from personakit.template import prompt_ids, stop_token_ids

    loaded = load_base(str(embedded_dir))
    model, tokenizer = loaded.model, loaded.tokenizer
    messages = ["Hi!", "Name one fruit.", "Tell me a long story about a dragon who learns to bake bread.",
                "What should I eat before an exam tomorrow morning?"]
    conversations = [[{"role": "user", "content": m}] for m in messages]
    decoding = _decoding(repetition_penalty=1.1, no_repeat_ngram_size=4, max_new_tokens=40)
    batched = generate_replies(model, tokenizer, conversations, decoding, batch_size=4)
    stops = set(stop_token_ids(tokenizer))
    for conversation, reply in zip(conversations, batched):
        ids = torch.tensor([prompt_ids(tokenizer, conversation)])
        with torch.no_grad():
            row = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 **generate_kwargs(tokenizer, decoding, ids.shape[1]))[0, ids.shape[1]:].tolist()
        end = next((i for i, t in enumerate(row) if t in stops), None)
        tokens = row if end is None else row[:end]
        assert reply.text == tokenizer.decode(tokens, skip_special_tokens=True).strip()
        assert (reply.new_tokens, reply.hit_limit) == (len(tokens), end is None)
    # rows ended at different steps, so the batch really shrank while decoding
    assert len({r.new_tokens for r in batched}) > 1 and any(not r.hit_limit for r in batched)


def test_a_sampled_reply_is_its_own_whatever_its_batch(tiny_model_dir):
    """Each row samples from its own generator seeded with --seed: a report's sampled reply is the
    one its prompt gets alone (and in chat.py), not a draw that depends on the prompts beside it."""
    from personakit.generation import generate_one, generate_replies

    loaded = load_base(str(tiny_model_dir))
    conversations = [[{"role": "user", "content": m}] for m in ("hi", "how was your day?", "I can't sleep", "tell me a story")]
    decoding = _decoding(do_sample=True, temperature=1.0, repetition_penalty=1.1, no_repeat_ngram_size=0, max_new_tokens=16, seed=7)
    together = [r.text for r in generate_replies(loaded.model, loaded.tokenizer, conversations, decoding, batch_size=4)]
    alone = [generate_one(loaded.model, loaded.tokenizer, c, decoding).text for c in conversations]
    assert together == alone and len(set(together)) > 1
    other_seed = generate_replies(loaded.model, loaded.tokenizer, conversations, _decoding(**{**decoding.as_dict(), "seed": 8}), batch_size=4)
    assert [r.text for r in other_seed] != together
