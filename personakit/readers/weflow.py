"""WeFlow (and EchoTrace, its predecessor): the JSON, the "weclone" CSV and the TXT exports.

WeFlow's repository (github hicccc77/WeFlow) was emptied in July 2026; its code survives in the
history: electron/services/exportService.ts at commit 31eba04092e021d692667653c1a1ef7b75f1e235
(WeFlow 4.3.0, 2026-06-15), which these readers follow: `exportSessionToDetailedJson` (`weflow`
header, `session` {wxid, nickname, remark, displayName, type 私聊/群聊}, `messages` with
`localType`, the Chinese `type` of `getMessageTypeName`, `content`, `isSend`, `senderUsername`,
`senderDisplayName`; a quote is `reply[引用 name：quoted]` with `appMsgKind: quote`,
`quotedSender`, `quotedContent`), `exportSessionToWeCloneCsv` (BOM, CRLF,
`id,MsgSvrID,type_name,is_sender,talker,msg,src,CreateTime`, English `type_name`, ISO times;
recalls, pats, quotes and cards are `text` rows) and `exportSessionToTxt` (`time 'name'` then
the content as `formatPlainExportContent` writes it; 我 is the exporter in a private chat).
EchoTrace (github ycccccccy/echotrace, lib/services/chat_export_service.dart `exportToJson` and
lib/models/message.dart, commit e9e0d6c4c79653c66c64fe63b4fadfea2b860812, 2026-01-03) writes
the same JSON without the `weflow` header, its own `type` names, and a quote's own text only.
"""
from __future__ import annotations

import json
import re
from typing import Any

from ..errors import UserError
from ..exports import SELF_ALIASES, Conversation, Export, Message, _csv_rows, _parse_time

WECLONE_HEADER = ["id", "MsgSvrID", "type_name", "is_sender", "talker", "msg", "src", "CreateTime"]
WECLONE_TYPES = {"text": "text", "image": "image", "sticker": "sticker", "video": "video",
                 "voice": "voice", "location": "location", "file": "file"}
TXT_HEAD = re.compile(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) '(.*)'")
TXT_SELF = "我"     # the exporter's name in a private chat's TXT

# `type` of the JSON, WeFlow's names and EchoTrace's (Message.getTypeDescriptionFromInt).
TYPE_KINDS = {
    "文本消息": "text", "引用消息": "text", "图片消息": "image", "语音消息": "voice", "视频消息": "video",
    "动画表情": "sticker", "位置消息": "location", "名片消息": "contact", "通话消息": "call",
    "系统消息": "system", "拍一拍消息": "system", "链接消息": "link", "卡片式链接": "link",
    "图文消息": "link", "小程序消息": "link", "小程序分享": "link", "音乐消息": "link", "音乐卡片": "link",
    "文件消息": "file", "转账消息": "transfer", "转账卡片": "transfer", "红包卡片": "red_packet",
    "聊天记录": "forward", "聊天记录合并转发": "forward", "群公告": "other", "视频号直播卡片": "other",
}
# WeChat localType codes, for a `type` neither app names (e.g. 其他消息, 未知类型(...)).
LOCAL_TYPE_KINDS = {1: "text", 3: "image", 34: "voice", 42: "contact", 43: "video", 47: "sticker",
                    48: "location", 50: "call", 10000: "system", 10002: "system", 266287972401: "system",
                    244813135921: "text"}
# How a non-text message starts in the TXT and in the CSV's `text` rows (formatPlainExportContent,
# parseMessageContent), or its media file when media were exported alongside.
CONTENT_KINDS = {
    "图片": "image", "表情包": "sticker", "视频": "video", "语音消息": "voice", "其他消息": "other",
    "名片": "contact", "位置": "location", "语音通话": "call", "视频通话": "call", "通话": "call",
    "转账": "transfer", "转账收款": "transfer", "红包": "red_packet", "文件": "file", "音乐": "link",
    "小程序": "link", "链接": "link", "群公告": "other", "接龙": "other", "转发的聊天记录": "forward",
    "系统消息": "system",
}
CONTENT_TAG = re.compile(r"\[(" + "|".join(sorted(map(re.escape, CONTENT_KINDS), key=len, reverse=True))
                         + r")(?:[：:][^\]]*)?\]")
MEDIA_DIRS = {"images": "image", "voices": "voice", "videos": "video", "emojis": "sticker", "file": "file"}
MEDIA_PATH = re.compile(r"(?:\.\./|media/(?:[^/\n]+/)?)(images|voices|videos|emojis|file)/[^\n]+")
QUOTE = "[引用 "


def detect(text: str, parsed: Any) -> str | None:
    if isinstance(parsed, dict) and isinstance(parsed.get("session"), dict) and isinstance(parsed.get("messages"), list) \
            and all(isinstance(m, dict) and "localType" in m for m in parsed["messages"][:5]):
        return "weflow-json"
    if [h.strip() for h in text.lstrip("\ufeff").split("\n", 1)[0].split(",")] == WECLONE_HEADER:
        return "weflow-csv"
    if TXT_HEAD.fullmatch(text.lstrip().split("\n", 1)[0].rstrip("\r")):
        return "weflow-txt"
    return None


def near_miss(text: str, parsed: Any) -> str | None:
    if isinstance(parsed, dict) and isinstance(parsed.get("session"), dict) and "messages" in parsed:
        return ("a WeFlow/EchoTrace JSON export, but its messages lack 'localType'; "
                "export it again or try --format weflow-json")
    return None


def read(export: Export, text: str, parsed: Any) -> None:
    if export.format == "weflow-json":
        if detect(text, parsed) != "weflow-json":
            raise UserError(f"{export.path} is not a WeFlow/EchoTrace JSON export (no 'session' and "
                            f"'messages' with 'localType'); check the file or its --format")
        _read_json(export, parsed)
    elif export.format == "weflow-csv":
        _read_csv(export, text)
    else:
        _read_txt(export, text)


def _read_json(export: Export, parsed: dict[str, Any]) -> None:
    session = parsed["session"]
    friend_id = str(session.get("wxid") or "")
    conv = Conversation(group=session.get("type") == "群聊" or friend_id.endswith("@chatroom"))
    friend_names = [str(session.get(k) or "") for k in ("displayName", "remark", "nickname")]
    # The "arkme-json" variant names senders once, in `senders`, and gives messages a senderID.
    profiles = {s.get("senderID"): s for s in parsed.get("senders") or [] if isinstance(s, dict)}
    for n, m in enumerate(parsed["messages"], 1):
        where = f"message {m.get('localId', n)}" if isinstance(m, dict) else f"message {n}"
        if not isinstance(m, dict):
            export.reject("invalid_row", where, json.dumps(m, ensure_ascii=False), detail="a message is not an object")
            continue
        mine = m.get("isSend") == 1
        profile = profiles.get(m.get("senderID"), {})
        username = str(m.get("senderUsername") or profile.get("wxid") or "")
        sender = str(m.get("senderDisplayName") or profile.get("displayName") or username
                     or ("我" if mine else friend_id))
        names = [sender, username, *(str(profile.get(k) or "") for k in ("nickname", "remark", "groupNickname"))]
        if not conv.group and not mine:
            names += [friend_id, *friend_names]
        ids = tuple(dict.fromkeys(x for x in (*(SELF_ALIASES if mine else ()), *names) if x))
        conv.messages.append(Message(sender, ids, *_json_content(m), where,
                                     _parse_time(str(m.get("createTime", ""))), is_sender=mine))
    export.items.append(conv)


def _json_content(m: dict[str, Any]) -> tuple[str, str]:
    kind = TYPE_KINDS.get(str(m.get("type", "")))
    if kind is None or m.get("localType") in (10000, 266287972401):
        kind = LOCAL_TYPE_KINDS.get(m.get("localType"), "other")
    text = str(m.get("content") or "")
    if kind == "text":
        label = (f"{m['quotedSender']}：{m.get('quotedContent', '')}" if m.get("quotedSender")
                 else str(m.get("quotedContent", "")))
        text = text[:-len(f"{QUOTE}{label}]")] if label and text.endswith(f"{QUOTE}{label}]") else _unquote(text)
    return kind, text


def _unquote(text: str) -> str:
    """A quote reply's own words: WeFlow appends `[引用 name：quoted]` to them."""
    start = text.find(QUOTE)
    return text[:start] if start >= 0 and text.endswith("]") else text


def _content_kind(text: str) -> str:
    tag = CONTENT_TAG.match(text)
    if tag:
        return CONTENT_KINDS[tag.group(1)]
    media = MEDIA_PATH.fullmatch(text.strip())
    return MEDIA_DIRS[media.group(1)] if media else "text"


def _read_csv(export: Export, text: str) -> None:
    conv = Conversation()
    for where, row in _csv_rows(export, text.lstrip("\ufeff"), set(WECLONE_HEADER)):
        mine = row["is_sender"].strip() == "1"
        talker = row["talker"].strip() or ("我" if mine else "?")
        kind = WECLONE_TYPES.get(row["type_name"].strip(), "other")
        body = row["msg"]
        if kind == "text":
            kind = _content_kind(body)
        if kind == "text":
            body = _unquote(body)
        ids = tuple(dict.fromkeys((*SELF_ALIASES, talker))) if mine else (talker,)
        conv.messages.append(Message(talker, ids, kind, body, where, _parse_time(row["CreateTime"]), is_sender=mine))
    export.items.append(conv)


def _read_txt(export: Export, text: str) -> None:
    conv = Conversation()
    lines = text.splitlines()
    heads = [(i, match) for i, match in enumerate(map(TXT_HEAD.fullmatch, lines)) if match]
    for k, (head, match) in enumerate(heads):
        name = match.group(2)
        body = "\n".join(lines[head + 1:heads[k + 1][0] if k + 1 < len(heads) else len(lines)]).strip()
        kind = _content_kind(body)
        conv.messages.append(Message(name, (name,), kind, _unquote(body) if kind == "text" else body,
                                     f"line {head + 1}", _parse_time(match.group(1))))
    # Only a private chat names the exporter 我; a group names everyone by display name.
    if any(m.sender == TXT_SELF for m in conv.messages):
        for m in conv.messages:
            m.is_sender = m.sender == TXT_SELF
            if m.is_sender:
                m.ids = SELF_ALIASES
    export.items.append(conv)
