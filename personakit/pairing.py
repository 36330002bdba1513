"""Chat messages to candidate pairs: whose style is learned, turns, sessions, reply windows.

In a group chat everyone who is not the persona is the other side: the messages before a
persona turn form one prompt turn, each line prefixed with its speaker's name.

Every message ends up exactly once: inside a candidate pair (its text is part of the pair's
instruction or output), or as a reject with a structural reason:
  system       system notices, recalls, pats, join/leave lines, service messages, tool traffic
  group        any message of a group chat when groups are skipped (--skip-groups)
  non_text     images, stickers, voice, video, files, red packets, transfers, calls...
  empty        a text message with no text
  unanswered   the other side's text that got no persona reply within the reply window
  unprompted   persona text with no other-side text turn right before it in the window
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .cleaning import is_system_line
from .errors import UserError
from .exports import Candidate, Conversation, Export, Message, Reject

SENDERS_LISTED = 12   # "senders seen" names this many senders of a big group, then a count


@dataclass(frozen=True)
class Windows:
    merge: float     # seconds between one sender's messages that still form one turn
    reply: float     # seconds from the prompt's last message to the reply's first
    session: float   # seconds of silence that start a new session (history does not cross it)


@dataclass(frozen=True)
class GroupOptions:
    skip: bool = False            # drop group chats (reason "group")
    speaker_names: bool = True    # prefix each prompt line of a group chat with its speaker


@dataclass
class Turn:
    persona: bool
    sender: str
    messages: list[Message]
    speaker_names: bool = False

    @property
    def text(self) -> str:
        # One line per message bubble, as the persona would send them.
        return "\n".join(f"{m.sender}: {m.text.strip()}" if self.speaker_names else m.text.strip()
                         for m in self.messages if m.kind == "text" and m.text.strip())


def resolve_persona(export: Export, me: list[str]) -> None:
    """Mark system lines, groups, and each chat message as the persona's or not (from --me or
    the export's is-sender flag)."""
    for conv in export.conversations:
        for m in conv.messages:
            if m.kind == "text" and is_system_line(m.text):
                m.kind = "system"
        speakers = {(m.sender, m.is_sender) for m in conv.messages if m.kind != "system" and m.persona is None}
        conv.group = conv.group or len(speakers) > 2
    chat = [m for c in export.conversations for m in c.messages
            if m.persona is None and m.kind != "system"]
    if not chat:
        return
    if me:
        wanted = {name.casefold() for name in me}
        for m in chat:
            m.persona = any(i.casefold() in wanted for i in m.ids)
        if not any(m.persona for m in chat):
            raise UserError(f"--me {', '.join(me)} matches no sender in {export.path}; "
                            f"senders seen (any name or id listed works): {senders_seen(chat)}")
        for conv in export.conversations:
            talk = [m for m in conv.messages if m.kind != "system" and m.persona is not None]
            if not conv.group and len({(m.sender, m.is_sender) for m in talk}) > 1 and all(m.persona for m in talk):
                raise UserError(f"--me {', '.join(me)} matches both sides of a chat in {export.path} "
                                f"({senders_seen(talk)}); name only the persona")
    elif all(m.is_sender is not None for m in chat):
        for m in chat:
            m.persona = m.is_sender
    else:
        raise UserError(f"{export.path} does not say which messages are whose; pass --me with "
                        f"the persona's name or id, one of: {senders_seen(chat)}")


def senders_seen(messages: list[Message]) -> str:
    """Each sender with every alias --me accepts for it and its message count."""
    aliases: dict[tuple[str, bool | None], dict[str, None]] = {}
    counts: Counter[tuple[str, bool | None]] = Counter()
    for m in messages:
        key = (m.sender, m.is_sender)
        aliases.setdefault(key, {m.sender: None}).update(dict.fromkeys(m.ids))
        counts[key] += 1
    ranked = sorted(counts, key=lambda key: (-counts[key], key[0]))
    listed = "; ".join(f"{' / '.join(aliases[key])}: {counts[key]} messages"
                       for key in ranked[:SENDERS_LISTED])
    more = len(ranked) - SENDERS_LISTED
    return listed + (f"; and {more} more senders" if more > 0 else "")


def export_candidates(export: Export, windows: Windows,
                      groups: GroupOptions = GroupOptions()) -> tuple[list[Candidate], list[Reject]]:
    """All candidate pairs of one export, and the rejects of its parse and of pairing."""
    candidates: list[Candidate] = []
    rejects = list(export.rejects)
    for n, item in enumerate(export.items):
        if isinstance(item, Candidate):
            candidates.append(item)
            continue
        pairs, leftovers = pair_conversation(item, str(export.path), f"{export.path}#{n}", windows, groups)
        candidates += pairs
        rejects += leftovers
    return candidates, rejects


def pair_conversation(conv: Conversation, file: str, key: str, windows: Windows,
                      groups: GroupOptions = GroupOptions()) -> tuple[list[Candidate], list[Reject]]:
    candidates: list[Candidate] = []
    rejects: list[Reject] = []
    content = []
    for m in conv.messages:
        if m.kind == "system":
            rejects.append(_leftover("system", m, file))
        elif conv.group and groups.skip:
            rejects.append(_leftover("group", m, file))
        else:
            content.append(m)
    for s, session in enumerate(split_sessions(content, windows.session)):
        turns = build_turns(session, windows.merge, conv.group, groups.speaker_names)
        paired = [False] * len(turns)
        for i in range(1, len(turns)):
            prompt, reply = turns[i - 1], turns[i]
            if (reply.persona and not prompt.persona and prompt.text and reply.text
                    and _gap(prompt.messages[-1], reply.messages[0]) <= windows.reply):
                paired[i - 1] = paired[i] = True
                candidates.append(Candidate(
                    prompt.text, reply.text, file,
                    _span(prompt.messages[0].where, reply.messages[-1].where),
                    system=conv.system, session=f"{key}#{s}"))
        for turn, in_pair in zip(turns, paired):
            for m in turn.messages:
                reason = _message_reason(m, turn.persona, in_pair)
                if reason:
                    rejects.append(_leftover(reason, m, file))
    return candidates, rejects


def split_sessions(messages: list[Message], gap: float) -> list[list[Message]]:
    sessions: list[list[Message]] = []
    for m in messages:
        if sessions and _gap(sessions[-1][-1], m) <= gap:
            sessions[-1].append(m)
        else:
            sessions.append([m])
    return sessions


def build_turns(messages: list[Message], merge: float, group: bool = False,
                speaker_names: bool = True) -> list[Turn]:
    """Consecutive messages of one sender within the merge window form one turn; in a group
    chat so do consecutive messages of everyone but the persona."""
    turns: list[Turn] = []
    for m in messages:
        last = turns[-1] if turns else None
        persona = bool(m.persona)
        if (last and last.persona == persona and (last.sender == m.sender or (group and not persona))
                and _gap(last.messages[-1], m) <= merge):
            last.messages.append(m)
        else:
            turns.append(Turn(persona, m.sender, [m], group and not persona and speaker_names))
    return turns


def _message_reason(m: Message, persona: bool, in_pair: bool) -> str | None:
    if m.kind != "text":
        return "non_text"
    if not m.text.strip():
        return "empty"
    if in_pair:
        return None
    return "unprompted" if persona else "unanswered"


def _gap(a: Message, b: Message) -> float:
    # Without timestamps (ShareGPT, OpenAI messages) order alone decides.
    return b.time - a.time if a.time is not None and b.time is not None else 0.0


def _span(first: str, last: str) -> str:
    return first if first == last else f"{first} to {last}"


def _leftover(reason: str, m: Message, file: str) -> Reject:
    return Reject(reason, file, m.where, text=m.text if m.kind == "text" else f"[{m.kind}] {m.text}".strip())
