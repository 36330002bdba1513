"""MemoTrace/WeChatMsg TXT and JSON exports (its CSV is read in personakit.exports).

Built from the writer code of the last open-source version, github LC044/WeChatMsg at commit
9d599199fe81120db5f693fb9c896b81b0e6c988 (2025-03-27; the code was later removed from the
repository): `app/util/exporter/exporter_txt.py`, `exporter_json.py` and `exporter.py`.

TXT (`<remark>.txt`): each message is `{StrTime} {name}` then its content and a blank line; the
name is the exporter's own (`Me().name`) or the friend's remark (a group member's remark in a
group), HTML- and JS-escaped. System rows (recalls, pats...) are one line `{StrTime} {content}`
with no name. Media are written as `[图片]`, `[语音]`, `[表情包]`, `[视频]`, `[文件]`,
`[音乐分享]`, an indented `[链接]:title:...` card; a quote reply is its own text followed by a
line `引用:{name}:{quoted text}` (or `引用:未知`), which is never part of the reply.

JSON (`<remark>_train.json`, `<remark>_dev.json`): `[{"conversations": [{role, content}]}]`,
text messages only, already merged per side; `system` is MemoTrace's own prompt `你是{Me().name}，
一个聪明、热情、善良的人，...` (detection looks for it), read only for the exporter's name;
`assistant` is the exporter, `user` the friend.
"""
from __future__ import annotations

import html
import json
import re
from typing import Any

from ..errors import UserError
from ..exports import QQ_HEAD, SELF_ALIASES, Conversation, Export, Message, _parse_time, _qq_sides

MEDIA = {"[图片]": "image", "[语音]": "voice", "[表情包]": "sticker", "[视频]": "video", "[文件]": "file",
         "[音乐分享]": "link"}
QUOTE = "引用:"
CARD = "[链接]:title:"
# A name that is not MemoTrace's: QQ's `name(12345678)` / `name<mail>`, or a quoted `'name'`.
FOREIGN_NAME = re.compile(r".*(?:\(\d{4,}\)|<[^<>]+>)$|'.*'$")
SYSTEM_PROMPT = re.compile(r"你是(.*)，一个聪明、热情、善良的人，后面的对话来自你的朋友，你要认真地回答他")
JSON_FILE = re.compile(r"(.+)_(?:train|dev)$")


def detect(text: str, parsed: Any) -> str | None:
    first = parsed[0] if isinstance(parsed, list) and parsed else None
    turns = first.get("conversations") if isinstance(first, dict) else None
    if (isinstance(turns, list) and turns and isinstance(turns[0], dict) and turns[0].get("role") == "system"
            and SYSTEM_PROMPT.fullmatch(str(turns[0].get("content")))):
        return "wechat-memotrace-json"
    head = text.splitlines()[:60] if parsed is None else []
    names = [m.group(2) for m in map(QQ_HEAD.match, head) if m]
    # QQ's own text export has the same head lines under a 消息记录 header.
    if names and not any(FOREIGN_NAME.match(n) for n in names) and not any(
            line.startswith(("消息对象", "消息记录")) for line in head):
        return "wechat-memotrace-txt"
    return None


def near_miss(_text: str, _parsed: Any) -> str | None:
    return None


def read(export: Export, text: str, parsed: Any) -> None:
    if export.format == "wechat-memotrace-json":
        _read_json(export, parsed)
    else:
        _read_txt(export, text)


def _name(written: str) -> tuple[str, ...]:
    """The name as shown and as MemoTrace escaped it (both work for --me)."""
    shown = html.unescape(written.replace("\\'", "'").replace('\\"', '"').replace("\\\\", "\\"))
    return tuple(dict.fromkeys((shown, written)))


def _read_txt(export: Export, text: str) -> None:
    messages: list[tuple[int, re.Match[str], list[str]]] = []
    paragraph_start = True
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            paragraph_start = True
            continue
        head = QQ_HEAD.match(line) if paragraph_start else None
        if head:
            messages.append((lineno, head, []))
        elif messages:
            # A blank line inside a message's content is kept as written.
            messages[-1][2].extend(([""] if paragraph_start and messages[-1][2] else []) + [line.rstrip()])
        else:
            export.reject("invalid_row", f"line {lineno}", line, detail="text before the first dated message")
        paragraph_start = False
    conv = Conversation()
    for lineno, head, content in messages:
        conv.messages.append(_txt_message(f"line {lineno}", head, content))
    _qq_sides(conv, export.path.stem)   # a private chat's file is named after the friend's remark
    export.items.append(conv)


def _txt_message(where: str, head: re.Match[str], content: list[str]) -> Message:
    time = _parse_time(head.group(1))
    if not content:
        return Message("", (), "system", head.group(2), where, time)
    ids = _name(head.group(2).strip())
    quote = next((i for i, line in enumerate(content) if i and line.startswith(QUOTE)), len(content))
    body = "\n".join(content[:quote]).strip()
    kind = "link" if body.startswith(CARD) else MEDIA.get(body, "text")
    return Message(ids[0], ids, kind, body, where, time)



def _read_json(export: Export, parsed: Any) -> None:
    if not isinstance(parsed, list):
        raise UserError(f"{export.path} is not MemoTrace JSON (a JSON array of {{\"conversations\": [...]}}); "
                        f"check the file or its --format")
    stem = JSON_FILE.match(export.path.stem)
    friend = stem.group(1) if stem else None
    for i, item in enumerate(parsed, 1):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            export.reject("invalid_row", f"item {i}", json.dumps(item, ensure_ascii=False),
                          detail="not a {\"conversations\": [...]} record")
            continue
        prompt = next((t.get("content") for t in turns if t.get("role") == "system"), None)
        named = SYSTEM_PROMPT.fullmatch(prompt) if isinstance(prompt, str) else None
        me = named.group(1) if named else None
        conv = Conversation()
        for n, turn in enumerate(turns, 1):
            role, content = turn.get("role"), turn.get("content")
            if role == "system":
                continue
            where = f"item {i}, turn {n}"
            if role not in ("user", "assistant") or not isinstance(content, str):
                conv.messages.append(Message(str(role), (str(role),), "system", str(content), where))
            elif role == "assistant":
                ids = tuple(dict.fromkeys(x for x in ("assistant", *SELF_ALIASES, me) if x))
                conv.messages.append(Message(me or "assistant", ids, "text", content, where, is_sender=True))
            else:
                ids = tuple(x for x in ("user", friend) if x)
                conv.messages.append(Message(friend or "user", ids, "text", content, where, is_sender=False))
        export.items.append(conv)
