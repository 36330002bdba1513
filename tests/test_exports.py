"""clear_data.py on exports laid out exactly as the real exporters write them.

PyWxDump (both CSV layouts, UTF-8 and GBK), MemoTrace with its per-row Remark/NickName/Sender,
Telegram Desktop with service messages, QQ text with recall and pat lines; one group chat per
format. Each is run through the CLI and checked for: every real reply kept, no system text
anywhere in the output, every alias of --me working, group turns attributed to the right
speakers, and rows in = kept + rejected.
"""
from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import pytest
from test_clear_data import MEMOTRACE_HEADER, QQ_HEADER, RAW, run

from clear_data import main, parse_args
from personakit.cleaning import is_system_line
from personakit.errors import UserError

SYSTEM_TEXTS = ["撤回了一条消息", "拍了拍", "加入了群聊", "退出了群聊", "recalled a message", "patted",
                "joined the group", "pinned"]


def no_system_text(kept: list[dict]) -> None:
    texts = [t for r in kept for t in (r["instruction"], r["output"], *(x for p in r.get("history", []) for x in p))]
    assert not [t for t in texts if any(s in t for s in SYSTEM_TEXTS)]


def cli_error(tmp_path: Path, *argv: str) -> str:
    with pytest.raises(UserError) as exc:
        main(parse_args([*argv, "--out", str(tmp_path / "err.jsonl")]))
    return str(exc.value)


# ---- PyWxDump: `msg,src` and `content` JSON layouts ---------------------------------------

HER = "wxid_friend"
# (second, type_name, is_sender, talker, room_name, msg); talker is 我 on the exporter's rows.
WXDUMP_CHAT = [
    (0, "文本", 1, "我", HER, "周末去爬山吗"),
    (30, "文本", 0, HER, HER, "好呀！记得带水和防晒（我上次晒成了两截色）"),
    (40, "消息撤回1", 0, HER, HER, '"小雨" 撤回了一条消息'),
    (50, "拍一拍", 1, "我", HER, '我拍了拍"小雨"'),
    (60, "文本", 1, "我", HER, "几点出发"),
    (90, "引用回复", 0, HER, HER, "七点吧，早点人少（我起不来的话你打电话叫我）\n\n[引用](2024-06-01 10:01:00)林一:几点出发"),
    (100, "系统通知", 0, HER, HER, "你已添加了小雨，现在可以开始聊天了。"),
    (110, "文本", 1, "我", HER, "好的那明天见"),
    (130, "文本", 0, HER, HER, "明天见！今晚早点睡，养足精神"),
]
HER_REPLIES = ["好呀！记得带水和防晒（我上次晒成了两截色）", "七点吧，早点人少（我起不来的话你打电话叫我）",
               "明天见！今晚早点睡，养足精神"]


def pywxdump(path: Path, rows: list[tuple], layout: str = "msg", encoding: str = "utf-8") -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["msg", "src"] if layout == "msg" else ["content"]
    w.writerow(["id", "MsgSvrID", "type_name", "is_sender", "talker", "room_name", *cols, "CreateTime"])
    for i, (sec, typ, mine, talker, room, msg) in enumerate(rows, 1):
        body = [msg, ""] if layout == "msg" else [json.dumps({"src": "", "msg": msg}, ensure_ascii=False)]
        w.writerow([i, 7300 + i, typ, mine, talker, room, *body,
                    f"2024-06-01 {10 + sec // 3600:02d}:{sec // 60 % 60:02d}:{sec % 60:02d}"])
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


@pytest.mark.parametrize("encoding", ["utf-8", "gbk"])
@pytest.mark.parametrize("layout", ["msg", "content"])
def test_pywxdump_both_layouts_are_detected_and_read(tmp_path, layout, encoding):
    src = pywxdump(tmp_path / "wx.csv", WXDUMP_CHAT, layout, encoding)
    summary, kept, rejects = run(tmp_path, str(src), "--me", HER)
    assert [r["output"] for r in kept] == HER_REPLIES
    assert kept[1]["instruction"] == "几点出发"  # the quote PyWxDump appends is not her text
    assert summary["rejected"] == {"system": 3}
    assert {r["text"] for r in rejects} == {'[system] "小雨" 撤回了一条消息', '[system] 我拍了拍"小雨"',
                                           "[system] 你已添加了小雨，现在可以开始聊天了。"}
    assert summary["files"][0]["format"] == "wechat-pywxdump"
    no_system_text(kept)
    # --format names the layout family, not one layout
    _, again, _ = run(tmp_path, str(src), "--me", HER, "--format", "wechat-pywxdump", out="f.jsonl")
    assert again == kept


@pytest.mark.parametrize("me", ["我", "self", "SELF"])
def test_pywxdump_exporter_side_answers_to_what_the_file_shows(tmp_path, me):
    rows = [(0, "文本", 0, HER, HER, "在干嘛"), (20, "文本", 1, "我", HER, "在写论文，头都大了（第三章还没动）")]
    src = pywxdump(tmp_path / "wx.csv", rows, "content")
    _, kept, _ = run(tmp_path, str(src), "--me", me)
    assert kept == [{"instruction": "在干嘛", "output": "在写论文，头都大了（第三章还没动）"}]


def test_pywxdump_bad_content_cell_is_a_counted_reject(tmp_path):
    src = pywxdump(tmp_path / "wx.csv", WXDUMP_CHAT[:2], "content")
    src.write_text(src.read_text(encoding="utf-8") + '3,7303,文本,0,wxid_friend,wxid_friend,not json,2024-06-01 10:05:00\n',
                   encoding="utf-8")
    summary, kept, rejects = run(tmp_path, str(src), "--me", HER)
    assert len(kept) == 1 and summary["rejected"] == {"invalid_row": 1}
    assert rejects[0]["where"] == "line 4" and rejects[0]["text"] == "not json"


# ---- MemoTrace: Remark, NickName and Sender are the sender's own on every row ----------------

def memotrace_rows(path: Path, rows: list[tuple], talker: str = HER) -> Path:
    """rows: (minute, is_sender, Type, StrContent, (Remark, NickName, Sender))."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(MEMOTRACE_HEADER.split(","))
    for i, (minute, mine, typ, text, who) in enumerate(rows, 1):
        w.writerow([i, talker, typ, 0, mine, 1_700_000_000 + minute * 60, 2, text, "", *who])
    path.write_bytes(buf.getvalue().encode("utf-8-sig"))
    return path


LIN, XIAOYU, ZHOU = ("林一", "Lin", "wxid_lin"), ("小雨", "雨天晴", HER), ("阿周", "周周", "wxid_zhou")
MEMO_CHAT = [
    (0, 1, 1, "明天面试好紧张", LIN), (1, 0, 1, "你准备得那么认真，一定没问题（我面试前也会紧张到吃不下饭）", XIAOYU),
    (2, 0, 10000, '"小雨" 撤回了一条消息', XIAOYU), (3, 1, 10000, '我拍了拍"小雨"', LIN),
    (4, 1, 1, "谢谢你", LIN), (5, 0, 1, "面完记得告诉我！请你喝奶茶庆祝", XIAOYU),
    (20, 0, 1, "对了你带简历了吗", XIAOYU), (21, 1, 1, "带了三份，放心吧", LIN),
]


@pytest.mark.parametrize("me", ["小雨", "雨天晴", HER])
def test_memotrace_friend_answers_to_remark_nickname_and_wxid(tmp_path, me):
    summary, kept, _ = run(tmp_path, str(memotrace_rows(tmp_path / "m.csv", MEMO_CHAT)), "--me", me)
    assert [r["output"] for r in kept] == [MEMO_CHAT[1][3], MEMO_CHAT[5][3]]
    assert summary["rejected"] == {"system": 2, "unprompted": 1, "unanswered": 1}
    no_system_text(kept)


@pytest.mark.parametrize("me", ["林一", "Lin", "wxid_lin", "self", "我"])
def test_memotrace_exporter_answers_to_its_own_names(tmp_path, me):
    _, kept, _ = run(tmp_path, str(memotrace_rows(tmp_path / "m.csv", MEMO_CHAT)), "--me", me)
    assert [(r["instruction"], r["output"]) for r in kept] == [(MEMO_CHAT[1][3], "谢谢你"), (MEMO_CHAT[6][3], MEMO_CHAT[7][3])]


# ---- Telegram: service messages, personal chat self side -----------------------------------

def tg(i: int, who: tuple[str, str], text, **extra) -> dict:
    return {"id": i, "type": "message", "date": f"2024-05-01T10:{i:02d}:00", "date_unixtime": str(1714557600 + i * 60),
            "from": who[0], "from_id": who[1], "text": text, **extra}


def tg_service(i: int, who: tuple[str, str], action: str, **extra) -> dict:
    return {"id": i, "type": "service", "date": f"2024-05-01T10:{i:02d}:00", "date_unixtime": str(1714557600 + i * 60),
            "actor": who[0], "actor_id": who[1], "action": action, "text": "", **extra}


T_LIN, T_YU, T_ZHOU = ("Lin", "user111"), ("Xiaoyu", "user222"), ("Zhou", "user333")
TG_CHAT = {"name": "Xiaoyu", "type": "personal_chat", "id": 222, "messages": [
    tg(1, T_LIN, "明天要汇报好紧张"), tg(2, T_YU, "先深呼吸三次，你准备得很充分！（我汇报前都去厕所对着镜子练）"),
    tg_service(3, T_YU, "pin_message", message_id=2), tg_service(4, T_LIN, "phone_call", duration_seconds=60),
    tg(5, T_LIN, "Xiaoyu recalled a message"), tg(6, T_LIN, "好的我试试"), tg(7, T_YU, "加油！结束了告诉我"),
]}


@pytest.mark.parametrize("me", ["Xiaoyu", "user222", "222"])
def test_telegram_service_messages_are_system_and_ids_work_bare(tmp_path, me):
    src = tmp_path / "result.json"
    src.write_text(json.dumps(TG_CHAT, ensure_ascii=False), encoding="utf-8")
    summary, kept, _ = run(tmp_path, str(src), "--me", me)
    assert [r["output"] for r in kept] == ["先深呼吸三次，你准备得很充分！（我汇报前都去厕所对着镜子练）", "加油！结束了告诉我"]
    assert summary["rejected"] == {"system": 3}
    no_system_text(kept)


@pytest.mark.parametrize("me", [[], ["self"], ["我"], ["Lin"], ["user111"]])
def test_telegram_personal_chat_knows_the_exporter(tmp_path, me):
    chat = {**TG_CHAT, "messages": [tg(1, T_YU, "今天吃什么"), tg(2, T_LIN, "火锅！我请客（其实是想蹭你的会员卡）")]}
    src = tmp_path / "result.json"
    src.write_text(json.dumps(chat, ensure_ascii=False), encoding="utf-8")
    _, kept, _ = run(tmp_path, str(src), *(a for m in me for a in ("--me", m)))
    assert kept == [{"instruction": "今天吃什么", "output": "火锅！我请客（其实是想蹭你的会员卡）"}]


# ---- QQ: recall and pat lines in the sender's own turn --------------------------------------

QQ_PRIVATE = QQ_HEADER + """
2023-09-01 20:10:00 林一<lin@qq.com>
开学了好紧张

2023-09-01 20:10:30 林一<lin@qq.com>
林一撤回了一条消息

2023-09-01 20:11:00 小雨(1827364509)
第一天主动打个招呼就好（我当年就是这样混熟的）

2023-09-01 20:11:20 小雨(1827364509)
小雨撤回了一条消息

2023-09-01 20:11:40 小雨(1827364509)
小雨拍了拍林一

2023-09-01 20:12:00 林一<lin@qq.com>
You recalled a message

2023-09-01 20:12:30 林一<lin@qq.com>
嗯嗯我试试

2023-09-01 20:13:00 小雨(1827364509)
加油！有事随时找我
"""


@pytest.mark.parametrize("me", ["小雨", "1827364509"])
@pytest.mark.parametrize("encoding", ["gbk", "utf-8"])
def test_qq_recalls_and_pats_are_system_lines(tmp_path, me, encoding):
    src = tmp_path / "qq.txt"
    src.write_bytes(QQ_PRIVATE.replace("\n", "\r\n").encode(encoding))
    summary, kept, rejects = run(tmp_path, str(src), "--me", me)
    assert kept == [{"instruction": "开学了好紧张", "output": "第一天主动打个招呼就好（我当年就是这样混熟的）"},
                    {"instruction": "嗯嗯我试试", "output": "加油！有事随时找我",
                     "history": [["开学了好紧张", "第一天主动打个招呼就好（我当年就是这样混熟的）"]]}]
    assert summary["rejected"] == {"system": 4}
    assert sorted(r["where"] for r in rejects) == ["line 12", "line 18", "line 21", "line 24"]
    no_system_text(kept)


@pytest.mark.parametrize("text", [
    "小王撤回了一条消息", '"小雨" 撤回了一条消息', "你撤回了一条消息 重新编辑", '我拍了拍"小雨"', '"小雨" 拍了拍我的小脑袋',
    "小王戳了戳你", '"林一"邀请"小雨"加入了群聊', "欢迎小王加入本群", "小王退出了群聊", '你将"小王"移出了群聊',
    '"小雨"修改群名为“周末爬山”', "你已添加了小雨，现在可以开始聊天了。", "Xiaoyu recalled a message",
    'You patted "Xiaoyu"', '"Xiaoyu" patted me', "Lin joined the group via invite link",
    "Lin invited Xiaoyu to the group chat", "Zhou left the group"])
def test_system_lines_in_chinese_and_english(text):
    assert is_system_line(text)


@pytest.mark.parametrize("text", ["我拍了拍他的肩膀，说没事", "I patted my dog", "别撤回了一条消息嘛你", "我想加入群聊但是不敢",
                                  "I left the group because it was noisy and boring", "他昨天退出了群聊，好像生气了"])
def test_ordinary_lines_are_not_system_lines(text):
    assert not is_system_line(text)


# ---- group chats, one per format ------------------------------------------------------------

ROOM = "12345678@chatroom"
GROUP_PROMPT = ["周六爬山几点集合", "我都行", "别太早"]
GROUP_REPLY = "八点地铁站吧，下午还能下山吃火锅（我馋火锅一周了）"
GROUP_REPLY2 = "带水和巧克力，鞋要穿旧的（我穿新鞋磨掉一层皮）"


def wxdump_group() -> list[tuple]:
    return [
        (0, "邀请加群", 0, "未知", ROOM, '"林一"邀请"小雨"、"阿周"加入了群聊'),
        (60, "文本", 1, "我", ROOM, GROUP_PROMPT[0]), (90, "文本", 0, "wxid_zhou", ROOM, GROUP_PROMPT[1]),
        (100, "文本", 0, "wxid_zhou", ROOM, GROUP_PROMPT[2]), (150, "文本", 0, HER, ROOM, GROUP_REPLY),
        (160, "拍一拍", 0, "wxid_zhou", ROOM, '"阿周" 拍了拍 "小雨"'),
        (170, "文本", 0, "wxid_zhou", ROOM, "要带什么"), (200, "文本", 0, HER, ROOM, GROUP_REPLY2),
    ]


def test_wechat_group_in_a_mixed_file_is_split_by_room_and_attributed(tmp_path):
    # PyWxDump's export of everything: a private chat and a group, interleaved in time
    private = [(55, "文本", 1, "我", HER, "你周六有空吗"), (155, "文本", 0, HER, HER, "有空呀，怎么啦（我周末一般只睡觉）")]
    src = pywxdump(tmp_path / "all.csv", sorted(wxdump_group() + private), "content")
    summary, kept, rejects = run(tmp_path, str(src), "--me", HER)
    assert kept == [
        {"instruction": "我: 周六爬山几点集合\nwxid_zhou: 我都行\nwxid_zhou: 别太早", "output": GROUP_REPLY},
        {"instruction": "wxid_zhou: 要带什么", "output": GROUP_REPLY2,
         "history": [["我: 周六爬山几点集合\nwxid_zhou: 我都行\nwxid_zhou: 别太早", GROUP_REPLY]]},
        {"instruction": "你周六有空吗", "output": "有空呀，怎么啦（我周末一般只睡觉）"}]
    assert summary["rejected"] == {"system": 2}
    assert {r["text"] for r in rejects} == {'[system] "林一"邀请"小雨"、"阿周"加入了群聊', '[system] "阿周" 拍了拍 "小雨"'}
    no_system_text(kept)

    _, kept, _ = run(tmp_path, str(src), "--me", HER, "--group-speaker-names", "no", out="plain.jsonl")
    assert kept[0]["instruction"] == "\n".join(GROUP_PROMPT)

    summary, kept, _ = run(tmp_path, str(src), "--me", HER, "--skip-groups", out="skip.jsonl")
    assert [r["output"] for r in kept] == ["有空呀，怎么啦（我周末一般只睡觉）"]
    assert summary["rejected"] == {"group": 6, "system": 2}


def test_memotrace_group_attributes_members_by_name(tmp_path):
    rows = [(0, 1, 1, GROUP_PROMPT[0], LIN), (1, 0, 1, GROUP_PROMPT[1], ZHOU), (2, 0, 1, GROUP_PROMPT[2], ZHOU),
            (3, 0, 10000, '"阿周"邀请"小花"加入了群聊', ("", "", "")), (4, 0, 1, GROUP_REPLY, XIAOYU)]
    src = memotrace_rows(tmp_path / "g.csv", rows, talker=ROOM)
    _, kept, _ = run(tmp_path, str(src), "--me", "小雨")
    assert kept == [{"instruction": "林一: 周六爬山几点集合\n阿周: 我都行\n阿周: 别太早", "output": GROUP_REPLY}]
    # the room id names the chat, not a member: it is no alias of anyone
    assert "matches no sender" in cli_error(tmp_path, str(src), "--me", ROOM)


def test_telegram_group_pairs_with_whoever_spoke_before(tmp_path):
    chat = {"name": "Hiking", "type": "private_supergroup", "id": 999, "messages": [
        tg_service(1, T_LIN, "invite_members", members=["Xiaoyu", "Zhou"]),
        tg(2, T_LIN, GROUP_PROMPT[0]), tg(3, T_ZHOU, GROUP_PROMPT[1]), tg(4, T_ZHOU, GROUP_PROMPT[2]),
        tg(5, T_YU, GROUP_REPLY), tg_service(6, T_ZHOU, "remove_members", members=["Zhou"])]}
    src = tmp_path / "result.json"
    src.write_text(json.dumps(chat, ensure_ascii=False), encoding="utf-8")
    summary, kept, _ = run(tmp_path, str(src), "--me", "Xiaoyu")
    assert kept == [{"instruction": "Lin: 周六爬山几点集合\nZhou: 我都行\nZhou: 别太早", "output": GROUP_REPLY}]
    assert summary["rejected"] == {"system": 2}


def test_qq_group_pairs_with_whoever_spoke_before(tmp_path):
    text = """消息记录（此消息记录为文本格式，不支持重新导入）

================================================================
消息分组:我的群聊
================================================================
消息对象:爬山小分队
================================================================

2023-10-01 09:00:00 林一<lin@qq.com>
周六爬山几点集合

2023-10-01 09:00:30 阿周(22334455)
我都行

2023-10-01 09:00:40 系统消息(10000)
小花加入本群

2023-10-01 09:00:50 阿周(22334455)
别太早

2023-10-01 09:01:30 小雨(1827364509)
八点地铁站吧，下午还能下山吃火锅（我馋火锅一周了）

2023-10-01 09:02:00 阿周(22334455)
阿周撤回了一条消息
"""
    src = tmp_path / "qq.txt"
    src.write_bytes(text.replace("\n", "\r\n").encode("gbk"))
    summary, kept, _ = run(tmp_path, str(src), "--me", "1827364509")
    assert kept == [{"instruction": "林一: 周六爬山几点集合\n阿周: 我都行\n阿周: 别太早", "output": GROUP_REPLY}]
    assert summary["rejected"] == {"system": 2}
    # a file with nothing but a group chat, skipped, says so
    assert "group 4, system 2" in cli_error(tmp_path, str(src), "--me", "小雨", "--skip-groups")


# ---- as a stranger would try it -------------------------------------------------------------

def test_wrong_me_lists_every_alias_per_side(tmp_path):
    message = cli_error(tmp_path, str(memotrace_rows(tmp_path / "m.csv", MEMO_CHAT)), "--me", "小明")
    assert "小雨 / wxid_friend / 雨天晴: 3 messages; 林一 / self / 我 / Lin / wxid_lin: 3 messages" in message
    message = cli_error(tmp_path, str(pywxdump(tmp_path / "wx.csv", WXDUMP_CHAT, "content")), "--me", "小雨")
    assert "wxid_friend: 3 messages; 我 / self: 3 messages" in message


def test_me_naming_both_sides_is_refused(tmp_path):
    src = memotrace_rows(tmp_path / "m.csv", MEMO_CHAT)
    assert "matches both sides" in cli_error(tmp_path, str(src), "--me", "小雨", "--me", "林一")


def test_empty_export_is_one_clear_error(tmp_path):
    src = tmp_path / "wx.csv"
    src.write_bytes(b"")
    assert "is empty" in cli_error(tmp_path, str(src), "--me", HER)
    header_only = pywxdump(tmp_path / "h.csv", [], "content")
    assert "no usable rows" in cli_error(tmp_path, str(header_only), "--me", HER)


# ---- the shipped current-layout sample ------------------------------------------------------

def test_shipped_pywxdump_content_sample_mixes_a_private_chat_and_a_group(tmp_path):
    summary, kept, rejects = run(tmp_path, str(RAW / "wechat_pywxdump_content.csv"), "--me", "wxid_k3x9yu21")
    assert (summary["rows_in"], summary["kept"]) == (24, 11)
    assert summary["rejected"] == {"low_info": 1, "non_text": 4, "system": 5, "unanswered": 2, "unprompted": 1}
    assert sum(r["instruction"].startswith("我: ") or "wxid_a8m2zhou: " in r["instruction"] for r in kept) == 3
    no_system_text(kept)
    assert Counter(r["reason"] for r in rejects)["system"] == 5


@pytest.mark.parametrize("me", [[], ["self"], ["我"], ["林一"], ["lin@qq.com"]])
def test_qq_private_chat_knows_the_exporter_from_the_chat_name(tmp_path, me):
    src = tmp_path / "qq.txt"
    src.write_bytes(QQ_PRIVATE.encode("gbk"))
    _, kept, _ = run(tmp_path, str(src), *(a for m in me for a in ("--me", m)))
    assert kept == [{"instruction": "第一天主动打个招呼就好（我当年就是这样混熟的）", "output": "嗯嗯我试试"}]
