"""Terminal chat with a persona adapter (or the plain base), with recent-N memory and live persona switching.

    python chat.py --persona girl
    python chat.py --adapter adapters/girl --memory retrieval --memory-turns 6
    python chat.py --persona girl --once "How was your day?"
    printf 'hi\\nwhat did I just say?\\n/save chat.jsonl\\n' | python chat.py --persona girl
    python chat.py --persona girl --session work --memory summary

Every exchange is saved to conversations/<persona>/<session>.jsonl as it happens and the next run
with the same --session resumes it (--no-save for a throwaway chat).

The base and system prompt come from the adapter's persona.json; prompts are rendered with the same
chat-template code as training. Type /help in the chat for commands. Ctrl-C stops the current reply
(the partial reply stays on screen but is not kept in memory); Ctrl-D or /exit leaves.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from personakit.errors import UserError, run_cli
from personakit.flags import add_decoding_flags, add_memory_flags, add_model_flags, add_persona_flags, check_args, decoding_from_args

ROOT = Path(__file__).resolve().parent
CONVERSATIONS = ROOT / "conversations"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # who to talk to
    add_persona_flags(p, ROOT, "no adapter, the base; /persona switches")
    p.add_argument("--system", default=None, help="system prompt when talking to the base (personas always use the one they were trained with)")
    add_memory_flags(p, modes=("recent", "retrieval", "summary"))
    # saved conversations and summary memory
    p.add_argument("--session", default="default", help="saved conversation to resume and append to: conversations/<persona>/<SESSION>.jsonl")
    p.add_argument("--no-save", action="store_true", help="throwaway chat: resume nothing, save nothing")
    p.add_argument("--conversations-root", default=None, help="folder of saved conversations, one folder per persona (default: conversations/ next to chat.py)")
    p.add_argument("--summary-tokens", type=int, default=96, help="token budget of the running note of --memory summary")
    # modes
    p.add_argument("--once", default=None, metavar="MESSAGE", help="send one message, print the reply and exit")
    p.add_argument("--show-prompt", action="store_true", help="print the exact rendered prompt before each reply")
    add_model_flags(p, "(default: the base recorded in persona.json, else embedded SmolLM2-135M-Instruct)")
    add_decoding_flags(p, sample=True)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from personakit.chat_session import ChatOptions, run_chat
    from personakit.loading import BaseOptions

    if args.once is not None and not args.once.strip():
        raise UserError('the --once message is empty; pass the text to send, e.g. --once "hello"')
    check_args(args)
    return run_chat(ChatOptions(
        persona=args.persona, adapter=args.adapter, adapters_root=Path(args.adapters_root), system=args.system,
        memory=args.memory, memory_turns=args.memory_turns, retrieve_k=args.retrieve_k, max_context=args.max_context,
        session=args.session, save=not args.no_save, conversations_root=Path(args.conversations_root or CONVERSATIONS),
        summary_tokens=args.summary_tokens, once=args.once, show_prompt=args.show_prompt,
        base=BaseOptions.from_args(args), decoding=decoding_from_args(args),
    ))


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
