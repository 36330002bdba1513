"""clear_data.py on the Chinese exporters people use now: QQChatExporter, WeFlow/EchoTrace, chatlog.

One private chat between the exporter 林一 and the persona 小雨 is written the way each
exporter's writer code writes it (personakit/readers/ cites the code): a quote reply, a recall, a
pat, an image, a voice message, a merge, a phone number, an emoji and a second session. Every
writer must clean to the same three rows, with the same four rejects.
"""
from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from test_clear_data import run
from test_exports import cli_error, no_system_text

T = 1796128200                     # 2026-12-01 20:30:00 in China
CHINA = timezone(timedelta(hours=8))
QUOTED = "周末去爬山吗"
# (who, second, kind, text); who is "me" (林一, the exporter), "her" (小雨) or "sys".
CHAT = [
    ("me", 0, "text", QUOTED),
    ("her", 30, "quote", "好呀！记得带水和防晒（我上次晒成了两截色）"),
    ("her", 50, "text", "几点出发都行😀"),
    ("sys", 60, "recall", ""),
    ("me", 120, "image", ""),
    ("me", 150, "text", "七点？我怕起不来"),
    ("her", 200, "text", "七点可以，起不来我打你电话 13812345678（我闹钟比你响）"),
    ("her", 210, "voice", ""),
    ("me", 230, "pat", ""),
    ("me", 36000, "text", "昨天爬完腿好酸"),
    ("her", 36060, "text", "泡个热水脚，今晚早点睡（我也瘫了一天）"),
]
FIRST = ["周末去爬山吗", "好呀！记得带水和防晒（我上次晒成了两截色）\n几点出发都行😀"]
KEPT = [{"instruction": FIRST[0], "output": FIRST[1]},
        {"instruction": "七点？我怕起不来", "output": "七点可以，起不来我打你电话 [PHONE]（我闹钟比你响）",
         "history": [FIRST]},
        {"instruction": "昨天爬完腿好酸", "output": "泡个热水脚，今晚早点睡（我也瘫了一天）"}]
REJECTED = {"system": 2, "non_text": 2}
RECALL = '"小雨" 撤回了一条消息'      # WeChat's replacemsg, as WeFlow and chatlog copy it
PAT = '我拍了拍"小雨"'


def local(second: int, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return datetime.fromtimestamp(T + second, CHINA).strftime(fmt)


# ---- QQChatExporter v6 (json_exporter.rs, text_exporter.rs, simple_parser.rs) -------------

QQ_ME = {"uid": "u_lin", "uin": "10001", "name": "林一", "nickname": "林一"}
QQ_HER = {"uid": "u_xiaoyu", "uin": "1827364509", "name": "小雨", "nickname": "雨天晴", "remark": "小雨"}
QQ_SYSTEM = {"uid": "未知", "name": "系统消息"}
QQ_CHAT_INFO = {"name": "小雨", "type": "private", "selfUid": "u_lin", "selfUin": "10001", "selfName": "林一",
                "peerUid": "u_xiaoyu", "peerUin": "1827364509"}
QQ_NAME = "friend_小雨_1827364509_20261201_203000123"


def qce_message(n: int, who: str, second: int, kind: str, text: str) -> dict:
    """A CleanMessage as SimpleMessageParser builds it and serde serialises it."""
    elements, resources, system = [{"type": "text", "data": {"text": text}}], [], False
    if kind == "quote":
        elements.insert(0, {"type": "reply", "data": {"messageId": "7300000000000000001", "senderUin": "10001",
                                                       "senderName": "林一", "content": QUOTED, "timestamp": T}})
        text = "[回复消息]" + text
    elif kind == "image":
        elements = [{"type": "image", "data": {"filename": "IMG_2041.jpg", "size": 48211, "url": ""}}]
        resources, text = [{"type": "image", "filename": "IMG_2041.jpg", "size": 48211}], "[图片:IMG_2041.jpg]"
    elif kind == "voice":
        elements = [{"type": "audio", "data": {"filename": "voice.amr", "size": 6120, "duration": 4}}]
        resources, text = [{"type": "audio", "filename": "voice.amr", "size": 6120, "duration": 4.0}], "[语音:4秒]"
    elif kind in ("recall", "pat"):
        text = "小雨 撤回了一条消息" if kind == "recall" else "林一戳了戳小雨"
        elements, system = [{"type": "system", "data": {"subType": 1 if kind == "recall" else 0, "text": text}}], True
    sender = QQ_SYSTEM if system else QQ_ME if who == "me" else QQ_HER
    return {"id": str(7300000000000000000 + n), "seq": str(1000 + n), "timestamp": (T + second) * 1000,
            "time": datetime.fromtimestamp(T + second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "sender": sender, "type": "system" if system else "reply" if kind == "quote" else "text",
            "content": {"text": text, "html": "", "elements": elements, "resources": resources, "mentions": []},
            "recalled": kind == "recall", "system": system}


def compact(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def write_qce_json(path: Path, messages: list[dict], info: dict = QQ_CHAT_INFO) -> Path:
    """JsonSingleFileTemplates: compact header objects, one compact message per line."""
    meta = {"name": "QQChatExporter", "copyright": "https://github.com/shuakami/qq-chat-exporter", "version": "0.1.0"}
    head = (f'{{\n  "metadata":{compact(meta)},\n  "chatInfo":{compact(info)},\n  '
            f'"statistics":{compact({"totalMessages": len(messages)})},\n  "messages":[\n')
    body = ",\n".join("    " + compact(m) for m in messages)
    path.write_text(head + body + '\n  ],\n  "exportOptions":{"includedFields":["id","timestamp"]}\n}', encoding="utf-8")
    return path


def qce_json(tmp_path: Path) -> Path:
    return write_qce_json(tmp_path / f"{QQ_NAME}.json", [qce_message(n, *e) for n, e in enumerate(CHAT, 1)])


def qce_txt_block(m: dict) -> list[str]:
    """TextExporter::format_message with the default options."""
    sender, content = m["sender"], m["content"]
    lines = [f"{sender['name'] or sender['uid']}:", f"时间: {local(m['timestamp'] // 1000 - T)}"]
    if content["text"].strip():
        lines.append(f"内容: {content['text'].strip()}")
    elif m["system"]:
        lines.append("内容: [系统消息]")
    if content["resources"]:
        lines.append(f"资源: {len(content['resources'])} 个文件")
        lines += [f"  - {r['type']}: {r['filename']}" for r in content["resources"]]
    reply = next((e["data"] for e in content["elements"] if e["type"] == "reply"), None)
    if reply:
        lines.append(f"回复: {local(reply['timestamp'] - T, '%m-%d %H:%M')} {reply['senderName']} - {reply['content']}")
    return lines


def write_qce_txt(path: Path, messages: list[dict], name: str = "小雨", kind: str = "私聊") -> Path:
    lines = ["[QQChatExporter V5 / https://github.com/shuakami/qq-chat-exporter]",
             "[本软件是免费的开源项目~ 如果您是买来的，请立即退款！如果有帮助到您，欢迎给我点个Star~]", "",
             "===============================================", "           QQ聊天记录导出文件",
             "===============================================", "", f"聊天名称: {name}", f"聊天类型: {kind}",
             f"导出时间: {local(90000)}", f"消息总数: {len(messages)}", "", ""]
    for i, m in enumerate(messages):
        lines += qce_txt_block(m)
        if i + 1 < len(messages):
            lines.append("\n")
    lines += ["", "===============================================", "              导出完成",
              "===============================================", f"总计导出 {len(messages)} 条消息", f"导出时间: {local(90000)}"]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def qce_txt(tmp_path: Path) -> Path:
    return write_qce_txt(tmp_path / f"{QQ_NAME}.txt", [qce_message(n, *e) for n, e in enumerate(CHAT, 1)])


# ---- WeFlow 4.3.0 (exportService.ts) and EchoTrace (chat_export_service.dart) -----------------

WX_ME, WX_HER = "wxid_lin", "wxid_k3x9yu21"
WEFLOW_TYPES = {"text": (1, "文本消息"), "quote": (244813135921, "引用消息"), "image": (3, "图片消息"),
                "voice": (34, "语音消息"), "recall": (10000, "系统消息"), "pat": (266287972401, "系统消息")}
ECHOTRACE_TYPES = {**WEFLOW_TYPES, "pat": (266287972401, "拍一拍消息")}


def weflow_message(n: int, who: str, second: int, kind: str, text: str, echotrace: bool = False) -> dict:
    local_type, type_name = (ECHOTRACE_TYPES if echotrace else WEFLOW_TYPES)[kind]
    mine = who == "me"
    content = {"quote": text if echotrace else f"{text}[引用 林一：{QUOTED}]", "image": "[图片]",
               "voice": "[语音 4秒]" if echotrace else "[语音消息]", "recall": RECALL,
               "pat": "[拍一拍]" if echotrace else PAT}.get(kind, text)
    m = {"localId": n, "createTime": T + second, "formattedTime": local(second), "type": type_name,
         "localType": local_type, "content": content, "isSend": 1 if mine else 0,
         "senderUsername": WX_ME if mine else WX_HER, "senderDisplayName": "林一" if mine else "小雨", "source": ""}
    if kind == "quote" and not echotrace:
        m.update(appMsgType="57", appMsgKind="quote", quotedSender="林一", quotedContent=QUOTED)
    return m


def weflow_json(tmp_path: Path) -> Path:
    data = {"weflow": {"version": "1.0.3", "exportedAt": T + 90000, "generator": "WeFlow"},
            "session": {"wxid": WX_HER, "nickname": "雨天晴", "remark": "小雨", "displayName": "小雨", "type": "私聊",
                        "lastTimestamp": T + 36060, "messageCount": len(CHAT)},
            "messages": [weflow_message(n, *e) for n, e in enumerate(CHAT, 1)]}
    path = tmp_path / "私聊_小雨.json"
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def echotrace_json(tmp_path: Path) -> Path:
    data = {"session": {"wxid": WX_HER, "nickname": "雨天晴", "remark": "小雨", "displayName": "小雨",
                        "type": "私聊", "lastTimestamp": T + 36060, "messageCount": len(CHAT)},
            "messages": [weflow_message(n, *e, echotrace=True) for n, e in enumerate(CHAT, 1)],
            "avatars": {}, "exportTime": "2026-12-02T11:00:00.000"}
    path = tmp_path / "小雨_聊天记录_1796218200000.json"
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def weclone_csv(tmp_path: Path) -> Path:
    """exportSessionToWeCloneCsv: BOM, CRLF, escapeCsvCell, toISOString times."""
    names = {"text": "text", "quote": "text", "recall": "text", "pat": "text", "image": "image", "voice": "voice"}

    def cell(value) -> str:
        text = str(value)
        return '"' + text.replace('"', '""') + '"' if re.search(r'[",\r\n]', text) else text

    rows = ["\ufeffid,MsgSvrID,type_name,is_sender,talker,msg,src,CreateTime"]
    for n, (who, second, kind, text) in enumerate(CHAT, 1):
        m = weflow_message(n, who, second, kind, text)
        iso = datetime.fromtimestamp(T + second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        src = "3f9a1c0e.dat" if kind == "image" else ""
        rows.append(",".join(cell(v) for v in (n, 7300000000000000000 + n, names[kind], m["isSend"],
                                               m["senderDisplayName"], m["content"], src, iso)))
    path = tmp_path / "私聊_小雨.csv"
    path.write_bytes(("\r\n".join(rows) + "\r\n").encode("utf-8"))
    return path


def weflow_txt(tmp_path: Path) -> Path:
    """exportSessionToTxt: `time 'role'`, the plain content, a blank line; 我 is the exporter."""
    plain = {"voice": "[其他消息]"}
    blocks = []
    for n, (who, second, kind, text) in enumerate(CHAT, 1):
        m = weflow_message(n, who, second, kind, text)
        role = "我" if m["isSend"] else "小雨"
        blocks.append(f"{local(second)} '{role}'\n{plain.get(kind, m['content'])}\n\n")
    path = tmp_path / "私聊_小雨.txt"
    path.write_text("".join(blocks), encoding="utf-8")
    return path


# ---- chatlog (internal/model/message.go, internal/chatlog/http/route.go) --------------------

HOST = "127.0.0.1:5030"


def chatlog_message(n: int, who: str, second: int, kind: str, text: str) -> dict:
    mine = who == "me"
    typ, sub, content, contents = {"text": (1, 0, text, None), "quote": (49, 57, text, {"refer": {
        "seq": 0, "time": datetime.fromtimestamp(T, CHINA).isoformat(), "talker": "", "talkerName": "",
        "isChatRoom": False, "sender": WX_ME, "senderName": "林一", "isSelf": False, "type": 1, "subType": 0,
        "content": QUOTED}}), "image": (3, 0, "", {"md5": "9f2c4e1ab07d"}), "voice": (34, 0, "", {"voice": "4417"}),
        "recall": (10000, 0, RECALL, None), "pat": (49, 62, '我拍了拍"${wxid_k3x9yu21}"', None)}[kind]
    sender = "系统消息" if kind == "recall" else WX_ME if mine else WX_HER
    m = {"seq": (T + second) * 1000 + n, "time": datetime.fromtimestamp(T + second, CHINA).isoformat(),
         "talker": WX_HER, "talkerName": "", "isChatRoom": False, "sender": sender,
         "senderName": "" if mine or kind == "recall" else "小雨", "isSelf": mine, "type": typ, "subType": sub,
         "content": content}
    if contents:
        m["contents"] = contents
    return m


def plain_text_content(m: dict) -> str:
    """Message.PlainTextContent for the kinds in CHAT."""
    if m["type"] == 3:
        return f"![图片](http://{HOST}/image/{m['contents']['md5']})"
    if m["type"] == 34:
        return f"[语音](http://{HOST}/voice/{m['contents']['voice']})"
    if m["subType"] == 57:
        refer = m["contents"]["refer"]
        head = f"{refer['senderName']}({refer['sender']}) {local(0, '%m-%d %H:%M:%S')}"
        return f"> {head}\n> {refer['content']}\n{m['content']}"
    return m["content"]


def chatlog_json(tmp_path: Path) -> Path:
    path = tmp_path / "chatlog.json"
    path.write_text(compact([chatlog_message(n, *e) for n, e in enumerate(CHAT, 1)]), encoding="utf-8")
    return path


def chatlog_csv(tmp_path: Path) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Time", "SenderName", "Sender", "TalkerName", "Talker", "Content"])
    for n, e in enumerate(CHAT, 1):
        m = chatlog_message(n, *e)
        w.writerow([local(e[1]), m["senderName"], m["sender"], m["talkerName"], m["talker"], plain_text_content(m)])
    path = tmp_path / f"{WX_HER}_2026-12-01_2026-12-02.csv"
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def chatlog_txt(tmp_path: Path) -> Path:
    """Message.PlainText over two days of one year: times as 01-02 15:04:05."""
    blocks = []
    for n, e in enumerate(CHAT, 1):
        m = chatlog_message(n, *e)
        sender = "我" if m["isSelf"] else m["sender"]
        who = f"{m['senderName']}({sender})" if m["senderName"] else sender
        blocks.append(f"{who} {local(e[1], '%m-%d %H:%M:%S')}\n{plain_text_content(m)}\n\n")
    path = tmp_path / "chatlog.txt"
    path.write_text("".join(blocks), encoding="utf-8")
    return path


# ---- the same chat from every writer --------------------------------------------------------

WRITERS = [
    (qce_json, "qq-chat-exporter-json", ["小雨", "1827364509", "u_xiaoyu", "雨天晴"]),
    (qce_txt, "qq-chat-exporter-txt", ["小雨"]),
    (weflow_json, "weflow-json", ["小雨", WX_HER, "雨天晴"]),
    (echotrace_json, "weflow-json", ["小雨", WX_HER]),
    (weclone_csv, "weflow-csv", ["小雨"]),
    (weflow_txt, "weflow-txt", ["小雨"]),
    (chatlog_json, "chatlog-json", ["小雨", WX_HER]),
    (chatlog_csv, "chatlog-csv", ["小雨", WX_HER]),
    (chatlog_txt, "chatlog-txt", ["小雨", WX_HER]),
]
CASES = [(w, fmt, me) for w, fmt, names in WRITERS for me in names]


@pytest.mark.parametrize("writer, fmt, me", CASES, ids=[f"{w.__name__}-{me}" for w, _, me in CASES])
def test_every_writer_cleans_to_the_same_rows(tmp_path, writer, fmt, me):
    summary, kept, rejects = run(tmp_path, str(writer(tmp_path)), "--me", me)
    assert summary["files"][0]["format"] == fmt
    assert kept == KEPT
    assert summary["rejected"] == REJECTED
    no_system_text(kept)
    assert not [t for r in kept for t in (r["instruction"], r["output"]) if re.search(r"引用|回复|^> ", t, re.M)]


@pytest.mark.parametrize("writer, fmt, _names", WRITERS, ids=[w.__name__ for w, _, _ in WRITERS])
def test_a_wrong_me_lists_the_names_the_file_shows(tmp_path, writer, fmt, _names):
    message = cli_error(tmp_path, str(writer(tmp_path)), "--me", "阿周")
    assert "matches no sender" in message and "小雨" in message and re.search("林一|我", message)


@pytest.mark.parametrize("writer", [qce_json, weflow_json, weclone_csv, chatlog_json])
def test_the_format_flag_names_a_format_detection_would_pick(tmp_path, writer):
    fmt = next(f for w, f, _ in WRITERS if w is writer)
    _, kept, _ = run(tmp_path, str(writer(tmp_path)), "--me", "小雨", "--format", fmt)
    assert kept == KEPT


# ---- QQChatExporter: faces, stickers, cards, v5 quotes, chunked and batch folders --------------

def test_qq_faces_stay_as_emoji_codes_and_cards_v5_quotes_and_stickers_never_leak(tmp_path):
    her = {"uid": "u_xiaoyu", "uin": "1827364509", "name": "小雨"}
    text = lambda t: {"type": "text", "data": {"text": t}}  # noqa: E731
    messages = [qce_message(1, "me", 0, "text", "今天好累"), {
        **qce_message(2, "her", 20, "text", ""), "sender": her,
        "content": {"text": "抱抱/捂脸", "html": "", "elements": [text("抱抱"), {"type": "face", "data": {
            "id": "264", "name": "/捂脸"}}], "resources": [], "mentions": []}}, {
        # v5's MessageParser wrote the quote inline, before the reply's own words
        **qce_message(3, "her", 30, "text", ""), "sender": her, "type": "type_3",
        "content": {"text": "[回复 林一: 今天好累]\n早点睡（我也困得不行）", "html": "", "elements": [
            text("[回复 林一: 今天好累]\n早点睡（我也困得不行）"),
            {"type": "reply", "data": {"senderName": "林一", "content": "今天好累"}}], "resources": [], "mentions": []}}, {
        **qce_message(4, "her", 40, "text", ""), "sender": her,
        "content": {"text": "[嗷呜]", "html": "", "elements": [{"type": "market_face", "data": {"name": "嗷呜"}}],
                    "resources": [], "mentions": []}}, {
        **qce_message(5, "her", 50, "text", ""), "sender": her, "type": "forward",
        "content": {"text": "[聊天记录]\n阿周: 今晚吃火锅", "html": "", "elements": [{"type": "forward", "data": {
            "title": "聊天记录", "messageCount": 1}}], "resources": [], "mentions": []}}]
    src = write_qce_json(tmp_path / f"{QQ_NAME}.json", messages)
    summary, kept, rejects = run(tmp_path, str(src), "--me", "小雨")
    assert kept == [{"instruction": "今天好累", "output": "抱抱[捂脸]\n早点睡（我也困得不行）"}]
    assert sorted(r["text"] for r in rejects) == ["[forward] [聊天记录]\n阿周: 今晚吃火锅", "[sticker] [嗷呜]"]


def write_chunked(folder: Path, messages: list[dict], per_chunk: int) -> Path:
    """JsonExporter::export_chunked_jsonl: manifest.json beside chunks/c000001.jsonl, ..."""
    (folder / "chunks").mkdir(parents=True)
    chunks = []
    for i in range(0, len(messages), per_chunk):
        name = f"c{i // per_chunk + 1:06d}.jsonl"
        part = messages[i:i + per_chunk]
        (folder / "chunks" / name).write_text("".join(compact(m) + "\n" for m in part), encoding="utf-8")
        chunks.append({"index": i // per_chunk + 1, "fileName": name, "relativePath": f"chunks/{name}",
                       "start": part[0]["time"], "end": part[-1]["time"], "count": len(part), "bytes": 0})
    manifest = {"metadata": {"name": "QQChatExporter", "version": "0.1.0"}, "chatInfo": QQ_CHAT_INFO,
                "statistics": {"totalMessages": len(messages)},
                "chunked": {"format": "jsonl", "chunksDir": "chunks", "chunkFileExt": ".jsonl",
                            "maxMessagesPerChunk": per_chunk, "maxBytesPerChunk": 52428800, "chunks": chunks}}
    (folder / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")
    return folder


def test_qq_chunked_export_reads_as_a_folder_or_its_manifest(tmp_path):
    folder = write_chunked(tmp_path / f"{QQ_NAME}_chunked_jsonl", [qce_message(n, *e) for n, e in enumerate(CHAT, 1)], 4)
    for target, out in ((folder, "a.jsonl"), (folder / "manifest.json", "b.jsonl")):
        summary, kept, rejects = run(tmp_path, str(target), "--me", "小雨", out=out)
        assert kept == KEPT and summary["rejected"] == REJECTED
    assert {r["where"] for r in rejects} >= {"chunks/c000001.jsonl line 4", "chunks/c000003.jsonl line 1"}
    (folder / "chunks" / "c000002.jsonl").unlink()
    assert "lists chunks/c000002.jsonl, which is missing" in cli_error(tmp_path, str(folder), "--me", "小雨")


def test_a_folder_of_batch_exports_reads_every_export_in_it(tmp_path):
    batch = tmp_path / "exports"
    batch.mkdir()
    qce_json(batch)
    qce_txt(batch)
    (batch / "resources").mkdir()     # media copied beside the exports are not exports
    summary, kept, _ = run(tmp_path, str(batch), "--me", "小雨")
    assert [(Path(f["path"]).suffix, f["format"]) for f in summary["files"]] == [
        (".json", "qq-chat-exporter-json"), (".txt", "qq-chat-exporter-txt")]
    assert kept == KEPT and summary["rejected"] == {"system": 4, "non_text": 4, "duplicate": 3}
    (tmp_path / "empty").mkdir()
    assert "holds no export files" in cli_error(tmp_path, str(tmp_path / "empty"), "--me", "小雨")


# ---- group chats: every member is a speaker of their own -------------------------------------

PROMPT = ["周六爬山几点集合", "我都行", "别太早"]
REPLY = "八点地铁站吧，下午还能下山吃火锅（我馋火锅一周了）"
GROUP_KEPT = [{"instruction": "林一: 周六爬山几点集合\n阿周: 我都行\n阿周: 别太早", "output": REPLY}]


def group_qce_messages() -> list[dict]:
    zhou = {"uid": "u_zhou", "uin": "22334455", "name": "阿周", "nickname": "周周", "groupCard": "阿周"}
    her = {**QQ_HER, "groupCard": "小雨"}
    rows = [("me", 0, "text", PROMPT[0]), ("zhou", 30, "text", PROMPT[1]), ("sys", 40, "pat", ""),
            ("zhou", 50, "text", PROMPT[2]), ("her", 90, "text", REPLY)]
    messages = [qce_message(n, *r) for n, r in enumerate(rows, 1)]
    messages[1]["sender"] = messages[3]["sender"] = zhou
    messages[4]["sender"] = her
    messages[2]["content"]["text"] = "阿周邀请小花加入了群聊"
    return messages


def test_qq_group_json_and_txt_attribute_each_member(tmp_path):
    info = {**QQ_CHAT_INFO, "name": "爬山小分队", "type": "group", "peerUid": "765432109"}
    src = write_qce_json(tmp_path / "group_爬山小分队_765432109_20261201_203000123.json", group_qce_messages(), info)
    _, kept, _ = run(tmp_path, str(src), "--me", "u_xiaoyu")
    assert kept == GROUP_KEPT
    messages = group_qce_messages()
    messages[4]["sender"] = {**messages[4]["sender"], "title": "活跃"}
    txt = write_qce_txt(tmp_path / "group_爬山小分队_765432109_20261201_203000123.txt", messages, "爬山小分队", "群聊")
    text = txt.read_text(encoding="utf-8").replace("\n小雨:\n", "\n[活跃] 小雨:\n")
    txt.write_text(text, encoding="utf-8")
    summary, kept, _ = run(tmp_path, str(txt), "--me", "小雨", out="txt.jsonl")
    assert kept == GROUP_KEPT and summary["rejected"] == {"system": 1}


def test_weflow_txt_and_weclone_csv_groups_attribute_by_display_name(tmp_path):
    # A group's TXT names the exporter by display name too, and files its notices under it.
    txt = tmp_path / "群聊_爬山小分队.txt"
    txt.write_text(f"{local(0)} '林一'\n{PROMPT[0]}\n\n{local(30)} '阿周'\n{PROMPT[1]}\n\n"
                   f"{local(40)} '林一'\n阿周邀请小花加入了群聊\n\n{local(50)} '阿周'\n{PROMPT[2]}\n\n"
                   f"{local(90)} '小雨'\n{REPLY}\n\n", encoding="utf-8")
    summary, kept, _ = run(tmp_path, str(txt), "--me", "小雨")
    assert kept == GROUP_KEPT and summary["rejected"] == {"system": 1}
    assert "does not say which messages are whose" in cli_error(tmp_path, str(txt))
    rows = [(1, "林一", PROMPT[0]), (0, "阿周", PROMPT[1]), (0, "阿周", PROMPT[2]), (0, "小雨", REPLY)]
    csv_path = tmp_path / "群聊_爬山小分队.csv"
    csv_path.write_bytes(("\ufeffid,MsgSvrID,type_name,is_sender,talker,msg,src,CreateTime\r\n" + "".join(
        f"{n},{n},text,{mine},{who},{msg},,2026-12-01T12:3{n}:00.000Z\r\n"
        for n, (mine, who, msg) in enumerate(rows, 1))).encode("utf-8"))
    _, kept, _ = run(tmp_path, str(csv_path), "--me", "小雨", out="csv.jsonl")
    assert kept == GROUP_KEPT


def test_chatlog_group_json_and_text_with_the_room_shown(tmp_path):
    room, room_name = "34127698@chatroom", "爬山小分队"
    people = {"me": ("wxid_lin", "林一"), "zhou": ("wxid_zhou", "阿周"), "her": (WX_HER, "小雨"), "sys": ("系统消息", "")}
    rows = [("me", 0, PROMPT[0]), ("zhou", 30, PROMPT[1]), ("sys", 40, '"阿周"邀请"小花"加入了群聊'),
            ("zhou", 50, PROMPT[2]), ("her", 90, REPLY)]
    messages = [{"seq": (T + s) * 1000, "time": datetime.fromtimestamp(T + s, CHINA).isoformat(), "talker": room,
                 "talkerName": room_name, "isChatRoom": True, "sender": people[who][0], "senderName": people[who][1],
                 "isSelf": who == "me", "type": 10000 if who == "sys" else 1, "subType": 0, "content": text}
                for who, s, text in rows]
    src = tmp_path / "chatlog.json"
    src.write_text(compact(messages), encoding="utf-8")
    summary, kept, _ = run(tmp_path, str(src), "--me", WX_HER)
    assert kept == GROUP_KEPT and summary["rejected"] == {"system": 1}
    # text of several talkers at once (talker=a,b) shows the room; 我 stands for the exporter
    blocks = []
    for m in messages:
        sender = "我" if m["isSelf"] else m["sender"]
        who = f"{m['senderName']}({sender})" if m["senderName"] else sender
        blocks.append(f"{who} [{room_name}({room})] {local((m['seq'] // 1000) - T, '%H:%M:%S')}\n{m['content']}\n\n")
    txt = tmp_path / "chatlog.txt"
    txt.write_text("".join(blocks), encoding="utf-8")
    summary, kept, _ = run(tmp_path, str(txt), "--me", "小雨", out="txt.jsonl")
    assert kept == GROUP_KEPT and summary["rejected"] == {"system": 1}


# ---- detection: what each file is taken for, and what a stranger is told ----------------------

def test_a_cut_off_export_names_the_formats_tried_and_the_closest_one(tmp_path):
    src = tmp_path / f"{QQ_NAME}.json"
    src.write_text(qce_json(tmp_path).read_text(encoding="utf-8")[:900], encoding="utf-8")
    message = cli_error(tmp_path, str(src), "--me", "小雨")
    assert "tried alpaca, sharegpt" in message and "chatlog-txt" in message
    assert "it looks like a QQChatExporter export" in message


# ---- the shipped samples, as data/raw/README.md lists them ------------------------------------

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"
SAMPLES = [("qq_chat_exporter.json", ["小雨", "1827364509", "u_xiaoyu", "雨天晴"], 5, 9),
           ("qq_chat_exporter.txt", ["小雨"], 4, 8), ("weflow.json", ["小雨", WX_HER, "雨天晴"], 4, 8),
           ("weflow_weclone.csv", ["小雨"], 4, 8), ("weflow.txt", ["小雨"], 4, 8),
           ("chatlog.json", ["小雨", WX_HER], 4, 8), ("chatlog.csv", ["小雨", WX_HER], 4, 8),
           ("chatlog.txt", ["小雨", WX_HER], 4, 8)]


@pytest.mark.parametrize("name, aliases, kept_rows, rows", SAMPLES)
def test_shipped_samples_clean_as_the_raw_readme_says(tmp_path, name, aliases, kept_rows, rows):
    row = next(line for line in (RAW / "README.md").read_text(encoding="utf-8").splitlines()
               if line.startswith(f"| `{name}` |"))
    assert row.endswith(f"| {kept_rows} / {rows} |")
    for n, me in enumerate(aliases):
        summary, kept, _ = run(tmp_path, str(RAW / name), "--me", me, out=f"{n}.jsonl")
        assert (len(kept), summary["rows_in"]) == (kept_rows, rows)
        assert summary["rejected"] == {"system": 2, "non_text": 2}
        assert all("（" in r["output"] for r in kept[:1]) and sum("（" in r["output"] for r in kept) >= kept_rows // 2
        no_system_text(kept)


def test_all_new_samples_clean_together(tmp_path):
    summary, kept, _ = run(tmp_path, *(str(RAW / name) for name, *_ in SAMPLES), "--me", "小雨")
    assert (len(kept), summary["rows_in"]) == (33, 65)
    assert summary["pii_masked"] == {"EMAIL": 1, "PHONE": 2}


def test_weflow_arkme_json_names_senders_once(tmp_path):
    messages = [weflow_message(n, *e) for n, e in enumerate(CHAT, 1)]
    ids = {WX_ME: 1, WX_HER: 2}
    for m in messages:
        m["senderID"] = ids[m.pop("senderUsername")]
        del m["senderDisplayName"]
    data = {"weflow": {"version": "1.0.3", "generator": "WeFlow", "format": "arkme-json"},
            "session": {"wxid": WX_HER, "nickname": "雨天晴", "remark": "小雨", "displayName": "小雨", "type": "私聊"},
            "senders": [{"senderID": 1, "wxid": WX_ME, "displayName": "林一", "nickname": "林一"},
                        {"senderID": 2, "wxid": WX_HER, "displayName": "小雨", "nickname": "雨天晴", "remark": "小雨"}],
            "messages": messages}
    src = tmp_path / "私聊_小雨.json"
    src.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    for me in ("小雨", WX_HER):
        _, kept, _ = run(tmp_path, str(src), "--me", me, out=f"{me}.jsonl")
        assert kept == KEPT


def test_weflow_txt_media_files_cards_and_calls_are_not_text_and_me_takes_wo(tmp_path):
    lines = [("我", "周末有空吗"), ("小雨", "有呀，你想去哪（我周末一般在家发霉）"), ("我", "那就去海边吧"),
             ("我", "media/images/3f9a1c0e.jpg"), ("我", "[文件]行程.pdf"), ("小雨", "[语音通话] 03:12"),
             ("小雨", "[转账]¥20.00"), ("小雨", "[链接] 周末去哪玩\nhttps://example.com/a"), ("小雨", "[表情包：开心]")]
    src = tmp_path / "私聊_小雨.txt"
    src.write_text("".join(f"{local(60 * i)} '{who}'\n{text}\n\n" for i, (who, text) in enumerate(lines)), encoding="utf-8")
    summary, kept, _ = run(tmp_path, str(src), "--me", "小雨")
    assert kept == [{"instruction": "周末有空吗", "output": "有呀，你想去哪（我周末一般在家发霉）"}]
    assert summary["rejected"] == {"non_text": 6, "unanswered": 1}
    _, kept, _ = run(tmp_path, str(src), "--me", "我", out="wo.jsonl")   # the exporter's own side
    assert kept == [{"instruction": "有呀，你想去哪（我周末一般在家发霉）", "output": "那就去海边吧"}]


def test_qq_json_without_self_info_knows_the_exporter_from_the_chat_name(tmp_path):
    # v5 writes chatInfo without selfUid/selfUin: a private chat is named after the friend.
    info = {"name": "小雨", "type": "private", "participantCount": 2}
    src = write_qce_json(tmp_path / f"{QQ_NAME}.json", [qce_message(n, *e) for n, e in enumerate(CHAT, 1)], info)
    _, kept, _ = run(tmp_path, str(src), "--me", "1827364509")
    assert kept == KEPT
    _, kept, _ = run(tmp_path, str(src), out="no_me.jsonl")   # the exporter's side, from the same fact
    assert [r["output"] for r in kept] == ["七点？我怕起不来"]


@pytest.mark.parametrize("fmt", ["qq-chat-exporter-txt", "weflow-txt", "weflow-csv", "chatlog-txt", "chatlog-json"])
def test_a_format_named_for_the_wrong_file_says_so(tmp_path, fmt):
    src = tmp_path / "notes.txt"
    src.write_text("just some notes\nnothing to see\n", encoding="utf-8")
    message = cli_error(tmp_path, str(src), "--format", fmt)
    assert "check the file or its --format" in message


def test_weflow_json_and_chatlog_csv_groups_attribute_each_member(tmp_path):
    room = "34127698@chatroom"
    people = {"me": ("wxid_lin", "林一"), "zhou": ("wxid_zhou", "阿周"), "her": (WX_HER, "小雨")}
    rows = [("me", 0, PROMPT[0]), ("zhou", 30, PROMPT[1]), ("zhou", 50, PROMPT[2]), ("her", 90, REPLY)]
    messages = [{"localId": n, "createTime": T + s, "formattedTime": local(s), "type": "文本消息", "localType": 1,
                 "content": text, "isSend": int(who == "me"), "senderUsername": people[who][0],
                 "senderDisplayName": people[who][1], "source": ""} for n, (who, s, text) in enumerate(rows, 1)]
    messages.insert(2, {"localId": 9, "createTime": T + 40, "formattedTime": local(40), "type": "系统消息",
                        "localType": 10000, "content": '"阿周"邀请"小花"加入了群聊', "isSend": 0,
                        "senderUsername": room, "senderDisplayName": "爬山小分队", "source": ""})
    data = {"weflow": {"version": "1.0.3", "generator": "WeFlow"}, "messages": messages,
            "session": {"wxid": room, "nickname": "爬山小分队", "remark": "", "displayName": "爬山小分队", "type": "群聊"}}
    src = tmp_path / "群聊_爬山小分队.json"
    src.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    summary, kept, _ = run(tmp_path, str(src), "--me", WX_HER)
    assert kept == GROUP_KEPT and summary["rejected"] == {"system": 1}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Time", "SenderName", "Sender", "TalkerName", "Talker", "Content"])
    for who, s, text in rows:
        w.writerow([local(s), people[who][1], people[who][0], "爬山小分队", room, text])
    src = tmp_path / f"{room}_2026-12-01_2026-12-01.csv"
    src.write_text(buf.getvalue(), encoding="utf-8")
    _, kept, _ = run(tmp_path, str(src), "--me", "小雨", out="csv.jsonl")
    assert kept == GROUP_KEPT
    # a group's CSV does not say which rows are the exporter's
    assert "does not say which messages are whose" in cli_error(tmp_path, str(src))


def test_qq_txt_faces_become_emoji_codes_and_a_faces_only_reply_is_low_info(tmp_path):
    rows = [("me", 0, "text", "今天好累"), ("her", 20, "text", "抱抱/捂脸 早点休息"),
            ("me", 60, "text", "你笑什么"), ("her", 80, "text", "/doge/doge"),
            ("me", 120, "text", "推荐个视频"), ("her", 140, "text", "这个超好笑 https://b23.tv/doge")]
    src = write_qce_txt(tmp_path / f"{QQ_NAME}.txt", [qce_message(n, *r) for n, r in enumerate(rows, 1)])
    summary, kept, _ = run(tmp_path, str(src), "--me", "小雨")
    assert [r["output"] for r in kept] == ["抱抱[捂脸] 早点休息", "这个超好笑 https://b23.tv/doge"]
    assert summary["rejected"] == {"low_info": 1}


def test_the_script_reads_a_folder_as_a_user_runs_it(tmp_path):
    batch = tmp_path / "QQChatExporter"
    batch.mkdir()
    qce_json(batch)
    proc = subprocess.run([sys.executable, str(RAW.parents[1] / "clear_data.py"), str(batch), "--me", "小雨",
                           "--out", str(tmp_path / "girl.jsonl")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "qq-chat-exporter-json, utf-8, 3 candidate pairs" in proc.stdout and "rows in 7 = kept 3 + rejected 4" in proc.stdout
