"""export.py: merged / GGUF / Ollama exports of a persona, each round-tripped against transformers and
llama.cpp; bad input gets one sentence and leaves nothing half-written."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, head_rows, train_persona

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (make setup-export installs it); the GGUF round-trip runs it"
)


def run_export(*argv: str) -> int:
    import export

    return export.main(export.parse_args(list(argv)))


def build_smol_tokenizer_model(embedded_dir: Path, out: Path, arch: str = "llama", init: float = 0.02) -> Path:
    """A tiny random model with the embedded SmolLM2 tokenizer: llama.cpp's converter only accepts
    tokenizers it knows (it hashes the pre-tokenizer), which the tokenizer trained in conftest is not.
    `init`: the weights' std; at 0.3 greedy replies are varied tokens, not one token repeated."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                             initializer_range=init)
        model = LlamaForCausalLM(config)
    else:  # an architecture llama.cpp's converter does not know
        config = OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=32, max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
        model = OPTForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def smol_persona(embedded_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("smol_persona")
    base = build_smol_tokenizer_model(embedded_dir, tmp / "base")
    data = head_rows(ROOT / "data" / "en" / "girl.jsonl", 16, tmp / "girl.jsonl")
    return train_persona(base, data, tmp / "adapters", "girl", "--system", "You are Mia. Reply warmly, in one or two sentences.\n感谢 \"quotes\" too.")


def test_merged_export_loads_in_transformers_with_the_persona_prompt(tiny_adapters, tmp_path, capsys):
    from transformers import AutoTokenizer

    from personakit.persona import read_adapter
    from personakit.template import build_messages, prompt_ids

    out = tmp_path / "girl-hf"
    assert run_export("--adapters-root", str(tiny_adapters), "--persona", "girl", "--format", "merged", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "ok   merged greedy replies (transformers)" in printed and "FAIL" not in printed
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "export.json"):
        assert (out / name).is_file()
    assert not list(tmp_path.glob(".girl-hf*")), "staging folders are removed"
    info = read_adapter(tiny_adapters / "girl")
    trained, exported = AutoTokenizer.from_pretrained(info.path), AutoTokenizer.from_pretrained(out)
    row = {"instruction": "Any plans?", "output": "x", "history": [["hi", "hey!"]]}
    # A loader that sends no system message gets exactly the trained prompt.
    assert prompt_ids(exported, build_messages(row, None)) == prompt_ids(trained, build_messages(row, info.system))
    gen = json.loads((out / "generation_config.json").read_text())
    assert trained.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]


@needs_llama_cpp
def test_gguf_and_ollama_exports_answer_like_the_adapter(smol_persona, tmp_path, capsys):
    import gguf

    out = tmp_path / "girl-gguf"
    assert run_export("--adapter", str(smol_persona), "--format", "gguf", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "ok   gguf prompt tokens: 3/3" in printed and "ok   gguf greedy replies (llama.cpp, f16)" in printed
    reader = gguf.GGUFReader(out / "girl-f16.gguf")
    template = reader.get_field("tokenizer.chat_template").contents()
    assert "You are Mia." in template
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == 2  # <|im_end|>

    ollama = tmp_path / "girl-ollama"
    assert run_export("--adapter", str(smol_persona), "--format", "ollama", "--quant", "q8_0", "--out", str(ollama)) == 0
    printed = capsys.readouterr().out
    assert "ok   gguf greedy replies (llama.cpp, q8_0)" in printed
    assert f"ollama create girl -f {ollama / 'Modelfile'}" in printed
    modelfile = (ollama / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./girl-q8_0.gguf\n")
    assert 'SYSTEM """You are Mia. Reply warmly, in one or two sentences.\n感谢 "quotes" too."""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "{{ .System }}" in modelfile
    assert (ollama / "girl-q8_0.gguf").is_file()


@needs_llama_cpp
def test_lora_only_gguf_writes_the_base_once_beside_the_export(smol_persona, tmp_path, capsys):
    out = tmp_path / "girl-lora"
    assert run_export("--adapter", str(smol_persona), "--format", "gguf", "--lora-only", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "ok   gguf greedy replies (llama.cpp, f16)" in printed
    bases = list(tmp_path.glob("base-*-f16.gguf"))
    assert len(bases) == 1 and (out / "girl-lora-f16.gguf").is_file()
    stamp = bases[0].stat().st_mtime_ns
    assert run_export("--adapter", str(smol_persona), "--format", "gguf", "--lora-only", "--out", str(out), "--overwrite") == 0
    assert bases[0].stat().st_mtime_ns == stamp, "the base GGUF is reused, not rewritten"
    assert f"llama-server -m {bases[0]} --lora {out / 'girl-lora-f16.gguf'}" in capsys.readouterr().out


# ---------------------------------------------------------------- bad input


def test_unknown_persona_and_existing_output_are_one_sentence(tiny_adapters, tmp_path):
    from personakit.errors import UserError

    with pytest.raises(UserError, match="no persona named 'nobody'"):
        run_export("--adapters-root", str(tiny_adapters), "--persona", "nobody", "--format", "merged", "--out", str(tmp_path / "x"))
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        run_export("--adapters-root", str(tiny_adapters), "--persona", "girl", "--format", "merged", "--out", str(out))
    assert (out / "mine.txt").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_adapter_of_another_base_is_refused(tiny_adapters, tmp_path):
    from personakit.errors import UserError

    adapter = shutil.copytree(tiny_adapters / "girl", tmp_path / "girl")
    meta = json.loads((adapter / "persona.json").read_text())
    meta["base"]["fingerprint"] = "0123456789abcdef"
    (adapter / "persona.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="was trained on base"):
        run_export("--adapter", str(adapter), "--format", "merged", "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@needs_llama_cpp
def test_tokenizer_llama_cpp_does_not_know_is_named(tiny_adapters, tmp_path):
    from personakit.errors import UserError

    with pytest.raises(UserError, match="does not recognise this base's tokenizer"):
        run_export("--adapters-root", str(tiny_adapters), "--persona", "girl", "--format", "gguf", "--out", str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


@needs_llama_cpp
def test_architecture_llama_cpp_does_not_know_is_named(embedded_dir, tmp_path):
    from personakit.errors import UserError

    base = build_smol_tokenizer_model(embedded_dir, tmp_path / "opt", arch="opt")
    data = head_rows(ROOT / "data" / "en" / "girl.jsonl", 8, tmp_path / "girl.jsonl")
    adapter = train_persona(base, data, tmp_path / "adapters", "girl", "--max-steps", "1")
    with pytest.raises(UserError, match="does not know the architecture OPTForCausalLM"):
        run_export("--adapter", str(adapter), "--format", "gguf", "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_disk_full_mid_write_leaves_nothing(tiny_adapters, tmp_path):
    """A file-size limit makes the weights write fail halfway, as a full disk does."""
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000)); "
        "sys.argv = ['export.py'] + sys.argv[1:]; import runpy; runpy.run_path('export.py', run_name='__main__')"
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", code, "--adapters-root", str(tiny_adapters), "--persona", "girl", "--format", "merged", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the disk filled up while writing the export") and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- embedded model, end to end


@needs_llama_cpp
def test_embedded_persona_exports_to_ollama_within_a_minute(embedded_dir, tmp_path, capsys):
    data = head_rows(ROOT / "data" / "en" / "girl.jsonl", 8, tmp_path / "girl.jsonl")
    adapter = train_persona(Path("embedded"), data, tmp_path / "adapters", "girl", "--max-steps", "1", "--batch-size", "2")
    started = time.time()
    assert run_export("--adapter", str(adapter), "--format", "ollama", "--out", str(tmp_path / "girl-ollama")) == 0
    seconds = time.time() - started
    printed = capsys.readouterr().out
    assert "FAIL" not in printed and "ok   gguf prompt tokens: 3/3" in printed
    print(f"embedded export to ollama (f16) with round-trip: {seconds:.1f}s")


GO_RENDER = """package main

import ("encoding/json"; "os"; "text/template")

type Message struct { Role string; Content string }
type Values struct { System string; Messages []Message }

func main() {
	text, _ := os.ReadFile(os.Args[1])
	var cases []Values
	data, _ := os.ReadFile(os.Args[2])
	if err := json.Unmarshal(data, &cases); err != nil { panic(err) }
	t := template.Must(template.New("m").Parse(string(text)))
	var out []string
	for _, v := range cases {
		var b stringsBuilder
		if err := t.Execute(&b, v); err != nil { panic(err) }
		out = append(out, b.s)
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

type stringsBuilder struct { s string }
func (b *stringsBuilder) Write(p []byte) (int, error) { b.s += string(p); return len(p), nil }
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed; Ollama's TEMPLATE is a Go text/template and is rendered with Go's own package here")
def test_ollama_template_renders_the_training_prompt_in_go(smol_persona, tmp_path):
    """The Modelfile TEMPLATE, run by Go's text/template (what Ollama uses) with the values Ollama
    passes (SYSTEM when the request has none, system messages kept in .Messages), gives our prompt."""
    from transformers import AutoTokenizer

    from personakit.exporting import probe_conversations
    from personakit.ollama import translate_template
    from personakit.persona import read_adapter
    from personakit.template import render_text

    info = read_adapter(smol_persona)
    tok = AutoTokenizer.from_pretrained(smol_persona)
    template, _ = translate_template(tok)
    convs = probe_conversations(info.system)
    (tmp_path / "t.tmpl").write_text(template)
    (tmp_path / "cases.json").write_text(json.dumps([
        {"System": c[0]["content"], "Messages": [{"Role": m["role"], "Content": m["content"]} for m in c]} for c in convs
    ]))
    (tmp_path / "main.go").write_text(GO_RENDER)
    done = subprocess.run(["go", "run", "main.go", "t.tmpl", "cases.json"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, GOCACHE=str(tmp_path / "gocache"), GO111MODULE="off"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [render_text(tok, c, generation_prompt=True) for c in convs]


def test_replies_may_part_only_where_the_reference_hesitated():
    import torch

    from personakit.exporting import Reference, compare_reply

    logits = torch.zeros(3, 10)
    logits[0, 4], logits[1, 5], logits[1, 6], logits[2, 7] = 9.0, 3.0, 2.99, 5.0
    ref = Reference(prompt=[1, 2], reply=[4, 5, 7], logits=logits)
    assert compare_reply(ref, [4, 5, 7], 0.05) == (True, "all 3 tokens identical")
    ok, detail = compare_reply(ref, [4, 6, 1], 0.05)
    assert ok and "parted at a near-tie" in detail
    ok, detail = compare_reply(ref, [1, 5, 7], 0.05)
    assert not ok and "identical for 0 tokens" in detail
    assert not compare_reply(ref, [4, 5], 0.05)[0]
