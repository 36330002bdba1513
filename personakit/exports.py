"""Raw chat exports and loose datasets in; messages, candidate rows and parse rejects out.

Chat exports (WeChat CSV, Telegram JSON, QQ text, and the exporters in personakit/readers/) and
role-based datasets (ShareGPT, OpenAI `messages`) become conversations of messages, paired later;
alpaca/canonical records are already pairs and become candidates directly. Whatever cannot be
parsed becomes a reject.
"""
from __future__ import annotations

import calendar
import codecs
import csv
import io
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from importlib import import_module
from pathlib import Path
from typing import Any, Callable, Iterator

from .data import parse_jsonl
from .errors import UserError

# Format name -> module of personakit/readers/ that detects and reads it (imported on use,
# since the readers import this module).
READER_MODULES = {
    "qq-chat-exporter-json": "qq_chat_exporter", "qq-chat-exporter-txt": "qq_chat_exporter",
    "weflow-json": "weflow", "weflow-csv": "weflow", "weflow-txt": "weflow",
    "chatlog-json": "chatlog", "chatlog-csv": "chatlog", "chatlog-txt": "chatlog",
    "wechat-memotrace-txt": "memotrace", "wechat-memotrace-json": "memotrace", "whatsapp": "whatsapp",
    "discord": "discord",
}
FORMATS = ("auto", "alpaca", "sharegpt", "messages", "wechat-memotrace", "wechat-pywxdump",
           "telegram", "qq", *READER_MODULES)

# How exports write media inline; such a token is never training text.
MEDIA_PLACEHOLDERS = {
    "图片": "image", "照片": "image", "photo": "image", "image": "image",
    "表情": "sticker", "动画表情": "sticker", "sticker": "sticker", "gif": "sticker",
    "语音": "voice", "voice": "voice", "voice message": "voice", "audio": "voice",
    "视频": "video", "video": "video", "文件": "file", "file": "file",
    "红包": "red_packet", "转账": "transfer", "位置": "location", "location": "location",
    "链接": "link", "名片": "contact", "语音通话": "call", "视频通话": "call",
    "media": "media",
}
PLACEHOLDER_RE = re.compile(
    r"\[(" + "|".join(sorted(map(re.escape, MEDIA_PLACEHOLDERS), key=len, reverse=True)) + r")\]",
    re.IGNORECASE)


def placeholder_kind(text: str) -> str:
    """The media kind of a message that is only placeholders ("[图片]"), else "text"."""
    media = PLACEHOLDER_RE.findall(text)
    return MEDIA_PLACEHOLDERS[media[0].lower()] if media and not PLACEHOLDER_RE.sub("", text).strip() else "text"


# MemoTrace/WeChatMsg `Type` codes; anything not listed is some other non-text message.
WECHAT_TYPES = {1: "text", 3: "image", 34: "voice", 42: "contact", 43: "video", 47: "sticker",
                48: "location", 49: "app", 50: "call", 10000: "system", 10002: "system"}
# PyWxDump/WeClone `type_name` values; type 10000 is "系统通知", "拍一拍", "邀请加群" or
# "消息撤回<subtype>" (utils `typeid2name`).
WXDUMP_TYPES = {"文本": "text", "引用回复": "text", "粘贴的文本": "text", "图片": "image", "语音": "voice",
                "视频": "video", "动画表情": "sticker", "用户上传的GIF表情": "sticker", "文件": "file",
                "位置": "location", "名片": "contact", "链接": "link", "卡片式链接": "link",
                "分享链接": "link", "转账": "transfer", "红包": "red_packet", "语音通话": "call",
                "视频通话": "call", "系统通知": "system", "撤回消息": "system", "拍一拍": "system",
                "邀请加群": "system", "添加好友": "system", "群公告": "system"}
# PyWxDump appends the quoted message to a quote reply's own text: "reply\n\n[引用](time)name:quoted".
WXDUMP_QUOTE = re.compile(r"\s*\[引用\]\(.*", re.DOTALL)
WXDUMP_SELF = "我"          # PyWxDump's `talker` on the exporting account's rows
WXDUMP_SYSTEM = "系统"      # its `talker` on a group's system/publisher rows
SELF_ALIASES = ("self", "我")
# Telegram chat types with more than two people (the others: personal_chat, bot_chat, saved_messages).
TELEGRAM_GROUPS = {"private_group", "private_supergroup", "public_supergroup", "private_channel",
                   "public_channel"}
TELEGRAM_MEDIA = {"sticker": "sticker", "animation": "sticker", "voice_message": "voice",
                  "audio_file": "voice", "video_message": "video", "video_file": "video"}
PERSONA_ROLES = {"gpt": True, "assistant": True, "model": True, "bot": True,
                 "human": False, "user": False}

QQ_HEAD = re.compile(r"^(\d{4}-\d{1,2}-\d{1,2} \d{1,2}:\d{2}:\d{2}) (.+?)\s*$")
QQ_NAME = re.compile(r"^(.*?)(?:\((\d{4,})\)|<([^<>]+)>)$")
QQ_SEPARATOR = re.compile(r"^={10,}\s*$")
QQ_SYSTEM_IDS = {"10000", "系统消息"}
EXPORT_SUFFIXES = (".json", ".jsonl", ".txt", ".csv")


@dataclass
class Message:
    sender: str                  # display name
    ids: tuple[str, ...]         # every name or id that --me may use for this sender
    kind: str                    # "text", "system", or a media kind
    text: str
    where: str                   # "line 12", "message 345", "item 3, turn 2"
    time: float | None = None    # seconds; only differences are used
    is_sender: bool | None = None   # the export's own "the exporting account sent this" flag
    persona: bool | None = None     # known from roles, else resolved from --me


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)
    system: str | None = None
    group: bool = False          # a group chat (also set later when more than two people speak)


@dataclass
class Candidate:
    instruction: str
    output: str
    file: str
    where: str
    history: list[list[str]] = field(default_factory=list)
    system: str | None = None
    session: str | None = None   # chat pairs: earlier kept pairs of this session become history


@dataclass
class Reject:
    reason: str
    file: str
    where: str
    detail: str | None = None
    instruction: str | None = None
    output: str | None = None
    text: str | None = None

    def to_row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Export:
    path: Path
    format: str
    encoding: str
    items: list[Candidate | Conversation] = field(default_factory=list)   # in file order
    rejects: list[Reject] = field(default_factory=list)
    date_order: str = "auto"     # WhatsApp: "dmy", "mdy" or "ymd"; "auto" until the whole file decides

    @property
    def conversations(self) -> list[Conversation]:
        return [i for i in self.items if isinstance(i, Conversation)]

    def reject(self, reason: str, where: str, text: str, detail: str | None = None) -> None:
        self.rejects.append(Reject(reason, str(self.path), where, detail=detail, text=text))


def decode(data: bytes) -> tuple[str, str]:
    """Text and encoding name: BOM first, then strict UTF-8, then GB18030 (Chinese Windows)."""
    if data.startswith(codecs.BOM_UTF8):
        return data[3:].decode("utf-8", errors="replace"), "utf-8-sig"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace"), "utf-16"
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        lenient = data.decode("utf-8", errors="replace")
    broken = lenient.count("\ufffd") - data.count("\ufffd".encode())
    high = len(data) - len(data.translate(None, bytes(range(0x80, 0x100))))
    # A few broken bytes in a UTF-8 file are damage (their lines are rejected as garbled);
    # GBK text read as UTF-8 breaks on nearly every Chinese character.
    if broken * 100 <= high:
        return lenient, "utf-8 (damaged bytes replaced)"
    return data.decode("gb18030", errors="replace"), "gb18030"


def read_export(path: Path, fmt: str = "auto", date_order: str = "auto") -> Export:
    """Read one file in `fmt` (or the detected format) into messages, candidates and rejects."""
    text, encoding = decode(path.read_bytes())
    if not text.strip():
        raise UserError(f"{path} is empty; export the chat again or leave the file out")
    parsed = _load_json(text)
    if fmt == "auto":
        fmt = detect_format(path, text, parsed)
    export = Export(path, fmt, encoding, date_order=date_order)
    if fmt in READER_MODULES:
        _reader(READER_MODULES[fmt]).read(export, text, parsed)
        if not export.rejects and not any(c.messages for c in export.conversations):
            raise UserError(f"{path} holds no messages as a {fmt} export would write them; "
                            f"check the file or its --format")
    else:
        READERS[fmt](export, text, parsed)
    return export


def input_files(path: Path) -> list[Path]:
    """The export files one command-line input names: the file itself, or those in a folder
    (an exporter's batch output; a chunked export is its manifest), in name order."""
    if not path.is_dir():
        return [path]
    if (path / "manifest.json").is_file():
        return [path / "manifest.json"]
    found = []
    for entry in sorted(path.iterdir()):
        if entry.is_dir() and (entry / "manifest.json").is_file():
            found.append(entry / "manifest.json")
        elif entry.is_file() and entry.suffix.lower() in EXPORT_SUFFIXES and not entry.name.startswith("."):
            found.append(entry)
    if not found:
        raise UserError(f"folder {path} holds no export files ({', '.join(EXPORT_SUFFIXES)}); "
                        f"name the export files themselves")
    return found


def _reader(module: str) -> Any:
    return import_module(f".readers.{module}", __package__)


def detect_format(path: Path, text: str, parsed: Any) -> str:
    modules = [_reader(m) for m in dict.fromkeys(READER_MODULES.values())]
    for module in modules:
        fmt = module.detect(text, parsed)
        if fmt:
            return fmt
    near = next((hint for hint in (m.near_miss(text, parsed) for m in modules) if hint), None)
    if near is None and text.lstrip()[:1] in ("[", "{"):
        return "telegram" if _is_telegram(parsed) else "records"
    header = {c.strip() for c in text.split("\n", 1)[0].split(",")}
    if {"Type", "IsSender", "StrContent"} <= header:
        return "wechat-memotrace"
    if {"type_name", "is_sender"} <= header and header & {"msg", "content"}:
        return "wechat-pywxdump"
    head = text.splitlines()[:60]
    if near is None and any(line.startswith(("消息对象", "消息记录")) or QQ_HEAD.match(line) for line in head):
        return "qq"
    raise UserError(f"{path} is in no format clear_data.py knows (tried {', '.join(FORMATS[1:])})"
                    + (f"; it looks like {near}" if near else "")
                    + "; check the file or name its format with --format")


def _load_json(text: str) -> Any:
    """The whole file as one JSON value, or None (JSONL, or not JSON at all)."""
    if text.lstrip()[:1] not in ("[", "{"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _is_telegram(data: Any) -> bool:
    if not isinstance(data, dict):
        return False
    if isinstance(data.get("chats"), dict):
        return True
    messages = data.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and ("date" in m or "date_unixtime" in m) for m in messages[:5])


def _parse_time(value: str) -> float | None:
    """Unix seconds from epoch numbers or local date strings (read as UTC: only gaps matter)."""
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    for pattern in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y/%m/%d %H:%M:%S", "%Y-%m-%d %H:%M"):
        try:
            return float(calendar.timegm(datetime.strptime(value, pattern).timetuple()))
        except ValueError:
            continue
    try:   # ISO 8601 with fractions or a zone: "2026-12-01T12:30:00.000Z", "...+08:00"
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return None
    return stamp.timestamp() if stamp.tzinfo else float(calendar.timegm(stamp.timetuple()))


# ---- JSON / JSONL records: alpaca, canonical, ShareGPT, OpenAI messages

def _read_records(export: Export, text: str, parsed: Any, kind: str | None = None) -> None:
    for where, obj in _json_items(export, text, parsed):
        _add_record(export, where, obj, kind or _record_kind(obj))


def _json_items(export: Export, text: str, parsed: Any) -> list[tuple[str, Any]]:
    """(where, object) per record of a JSON array, a single object, or JSONL lines."""
    if isinstance(parsed, list):
        return [(f"item {i}", obj) for i, obj in enumerate(parsed, 1)]
    if isinstance(parsed, dict):
        return [("line 1", parsed)]
    if text.lstrip().startswith("["):
        # One broken array cannot be read record by record; JSONL can.
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{export.path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                            f"fix it or save one record per line as JSONL") from None
    records, bad = parse_jsonl(text.splitlines(), on_error="collect")
    for line in bad:
        export.reject("bad_json", f"line {line.lineno}", line.text, detail=line.reason)
    return [(f"line {lineno}", obj) for lineno, obj in records]


def _record_kind(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "conversations" in obj:
        return "sharegpt"
    if "messages" in obj:
        return "messages"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    return None


def _add_record(export: Export, where: str, obj: Any, kind: str | None) -> None:
    result: Candidate | Conversation | str
    if not isinstance(obj, dict) or kind is None:
        result = "not an alpaca, ShareGPT or OpenAI messages record"
    elif kind == "alpaca":
        result = _alpaca(obj, str(export.path), where)
    else:
        result = _role_conversation(obj, kind, where)
    if isinstance(result, (Candidate, Conversation)):
        export.items.append(result)
    else:
        export.reject("invalid_row", where, json.dumps(obj, ensure_ascii=False), detail=result)


def _alpaca(obj: dict[str, Any], file: str, where: str) -> Candidate | str:
    instruction, extra, output = obj.get("instruction", ""), obj.get("input", ""), obj.get("output")
    if not all(isinstance(v, str) for v in (instruction, extra, output)):
        return "'instruction', 'input' and 'output' must be strings"
    if extra.strip():
        instruction = f"{instruction}\n{extra}" if instruction.strip() else extra
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in history):
        return "'history' must be a list of [user, reply] pairs"
    system = obj.get("system") or None
    if system is not None and not isinstance(system, str):
        return "'system' must be a string"
    return Candidate(instruction, output, file, where, [list(p) for p in history], system)


def _role_conversation(obj: dict[str, Any], kind: str, where: str) -> Conversation | str:
    items = obj.get("conversations" if kind == "sharegpt" else "messages")
    role_key, text_key = ("from", "value") if kind == "sharegpt" else ("role", "content")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        return f"'{'conversations' if kind == 'sharegpt' else 'messages'}' must be a list of objects"
    system = obj.get("system") if isinstance(obj.get("system"), str) else None
    conv = Conversation()
    for n, item in enumerate(items, 1):
        role = str(item.get(role_key, "")).lower()
        kind_, text = _content(item.get(text_key))
        if role == "system" and kind_ == "text":
            # A system prompt is row metadata, not a message to pair or count.
            system = f"{system}\n{text}" if system else text
            continue
        persona = PERSONA_ROLES.get(role)
        conv.messages.append(Message(
            sender=role, ids=(role,), kind=kind_ if persona is not None else "system", text=text,
            where=f"{where}, turn {n}", persona=bool(persona)))
    conv.system = system
    return conv


def _content(value: Any) -> tuple[str, str]:
    """(kind, text) of a ShareGPT value or OpenAI content (a string or a list of parts)."""
    if isinstance(value, str):
        return "text", value
    if isinstance(value, list):
        parts = [p.get("text", "") for p in value if isinstance(p, dict) and p.get("type") == "text"]
        return ("text", "\n".join(parts)) if parts else ("image", "")
    return "other", ""


# ---- WeChat CSV: MemoTrace/WeChatMsg and PyWxDump/WeClone

def _csv_rows(export: Export, text: str, required: set[str],
              one_of: tuple[str, ...] = ()) -> Iterator[tuple[str, dict[str, str]]]:
    """(where, row) per CSV record; a row with too few fields becomes a reject."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader)]
    missing = sorted(required - set(header))
    if one_of and not set(one_of) & set(header):
        missing.append(" or ".join(one_of))
    if missing:
        raise UserError(f"{export.path} lacks CSV column(s) {', '.join(missing)} that a "
                        f"{export.format} export has; check the file or its --format")
    start = reader.line_num + 1
    for fields in reader:
        where, start = f"line {start}", reader.line_num + 1
        if not fields:
            continue
        if len(fields) < len(header):
            export.reject("invalid_row", where, ",".join(fields), detail="fewer CSV fields than the header")
            continue
        yield where, dict(zip(header, fields))


def _chat(convs: dict[str, Conversation], chat_id: str) -> Conversation:
    """The conversation of one chat id; a file that mixes many chats is split by it."""
    if chat_id not in convs:
        convs[chat_id] = Conversation(group=chat_id.endswith("@chatroom"))
    return convs[chat_id]


def _read_memotrace(export: Export, text: str, _parsed: Any) -> None:
    convs: dict[str, Conversation] = {}
    for where, row in _csv_rows(export, text, {"Type", "IsSender", "StrContent", "TalkerId"}):
        try:
            kind = WECHAT_TYPES.get(int(row["Type"]), "other")
        except ValueError:
            kind = "other"
        mine = row["IsSender"].strip() == "1"
        talker = row["TalkerId"].strip()
        # Remark, NickName and wxid (`Sender`) of whoever sent the row: the exporting account's
        # own on its rows, the friend's or group member's on theirs.
        names = [row.get(k, "").strip() for k in ("Remark", "NickName", "Sender")]
        conv = _chat(convs, talker)
        if mine:
            ids = tuple(dict.fromkeys(x for x in (*SELF_ALIASES, *names) if x))
            sender = next((n for n in names if n), "self")
        else:
            ids = tuple(dict.fromkeys(x for x in ((*names,) if conv.group else (talker, *names)) if x))
            sender = next((n for n in names if n), talker)
        time = _parse_time(row.get("CreateTime", "")) or _parse_time(row.get("StrTime", ""))
        conv.messages.append(Message(sender, ids, kind, row["StrContent"], where, time, is_sender=mine))
    export.items.extend(convs.values())


def _read_pywxdump(export: Export, text: str, _parsed: Any) -> None:
    """Both PyWxDump CSV layouts: `msg,src` columns, or one `content` column holding the JSON
    object {"src": ..., "msg": ...}. `talker` is 我 (or the account's wxid) on the exporting
    account's rows and the sender's wxid on the others; `room_name` is the chat's wxid."""
    convs: dict[str, Conversation] = {}
    for where, row in _csv_rows(export, text, {"type_name", "is_sender", "talker"}, ("msg", "content")):
        body = _wxdump_text(row)
        if body is None:
            export.reject("invalid_row", where, row["content"],
                          detail="the content column is not a JSON object with 'msg'")
            continue
        mine = row["is_sender"].strip() == "1"
        talker = row["talker"].strip()
        kind = WXDUMP_TYPES.get(row["type_name"].strip(), "other")
        if row["type_name"].strip().startswith("消息撤回") or (talker == WXDUMP_SYSTEM and not mine):
            kind = "system"
        if kind == "text":
            body = WXDUMP_QUOTE.sub("", body)
        sender = (talker or WXDUMP_SELF) if mine else talker
        ids = tuple(dict.fromkeys((*SELF_ALIASES, sender))) if mine else (sender,)
        conv = _chat(convs, row.get("room_name", "").strip() or talker)
        conv.messages.append(Message(sender, ids, kind, body, where,
                                     _parse_time(row.get("CreateTime", "")), is_sender=mine))
    export.items.extend(convs.values())


def _wxdump_text(row: dict[str, str]) -> str | None:
    if "msg" in row:
        return row["msg"]
    try:
        content = json.loads(row["content"])
    except json.JSONDecodeError:
        return None
    if not isinstance(content, dict) or not isinstance(content.get("msg", ""), str):
        return None
    return content.get("msg", "")


# ---- Telegram Desktop JSON (one chat's result.json, or the full export with chats.list)

def _read_telegram(export: Export, text: str, parsed: Any) -> None:
    if not _is_telegram(parsed):
        raise UserError(f"{export.path} is not a Telegram Desktop JSON export (no 'messages' or "
                        f"'chats'); export as 'Machine-readable JSON' or check --format")
    chats = parsed["chats"].get("list", []) if isinstance(parsed.get("chats"), dict) else [parsed]
    for chat in chats:
        conv = Conversation(group=chat.get("type") in TELEGRAM_GROUPS)
        # In a personal chat the chat id is the friend's: every other sender is the exporter.
        friend = f"user{chat['id']}" if chat.get("type") == "personal_chat" and chat.get("id") else None
        for m in chat.get("messages", []):
            if isinstance(m, dict):
                conv.messages.append(_telegram_message(m, friend))
        export.items.append(conv)


def _telegram_message(m: dict[str, Any], friend: str | None) -> Message:
    if m.get("type", "message") != "message":
        kind = "system"
    elif "photo" in m:
        kind = "image"
    elif "media_type" in m or "file" in m:
        kind = TELEGRAM_MEDIA.get(m.get("media_type", ""), "file")
    elif any(k in m for k in ("poll", "location_information", "contact_information")):
        kind = "other"
    else:
        kind = "text"
    raw = m.get("text", "")
    text = raw if isinstance(raw, str) else "".join(
        p if isinstance(p, str) else str(p.get("text", "")) for p in raw if isinstance(p, (str, dict)))
    sender = str(m.get("from") or m.get("actor") or "Deleted Account")
    user = str(m.get("from_id") or m.get("actor_id") or "")
    # from_id is "user<id>"; the chat list and profile links show the bare number.
    names = [sender, user, user[4:] if user.startswith("user") else ""]
    mine = None if friend is None or not user else user != friend
    ids = tuple(dict.fromkeys(x for x in (*(SELF_ALIASES if mine else ()), *names) if x))
    time = _parse_time(str(m.get("date_unixtime", ""))) or _parse_time(str(m.get("date", "")))
    return Message(sender, ids, kind, text, f"message {m.get('id', '?')}", time, is_sender=mine)


# ---- QQ text export ("消息记录" .txt)

def _read_qq(export: Export, text: str, _parsed: Any) -> None:
    conv: Conversation | None = None
    head: tuple[int, re.Match[str]] | None = None
    body: list[str] = []
    group = False
    friends: list[tuple[Conversation, str]] = []

    def flush() -> None:
        nonlocal conv, head
        if head is None:
            return
        if conv is None:
            conv = Conversation()
            export.items.append(conv)
        conv.messages.append(_qq_message(head[0], head[1], "\n".join(body).strip()))
        head = None
        body.clear()

    for lineno, line in enumerate(text.splitlines(), 1):
        match = QQ_HEAD.match(line)
        if match or QQ_SEPARATOR.match(line) or line.startswith(("消息对象", "消息分组", "消息记录")):
            flush()
            if match:
                head = (lineno, match)
            elif line.startswith("消息对象"):
                conv = Conversation(group=group)
                export.items.append(conv)
                friends.append((conv, line[len("消息对象"):].lstrip(":：").strip()))
            elif line.startswith("消息分组"):
                # QQ files group chats under 我的群聊 (or another folder with 群 in its name).
                group = "群" in line[len("消息分组"):]
        elif head is not None:
            body.append(line)
    flush()
    for conv, friend in friends:
        _qq_sides(conv, friend)


def _qq_sides(conv: Conversation, friend: str) -> None:
    """A private chat is named after the friend, so the one other speaker is the exporter."""
    talk = [m for m in conv.messages if m.kind != "system"]
    if conv.group or len({m.sender for m in talk}) != 2 or friend not in {m.sender for m in talk}:
        return
    for m in talk:
        m.is_sender = m.sender != friend
        if m.is_sender:
            m.ids = tuple(dict.fromkeys((*SELF_ALIASES, *m.ids)))


def _qq_message(lineno: int, head: re.Match[str], body: str) -> Message:
    name = head.group(2).strip()
    parsed = QQ_NAME.match(name)
    sender = parsed.group(1).strip() if parsed else name
    ident = (parsed.group(2) or parsed.group(3)) if parsed else None
    ids = tuple(dict.fromkeys(x for x in (sender, ident) if x))
    kind = "system" if set(ids) & QQ_SYSTEM_IDS else placeholder_kind(body)
    return Message(sender, ids, kind, body, f"line {lineno}", _parse_time(head.group(1)))


READERS: dict[str, Callable[[Export, str, Any], None]] = {
    "records": _read_records,
    "alpaca": lambda e, t, p: _read_records(e, t, p, "alpaca"),
    "sharegpt": lambda e, t, p: _read_records(e, t, p, "sharegpt"),
    "messages": lambda e, t, p: _read_records(e, t, p, "messages"),
    "wechat-memotrace": _read_memotrace,
    "wechat-pywxdump": _read_pywxdump,
    "telegram": _read_telegram,
    "qq": _read_qq,
}
