"""serve.py driven by the clients people use: the openai SDK, LangChain's ChatOpenAI, LiteLLM, and
request bodies as AstrBot, LangBot and Open WebUI build them (tests/fixtures/clients/, each naming
the package version and file it was read from)."""
from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_serve import KEY, ask, post, serving

import serve
from personakit.exports import MEDIA_PLACEHOLDERS
from personakit.serve.protocol import PLACEHOLDERS, ServeSettings, parse_request

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "clients"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapters):
    # Open WebUI's title and tag prompts are some 400 tokens of the tiny model's small vocabulary
    with serving(tiny_model_dir, tiny_adapters, "--max-context", "1000") as started:
        yield started


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=60)


def chat(client, messages, model="girl", **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 12, **kwargs}
    return client.chat.completions.create(model=model, messages=messages, **kwargs).choices[0]


def post_stream(url, body: dict) -> tuple[int, list]:
    """A raw streamed POST: (status, the parsed `data:` events before [DONE])."""
    req = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        lines = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return resp.status, [json.loads(line) for line in lines[:-1]]


def test_tools_are_answered_as_plain_text_and_logged_once(client, server):
    plain = chat(client, [{"role": "user", "content": "what's the weather in Paris?"}])
    for _ in range(2):
        tooled = chat(client, [{"role": "user", "content": "what's the weather in Paris?"}], tools=[WEATHER],
                      tool_choice="auto", parallel_tool_calls=True)
        assert tooled.message.tool_calls is None and tooled.message.content == plain.message.content
        assert tooled.finish_reason == plain.finish_reason
    told = [line for line in server[2] if "answered as plain text" in line and "OpenAI/Python" in line]
    assert len(told) == 1 and "tools, tool_choice, parallel_tool_calls" in told[0]


def test_tool_calls_and_tool_results_in_the_history_are_left_out(client):
    question = {"role": "user", "content": "what's the weather in Paris?"}
    answer = {"role": "assistant", "content": "rainy, take an umbrella"}
    follow_up = {"role": "user", "content": "thanks!"}
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": "Paris: rain, 9 C"}
    without = chat(client, [question, answer, follow_up]).message.content
    assert chat(client, [question, call, result, answer, follow_up]).message.content == without
    # a conversation ending on a tool result: the persona answers the user's question
    assert chat(client, [question, call, result]).message.content == chat(client, [question]).message.content


def test_image_audio_and_file_parts_become_the_export_placeholder(client):
    parts = [{"type": "text", "text": "look at this "}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
             {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
             {"type": "file", "file": {"file_id": "file-1"}}]
    as_text = chat(client, [{"role": "user", "content": "look at this [image][voice][file]"}]).message.content
    assert chat(client, [{"role": "user", "content": parts}]).message.content == as_text


def test_placeholders_follow_the_persona_language_and_are_the_exports_own():
    from personakit.flags import decoding_from_args

    settings = ServeSettings(decoding=decoding_from_args(serve.parse_args([])), max_context=400, memory_turns=4, retrieve_k=0,
                             client_system="ignore", api_key=None, max_batch=8)
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}
    astrbot = {"model": "girl", "messages": [{"role": "user", "content": [{"type": "text", "text": "[图片]"}, image]}]}
    assert parse_request(astrbot, ["girl", "base"], settings, {"girl": "zh"}).message == "[图片]"  # its own "[图片]" not doubled
    assert parse_request(astrbot, ["girl", "base"], settings, {"girl": "en"}).message == "[图片][image]"
    base = {"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": "你看这个"}, image]}]}
    assert parse_request(base, ["girl", "base"], settings, {"girl": "en"}).message == "你看这个[图片]"  # the base: the messages' language
    for marks in PLACEHOLDERS.values():
        assert all(mark.strip("[]") in MEDIA_PLACEHOLDERS for mark in marks.values())


def test_integer_and_tiny_temperatures_do_not_fail_the_batch(server, client):
    greedy = ask(client, "girl", "tell me a story").choices[0].message.content
    sampled = ask(client, "girl", "hi", temperature=1.0, seed=7).choices[0].message.content
    base = {"model": "girl", "max_tokens": 12, "messages": [{"role": "user", "content": "hi"}]}
    with ThreadPoolExecutor(3) as pool:  # admitted in the same step: one bad row used to fail them all
        replies = list(pool.map(lambda body: post(server[0], json.dumps(body).encode()), [
            {**base, "temperature": 1, "seed": 7}, {**base, "messages": [{"role": "user", "content": "tell me a story"}], "temperature": 1e-300},
            {**base, "temperature": 0, "top_p": 1, "messages": [{"role": "user", "content": "tell me a story"}]}]))
    assert [status for status, _ in replies] == [200, 200, 200]
    assert [r["choices"][0]["message"]["content"] for _, r in replies] == [sampled, greedy, greedy]


def test_zero_penalties_change_nothing_and_large_ones_change_the_reply(client):
    plain = ask(client, "girl", "tell me a long story", max_tokens=40).choices[0].message.content
    assert ask(client, "girl", "tell me a long story", max_tokens=40, presence_penalty=0, frequency_penalty=0).choices[0].message.content == plain
    assert ask(client, "girl", "tell me a long story", max_tokens=40, frequency_penalty=2, presence_penalty=2).choices[0].message.content != plain


def test_penalties_follow_openai_on_the_reply_tokens(tiny_model_dir):
    """Each greedy token is the argmax of the logits minus frequency x count and presence x (count > 0),
    counted over the reply so far (not the prompt), recomputed here without the engine's cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personakit.engine import Engine, Row, Sampling

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer("hello hello hello, tell me a story")["input_ids"]
    row = Row(prompt=prompt, max_tokens=30, sampling=Sampling(presence_penalty=0.7, frequency_penalty=1.3))
    plain = Row(prompt=prompt, max_tokens=30)
    Engine(model, tokenizer).run([row, plain])
    assert row.tokens != plain.tokens
    for t, token in enumerate(row.tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + row.tokens[:t]])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(row.tokens[:t], dtype=torch.long), minlength=logits.shape[0])
        assert int((logits - 1.3 * counts - 0.7 * (counts > 0)).argmax()) == token, t


@pytest.mark.parametrize("body, says", [
    ({"tools": {"type": "function"}}, "'tools' must be a list"),
    ({"tool_choice": 3}, "'tool_choice' must be a string or an object"),
    ({"parallel_tool_calls": "yes"}, "'parallel_tool_calls' must be true or false"),
    ({"presence_penalty": 2.5}, "outside the allowed range"),
    ({"frequency_penalty": "high"}, "must be a number"),
    ({"temperature": True}, "must be a number"),
    ({"n": 2}, "one choice per request"),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}]}, "video_url"),
    ({"logprobs": True}, "not supported"),
])
def test_what_clients_get_wrong_is_still_an_openai_shaped_400(server, body, says):
    status, reply = post(server[0], json.dumps({"model": "girl", "messages": [{"role": "user", "content": "hi"}], **body}).encode())
    assert status == 400 and says in reply["error"]["message"], reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}


def test_tools_reject_refuses_them_in_words_bots_recover_from(tiny_model_dir, tiny_adapters):
    with serving(tiny_model_dir, tiny_adapters, "--tools", "reject") as (url, _, _):
        status, reply = post(url, json.dumps({"model": "girl", "messages": [{"role": "user", "content": "hi"}],
                                              "tools": [WEATHER]}).encode())
        message = reply["error"]["message"].lower()
        # AstrBot retries without tools when the error says "tool" and "support" (openai_source.py, _handle_api_error)
        assert status == 400 and "tool" in message and "support" in message and reply["error"]["param"] == "tools"
        status, _ = post(url, json.dumps({"model": "girl", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "none"}).encode())
        assert status == 200


def test_langchain_invoke_stream_and_bind_tools(server, client):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "rain"

    reply = ask(client, "girl", "how was your day?").choices[0].message.content
    llm = ChatOpenAI(model="girl", base_url=server[0], api_key=KEY, temperature=0, max_tokens=12, max_retries=0, timeout=60)
    assert llm.invoke("how was your day?").content == reply
    assert "".join(chunk.content for chunk in llm.stream("how was your day?")) == reply
    answer = llm.bind_tools([get_weather]).invoke("how was your day?")
    assert answer.tool_calls == [] and answer.content == reply
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    tuned = ChatOpenAI(model="girl", base_url=server[0], api_key=KEY, temperature=1, seed=7, presence_penalty=0.5,
                       frequency_penalty=0.5, max_tokens=12, max_retries=0, timeout=60)
    assert tuned.invoke("how was your day?").content == tuned.invoke("how was your day?").content


def test_litellm_completion_plain_and_streamed(server, client):
    import litellm

    reply = ask(client, "peixuan", "I can't sleep").choices[0].message.content
    common = {"model": "openai/peixuan", "api_base": server[0], "api_key": KEY, "temperature": 0, "max_tokens": 12,
              "messages": [{"role": "user", "content": "I can't sleep"}]}
    assert litellm.completion(**common).choices[0].message.content == reply
    chunks = list(litellm.completion(**common, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    tooled = litellm.completion(**common, tools=[WEATHER], tool_choice="auto").choices[0]
    assert tooled.message.content == reply and not tooled.message.tool_calls


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.json")))
def test_recorded_client_bodies_get_a_reply(server, name):
    fixture = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    assert fixture["source"]["package"] and fixture["source"]["file"]
    body = json.loads(json.dumps(fixture["body"]).replace('"PERSONA"', '"girl"'))
    if body.get("stream"):
        status, events = post_stream(server[0], body)
        assert not [e for e in events if "error" in e], events
        finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
        assert not [c for e in events for c in e["choices"] if c["delta"].get("tool_calls")]
        assert (events[-1].get("usage") is not None) == bool(body.get("stream_options", {}).get("include_usage"))
    else:
        status, reply = post(server[0], json.dumps(body).encode())
        choice = reply["choices"][0]
        finish, text = [choice["finish_reason"]], choice["message"]["content"]
        assert "tool_calls" not in choice["message"]
    assert status == 200 and finish in (["stop"], ["length"]) and isinstance(text, str)
