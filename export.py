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
from personakit.flags import add_persona_flags, check_args, print_config

ROOT = Path(__file__).resolve().parent


def add_export_args(p: argparse.ArgumentParser) -> None:
    """Every flag of export.py in one place."""
    add_persona_flags(p, ROOT, "none: name the persona to export")
    g = p.add_argument_group("output")
    g.add_argument("--format", required=True, choices=["merged", "gguf", "ollama"], help="merged: Hugging Face folder; gguf: llama.cpp / LM Studio file; ollama: GGUF + Modelfile")
    g.add_argument("--out", required=True, help="export folder to create")
    g.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    g.add_argument("--quant", default="f16", choices=["f16", "q8_0"], help="GGUF weight type")
    g.add_argument("--lora-only", action="store_true", help="GGUF of the adapter alone (llama-server --lora), the base's GGUF written once beside the folder")
    g.add_argument("--no-verify", dest="verify", action="store_false", help="skip the round-trip check")
    g.add_argument("--cache-dir", default=None, help="embedded base and llama.cpp converter cache (default: $PERSONAKIT_CACHE or ~/.cache/personakit)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_args(p)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    if not (args.persona or args.adapter):
        raise UserError("name the persona to export: --persona NAME (under --adapters-root) or --adapter PATH")
    check_args(args)
    print_config(args)
    from personakit.exporting import export
    from personakit.persona import find_persona, read_adapter

    info = read_adapter(args.adapter) if args.adapter else find_persona(args.persona, args.adapters_root)
    result = export(
        info, args.format, Path(args.out), overwrite=args.overwrite, quant=args.quant, lora_only=args.lora_only,
        verify=args.verify, cache_dir=args.cache_dir, allow_base_mismatch=args.allow_base_mismatch,
        log=lambda line: print(line, flush=True),
    )
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
