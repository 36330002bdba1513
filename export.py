"""Export a persona to run outside Python, checked to answer like the trained model.

    python export.py --persona girl --format merged --out exports/girl-hf
    python export.py --persona girl --format gguf --out exports/girl-gguf            # llama.cpp, LM Studio
    python export.py --persona girl --format ollama --out exports/girl-ollama        # then: ollama create ...
    python export.py --persona girl --format gguf --lora-only --out exports/girl-lora # llama-server -m base --lora

The folder appears only when the export is written and its round-trip check passed: the same
conversations rendered by our template path and by the exported artifact give the same token ids,
and greedy replies of the export match the adapter's. On a difference it prints what
differed, writes nothing and exits with code 2 (`--no-verify` writes without checking).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from personakit.errors import UserError, run_cli
from personakit.flags import add_options, add_persona_flags, check_args, print_config
from personakit.options import ExportOptions, PersonaChoice

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_persona_flags(p, ROOT, "none: name the persona to export")
    add_options(p, ExportOptions)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    if not (args.persona or args.adapter):
        raise UserError("name the persona to export: --persona NAME (under --adapters-root) or --adapter PATH")
    check_args(args)
    print_config(args)
    from personakit.exporting import export
    from personakit.persona import find_persona, read_adapter

    choice = PersonaChoice.from_args(args)
    info = read_adapter(choice.adapter) if choice.adapter else find_persona(choice.persona, choice.adapters_root)
    result = export(info, ExportOptions.from_args(args), allow_base_mismatch=choice.allow_base_mismatch,
                    log=lambda line: print(line, flush=True))
    if result.checks:
        print("round-trip check:")
        for c in result.checks:
            print(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    else:
        print("round-trip check: skipped (--no-verify)")
    for f in result.files:
        print(f"wrote {f} ({f.stat().st_size / 1e6:.1f} MB)")
    print(f"exported persona {info.name} as {args.format} in {result.seconds:.1f}s; run it with:")
    for line in result.next_step.splitlines():
        print(f"  {line}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
