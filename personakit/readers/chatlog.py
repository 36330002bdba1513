"""chatlog (github sjzar/chatlog): the JSON, CSV and text its HTTP API gives for /api/v1/chatlog.

Built from the writer code at commit a638aa9c20350cb8f55910584583e4c8112ca3b9 (2025-08-30):
internal/model/message.go (`Message` as JSON: seq, time, talker, talkerName, isChatRoom, sender,
senderName, isSelf, numeric type/subType, content, contents; `ParseMediaInfo` leaves `content`
empty for media, keeps only a quote's own words there with the quoted message under
`contents.refer`, and names system messages' sender 系统消息; `CSV` and `PlainText`, the other
two outputs, write `PlainTextContent`: `![图片](...)`, `[语音]`, `[链接|title](url)`, a quote as
`> ` lines before the reply), internal/model/message_v3.go and message_v4.go (`isSelf`; a v3
private chat leaves `sender` empty on the exporter's rows) and internal/chatlog/http/route.go
(the CSV header `Time,SenderName,Sender,TalkerName,Talker,Content`; text blocks
`SenderName(sender) [TalkerName(talker)] time`, then the content and a blank line, 我 for the
exporter, the time as util.PerfectTimeFormat shortens it).
"""
from __future__ import annotations

import json
import re
from typing import Any

from ..exports import SELF_ALIASES, Conversation, Export, Message, _chat, _csv_rows, _parse_time

CSV_HEADER = ["Time", "SenderName", "Sender", "TalkerName", "Talker", "Content"]
SYSTEM_SENDER = "系统消息"
TXT_SELF = "我"
# A line that starts with a date is another exporter's header (`2024-06-10 20:05:00 name`).
TXT_HEAD = re.compile(r"(?!\d{4}-\d{2}-\d{2} )(?P<who>.+?) (?:\[(?P<room>.+)\] )?"
                      r"(?P<time>\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}|\d{2}-\d{2} \d{2}:\d{2}:\d{2}|\d{2}:\d{2}:\d{2})")
NAME_ID = re.compile(r"(.*)\(([^()]*)\)")
# PerfectTimeFormat drops the year (or the date) when the range asked for stays inside one;
# only gaps matter, so a stand-in leap year fills it.
STAND_IN_DATE = ("2000-", "2000-01-01 ")

TYPE_KINDS = {1: "text", 3: "image", 34: "voice", 42: "contact", 43: "video", 47: "sticker",
              48: "location", 50: "call", 10000: "system"}
SHARE_KINDS = {57: "text", 62: "system", 6: "file", 8: "sticker", 19: "forward", 24: "forward",
               2000: "transfer", 2001: "red_packet", 2003: "red_packet", 87: "other", 63: "other"}
SHARE = 49
# PlainTextContent of each non-text message, as the CSV and text outputs begin it.
PLAIN_KINDS = [(re.compile(p), kind) for p, kind in (
    (r"!\[图片\]\(", "image"), (r"\[语音\](?:\(|$)", "voice"), (r"\[名片\]$", "contact"),
    (r"!\[视频\]\(", "video"), (r"!\[动画表情\]\(|\[动画表情\]$|\[GIF表情\]$", "sticker"),
    (r"\[位置\|", "location"), (r"\[(?:链接|小程序|视频号|音乐)\||\[(?:小程序|视频号|分享)\]$", "link"),
    (r"\[文件\|", "file"), (r"\[转账\|", "transfer"), (r"\[红包(?:封面)?\]$", "red_packet"),
    (r"\[语音通话\]$", "call"), (r"\[(?:合并转发|笔记)[|\]]", "forward"),
    (r"\[(?:群公告|视频号直播)[|\]]|Type: \d+ Content: ", "other"))]
QUOTED_LINE = "> "
EMPTY_QUOTE = "[引用]"


def detect(text: str, parsed: Any) -> str | None:
    if isinstance(parsed, list) and parsed and all(
            isinstance(m, dict) and {"isSelf", "talker", "seq"} <= m.keys() for m in parsed[:5]):
        return "chatlog-json"
    if [h.strip() for h in text.lstrip("\ufeff").split("\n", 1)[0].split(",")] == CSV_HEADER:
        return "chatlog-csv"
    lines = text.strip().splitlines()
    if lines and TXT_HEAD.fullmatch(lines[0]) and len(lines) > 1 and not TXT_HEAD.fullmatch(lines[1]):
        return "chatlog-txt"
    return None


def near_miss(text: str, parsed: Any) -> str | None:
    if isinstance(parsed, list) and parsed and isinstance(parsed[0], dict) and {"talker", "sender"} <= parsed[0].keys():
        return ("a chatlog JSON export, but its messages lack 'isSelf' or 'seq'; "
                "fetch it again from chatlog's /api/v1/chatlog?format=json or try --format chatlog-json")
    return None


def read(export: Export, text: str, parsed: Any) -> None:
    if export.format == "chatlog-json":
        _read_json(export, parsed if isinstance(parsed, list) else [])
    elif export.format == "chatlog-csv":
        _read_csv(export, text)
    else:
        _read_txt(export, text)


def _read_json(export: Export, parsed: list[Any]) -> None:
    convs: dict[str, Conversation] = {}
    for n, m in enumerate(parsed, 1):
        if not isinstance(m, dict):
            export.reject("invalid_row", f"message {n}", json.dumps(m, ensure_ascii=False), detail="a message is not an object")
            continue
        talker = str(m.get("talker") or "")
        conv = _chat(convs, talker)
        conv.group = conv.group or bool(m.get("isChatRoom"))
        mine = bool(m.get("isSelf"))
        sender = str(m.get("sender") or "")
        name = str(m.get("senderName") or sender or (TXT_SELF if mine else talker))
        friend = () if conv.group or mine else (talker, str(m.get("talkerName") or ""))
        ids = tuple(dict.fromkeys(x for x in (*(SELF_ALIASES if mine else ()), name, sender, *friend) if x))
        kind = TYPE_KINDS.get(m.get("type"), "other")
        if m.get("type") == SHARE:
            kind = SHARE_KINDS.get(m.get("subType"), "link")
        if sender == SYSTEM_SENDER:
            kind = "system"
        conv.messages.append(Message(name, ids, kind, str(m.get("content") or ""), f"message {m.get('seq', n)}",
                                     _parse_time(str(m.get("time", ""))), is_sender=mine))
    export.items.extend(convs.values())


def _plain(content: str) -> tuple[str, str]:
    """(kind, text) of PlainTextContent: a quote's `> ` lines dropped, media by their markup."""
    lines = content.split("\n")
    while lines and lines[0].startswith(QUOTED_LINE):
        lines.pop(0)
    text = "\n".join(lines).strip()
    if text == EMPTY_QUOTE:
        return "text", ""
    return next((kind for pattern, kind in PLAIN_KINDS if pattern.match(text)), "text"), text


def _read_csv(export: Export, text: str) -> None:
    convs: dict[str, Conversation] = {}
    for where, row in _csv_rows(export, text, set(CSV_HEADER)):
        talker, sender, name = row["Talker"].strip(), row["Sender"].strip(), row["SenderName"].strip()
        conv = _chat(convs, talker)
        # No is-self column: in a private chat every sender but the friend is the exporter.
        mine = None if conv.group or sender == SYSTEM_SENDER else sender != talker
        kind, body = _plain(row["Content"])
        if sender == SYSTEM_SENDER:
            kind = "system"
        friend = (talker, row["TalkerName"].strip()) if mine is False else ()
        ids = tuple(dict.fromkeys(x for x in (*(SELF_ALIASES if mine else ()), name, sender, *friend) if x))
        conv.messages.append(Message(name or sender or TXT_SELF, ids, kind, body, where, _parse_time(row["Time"]),
                                     is_sender=mine))
    export.items.extend(convs.values())


def _read_txt(export: Export, text: str) -> None:
    convs: dict[str, Conversation] = {}
    lines = text.splitlines()
    # A block starts at a header line after a blank line; its content may hold blank lines too.
    heads = [(i, match) for i, match in ((i, TXT_HEAD.fullmatch(line)) for i, line in enumerate(lines)
                                          if i == 0 or not lines[i - 1].strip()) if match]
    for k, (head, match) in enumerate(heads):
        end = heads[k + 1][0] if k + 1 < len(heads) else len(lines)
        who = NAME_ID.fullmatch(match.group("who"))
        name, ident = (who.group(1), who.group(2)) if who else (match.group("who"), match.group("who"))
        room = NAME_ID.fullmatch(match.group("room") or "")
        conv = _chat(convs, room.group(2) if room else match.group("room") or "")
        mine = ident == TXT_SELF
        kind, body = _plain("\n".join(lines[head + 1:end]).strip())
        if ident == SYSTEM_SENDER:
            kind = "system"
        ids = tuple(dict.fromkeys(x for x in (*(SELF_ALIASES if mine else ()), name, ident) if x))
        conv.messages.append(Message(name or ident, ids, kind, body, f"line {head + 1}",
                                     _txt_time(match.group("time")), is_sender=mine))
    export.items.extend(convs.values())


def _txt_time(value: str) -> float | None:
    if len(value) == len("2006-01-02 15:04:05"):
        return _parse_time(value)
    return _parse_time(STAND_IN_DATE[0 if len(value) == len("01-02 15:04:05") else 1] + value)
