"""serve.py --engine llama-server|vllm: our persona layer in front of an existing engine. Against a real
llama-server (built by `make llama-server` from the llama.cpp source the project already builds): the
replies equal llama.cpp's own greedy replies on the same GGUFs, every persona gets its own adapter and
system prompt per request, streaming equals plain, and a dead engine is a 503 while serve.py keeps
serving. vLLM does not run here: what we send is checked against vLLM's own request schema."""
from __future__ import annotations

import contextlib
import io
import json
import shlex
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from test_export import HAS_LLAMA_CPP, build_smol_tokenizer_model, run_export
from test_serve import free_port, on_loopback, post

import serve
from conftest import ROOT, head_rows, train_persona

KEY = "test-key"
SYSTEMS = {"girl": "You are Mia. Reply warmly, in one or two sentences.", "peixuan": "You are Peixuan. Be blunt and brief."}
MESSAGES = ["hi there", "I can't sleep", "what should I eat tonight"]
MAX_TOKENS = 16


def llama_server() -> str | None:
    from personakit.serve.external import llama_server_binary

    return shutil.which(llama_server_binary(None))


needs_llama_server = pytest.mark.skipif(
    llama_server() is None or not HAS_LLAMA_CPP,
    reason="llama-server is not built (`make llama-server` builds it, `make test` too) or llama-cpp-python is missing",
)


@contextlib.contextmanager
def serving(*flags: str):
    """serve.py as a real uvicorn server in a thread: (base URL, log lines)."""
    from personakit.serve.app import create_app, server_from_args

    logs: list[str] = []
    args = serve.parse_args(["--api-key", KEY, "--max-context", "512", *flags])
    with on_loopback(create_app(server_from_args(args, log=logs.append))) as url:
        yield url, logs


@contextlib.contextmanager
def engine(adapters_root: Path, exports: Path, port: int):
    """llama-server started with exactly the command `serve.py --print-engine-command llama-server` prints."""
    from personakit.serve.app import print_engine_command

    args = serve.parse_args(["--adapters-root", str(adapters_root), "--exports-root", str(exports), "--max-context", "512",
                             "--max-batch", "4", "--engine-url", f"http://127.0.0.1:{port}", "--print-engine-command", "llama-server"])
    out = _capture(lambda: print_engine_command(args))
    argv = shlex.split(out)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"llama-server exited: {proc.stderr.read()[-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "llama-server did not come up in 120 s"
            time.sleep(0.2)
        yield proc, argv
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _capture(fn) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert fn() == 0
    return buf.getvalue().strip()


@pytest.fixture(scope="module")
def personas(embedded_dir, tmp_path_factory) -> dict[str, Path]:
    """Two personas of one tiny base (the embedded tokenizer, which llama.cpp's converter knows), each
    trained hard enough that its adapter changes the replies, and exported as LoRA GGUFs."""
    tmp = tmp_path_factory.mktemp("external")
    base = build_smol_tokenizer_model(embedded_dir, tmp / "base", init=0.3)
    root, exports = tmp / "adapters", tmp / "exports"
    for name, system in SYSTEMS.items():
        data = head_rows(ROOT / "data" / "en" / f"{name}.jsonl", 8, tmp / f"{name}.jsonl")
        train_persona(base, data, root, name, "--system", system, "--learning-rate", "0.05", "--max-steps", "2")
        if HAS_LLAMA_CPP:
            assert run_export("--adapter", str(root / name), "--format", "gguf", "--lora-only", "--no-verify",
                              "--out", str(exports / f"{name}-lora")) == 0
    return {"base": base, "root": root, "exports": exports}


@pytest.fixture(scope="module")
def stack(personas):
    """llama-server with both personas, and serve.py --engine llama-server in front of it."""
    port = free_port()
    with engine(personas["root"], personas["exports"], port) as (proc, argv):
        with serving("--adapters-root", str(personas["root"]), "--engine", "llama-server", "--engine-url", f"http://127.0.0.1:{port}",
                     "--greedy", "--repetition-penalty", "1", "--no-repeat-ngram-size", "0", "--max-new-tokens", str(MAX_TOKENS)) as (url, logs):
            yield {"url": url, "logs": logs, "argv": argv, **personas}


def reference(personas, persona: str | None, message: str, lora: str | None = "same", max_tokens: int = MAX_TOKENS) -> tuple[str, int]:
    """llama.cpp's own greedy reply (llama-cpp-python on the same GGUFs) to the prompt our template renders
    with the persona's system prompt, and its prompt length; `lora`: the adapter to run, "same" = the persona's."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from personakit.template import build_messages, prompt_ids, stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(personas["base"])
    prompt = prompt_ids(tokenizer, build_messages({"instruction": message, "history": []}, SYSTEMS.get(persona)))
    exports = personas["exports"]
    lora = persona if lora == "same" else lora
    llm = Llama(model_path=str(next(exports.glob("base-*.gguf"))), n_ctx=512, verbose=False, logits_all=True,
                lora_path=str(exports / f"{lora}-lora" / f"{lora}-lora-f16.gguf") if lora else None)
    stops, reply = stop_token_ids(tokenizer), []
    llm.eval(prompt)
    while len(reply) < max_tokens:
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        if token in stops:
            break
        reply.append(token)
        llm.eval([token])
    llm.close()
    return tokenizer.decode(reply, skip_special_tokens=True).strip(), len(prompt)


def ask(url: str, model: str, message: str, **extra):
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": message}], temperature=0, **extra)


# ---------------------------------------------------------------- against a real llama-server


@needs_llama_server
def test_greedy_replies_through_serve_py_equal_llama_cpps_own_per_persona(stack):
    for persona in ("girl", "peixuan"):
        for message in MESSAGES:
            expected, prompt_len = reference(stack, persona, message)
            reply = ask(stack["url"], persona, message)
            assert reply.choices[0].message.content == expected, (persona, message)
            # the persona's system prompt is in the prompt although the client sent none
            assert reply.usage.prompt_tokens == prompt_len
    base, _ = reference(stack, None, MESSAGES[0], lora=None)
    assert ask(stack["url"], "base", MESSAGES[0]).choices[0].message.content == base
    # the test can fail: each persona's adapter changes its replies, so a wrong adapter would show
    assert any(reference(stack, "girl", m)[0] != reference(stack, "girl", m, lora="peixuan")[0] for m in MESSAGES)


@needs_llama_server
def test_client_system_message_is_ignored_and_two_personas_run_at_once(stack):
    from concurrent.futures import ThreadPoolExecutor

    alone = ask(stack["url"], "girl", "hi there").choices[0].message.content
    from openai import OpenAI

    client = OpenAI(base_url=stack["url"], api_key=KEY, max_retries=0, timeout=60)
    bot = client.chat.completions.create(model="girl", temperature=0, messages=[
        {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "hi there"}])
    assert bot.choices[0].message.content == alone
    jobs = [(p, m) for p in ("girl", "peixuan") for m in MESSAGES] * 2
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: ask(stack["url"], *job).choices[0].message.content, jobs))
    assert together == [reference(stack, p, m)[0] for p, m in jobs]


@needs_llama_server
def test_streaming_equals_plain_and_stop_strings_cut(stack):
    from openai import OpenAI

    client = OpenAI(base_url=stack["url"], api_key=KEY, max_retries=0, timeout=60)
    for message in MESSAGES:
        plain = ask(stack["url"], "peixuan", message)
        chunks = list(client.chat.completions.create(model="peixuan", temperature=0, stream=True,
                                                     messages=[{"role": "user", "content": message}]))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    full = ask(stack["url"], "girl", MESSAGES[0]).choices[0].message.content
    words = full.split()
    assert len(words) > 2, full
    cut = ask(stack["url"], "girl", MESSAGES[0], stop=[words[2]])
    assert cut.choices[0].message.content == full[:full.index(words[2])].rstrip()
    assert cut.choices[0].finish_reason == "stop"


@needs_llama_server
def test_engine_killed_mid_reply_is_a_503_and_serve_py_keeps_running(personas):
    port = free_port()
    with engine(personas["root"], personas["exports"], port) as (proc, _):
        with serving("--adapters-root", str(personas["root"]), "--engine", "llama-server", "--engine-url", f"http://127.0.0.1:{port}",
                     "--greedy", "--max-new-tokens", "400") as (url, logs):
            request = urllib.request.Request(f"{url}/chat/completions", method="POST", data=json.dumps({
                "model": "girl", "stream": True, "max_tokens": 400, "messages": [{"role": "user", "content": "tell me a story"}],
            }).encode(), headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
            with urllib.request.urlopen(request, timeout=60) as resp:
                events = []
                for raw in resp:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    events.append(line[5:].strip())
                    if len(events) == 3:  # the role, then reply text: the engine is decoding
                        proc.kill()
            errors = [json.loads(e)["error"] for e in events if e.startswith("{") and "error" in json.loads(e)]
            assert errors and errors[0]["type"] == "server_error" and errors[0]["code"] == "engine_unavailable", events[-3:]
            status, body = post(url, json.dumps({"model": "girl", "messages": [{"role": "user", "content": "hi"}]}).encode())
            assert status == 503 and "cannot be reached" in body["error"]["message"]
            with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10) as r:
                assert r.status == 200
            assert any("stopped answering" in line or "ended its stream" in line for line in logs), logs


# ---------------------------------------------------------------- no engine binary needed


def test_no_engine_listening_is_a_clear_503(tiny_model_dir, tiny_adapters):
    port = free_port()  # nothing listens there
    with serving("--adapters-root", str(tiny_adapters), "--base", str(tiny_model_dir), "--engine", "vllm",
                 "--engine-url", f"http://127.0.0.1:{port}") as (url, logs):
        status, body = post(url, json.dumps({"model": "girl", "messages": [{"role": "user", "content": "hi"}]}).encode())
        assert status == 503 and body["error"]["code"] == "engine_unavailable"
        assert body["error"]["message"].startswith(f"the vllm engine behind this server cannot be reached at http://127.0.0.1:{port}")
        status, body = post(url, json.dumps({"model": "nobody", "messages": [{"role": "user", "content": "hi"}]}).encode())
        assert status == 404  # our own validation still answers first
        assert any("is not answering yet" in line for line in logs)


def test_llama_server_command_needs_the_lora_ggufs(tiny_adapters, tmp_path):
    from personakit.errors import UserError
    from personakit.serve.app import print_engine_command

    args = serve.parse_args(["--adapters-root", str(tiny_adapters), "--exports-root", str(tmp_path), "--print-engine-command", "llama-server"])
    with pytest.raises(UserError, match=r"girl, peixuan has none under .*python export.py --persona girl --format gguf --lora-only"):
        print_engine_command(args)


# What vLLM accepts, from its own code (vllm-project/vllm):
# vllm/entrypoints/openai/protocol.py @ 0052bed36509c7a5a2d8e48265334e40cf2f5a0e, class CompletionRequest:
# `prompt: Optional[Union[list[int], list[list[int]], str, list[str]]]`, and these fields;
VLLM_COMPLETION_FIELDS = {
    "model", "prompt", "prompt_embeds", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user", "use_beam_search",
    "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids", "include_stop_str_in_output", "ignore_eos",
    "min_tokens", "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens", "allowed_token_ids",
    "prompt_logprobs", "add_special_tokens", "response_format", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern", "priority", "request_id", "logits_processors",
    "return_tokens_as_token_ids", "cache_salt", "kv_transfer_params", "vllm_xargs",
}
VLLM_STREAM_OPTIONS = {"include_usage", "continuous_usage_stats"}  # class StreamOptions, same file
# vllm/config/lora.py @ 01230b40128e570a58e54e75f7e55c4d5cd9246d: MaxLoRARanks, max_loras (default 1, per batch).
VLLM_LORA_RANKS = {1, 8, 16, 32, 64, 128, 256, 320, 512}


def test_what_we_send_vllm_fits_its_completion_request(tiny_model_dir, tiny_adapters):
    from transformers import AutoTokenizer

    from personakit.engine import Sampling
    from personakit.persona import read_adapter
    from personakit.serve.external import vllm_body
    from personakit.serve.scheduler import Job
    from personakit.template import build_messages, prompt_ids, stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    persona = read_adapter(tiny_adapters / "girl")
    prompt = prompt_ids(tokenizer, build_messages({"instruction": "hi", "history": []}, persona.system))
    greedy = Job(prompt=prompt, max_tokens=20, adapter="girl")
    body = vllm_body(greedy, "girl", stop_token_ids(tokenizer), 1.15)
    assert set(body) <= VLLM_COMPLETION_FIELDS and set(body["stream_options"]) <= VLLM_STREAM_OPTIONS
    assert body["prompt"] == prompt and all(isinstance(t, int) for t in body["prompt"])  # token ids, not text
    assert body["model"] == "girl" and body["stop_token_ids"] == stop_token_ids(tokenizer)
    assert body["temperature"] == 0.0 and body["max_tokens"] == 20 and body["stream"] is True
    sampled = Job(prompt=prompt, max_tokens=20, sampling=Sampling(True, 0.7, 0.9, 50, 2 ** 62 + 5))
    body = vllm_body(sampled, "base", [2], 1.0)
    assert (body["temperature"], body["top_p"], body["top_k"], body["seed"]) == (0.7, 0.9, 50, 2 ** 62 + 5)
    assert -(2 ** 63) <= body["seed"] < 2 ** 63  # vLLM's seed field is bounded by torch.long


def test_vllm_stream_is_read_into_text_finish_and_count():
    from personakit.serve.external import EngineError, vllm_pieces

    # vLLM's CompletionStreamResponse chunks: choices [{index, text, logprobs, finish_reason}], then the usage chunk
    chunks = [{"choices": [{"index": 0, "text": "Hel", "finish_reason": None}]},
              {"choices": [{"index": 0, "text": "lo", "finish_reason": None}]},
              {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]},
              {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}]
    pieces = list(vllm_pieces(iter(chunks)))
    assert "".join(p.text for p in pieces) == "Hello" and (pieces[-1].finish, pieces[-1].tokens) == ("length", 3)
    # an error in the stream (vLLM's ErrorResponse: {error: {message, type, param, code}}) becomes our error
    with pytest.raises(EngineError) as err:
        list(vllm_pieces(iter([{"error": {"message": "The model `nobody` does not exist.", "type": "NotFoundError", "code": 404}}])))
    assert err.value.api.status == 503 and "does not serve this persona" in err.value.api.message
    with pytest.raises(EngineError) as err:
        list(vllm_pieces(iter([{"error": {"message": "too long", "type": "BadRequestError", "code": 400}}])))
    assert err.value.api.status == 400


def test_vllm_command_loads_every_adapter_folder(tiny_adapters):
    from personakit.serve.app import print_engine_command

    args = serve.parse_args(["--adapters-root", str(tiny_adapters), "--max-context", "400", "--max-batch", "4",
                             "--print-engine-command", "vllm"])
    argv = shlex.split(_capture(lambda: print_engine_command(args)))
    assert argv[:2] == ["vllm", "serve"] and argv[argv.index("--served-model-name") + 1] == "base"
    assert "--enable-lora" in argv and int(argv[argv.index("--max-lora-rank") + 1]) in VLLM_LORA_RANKS
    assert argv[argv.index("--max-loras") + 1] == "2" and argv[argv.index("--max-model-len") + 1] == "400"
    modules = argv[argv.index("--lora-modules") + 1:argv.index("--max-model-len")]
    # vllm/entrypoints/openai/cli_args.py (LoRAParserAction): `name=path` without a comma, else JSON
    assert modules == [f"girl={(tiny_adapters / 'girl').resolve()}", f"peixuan={(tiny_adapters / 'peixuan').resolve()}"]
    assert all("," not in m for m in modules)
    assert argv[argv.index("--port") + 1] == "8001"


def test_llama_server_request_picks_the_personas_adapter_and_reads_its_stream():
    from personakit.engine import Sampling
    from personakit.serve.external import llama_server_body, llama_server_pieces
    from personakit.serve.scheduler import Job

    adapters = ["girl", "peixuan"]  # GET /lora-adapters order: the ids of --lora
    body = llama_server_body(Job(prompt=[1, 2, 3], max_tokens=9, adapter="peixuan"), adapters, 1.0)
    assert body["prompt"] == [1, 2, 3] and body["n_predict"] == 9 and body["stream"] is True
    assert body["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}] and body["temperature"] == 0.0
    assert all(a["scale"] == 0.0 for a in llama_server_body(Job(prompt=[1], max_tokens=9), adapters, 1.0)["lora"])  # base
    sampled = llama_server_body(Job(prompt=[1], max_tokens=9, sampling=Sampling(True, 0.7, 0.9, 50, 2 ** 40 + 3)), adapters, 1.15)
    assert (sampled["temperature"], sampled["top_k"], sampled["top_p"], sampled["min_p"], sampled["seed"]) == (0.7, 50, 0.9, 0.0, 3)
    # llama-server's /completion chunks (tools/server/server-task.cpp, to_json_non_oaicompat): the end-of-turn token
    # is counted by the engine but is not part of the reply, as in serve.py's own engine
    chunks = [{"content": "Hi", "stop": False, "tokens_predicted": 1}, {"content": " you", "stop": False, "tokens_predicted": 2},
              {"content": "", "stop": False, "tokens_predicted": 3}, {"content": "", "stop": True, "stop_type": "eos", "tokens_predicted": 3}]
    pieces = list(llama_server_pieces(iter(chunks)))
    assert "".join(p.text for p in pieces) == "Hi you" and (pieces[-1].finish, pieces[-1].tokens) == ("stop", 2)
    limit = list(llama_server_pieces(iter([{"content": "a", "stop": True, "stop_type": "limit", "tokens_predicted": 9}])))
    assert limit[-1].finish == "length" and limit[-1].tokens == 9
