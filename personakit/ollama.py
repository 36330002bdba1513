"""Ollama Modelfile: the chat template translated to Ollama's Go-template syntax, found by rendering.

A Jinja chat template cannot be translated in general; we recognise a family by what it renders
(not by its name) and emit the equivalent Go template. Supported: ChatML (`<|im_start|>role\\n
content<|im_end|>\\n`), the template of SmolLM2 and Qwen.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError
from .persona import AdapterInfo

CHATML_GO = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range $i, $_ := .Messages }}"
    "{{- if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n"
    "{{ else if eq .Role \"assistant\" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n"
    "{{ end }}{{- end }}<|im_start|>assistant\n"
)


def _chatml(messages: list[dict[str, str]], generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def _probes() -> list[list[dict[str, str]]]:
    return [
        [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"}],
        [{"role": "system", "content": "S2"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
         {"role": "user", "content": "U2 多字节"}],
    ]


def translate_template(tokenizer: Any) -> tuple[str, list[str]]:
    """(Go template, stop strings) for the tokenizer's chat template; an unknown family is an error."""
    from .template import render_text

    for conv in _probes():
        for gen in (True, False):
            msgs = conv if gen else conv + [{"role": "assistant", "content": "A2"}]
            if render_text(tokenizer, msgs, gen) != _chatml(msgs, gen):
                raise UserError(
                    "the chat template of this persona's base renders differently from ChatML "
                    "(<|im_start|>role ... <|im_end|>), the only family export.py can translate to "
                    "Ollama's template syntax; use --format gguf (LM Studio and llama-server read the "
                    "template from the GGUF) or write the Modelfile TEMPLATE by hand"
                )
    return CHATML_GO, ["<|im_start|>", "<|im_end|>"]


def _quote(text: str) -> str:
    # Modelfile values take triple quotes for multi-line text; a plain JSON string otherwise.
    if '"""' in text:
        raise UserError('the system prompt contains """, which a Modelfile cannot quote; remove it and retrain, or edit the Modelfile by hand')
    return f'"""{text}"""'


def modelfile(from_path: str, adapter_path: str | None, template: str, stops: list[str], system: str, decoding: dict[str, Any]) -> str:
    lines = [f"FROM {from_path}"]
    if adapter_path:
        lines.append(f"ADAPTER {adapter_path}")
    lines += [f"TEMPLATE {_quote(template)}", f"SYSTEM {_quote(system)}"]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    # chat.py's decoding defaults; Ollama's repeat_penalty also looks at the prompt's last 64 tokens.
    lines += [
        f"PARAMETER temperature {decoding['temperature']}",
        f"PARAMETER top_p {decoding['top_p']}",
        f"PARAMETER top_k {decoding['top_k']}",
        f"PARAMETER repeat_penalty {decoding['repetition_penalty']}",
        f"PARAMETER num_predict {decoding['max_new_tokens']}",
    ]
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, ggufs: tuple[Path, Path | None], tokenizer: Any, info: AdapterInfo, decoding: dict[str, Any], out: Path) -> Path:
    """Modelfile beside the GGUF; paths are relative to the final folder `out`."""
    import os

    template, stops = translate_template(tokenizer)
    eos = tokenizer.eos_token
    if eos and eos not in stops:
        stops.append(eos)
    model, lora = ggufs
    from_path = f"./{model.name}" if lora is None else os.path.relpath(model, out)
    adapter_path = f"./{lora.name}" if lora is not None else None
    path = folder / "Modelfile"
    path.write_text(modelfile(from_path, adapter_path, template, stops, info.system, decoding), encoding="utf-8")
    return path
