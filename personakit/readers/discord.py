"""DiscordChatExporter JSON (`Guild - Channel [channel id].json`, one channel or DM per file).

Built from its writer code, github Tyrrrz/DiscordChatExporter at commit
4f29fa63d0701fe116edbf644c992fa3b3e9f5f2 (2026-03-01):
`DiscordChatExporter.Core/Exporting/JsonMessageWriter.cs` (the layout: `guild`, `channel{id, type,
name}`, `messages[]` with `id`, `type`, `timestamp`, `timestampEdited`, `content`, `author{id,
name, discriminator, nickname, isBot}`, `attachments[{fileName}]`, `embeds`, `stickers`,
`reference{type, messageId}`, `forwardedMessage`), `PlainTextMessageExtensions.cs` (system
messages carry a fallback text such as "Pinned a message."), `Discord/Data/MessageKind.cs`
(only `Default` and `Reply` are someone's own words; other kinds are named or numbered) and
`Discord/Data/Channel.cs` (a DM channel is named after the other person's display name, which
is also the `nickname` the writer gives that person, so a DM knows which side is the exporter).
A reply's JSON holds only its own text and the id of the message it answers, so no quoted text
can leak; an edit changes `timestampEdited`, not the text.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import PurePath
from typing import Any

from ..errors import UserError
from ..exports import Conversation, Export, Message, _qq_sides

SPOKEN = {"Default", "Reply"}
PRIVATE = {"DirectTextChat"}
EXTENSIONS = {"image": (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"),
              "video": (".gifv", ".mp4", ".webm", ".mov"), "voice": (".mp3", ".wav", ".ogg", ".flac", ".m4a")}


def detect(_text: str, parsed: Any) -> str | None:
    if isinstance(parsed, dict) and isinstance(parsed.get("channel"), dict) and isinstance(parsed.get("messages"), list):
        return "discord"
    return None


def near_miss(_text: str, parsed: Any) -> str | None:
    if isinstance(parsed, dict) and isinstance(parsed.get("guild"), dict) and "channel" not in parsed:
        return ("a DiscordChatExporter JSON export, but it has no 'channel'; export it again with "
                "--format Json or try --format discord")
    return None


def read(export: Export, text: str, parsed: Any) -> None:
    if detect(text, parsed) != "discord":
        raise UserError(f"{export.path} is not a DiscordChatExporter JSON export (no 'channel' and 'messages'); "
                        f"export with --format Json or check --format")
    channel = parsed["channel"]
    conv = Conversation(group=channel.get("type") not in PRIVATE)
    for n, m in enumerate(parsed["messages"], 1):
        if not isinstance(m, dict) or not isinstance(m.get("author"), dict):
            export.reject("invalid_row", f"message {n}", json.dumps(m, ensure_ascii=False),
                          detail="a message without an 'author' object")
            continue
        conv.messages.append(_message(m, n))
    # A DM channel bears the friend's display name: every other author is the exporter.
    _qq_sides(conv, str(channel.get("name") or ""))
    export.items.append(conv)


def _message(m: dict[str, Any], n: int) -> Message:
    author = m["author"]
    name, nickname = str(author.get("name") or ""), str(author.get("nickname") or "")
    discriminator = str(author.get("discriminator") or "0000")
    ids = tuple(dict.fromkeys(x for x in (nickname, name, str(author.get("id") or ""),
                                          f"{name}#{discriminator}" if discriminator != "0000" else "") if x))
    content = m.get("content") if isinstance(m.get("content"), str) else ""
    if m.get("type") not in SPOKEN:
        kind = "system"
    elif content.strip():
        kind = "text"
    elif m.get("stickers"):
        kind = "sticker"
    elif m.get("attachments"):
        kind = _attachment_kind(m["attachments"][0])
    elif m.get("forwardedMessage"):
        kind = "forward"     # someone else's words, passed on
    elif m.get("embeds"):
        kind = "link"
    else:
        kind = "text"
    return Message(ids[0] if ids else "?", ids, kind, content, f"message {m.get('id', n)}", _time(m.get("timestamp")))


def _attachment_kind(attachment: Any) -> str:
    suffix = PurePath(str(attachment.get("fileName", ""))).suffix.lower() if isinstance(attachment, dict) else ""
    return next((kind for kind, suffixes in EXTENSIONS.items() if suffix in suffixes), "file")


def _time(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None

