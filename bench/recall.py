"""Recall benchmark: does a memory mode bring back a fact told 10-30 turns earlier?

    python -m bench.recall                              # writes the Memory recall section of BENCHMARKS.md (which says how long it took)
    OMP_NUM_THREADS=1 python -m bench.recall            # on a busy machine, where two torch threads wait on each other (BENCHMARKS.md, Defaults)
    python -m bench.recall --adapter adapters/girl      # replies from a persona instead of the plain base
    python -m bench.recall --limit 3 --no-replies --out /tmp/B.md   # smoke run

20 scripted English conversations: an opener or two, a fact ("my sister's cat is called
Biscuit"), 10-30 varied filler exchanges with scripted replies, then a question asking for the
fact. For each memory mode (recent, retrieval, summary) the final prompt is built with chat.py's
own memory functions and rendered with the embedded base's chat template; we count how often the
fact's answer word is in that prompt (deterministic), how often it is in the model's greedy reply,
and the prompt tokens. Summary notes are written by the embedded base, greedy, as in chat.py.
"""
from __future__ import annotations

import argparse
import platform
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from personakit.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
MODES = ("recent", "retrieval", "summary")
SYSTEM = "You are a close friend, chatting casually."
MAX_CONTEXT = 2048  # chat.py's default for the embedded base

# (fact told early, question asked later, the word a prompt or reply must contain)
FACTS = [
    ("My sister's cat is called Biscuit, she's a little menace.", "What's my sister's cat called again?", "Biscuit"),
    ("I'm flying to Lisbon on the 14th for my cousin's wedding.", "Which city am I flying to for the wedding?", "Lisbon"),
    ("My new manager's name is Priya, she seems nice so far.", "Do you remember my new manager's name?", "Priya"),
    ("I'm allergic to peanuts, so no satay for me.", "What was I allergic to, did I tell you?", "peanut"),
    ("My grandmother grew up in a village near Galway.", "Where did my grandmother grow up?", "Galway"),
    ("I drive an old green Volvo that I bought from my uncle.", "What car do I drive, do you remember?", "Volvo"),
    ("My daughter's violin teacher is called Mrs Okafor.", "Who is my daughter's violin teacher?", "Okafor"),
    ("Our wifi password is sunflower42, in case you visit.", "What was our wifi password again?", "sunflower42"),
    ("My favourite band as a teenager was Radiohead.", "Which band was my favourite as a teenager?", "Radiohead"),
    ("I started learning the cello in March, it's hard!", "Which instrument did I start learning in March?", "cello"),
    ("My dog Pepper is a border collie, full of energy.", "What breed is my dog Pepper?", "collie"),
    ("My school friend Tomasz just moved to Krakow.", "Where did my school friend Tomasz move to?", "Krakow"),
    ("I'm reading a novel called The Glass Orchard.", "What's the novel I'm reading called?", "Orchard"),
    ("My flat is on the ninth floor and the lift is always broken.", "Which floor is my flat on?", "ninth"),
    ("My brother works as a paramedic in Leeds.", "What does my brother do for work?", "paramedic"),
    ("I planted tomatoes and basil on the balcony last weekend.", "What did I plant on the balcony?", "tomato"),
    ("My son's birthday is on the 3rd of August.", "When is my son's birthday?", "August"),
    ("The dentist appointment is on Thursday at 4pm.", "When is my dentist appointment?", "Thursday"),
    ("My partner Sam is vegetarian, so no meat at the party.", "What does my partner Sam not eat, remind me?", "vegetarian"),
    ("I keep the spare key under the blue flowerpot.", "Where do I keep the spare key?", "flowerpot"),
]
FACT_REPLIES = ["Oh nice, good to know!", "Ha, noted.", "Really? Tell me more some time.", "That's lovely.", "Got it!"]
OPENERS = [
    ("Hey, how are you doing?", "Hey! I'm good, you?"),
    ("Morning! Long week already.", "Morning, hang in there."),
    ("Hi, got a minute to chat?", "Always, what's up?"),
]
FILLER = [
    ("Work was so busy today.", "Ugh, sounds exhausting."),
    ("I finally cleaned the kitchen.", "That always feels great."),
    ("It rained all afternoon here.", "Perfect excuse to stay in."),
    ("I watched a documentary about octopuses.", "They're so clever, right?"),
    ("Should I get a haircut this weekend?", "Go for it, treat yourself."),
    ("My phone battery dies so fast lately.", "Maybe time for a new one."),
    ("I tried a new ramen place downtown.", "Was it any good?"),
    ("It was great, really rich broth.", "Now I'm hungry."),
    ("I can't decide what to cook tonight.", "Pasta never fails."),
    ("The bus was late again this morning.", "Classic, so annoying."),
    ("I went for a run before breakfast.", "Impressive, I could never."),
    ("My neighbours are renovating, it's so loud.", "Earplugs might save you."),
    ("I'm thinking of learning to code.", "You'd be good at it."),
    ("Just finished a really long meeting.", "Time for a break then."),
    ("Do you like rainy days?", "Honestly, yes, they're cosy."),
    ("I bought a plant for my desk.", "Nice, what kind?"),
    ("A small succulent, hard to kill.", "Smart choice."),
    ("The supermarket was packed tonight.", "Saturday crowds are the worst."),
    ("I stayed up too late watching videos.", "We've all been there."),
    ("My coffee machine broke this morning.", "Oh no, a tragedy."),
    ("I'm trying to drink more water.", "Good habit, keep it up."),
    ("Any tips for sleeping better?", "No screens an hour before bed helps."),
    ("I signed up for a pottery class.", "That sounds fun!"),
    ("My laptop keeps freezing.", "Have you tried turning it off and on?"),
    ("The sunset tonight was amazing.", "Did you take a photo?"),
    ("I need new running shoes.", "Get fitted at a proper shop."),
    ("Traffic was terrible on the way home.", "Podcasts make it bearable."),
    ("I'm so tired of winter.", "Spring is coming, promise."),
    ("I found an old photo album yesterday.", "Those are the best to look through."),
    ("My team won the quiz night!", "Congrats, nerd champions!"),
    ("I think I'm catching a cold.", "Rest and lots of tea."),
    ("The new episode of that show came out.", "No spoilers please!"),
    ("I reorganised my bookshelf by colour.", "That must look pretty."),
    ("What should I get my friend for her birthday?", "Something handmade is always nice."),
    ("I burned the toast again.", "Happens to the best of us."),
    ("I'm craving something sweet.", "Chocolate is the answer."),
    ("My inbox has 300 unread emails.", "Declare email bankruptcy."),
    ("I might repaint the living room.", "What colour are you thinking?"),
    ("Maybe a soft green.", "That would be calming."),
    ("Nothing much happening today.", "Quiet days are nice too."),
    # near misses: the same topics as some facts, without the fact
    ("My manager moved our weekly meeting again.", "Meetings about meetings, classic."),
    ("A cat sat on my car bonnet all morning.", "Cats choose their spots."),
    ("My brother called last night, we talked for ages.", "That's sweet."),
    ("I have to book a flight for the conference.", "Book early, it's cheaper."),
    ("My friend's dog barked at me again.", "Some dogs just do that."),
]


@dataclass
class Conversation:
    history: list[tuple[str, str]]  # every exchange before the question
    question: str
    answer: str


def build_conversations() -> list[Conversation]:
    """The 20 scripted conversations; gaps between fact and question spread evenly over 10-30 exchanges."""
    conversations = []
    for i, (fact, question, answer) in enumerate(FACTS):
        rng = random.Random(i)
        gap = 9 + round(i * 20 / (len(FACTS) - 1))  # the question comes 10-30 exchanges after the fact
        openers = rng.sample(OPENERS, 1 + i % 2)
        filler = rng.sample(FILLER, gap)
        history = openers + [(fact, FACT_REPLIES[i % len(FACT_REPLIES)])] + filler
        for text in [question] + [u + r for u, r in openers + filler]:
            assert answer.lower() not in text.lower(), (answer, text)  # the fact lives in one exchange only
        conversations.append(Conversation(history, question, answer))
    return conversations


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default=None, help="adapter folder whose persona replies (default: the plain embedded base)")
    p.add_argument("--memory-turns", type=int, default=4, help="recent exchanges kept, as chat.py --memory-turns")
    p.add_argument("--retrieve-k", type=int, default=2, help="exchanges brought back, as chat.py --retrieve-k")
    p.add_argument("--summary-tokens", type=int, default=96, help="note budget, as chat.py --summary-tokens")
    p.add_argument("--max-new-tokens", type=int, default=48, help="reply length limit")
    p.add_argument("--batch-size", type=int, default=10, help="conversations generated together")
    p.add_argument("--limit", type=int, default=None, help="use only the first N conversations (smoke runs)")
    p.add_argument("--no-replies", action="store_true", help="prompt figures only: no replies, no summary mode (no model run)")
    p.add_argument("--model-subset", type=int, default=None,
                   help="run the model (summary notes, replies) on N conversations spread over the gaps; recent and retrieval prompts still use all (default: all)")
    p.add_argument("--cache-dir", default=None, help="where the embedded base is converted (default: $PERSONAKIT_CACHE or ~/.cache/personakit)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file whose Memory recall section is replaced")
    return p.parse_args(argv)


def summary_notes(args: argparse.Namespace, loaded: Any, model: Any, info: Any, convs: list[Conversation], budget: int) -> list[str]:
    """The running note of each conversation when the question comes, folded exactly when chat.py
    would fold it; conversations are advanced together, one fold per round, in batches."""
    from personakit.generation import Decoding, generate_replies
    from personakit.loading import use_adapter
    from personakit.summary import cut_to_tokens, summary_messages, to_fold
    from personakit.template import prompt_ids

    schedules = []
    for conv in convs:
        chunks, covers = [], 0
        for total in range(len(conv.history) + 1):  # chat.py checks before answering each message
            count = to_fold(total, covers, args.memory_turns)
            if count:
                chunks.append(conv.history[covers:covers + count])
                covers += count
        schedules.append(chunks)
    decoding = Decoding(do_sample=False, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.15, no_repeat_ngram_size=4,
                        max_new_tokens=args.summary_tokens, seed=1234, min_reply_chars=0)
    words = max(args.summary_tokens * 2 // 3, 8)
    speaker = info.name if info else "base"  # chat.py's label for the one replying
    notes = [""] * len(convs)
    for round_ in range(max(map(len, schedules), default=0)):
        active = [i for i, chunks in enumerate(schedules) if round_ < len(chunks)]
        batch = [summary_messages(notes[i], schedules[i][round_], speaker, words) for i in active]
        if any(len(prompt_ids(loaded.tokenizer, m)) > budget for m in batch):
            raise UserError("a summarising prompt is over the context budget; lower --memory-turns")
        with use_adapter(model, None) as base:  # as chat.py: the base writes the note
            texts = generate_replies(base, loaded.tokenizer, batch, decoding, args.batch_size)
        for i, reply in zip(active, texts):
            notes[i] = cut_to_tokens(loaded.tokenizer, reply.text, args.summary_tokens) or notes[i]
        print(f"summary round {round_ + 1}: {len(active)} notes", flush=True)
    return notes


def final_prompt(args: argparse.Namespace, tokenizer: Any, conv: Conversation, mode: str, system: str, note: str, budget: int) -> list[dict[str, str]]:
    """The messages chat.py would send for the question in `mode` (same memory functions, same order)."""
    from personakit.memory import fit_to_budget, memory_window
    from personakit.summary import to_fold, with_note
    from personakit.template import build_messages, prompt_ids

    history = conv.history
    if mode == "summary":
        covers = 0
        for total in range(len(history) + 1):
            covers += to_fold(total, covers, args.memory_turns)
        history, turns, system = history[covers:], len(history) - covers, with_note(system, note)
    else:
        turns = args.memory_turns
    window = memory_window(history, conv.question, turns, args.retrieve_k if mode == "retrieval" else 0)

    def messages(memory: list[tuple[str, str]]) -> list[dict[str, str]]:
        return build_messages({"instruction": conv.question, "history": [list(p) for p in memory]}, system)

    return messages(fit_to_budget(window, lambda memory: len(prompt_ids(tokenizer, messages(memory))), budget))


def main(args: argparse.Namespace) -> int:
    import sys

    from bench.benchmarking import md_table, write_section
    from personakit.generation import Decoding, generate_replies
    from personakit.loading import attach_adapters, generating_with, load_base
    from personakit.persona import read_adapter
    from personakit.template import prompt_ids, render_text

    started = time.time()
    convs = build_conversations()[: args.limit]
    info = read_adapter(args.adapter) if args.adapter else None
    loaded = load_base(info.base_id if info else None, cache_dir=args.cache_dir, load_in_4bit="no")
    model = attach_adapters(loaded, [info]) if info else loaded.model
    system = info.system if info else SYSTEM
    budget = MAX_CONTEXT - args.max_new_tokens
    modes = [m for m in MODES if not (args.no_replies and m == "summary")]
    step = len(convs) / args.model_subset if args.model_subset else 1.0
    sampled = sorted({int(k * step) for k in range(min(args.model_subset or len(convs), len(convs)))})
    notes = [""] * len(convs)
    if "summary" in modes:
        for i, note in zip(sampled, summary_notes(args, loaded, model, info, [convs[i] for i in sampled], budget)):
            notes[i] = note
    decoding = Decoding(do_sample=False, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.15, no_repeat_ngram_size=4,
                        max_new_tokens=args.max_new_tokens, seed=1234, min_reply_chars=0)

    rows, details = [], []
    for mode in modes:
        shown = sampled if mode == "summary" else list(range(len(convs)))
        prompts = {i: final_prompt(args, loaded.tokenizer, convs[i], mode, system, notes[i], budget) for i in shown}
        sizes = [len(prompt_ids(loaded.tokenizer, m)) for m in prompts.values()]
        in_prompt = {i: convs[i].answer.lower() in render_text(loaded.tokenizer, m, generation_prompt=True).lower() for i, m in prompts.items()}
        replies: dict[int, str] = {}
        if not args.no_replies:
            with generating_with(model, info.name if info else None, loaded.quantized) as m:
                replies = dict(zip(sampled, (r.text for r in generate_replies(m, loaded.tokenizer, [prompts[i] for i in sampled], decoding, args.batch_size))))
        in_reply = sum(convs[i].answer.lower() in r.lower() for i, r in replies.items())
        rows.append([mode, f"{sum(in_prompt.values())}/{len(shown)}", f"{in_reply}/{len(replies)}" if replies else "not run",
                     f"{sum(sizes) / len(sizes):.0f}", max(sizes)])
        details += [f"- {mode} #{i + 1} ({convs[i].answer}): prompt {'yes' if in_prompt[i] else 'no'}"
                    + (f", reply {replies[i][:80]!r}" if i in replies else "")
                    + (f", note {notes[i][:160]!r}" if mode == "summary" else "") for i in shown]
        print(f"{mode}: fact in prompt {rows[-1][1]}, in reply {rows[-1][2]}, mean prompt {rows[-1][3]} tokens", flush=True)

    gaps = [len(c.history) - next(i for i, (u, _) in enumerate(c.history) if c.answer.lower() in u.lower()) for c in convs]
    model_name = f"adapter {info.path}" if info else "the plain embedded base"
    section = "\n".join([
        "## Memory recall",
        "",
        f"Command: `{' '.join(['python -m bench.recall', *sys.argv[1:]])}` · {datetime.now(timezone.utc):%Y-%m-%d} · "
        f"{platform.machine()}, embedded SmolLM2-135M-Instruct ({model_name}) on {loaded.device} · {(time.time() - started) / 60:.0f} min",
        "",
        f"{len(convs)} scripted English conversations; each tells a fact in one early exchange and asks for it "
        f"{min(gaps)}-{max(gaps)} exchanges later (fillers with scripted replies in between). Chat settings: "
        f"--memory-turns {args.memory_turns}, --retrieve-k {args.retrieve_k}, --summary-tokens {args.summary_tokens}, "
        f"{MAX_CONTEXT} context tokens; replies greedy, {args.max_new_tokens} new tokens at most. "
        f"\"In prompt\": the fact's answer word is in the prompt the model sees; \"in reply\": it is in the reply.",
        *([f"Summary notes and replies ran on conversations {', '.join(f'#{i + 1}' for i in sampled)} only (--model-subset, for CPU time).", ""]
          if len(sampled) < len(convs) else [""]),
        md_table(["memory", "fact in prompt", "fact in reply", "prompt tokens (mean)", "prompt tokens (max)"], rows),
        "",
        "Target: retrieval puts the fact in the prompt in at least 18/20 conversations where recent alone does in at most 2/20.",
        "",
        "<details><summary>per conversation</summary>",
        "",
        *details,
        "",
        "</details>",
    ])
    write_section(args.out, "recall", section)
    print(section)
    print(f"wrote the Memory recall section of {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
