"""QQChatExporter (github shuakami/qq-chat-exporter): its JSON, chunked JSONL and TXT exports.

Built from the exporter's own writer code at commit 888b51fab652fd50ce61dc259bc1ebb5b76aa234
(tag v6.2.7, 2026-08-22): qq-chat-export-core/src/json_exporter.rs and json_templates.rs (one
JSON `{metadata, chatInfo, statistics, messages}`, or a folder `<name>_chunked_jsonl/` with
manifest.json and chunks/c000001.jsonl holding one message per line), text_exporter.rs (the TXT:
a `[QQChatExporter V5 / ...]` banner, then blocks of `name:`, `时间:`, `内容:` and optional
`资源:`, `提及:`, `回复:` lines), types.rs (`CleanMessage`, `ChatInfo`) and
qq-chat-export-server/src/parser/simple_parser.rs (how `content.text` and `content.elements` are
made: `[图片:x.jpg]`, `[语音:4秒]`, faces as `/捂脸`, a quote as a `reply` element shown as
`[回复消息]`, gray tips as `system` with sender 系统消息). v5 (tag v5.5.79,
plugins/qq-chat-exporter/lib/core/) writes the same layout; its older MessageParser put a quote
inline as `[回复 name: quoted text]`, which is read too.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..exports import SELF_ALIASES, Conversation, Export, Message, _parse_time, decode, placeholder_kind

BANNER = "[QQChatExporter V"
SYSTEM_SENDER = "系统消息"      # the sender of gray tips (recalls, pokes, joins) that have none
UNKNOWN_UID = "未知"           # the parser's uid when it has none

# content.elements that are the message's own words or media; anything else (a forward, a card,
# markdown, a gift...) makes the whole message non-text.
TEXT_ELEMENTS = {"text", "at", "face", "market_face", "image", "video", "audio", "file", "reply", "location",
                 "wallet"}
CARD_KINDS = {"forward": "forward", "json": "link"}
SYSTEM_ELEMENTS = {"system", "av_record"}      # gray tips and call records (the parser's `system`)
UNNAMED_FACE = re.compile(r"表情\d*")           # a face the parser found no name for

# Media as `content.text` writes them (v6 and v5 spellings) -> the normalised placeholder.
INLINE_MEDIA = [(re.compile(r"\[(图片|视频|文件)[:：][^\]\n]*\]"), r"[\1]"),
                (re.compile(r"\[语音[:：\s][^\]\n]*\]"), "[语音]"), (re.compile(r"\[表情\d+\]"), "[表情]"),
                (re.compile(r"\[位置消息\]"), "[位置]"), (re.compile(r"\[(?:红包/钱包消息|恭喜发财)\]"), "[红包]")]
REPLY_PREFIX = re.compile(r"^(?:\[回复消息\]|\[回复 .*?\]\n|\[回复 [^\]\n]*\])", re.DOTALL)
# A gray tip sent under a real sender: "小雨 撤回了一条消息（理由）", "你撤回了 小雨 的消息".
RECALL = re.compile(r".{0,40}?\s?撤回了(?:一条消息| ?.{0,40}? ?的消息)(?:（[^）]*）)?")

# TXT: what 内容: says when a message has no text.
TXT_NO_TEXT = {"[系统消息]": "system", "[表情消息]": "sticker", "[无文本内容]": "other"}
TXT_RESOURCES = re.compile(r"\[((?:image|video|audio|file)(?:、(?:image|video|audio|file))*)消息\]")
RESOURCE_KINDS = {"image": "image", "video": "video", "audio": "voice", "file": "file"}
TXT_FIELDS = ("类型: ", "资源: ", "提及: ", "回复: ")
TXT_NUMBER = re.compile(r"\[\d+\]")            # the optional message number line before a block
TXT_RULE = re.compile(r"={10,}\s*")


def detect(text: str, parsed: Any) -> str | None:
    if isinstance(parsed, dict) and isinstance(parsed.get("chatInfo"), dict) and (
            isinstance(parsed.get("messages"), list) or isinstance(parsed.get("chunked"), dict)):
        return "qq-chat-exporter-json"
    if text.lstrip().startswith(BANNER):
        return "qq-chat-exporter-txt"
    return None


def near_miss(text: str, parsed: Any) -> str | None:
    if "QQChatExporter" in text[:2000] or "QQ聊天记录导出文件" in text[:2000]:
        return ("a QQChatExporter export, but it has neither the JSON keys (chatInfo, messages) nor "
                "the TXT banner line; if it was cut off, export it again, else try --format "
                "qq-chat-exporter-json or qq-chat-exporter-txt")
    return None


def read(export: Export, text: str, parsed: Any) -> None:
    if export.format == "qq-chat-exporter-json":
        if detect(text, parsed) != "qq-chat-exporter-json":
            raise UserError(f"{export.path} is not a QQChatExporter JSON export (no 'chatInfo' and "
                            f"'messages'); check the file or its --format")
        _read_json(export, parsed)
    else:
        _read_txt(export, text)


# ---- JSON: one file, or manifest.json of a chunked export

def _read_json(export: Export, parsed: dict[str, Any]) -> None:
    info = parsed["chatInfo"]
    if isinstance(parsed.get("chunked"), dict):
        records = _chunk_records(export, parsed["chunked"])
    else:
        records = [(f"message {m.get('id') or n}" if isinstance(m, dict) else f"message {n}", m)
                   for n, m in enumerate(parsed["messages"], 1)]
    conv = Conversation(group=info.get("type") == "group")
    self_ids = {str(info[k]) for k in ("selfUid", "selfUin") if info.get(k)}
    for where, m in records:
        if isinstance(m, dict):
            conv.messages.append(_json_message(m, where, info, self_ids))
        else:
            export.reject("invalid_row", where, json.dumps(m, ensure_ascii=False), detail="a message is not an object")
    if not self_ids:
        _mark_sides(conv, str(info.get("name") or ""))
    export.items.append(conv)


def _chunk_records(export: Export, chunked: dict[str, Any]) -> list[tuple[str, Any]]:
    records: list[tuple[str, Any]] = []
    for chunk in chunked.get("chunks") or []:
        rel = str(chunk.get("relativePath") or Path(str(chunked.get("chunksDir", "chunks"))) / str(chunk.get("fileName")))
        path = export.path.parent / rel
        if not path.is_file():
            raise UserError(f"{export.path} lists {rel}, which is missing; copy the whole "
                            f"_chunked_jsonl folder and point at it")
        for lineno, line in enumerate(decode(path.read_bytes())[0].splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{rel} line {lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                export.reject("bad_json", f"{rel} line {lineno}", line, detail=exc.msg)
    return records


def _json_message(m: dict[str, Any], where: str, info: dict[str, Any], self_ids: set[str]) -> Message:
    sender = m.get("sender") if isinstance(m.get("sender"), dict) else {}
    uid, uin = str(sender.get("uid") or ""), str(sender.get("uin") or "")
    name = str(sender.get("name") or uin or uid or SYSTEM_SENDER)
    mine = bool(self_ids & {uid, uin}) if self_ids else None
    own = (*SELF_ALIASES, info.get("selfName")) if mine else ()
    ids = tuple(dict.fromkeys(str(x) for x in (*own, name, sender.get("nickname"), sender.get("groupCard"),
                                               sender.get("remark"), uin, uid) if x and x != UNKNOWN_UID))
    content = m.get("content") if isinstance(m.get("content"), dict) else {}
    kind, text = _json_text(content)
    if m.get("recalled") or m.get("system") or m.get("type") == "system" or (
            name == SYSTEM_SENDER and uid in ("", UNKNOWN_UID)):
        kind = "system"
    if kind != "text":   # a reject keeps the text as written
        text = str(content.get("text", ""))
    stamp = m.get("timestamp")
    time = stamp / 1000 if isinstance(stamp, (int, float)) and stamp > 0 else _parse_time(str(m.get("time", "")))
    return Message(name, ids, kind, text, where, time, is_sender=mine)


def _json_text(content: dict[str, Any]) -> tuple[str, str]:
    """(kind, text) of `content.text`, read with its elements: faces as [捂脸], stickers as [表情],
    cards and forwards (other people's words) never text."""
    text = str(content.get("text", ""))
    for e in content.get("elements") or []:
        kind = e.get("type") if isinstance(e, dict) else None
        data = e.get("data") if isinstance(e, dict) and isinstance(e.get("data"), dict) else {}
        if kind in SYSTEM_ELEMENTS:
            return "system", text
        if kind not in TEXT_ELEMENTS:
            return CARD_KINDS.get(str(kind), "other"), text
        name = str(data.get("name") or "")
        if kind == "face" and name:
            face = name.strip("/[]")
            text = text.replace(name, "[表情]" if UNNAMED_FACE.fullmatch(face) else f"[{face}]", 1)
        elif kind == "market_face":
            text = text.replace(f"[{name or '表情'}]", "[表情]", 1)
    return _inline(text)


def _inline(text: str) -> tuple[str, str]:
    """(kind, text) of `content.text` as written: the quote marker dropped, media normalised."""
    text = REPLY_PREFIX.sub("", text.strip()).strip()
    for pattern, placeholder in INLINE_MEDIA:
        text = pattern.sub(placeholder, text)
    return ("system" if RECALL.fullmatch(text) else placeholder_kind(text)), text


def _mark_sides(conv: Conversation, friend: str) -> None:
    """A private chat is named after the friend, so the one other speaker is the exporter."""
    talk = [m for m in conv.messages if m.kind != "system"]
    if conv.group or len({m.sender for m in talk}) > 2 or friend not in {m.sender for m in talk}:
        return
    for m in talk:
        m.is_sender = m.sender != friend
        if m.is_sender:
            m.ids = tuple(dict.fromkeys((*SELF_ALIASES, *m.ids)))


# ---- TXT

def _read_txt(export: Export, text: str) -> None:
    lines = text.splitlines()
    heads = [i for i in range(len(lines) - 1) if _is_head(lines[i], lines[i + 1])]
    info = dict(line.split(": ", 1) for line in lines[:heads[0] if heads else len(lines)] if ": " in line)
    conv = Conversation(group=info.get("聊天类型") == "群聊")
    for k, head in enumerate(heads):
        if k + 1 < len(heads):
            end = heads[k + 1] - (1 if TXT_NUMBER.fullmatch(lines[heads[k + 1] - 1]) else 0)
        else:
            end = next((i for i in range(head, len(lines)) if TXT_RULE.fullmatch(lines[i])), len(lines))
        conv.messages.append(_txt_message(lines, head, end, conv.group))
    _mark_sides(conv, info.get("聊天名称", ""))
    export.items.append(conv)


def _is_head(line: str, following: str) -> bool:
    return len(line) > 1 and line.endswith(":") and following.startswith("时间: ") and not line.startswith(
        ("内容: ", *TXT_FIELDS))


def _txt_message(lines: list[str], head: int, end: int, group: bool) -> Message:
    sender = lines[head][:-1]
    if group:   # a group title goes before the name: "[管理员] 小雨:"
        sender = re.sub(r"^\[[^\]]+\] ", "", sender)
    content: list[str] = []
    field = None
    for line in lines[head + 2:end]:
        if line.startswith("内容: "):
            field, content = "内容", [line[len("内容: "):]]
        elif line.startswith(TXT_FIELDS):
            field = line[:2]
        elif field == "内容":
            content.append(line)
    raw = "\n".join(content).strip()
    resources = TXT_RESOURCES.fullmatch(raw)
    if raw in TXT_NO_TEXT:
        kind, body = TXT_NO_TEXT[raw], raw
    elif resources:
        kind, body = RESOURCE_KINDS[resources.group(1).split("、")[0]], raw
    else:
        kind, body = _inline(raw)
    if sender == SYSTEM_SENDER:
        kind = "system"
    time = _parse_time(lines[head + 1][len("时间: "):])
    return Message(sender, (sender,), kind, body if kind == "text" else raw, f"line {head + 1}", time)
