"""chat.py's session: the REPL (commands, Ctrl-C), the conversation with its memory policy
(recent window, retrieval, summary note) and saved session, and the persona switching on one base."""
from __future__ import annotations

import contextlib
import dataclasses
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .conversations import ConversationStore, Exchange, Saved, list_sessions
from .data import normalize_row, write_jsonl
from .errors import UserError
from .generation import Decoding, Reply, fuller_request, generate_one
from .loading import BaseOptions, LoadedBase, attach_adapters, check_base_match, load_for_chat, use_adapter
from .memory import PromptTooLong, fit_prompt, memory_window, reply_budget
from .persona import AdapterInfo, find_persona, list_adapters, read_adapter
from .summary import fold_into_note, to_fold, with_note
from .template import prompt_ids, render_text

HELP = """commands:
  /reset                clear the memory of this run (the saved session keeps it; /forget deletes it)
  /history [N]          show the conversation so far (the last N exchanges)
  /sessions             list the saved sessions of this persona
  /forget               delete this session's saved history (asks first)
  /persona [NAME]       switch to persona NAME without reloading the base; alone, list the personas
  /base                 talk to the base model (adapter off, system prompt from --system or none)
  /save FILE [--force]  write the conversation as canonical JSONL training rows
  /help                 show this list
  /exit                 leave (Ctrl-D works too; Ctrl-C only stops the current reply)"""


@dataclass(frozen=True)
class ChatOptions:
    """What chat.py's flags ask for, typed."""

    persona: str | None  # a name under adapters_root
    adapter: str | None  # or an adapter folder
    adapters_root: Path
    system: str | None  # system prompt when talking to the base
    memory: str  # recent, retrieval or summary
    memory_turns: int
    retrieve_k: int
    max_context: int | None
    session: str
    save: bool
    conversations_root: Path
    summary_tokens: int
    once: str | None
    show_prompt: bool
    base: BaseOptions
    decoding: Decoding


def note(text: str) -> None:
    """Status lines go to stderr so that stdout holds only replies (and what commands print)."""
    print(text, file=sys.stderr, flush=True)


class CtrlC:
    """While armed, Ctrl-C sets `pressed` instead of raising, so it stops the reply and not the chat."""

    def __init__(self) -> None:
        self.pressed = False

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.pressed = True

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        self.pressed = False
        if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
            yield
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class Chat:
    """One base model, the adapters loaded onto it so far, the active persona and the conversation."""

    def __init__(self, options: ChatOptions, loaded: LoadedBase, model: Any, persona: AdapterInfo | None, budget: int,
                 store: ConversationStore | None = None, saved: Saved | None = None):
        self.options, self.loaded, self.model, self.persona, self.budget = options, loaded, model, persona, budget
        self.tokenizer = loaded.tokenizer
        self.decoding = options.decoding
        self.adapters = {persona.name: persona.path} if persona else {}
        saved = saved or Saved()
        self.store = store
        # The whole session (saved ones first); memory starts at `start` (moved by /reset), and the
        # summary note condenses turns[start:covers].
        self.turns: list[Exchange] = saved.exchanges
        self.start = 0
        summary = options.memory == "summary"
        self.note, self.covers = (saved.note, saved.covers) if summary else ("", 0)
        self.ctrl_c = CtrlC()
        self.interactive = False
        self.done = False

    @property
    def speaker(self) -> str:
        return self.persona.name if self.persona else "base"

    def system(self) -> str | None:
        return with_note(self.persona.system if self.persona else self.options.system, self.note)

    def run(self) -> int:
        """Read messages until /exit or EOF: from the terminal with a prompt, or one per line from a pipe."""
        self.interactive = interactive = sys.stdin.isatty()
        if interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
            note("type /help for commands; Ctrl-C stops a reply, Ctrl-D or /exit leaves")
        while not self.done:
            try:
                line = input("you> ") if interactive else sys.stdin.readline()
            except EOFError:
                print()  # leave the shell prompt on a line of its own
                break
            except KeyboardInterrupt:
                print()
                continue
            if not interactive and not line:
                break
            try:
                self.handle(line)
            except UserError as exc:
                note(f"error: {exc}")
            except KeyboardInterrupt:
                note("(interrupted)")
        return 0

    def handle(self, line: str) -> None:
        line = line.strip()
        if not line:
            return  # an empty message asks nothing: no generation
        if line.startswith("/"):
            self.command(line)
        else:
            self.say(line)

    def command(self, line: str) -> None:
        try:
            name, *rest = shlex.split(line)
        except ValueError:
            raise UserError(f"cannot read {line!r} (unbalanced quotes); quote a file name with spaces in it") from None
        if name in ("/exit", "/quit"):
            self.done = True
        elif name == "/reset":
            self.start, self.note, self.covers = len(self.turns), "", len(self.turns)
            note("memory cleared" + (" (the saved session keeps it; /forget deletes it)" if self.store else ""))
        elif name == "/history":
            self.history(rest)
        elif name == "/sessions":
            self.list_sessions()
        elif name == "/forget":
            self.forget()
        elif name == "/persona":
            if rest:
                self.switch(rest[0])
            else:
                self.list_personas()
        elif name == "/base":
            self.persona = None
            system = self.options.system or "the template's default"
            note(f"now talking to the base model (adapter off, system prompt: {system})")
        elif name == "/save":
            self.save(rest)
        elif name == "/help":
            print(HELP)
        else:
            raise UserError(f"unknown command {name}; type /help for the list")

    def history(self, rest: list[str]) -> None:
        if len(rest) > 1 or (rest and not rest[0].isdigit()):
            raise UserError("/history takes one number: /history 5 shows the last 5 exchanges")
        memory = self.turns[self.start:]
        first = max(len(memory) - int(rest[0]), 0) if rest else 0
        for i, turn in enumerate(memory[first:], first + 1):
            print(f"[{i}] you: {turn.user}\n    {turn.speaker}: {turn.reply}")
        if not memory:
            print("(no exchanges yet)")

    def list_sessions(self) -> None:
        root = self.options.conversations_root
        persona = self.store.persona if self.store else self.speaker
        found = list_sessions(root, persona)
        current = self.store.session if self.store else None
        for s in found:
            mark = " (this one)" if s.name == current else ""
            print(f"{s.name}: {s.exchanges} exchange(s), last used {time.strftime('%Y-%m-%d %H:%M', time.localtime(s.modified))}{mark}")
        if not found:
            print(f"(no saved sessions of {persona} under {root})")

    def ask(self, question: str) -> str:
        """One line of confirmation, from the terminal or the next piped line."""
        if self.interactive:
            return input(question)
        print(question, end="", file=sys.stderr, flush=True)
        return sys.stdin.readline()

    def forget(self) -> None:
        if self.store is None:
            raise UserError("this chat saves nothing (--no-save); /reset clears its memory")
        answer = self.ask(f"delete all {len(self.turns)} saved exchange(s) of session {self.store.session!r} ({self.store.path})? type yes to confirm: ")
        if answer.strip().lower() != "yes":
            note("kept the session")
            return
        self.store.forget()
        self.turns, self.start, self.note, self.covers = [], 0, "", 0
        note(f"forgot session {self.store.session!r}: its file is empty and the memory cleared")

    def list_personas(self) -> None:
        found = ", ".join(list_adapters(self.options.adapters_root)) or "none"
        print(f"personas under {self.options.adapters_root}: {found} (now: {self.speaker})")

    def switch(self, name: str) -> None:
        """Make persona `name` active; its adapter joins the already loaded base on first use."""
        info = find_persona(name, self.options.adapters_root)
        loaded_from = self.adapters.get(info.name)
        if loaded_from is not None and loaded_from.resolve() != info.path.resolve():
            raise UserError(f"a different adapter named {info.name} is already loaded from {loaded_from}; rename one persona")
        if loaded_from is None:
            if hasattr(self.model, "peft_config"):
                check_base_match(info, self.loaded, self.options.base.allow_base_mismatch)
                self.model.load_adapter(str(info.path), adapter_name=info.name)
            else:
                self.model = attach_adapters(self.loaded, [info], self.options.base.allow_base_mismatch)
            self.adapters[info.name] = info.path
        self.persona = info
        note(f"now talking to {info.name} (memory kept; /reset clears it)")

    def save(self, rest: list[str]) -> None:
        files = [r for r in rest if r != "--force"]
        if len(files) != 1:
            raise UserError("/save needs one file name: /save FILE, or /save FILE --force to overwrite")
        if len(self.turns) == self.start:
            raise UserError("nothing to save yet; chat first, then /save FILE")
        path = Path(files[0]).expanduser()
        if path.exists() and "--force" not in rest:
            raise UserError(f"{path} already exists; use /save {files[0]} --force to overwrite it, or pick another name")
        pairs = [[t.user, t.reply] for t in self.turns[self.start:]]
        write_jsonl(path, [normalize_row({"instruction": u, "output": r, "history": pairs[:i]}) for i, (u, r) in enumerate(pairs)])
        note(f"saved {len(pairs)} rows to {path}")

    def say(self, message: str) -> None:
        """Answer one message with the memory that fits the budget; remember the exchange."""
        options = self.options
        retrieve_k = options.retrieve_k if options.memory == "retrieval" else 0
        if options.memory == "summary":
            self.update_note()
        # What the note condenses is left out; in summary mode all the rest is kept word for word.
        history = [(t.user, t.reply) for t in self.turns[max(self.start, self.covers):]]
        turns = len(history) if options.memory == "summary" else options.memory_turns
        window = memory_window(history, message, turns, retrieve_k)
        try:
            fitted = fit_prompt(self.tokenizer, message, window, self.system(), self.budget)
        except PromptTooLong as exc:
            raise UserError(
                f"this message makes a {exc.size}-token prompt, over the budget of {self.budget} "
                f"(--max-context minus --max-new-tokens); shorten it or raise --max-context"
            ) from None
        if fitted.kept < fitted.window:
            note(f"(memory: left out the {fitted.window - fitted.kept} oldest exchange(s) to fit {self.budget} prompt tokens)")
        messages = fitted.messages
        reply = self.generate(messages)
        if len(reply.text) < self.decoding.min_reply_chars and not self.ctrl_c.pressed:
            note(f"(reply shorter than {self.decoding.min_reply_chars} characters; asked once more for a fuller answer)")
            reply = self.generate(fuller_request(messages))
        if self.ctrl_c.pressed:
            note("(stopped; the partial reply is not kept in memory)")
        elif not reply.text:
            note("(empty reply; not kept in memory)")
        else:
            self.turns.append(Exchange(message, reply.text, self.speaker))
            if self.store:
                self.store.append(self.turns[-1])

    def update_note(self) -> None:
        """Fold the exchanges that have left the recent window into the running note, a few at a time."""
        begin = max(self.covers, self.start)
        count = to_fold(len(self.turns), begin, self.options.memory_turns)
        if not count:
            return
        fresh = self.turns[begin:begin + count]
        note(f"(memory: condensing {len(fresh)} older exchange(s) into the note)")
        self.note = fold_into_note(self.tokenizer, self.note, [(t.user, t.reply) for t in fresh], self.speaker,
                                   self.options.summary_tokens, self.budget, self.summarize)
        self.covers = begin + count
        if self.store:
            self.store.append_note(self.note, self.covers)

    def summarize(self, messages: list[dict[str, str]]) -> str:
        """The base model (adapter off, greedy) writes the note, so it is plain notes, not the persona's style."""
        if self.options.show_prompt:
            text = render_text(self.tokenizer, messages, generation_prompt=True)
            print(f"--- summary prompt ({len(prompt_ids(self.tokenizer, messages))} tokens) ---\n{text}--- end of summary prompt ---", flush=True)
        decoding = dataclasses.replace(self.decoding, do_sample=False, max_new_tokens=self.options.summary_tokens, min_reply_chars=0)
        with use_adapter(self.model, None) as model:
            return generate_one(model, self.tokenizer, messages, decoding).text

    def generate(self, messages: list[dict[str, str]]) -> Reply:
        streaming = self.options.once is None  # --once is for scripts: print only the final reply
        with self.ctrl_c.armed():
            if self.options.show_prompt:
                text = render_text(self.tokenizer, messages, generation_prompt=True)
                print(f"--- prompt ({len(prompt_ids(self.tokenizer, messages))} tokens) ---\n{text}--- end of prompt ---", flush=True)
            if streaming:
                print(f"{self.speaker}> ", end="", flush=True)
            show = (lambda piece: print(piece, end="", flush=True)) if streaming else None
            with use_adapter(self.model, self.persona.name if self.persona else None) as model:
                reply = generate_one(model, self.tokenizer, messages, self.decoding, show, lambda: self.ctrl_c.pressed)
        print(("" if streaming else reply.text), flush=True)
        return reply


def run_chat(options: ChatOptions) -> int:
    """chat.py: open the saved session (before the model loads, so a locked one fails at once), load, chat."""
    persona = find_persona(options.persona, options.adapters_root) if options.persona else read_adapter(options.adapter) if options.adapter else None
    store = ConversationStore(options.conversations_root, persona.name if persona else "base", options.session) if options.save else None
    saved = store.open() if store else Saved()
    try:
        return converse(options, persona, store, saved)
    finally:
        if store:
            store.close()


def converse(options: ChatOptions, persona: AdapterInfo | None, store: ConversationStore | None, saved: Saved) -> int:
    """Load the base and the persona, resume the saved session, then chat."""
    loaded, model = load_for_chat(options.base, [persona] if persona else [], persona.base_id if persona else None)
    max_context, budget = reply_budget(loaded.model, options.max_context, options.decoding.max_new_tokens)
    chat = Chat(options, loaded, model, persona, budget=budget, store=store, saved=saved)
    note(
        f"chat: {chat.speaker} on {loaded.ref.base_id} ({loaded.device}{', 4-bit' if loaded.quantized else ''}); "
        f"memory {options.memory}, last {options.memory_turns} exchanges, {max_context} context tokens; "
        + " ".join(f"{k}={v}" for k, v in chat.decoding.as_dict().items())
    )
    if store:
        resumed = f"resumed {len(saved.exchanges)} exchange(s)" if saved.exchanges else "new"
        note(f"session {store.session!r}: {resumed}, saved to {store.path}")
    if store and saved.skipped:
        lines = ", ".join(map(str, saved.skipped[:10])) + (" ..." if len(saved.skipped) > 10 else "")
        note(f"warning: skipped {len(saved.skipped)} unreadable line(s) of {store.path} (line {lines}); they stay in the file untouched")
    if options.once is not None:
        chat.handle(options.once)
        return 0
    return chat.run()
