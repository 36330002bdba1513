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

from ..cleaning import URL
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
# QQ's system faces as `content.text` writes them, "/捂脸": the `QDes` names of the exporter's
# qq-chat-export-server/assets/face_config.json (same commit). Written as [捂脸], as WeChat does,
# so that a reply of nothing but faces counts as one.
QQ_FACES = """
龙年快乐 新年中龙 超级赞 芒狗 好兄弟 抛媚眼 狼狗 亲亲 狗狗笑哭 狗狗可怜 狗狗生气 狗狗疑问 tui 超级ok 忙 祝贺 超级鼓掌 奥特笑哭 彩虹 冒泡 气呼呼 波波流泪 emo
企鹅爱心 超级转圈 快乐 真棒 路过 企鹅流泪 跺脚 企鹅笑哭 嗨 出去玩 别说话 太头秃 太沧桑 太头疼 太赞了 呜呜呜 太气了 晚安 太好笑 摇起来 好运来 闪亮登场 姐是女王 么么哒
一起嗨 我听听 臭美 开心 送你花花 新年大龙 微笑 撇嘴 色 发呆 得意 害羞 闭嘴 睡 大哭 流泪 尴尬 发怒 调皮 呲牙 惊讶 难过 酷 冷汗 抓狂 吐 偷笑 可爱 白眼 傲慢 饥饿 困
惊恐 流汗 憨笑 悠闲 奋斗 咒骂 疑问 嘘 晕 折磨 衰 骷髅 敲打 再见 擦汗 抠鼻 鼓掌 糗大了 坏笑 左哼哼 右哼哼 哈欠 鄙视 委屈 快哭了 阴险 右亲亲 左亲亲 吓 可怜 眨眼睛
笑哭 doge 泪奔 无奈 托腮 卖萌 斜眼笑 喷血 小纠结 我最美 脑阔疼 沧桑 捂脸 辣眼睛 哦哟 头秃 问号脸 暗中观察 emm 吃瓜 呵呵哒 汪汪 喵喵 牛气冲天 无眼笑 敬礼 狂笑
面无表情 摸鱼 摸锦鲤 魔鬼笑 哦 睁眼 期待 拜谢 元宝 牛啊 胖三斤 嫌弃 举牌牌 豹富 拜托 耶 666 尊嘟假嘟 咦 裂开 虎虎生威 大展宏兔 右拜年 左拜年 拿到红包 打call
变形 仔细分析 菜汪 崇拜 比心 庆祝 吃糖 惊吓 花朵脸 我想开了 舔屏 打招呼 酸Q 我方了 大怨种 红包多多 你真棒棒 戳一戳 太阳 月亮 敲敲 坚强 贴贴 略略略 篮球 骰子 包剪锤
生气 蛋糕 拥抱 爱心 玫瑰 凋谢 幽灵 爆筋 示爱 心碎 咖啡 羊驼 鞭炮 烟花 赞 OK 抱拳 握手 勾引 胜利 拳头 差劲 踩 NO 点赞 我酸了 猪头 菜刀 刀 手枪 茶 便便 喝彩
棒棒糖 西瓜 喝奶 炸弹 发抖 转圈 爱情 跳跳 怄火 挥手 拍桌 飞吻 糊脸 啵啵 抱抱 托脸 颤抖 生日快乐 偷看 舔一舔 掐一掐 佛系 扇脸 扯一扯 撩一撩 嘲讽 不开心 飙泪 大笑 吃
求求 敲开心 开枪 干杯 顶呱呱 蹭一蹭 拍手 拍头 哼 扔狗 暴击 甩头 我不看 让我康康 喷脸 惊喜 爱你 无聊 汗 好闪 请 拒绝 呃 福萝卜 害怕 原谅 续标识 划龙舟 中龙舟 大龙舟
求放过 偷感 玩火 火车 中火车 大火车 蛇年快乐 蛇身 蛇尾 收到 粽于等到你 复兴号 灵蛇献瑞
""".split()
FACE_TEXT = re.compile("/(" + "|".join(sorted(map(re.escape, QQ_FACES), key=len, reverse=True)) + ")")
URL_SPLIT = re.compile(f"({URL.pattern})", URL.flags)
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
    """(kind, text) of `content.text`, read with its elements: faces as [捂脸], shop stickers as
    [表情], cards and forwards (other people's words) never text."""
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
    # A link's path is no face: https://b23.tv/doge stays as it is.
    text = "".join(part if URL.fullmatch(part) else FACE_TEXT.sub(r"[\1]", part)
                   for part in URL_SPLIT.split(REPLY_PREFIX.sub("", text.strip()).strip()))
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
    kind, body = _inline(raw)
    resources = TXT_RESOURCES.fullmatch(raw)
    if raw in TXT_NO_TEXT:
        kind = TXT_NO_TEXT[raw]
    elif resources:
        kind = RESOURCE_KINDS[resources.group(1).split("、")[0]]
    if sender == SYSTEM_SENDER:
        kind = "system"
    time = _parse_time(lines[head + 1][len("时间: "):])
    return Message(sender, (sender,), kind, body if kind == "text" else raw, f"line {head + 1}", time)
