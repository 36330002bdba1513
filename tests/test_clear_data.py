"""clear_data.py: raw exports in every format and encoding to clean pairs, nothing lost."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import clear_data
from clear_data import main, parse_args
from personakit.cleaning import is_garbled, mask_pii
from personakit.data import read_jsonl
from personakit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

RAW = ROOT / "data" / "raw"
MEMOTRACE_HEADER = "localId,TalkerId,Type,SubType,IsSender,CreateTime,Status,StrContent,StrTime,Remark,NickName,Sender"
REPLY = "抱抱你，先去洗个热水澡早点睡（我上次也是这样熬过来的）你可以的"


def run(tmp_path: Path, *argv: str, out: str = "out.jsonl") -> tuple[dict, list[dict], list[dict]]:
    """Run the CLI; return the summary, kept rows and rejects, after checking the invariant."""
    out_path = tmp_path / out
    assert main(parse_args([*argv, "--out", str(out_path)])) == 0
    summary = json.loads(Path(f"{out_path}.summary.json").read_text(encoding="utf-8"))
    kept = [json.loads(line) for line in out_path.read_text(encoding="utf-8").splitlines()]
    rejects = [json.loads(line) for line in Path(f"{out_path}.rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert summary["rows_in"] == len(kept) + len(rejects) == summary["kept"] + sum(summary["rejected"].values())
    assert Counter(r["reason"] for r in rejects) == summary["rejected"]
    return summary, kept, rejects


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def memotrace(path: Path, rows: list[tuple[int, int, int, str]], encoding: str = "utf-8-sig") -> Path:
    """rows: (minute, is_sender, Type, StrContent); the friend is wxid_friend, remark 小雨.

    As MemoTrace writes it: Remark, NickName and Sender (wxid) are the exporting account's own
    (林一, Lin, wxid_lin) on its rows and the friend's on hers."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(MEMOTRACE_HEADER.split(","))
    for i, (minute, mine, typ, text) in enumerate(rows, 1):
        who = ["林一", "Lin", "wxid_lin"] if mine else ["小雨", "雨", "wxid_friend"]
        w.writerow([i, "wxid_friend", typ, 0, mine, 1_700_000_000 + minute * 60, 2, text, "", *who])
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


# ---- filters: exact counts per reason ------------------------------------------------------

NOISY_ROWS = [
    {"instruction": "今天好累", "output": REPLY},                                     # kept
    {"instruction": "今天好累", "output": REPLY},                                     # duplicate
    {"instruction": "ＴＯＤＡＹ 好累！", "output": REPLY.replace("，", ", ") + "!!"},      # near_duplicate
    {"instruction": "hi", "output": "   "},                                          # empty
    {"instruction": "看", "output": "[图片][Sticker]"},                               # placeholder
    {"instruction": "a", "output": "你好\ufffd呀今天怎么样"},                          # garbled: U+FFFD
    {"instruction": "b", "output": "ä½ å¥½ï¼Œä»Šå¤©æ€Žä¹ˆæ ·"},                      # garbled: cp1252
    {"instruction": "c", "output": "浣犲ソ鍟婏紝浠婂ぉ鎬庝箞鏍"},                       # garbled: GBK
    {"instruction": "d", "output": "正常的字\x07控制符"},                              # garbled: control
    {"instruction": "链接", "output": "https://example.com/a  www.example.org"},        # url_only
    {"instruction": "e", "output": "我觉得你可以先和导师约个时间把这周做的东西整理一下然后..."},  # truncated: cut
    {"instruction": "f", "output": "好的[truncated]"},                               # truncated: marker
    {"instruction": "g", "output": "嗯嗯！"},                                        # low_info
    {"instruction": "h", "output": "哈哈哈😂😂"},                                    # low_info
    {"instruction": "i", "output": "LOL ok"},                                        # low_info
    {"instruction": "j", "output": "累"},                                            # low_info (1 char)
    {"instruction": "k", "output": "长" * 401},                                      # too_long
    {"instruction": "l", "history": "not a list", "output": "你好呀"},                 # invalid_row
    "{not json",                                                                     # bad_json
    {"instruction": "n", "output": "那就明天再说吧……"},                              # kept: "……" is style
    {"instruction": "m", "output": "我也觉得...", "input": "补充"},                    # kept, input appended
]


def test_every_filter_has_a_named_reason_and_exact_count(tmp_path):
    src = write_jsonl(tmp_path / "noisy.jsonl", NOISY_ROWS)
    summary, kept, rejects = run(tmp_path, str(src))
    assert summary["rejected"] == {"bad_json": 1, "duplicate": 1, "empty": 1, "garbled": 4, "invalid_row": 1,
                                   "low_info": 4, "near_duplicate": 1, "placeholder": 1, "too_long": 1,
                                   "truncated": 2, "url_only": 1}
    assert [r["output"] for r in kept] == [REPLY, "那就明天再说吧……", "我也觉得..."]
    assert kept[2]["instruction"] == "m\n补充"
    near = next(r for r in rejects if r["reason"] == "near_duplicate")
    assert near["where"] == "line 3" and near["output"] == NOISY_ROWS[2]["output"]


def test_flags_move_the_thresholds(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", NOISY_ROWS[:3] + [{"instruction": "j", "output": "累"},
                                                           {"instruction": "k", "output": "长" * 401}])
    summary, kept, _ = run(tmp_path, str(src), "--near-dup", "0", "--min-reply-chars", "1",
                           "--max-reply-chars", "500")
    assert summary["rejected"] == {"duplicate": 1}
    assert len(kept) == 4


def test_malformed_json_lines_are_rejected_with_line_numbers_and_the_run_continues(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "a", "output": REPLY}, "{broken", "",
                                              '{"instruction": "b", "output": ', {"instruction": "c", "output": "好呀我们一起去吧"}])
    summary, kept, rejects = run(tmp_path, str(src))
    assert len(kept) == 2
    assert [(r["reason"], r["where"], r["text"]) for r in rejects] == [
        ("bad_json", "line 2", "{broken"), ("bad_json", "line 4", '{"instruction": "b", "output": ')]


# ---- structured datasets ----------------------------------------------------------------

def test_alpaca_json_array_keeps_history_and_system(tmp_path):
    src = tmp_path / "a.json"
    src.write_text(json.dumps([
        {"instruction": "又做噩梦了", "input": "", "output": "抱抱，醒来喝口温水（我也常做）",
         "history": [["我睡不着", "那我陪你聊会儿天"]], "system": "你是小雨"},
        {"instruction": "帮我看看", "input": "简历第一段", "output": "把结果和数字放前面会更好"},
    ], ensure_ascii=False), encoding="utf-8")
    _, kept, _ = run(tmp_path, str(src))
    assert kept == [
        {"instruction": "又做噩梦了", "output": "抱抱，醒来喝口温水（我也常做）",
         "history": [["我睡不着", "那我陪你聊会儿天"]], "system": "你是小雨"},
        {"instruction": "帮我看看\n简历第一段", "output": "把结果和数字放前面会更好"}]


def test_sharegpt_and_messages_become_pairs_with_history(tmp_path):
    src = write_jsonl(tmp_path / "conv.jsonl", [
        {"system": "你是小雨", "conversations": [
            {"from": "human", "value": "在吗"}, {"from": "gpt", "value": "在的在的，怎么啦"},
            {"from": "human", "value": "今天被批评了"}, {"from": "human", "value": "好难过"},
            {"from": "gpt", "value": "抱抱你，先吃点好吃的（我被批评完会去买冰淇淋）"},
            {"from": "human", "value": "谢谢"}]},
        {"messages": [
            {"role": "system", "content": "sys"}, {"role": "user", "content": [{"type": "text", "text": "看我拍的"}]},
            {"role": "tool", "content": "lookup"}, {"role": "assistant", "content": "哇好好看，构图进步了好多"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "assistant", "content": "这张更好看！"}]},
    ])
    summary, kept, rejects = run(tmp_path, str(src))
    assert kept == [
        {"instruction": "在吗", "output": "在的在的，怎么啦", "system": "你是小雨"},
        {"instruction": "今天被批评了\n好难过", "output": "抱抱你，先吃点好吃的（我被批评完会去买冰淇淋）",
         "history": [["在吗", "在的在的，怎么啦"]], "system": "你是小雨"},
        {"instruction": "看我拍的", "output": "哇好好看，构图进步了好多", "system": "sys"}]
    assert sorted((r["reason"], r["where"]) for r in rejects) == [
        ("non_text", "line 2, turn 5"), ("system", "line 2, turn 3"),
        ("unanswered", "line 1, turn 6"), ("unprompted", "line 2, turn 6")]


# ---- chat exports: merging, pairing, sessions ---------------------------------------------

CHAT = [  # (minute, is_sender, Type, text); is_sender 1 is the exporting user, 0 the friend 小雨
    (0, 1, 1, "在吗"), (1, 1, 1, "今天组会被批了"),            # merged into one prompt
    (2, 0, 1, "抱抱你！"), (3, 0, 47, ""), (4, 0, 1, "先吃顿好的（我被批完也是先吃）"),  # merged reply, sticker
    (5, 1, 10000, "\"小雨\" 撤回了一条消息"),                   # system
    (6, 1, 1, "他说我太慢"), (8, 0, 1, "慢慢来，列个清单一天做一件就好"),  # pair with history
    (9, 1, 3, ""), (10, 0, 1, "哇这张照片好好看"),             # image prompt: non_text + unprompted
    (11, 1, 1, "你说我要不要转专业"), (200, 0, 1, "刚看到！你是不喜欢现在的专业吗"),  # late: unanswered + unprompted
    (210, 1, 1, "有点不喜欢"), (211, 0, 1, ""),                # empty reply text: unanswered + empty
    (900, 1, 1, "早上好呀"), (901, 0, 1, "早呀！今天也要元气满满"),  # new session after a long silence
]


def test_wechat_chat_merges_turns_pairs_replies_and_accounts_for_every_message(tmp_path):
    src = memotrace(tmp_path / "chat.csv", CHAT)
    summary, kept, rejects = run(tmp_path, str(src), "--me", "小雨")
    assert kept == [
        {"instruction": "在吗\n今天组会被批了", "output": "抱抱你！\n先吃顿好的（我被批完也是先吃）"},
        {"instruction": "他说我太慢", "output": "慢慢来，列个清单一天做一件就好",
         "history": [["在吗\n今天组会被批了", "抱抱你！\n先吃顿好的（我被批完也是先吃）"]]},
        {"instruction": "早上好呀", "output": "早呀！今天也要元气满满"}]
    assert Counter(r["reason"] for r in rejects) == {"non_text": 2, "system": 1, "unanswered": 2,
                                                     "unprompted": 2, "empty": 1}
    # 16 messages: 8 inside the 3 kept pairs, 8 rejected one by one
    assert summary["rows_in"] == 3 + 8
    assert {r["where"] for r in rejects if r["reason"] == "unanswered"} == {"line 12", "line 14"}
    assert kept[0] and next(r for r in rejects if r["reason"] == "system")["where"] == "line 7"


def test_pairing_windows_and_history_limit_are_flags(tmp_path):
    src = memotrace(tmp_path / "chat.csv", CHAT)
    _, kept, rejects = run(tmp_path, str(src), "--me", "wxid_friend", "--reply-minutes", "240",
                           "--merge-minutes", "0.5", "--history-turns", "0")
    assert all("history" not in r for r in kept)
    # a minute apart is no longer one turn: the first bubble of each side is left alone
    assert kept[0] == {"instruction": "今天组会被批了", "output": "抱抱你！"}
    assert {(r["reason"], r["text"]) for r in rejects} >= {("unanswered", "在吗"),
                                                          ("unprompted", "先吃顿好的（我被批完也是先吃）")}
    # a reply three hours later now counts
    assert {"instruction": "你说我要不要转专业", "output": "刚看到！你是不喜欢现在的专业吗"} in kept


def test_without_me_the_exporters_own_messages_are_learned(tmp_path):
    src = memotrace(tmp_path / "chat.csv", [(0, 0, 1, "你吃饭了吗"), (1, 1, 1, "吃了呀，你呢"),
                                            (2, 0, 1, "还没"), (3, 1, 1, "快去吃！别饿着")])
    _, kept, _ = run(tmp_path, str(src))
    assert [r["output"] for r in kept] == ["吃了呀，你呢", "快去吃！别饿着"]


def test_unknown_me_lists_the_senders_seen(tmp_path):
    src = memotrace(tmp_path / "chat.csv", CHAT)
    with pytest.raises(UserError, match=r"--me 小明 matches no sender.*senders seen \(any name or id listed works\): "
                                         r"小雨 / wxid_friend / 雨: 8 messages; 林一 / self / 我 / Lin / wxid_lin: 7 messages"):
        main(parse_args([str(src), "--me", "小明", "--out", str(tmp_path / "o.jsonl")]))


def test_pywxdump_csv(tmp_path):
    src = tmp_path / "wx.csv"
    src.write_text(
        "id,MsgSvrID,type_name,is_sender,talker,room_name,msg,src,CreateTime\n"
        "1,11,文本,1,我,wxid_friend,周末去爬山吗,,2024-06-01 10:00:00\n"
        "2,12,动画表情,0,wxid_friend,wxid_friend,,,2024-06-01 10:01:00\n"
        "3,13,文本,0,wxid_friend,wxid_friend,好呀！记得带水和防晒（我上次晒成了两截色）,,2024-06-01 10:01:30\n"
        "4,14,撤回消息,0,wxid_friend,wxid_friend,\"小雨\"撤回了一条消息,,2024-06-01 10:02:00\n"
        "5,15,图片,1,我,wxid_friend,,FileStorage/a.dat,2024-06-01 10:03:00\n", encoding="utf-8")
    summary, kept, rejects = run(tmp_path, str(src), "--me", "wxid_friend")
    assert kept == [{"instruction": "周末去爬山吗", "output": "好呀！记得带水和防晒（我上次晒成了两截色）"}]
    assert summary["rejected"] == {"non_text": 2, "system": 1}
    assert summary["files"][0]["format"] == "wechat-pywxdump"


def test_telegram_single_chat_and_full_export(tmp_path):
    def msg(i, who, text, **extra):
        sender = {"me": ("Lin", "user1"), "her": ("Xiaoyu", "user2")}[who]
        return {"id": i, "type": "message", "date": f"2024-05-01T10:{i:02d}:00",
                "date_unixtime": str(1714557600 + i * 60), "from": sender[0], "from_id": sender[1],
                "text": text, **extra}
    chat = {"name": "Xiaoyu", "type": "personal_chat", "id": 2, "messages": [
        msg(1, "me", "明天要汇报好紧张"),
        msg(2, "her", ["先", {"type": "bold", "text": "深呼吸"}, "三次，你准备得很充分！"]),
        {"id": 3, "type": "service", "date": "2024-05-01T10:03:00", "actor": "Lin", "action": "phone_call", "text": ""},
        msg(4, "me", "", photo="photos/p.jpg"),
        msg(5, "her", "", media_type="sticker", sticker_emoji="🥺", file="s.webp"),
    ]}
    single = tmp_path / "result.json"
    single.write_text(json.dumps(chat, ensure_ascii=False), encoding="utf-8")
    summary, kept, _ = run(tmp_path, str(single), "--me", "user2")
    assert kept == [{"instruction": "明天要汇报好紧张", "output": "先深呼吸三次，你准备得很充分！"}]
    assert summary["rejected"] == {"non_text": 2, "system": 1}

    other = {"name": "Group", "type": "private_group", "id": 3,
             "messages": [msg(1, "me", "晚上吃什么"), msg(2, "her", "火锅！我请客（其实是想蹭你的会员卡）")]}
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"about": "...", "chats": {"about": "...", "list": [chat, other]}},
                               ensure_ascii=False), encoding="utf-8")
    summary, kept, _ = run(tmp_path, str(full), "--me", "Xiaoyu", out="full.jsonl")
    # the second chat is a group: its prompt lines carry the speaker's name
    assert [r["instruction"] for r in kept] == ["明天要汇报好紧张", "Lin: 晚上吃什么"]


def test_format_flag_overrides_detection(tmp_path):
    src = memotrace(tmp_path / "chat.csv", CHAT)
    with pytest.raises(UserError, match="lacks CSV column.*talker, type_name, msg or content"):
        main(parse_args([str(src), "--format", "wechat-pywxdump", "--out", str(tmp_path / "o.jsonl")]))
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "在吗", "output": "在的在的，怎么啦"},
                                                  {"conversations": [{"from": "human", "value": "hi"}]}])
    summary, kept, _ = run(tmp_path, str(rows), "--format", "alpaca")
    assert len(kept) == 1 and summary["rejected"] == {"invalid_row": 1}


def test_telegram_needs_me_and_says_who_is_there(tmp_path):
    src = tmp_path / "result.json"
    src.write_text(json.dumps({"messages": [{"id": 1, "type": "message", "date": "2024-05-01T10:00:00",
                                             "from": "Lin", "from_id": "user1", "text": "hi"}]}), encoding="utf-8")
    with pytest.raises(UserError, match=r"pass --me .* Lin / user1 / 1: 1 messages"):
        main(parse_args([str(src), "--out", str(tmp_path / "o.jsonl")]))


# The header QQ's text export starts with (a private chat with 小雨).
QQ_HEADER = """消息记录（此消息记录为文本格式，不支持重新导入）

================================================================
消息分组:我的好友
================================================================
消息对象:小雨
================================================================
"""
QQ_TEXT = QQ_HEADER + """
2023-09-01 20:10:00 林一<lin@qq.com>
开学了好紧张
怕和室友处不好

2023-09-01 20:11:00 小雨(1827364509)
第一天主动打个招呼就好

带点小零食分给大家（我当年就是这样混熟的）

2023-09-01 20:12:00 林一<lin@qq.com>
[图片]

2023-09-01 20:13:00 系统消息(10000)
林一撤回了一条消息

2023-09-01 20:14:00 小雨(1827364509)
[表情]好可爱
"""


@pytest.mark.parametrize("encoding", ["gbk", "utf-8", "utf-8-sig", "utf-16"])
def test_qq_text_export_in_every_encoding(tmp_path, encoding):
    src = tmp_path / "qq.txt"
    src.write_bytes(QQ_TEXT.replace("\n", "\r\n").encode(encoding))
    summary, kept, rejects = run(tmp_path, str(src), "--me", "1827364509")
    assert kept == [{"instruction": "开学了好紧张\n怕和室友处不好",
                     "output": "第一天主动打个招呼就好\n\n带点小零食分给大家（我当年就是这样混熟的）"}]
    assert sorted((r["reason"], r["where"]) for r in rejects) == [
        ("non_text", "line 18"), ("system", "line 21"), ("unprompted", "line 24")]
    assert summary["files"][0]["encoding"] == {"gbk": "gb18030"}.get(encoding, encoding)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "gbk"])
def test_json_and_csv_read_the_same_in_every_encoding(tmp_path, encoding):
    rows = [{"instruction": "今天好累", "output": REPLY}, {"instruction": "好想家", "output": "给妈妈打个视频吧（我每次打完都更想了）"}]
    src = tmp_path / "a.jsonl"
    src.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))
    _, kept, _ = run(tmp_path, str(src))
    assert kept == rows
    chat = memotrace(tmp_path / "chat.csv", CHAT, encoding=encoding)
    _, kept, _ = run(tmp_path, str(chat), "--me", "小雨", out="chat.jsonl")
    assert len(kept) == 3


def test_a_few_damaged_bytes_do_not_turn_a_utf8_file_into_gbk(tmp_path):
    src = tmp_path / "a.jsonl"
    good = "".join(json.dumps({"instruction": f"第{i}天", "output": f"今天也要加油呀{i}（我也在努力）"},
                              ensure_ascii=False) + "\n" for i in range(20))
    src.write_bytes(good.encode() + '{"instruction": "坏", "output": "收到了一份'.encode() + b"\xc0" + '物"}\n'.encode())
    summary, kept, _ = run(tmp_path, str(src))
    assert len(kept) == 20 and summary["rejected"] == {"garbled": 1}


# ---- personal data ----------------------------------------------------------------------

PII_ROW = {"instruction": "我的新号码是138 1234 5678，邮箱 lin.yi@example.com",
           "output": "收到！我的是+44 20 7946 0958，身份证11010519900307123X，卡号6222021234567890128（别外传）"}


def test_pii_is_masked_by_default_with_typed_placeholders(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [PII_ROW])
    summary, kept, rejects = run(tmp_path, str(src))
    assert kept == [{"instruction": "我的新号码是[PHONE]，邮箱 [EMAIL]",
                     "output": "收到！我的是[PHONE]，身份证[ID]，卡号[CARD]（别外传）"}]
    assert summary["pii_masked"] == {"CARD": 1, "EMAIL": 1, "ID": 1, "PHONE": 2}


def test_pii_drop_rejects_the_row_and_keep_leaves_it(tmp_path):
    clean = {"instruction": "在吗", "output": "在的在的，怎么啦"}
    src = write_jsonl(tmp_path / "in.jsonl", [PII_ROW, clean])
    summary, kept, rejects = run(tmp_path, str(src), "--pii", "drop")
    assert kept == [clean] and summary["rejected"] == {"pii": 1}
    assert rejects[0]["output"] == PII_ROW["output"]
    _, kept, _ = run(tmp_path, str(src), "--pii", "keep", out="keep.jsonl")
    assert kept == [PII_ROW, clean]


@pytest.mark.parametrize("text, masked", [
    ("电话13912345678", "电话[PHONE]"),
    ("+86 137 2468 1357", "[PHONE]"),
    ("call +1 415 555 2671 now", "call [PHONE] now"),
    ("卡号 6222 0212 3456 7890 128", "卡号 [CARD]"),
    ("订单号 6222021234567890123 不是卡号", "订单号 6222021234567890123 不是卡号"),  # fails Luhn
    ("2024年3月花了12345元", "2024年3月花了12345元"),
])
def test_pii_patterns(text, masked):
    assert mask_pii(text)[0] == masked


@pytest.mark.parametrize("text", ["你好，今天怎么样（我也很好）", "café…", "Müßig", "阿卜杜拉·买买提", "价格×3"])
def test_ordinary_text_is_not_garbled(text):
    assert not is_garbled(text)


# ---- outputs, reruns and bad input ------------------------------------------------------

def test_same_input_and_flags_give_byte_identical_output_and_inputs_are_untouched(tmp_path):
    src = memotrace(tmp_path / "chat.csv", CHAT)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    outputs = []
    for name in ("a", "b"):
        run(tmp_path / name, str(src), "--me", "小雨")
        outputs.append([(tmp_path / name / f"out.jsonl{s}").read_bytes() for s in ("", ".rejects.jsonl")])
    assert outputs[0] == outputs[1]
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before


def test_existing_output_is_not_overwritten_without_flag(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "在吗", "output": "在的在的，怎么啦"}])
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n", encoding="utf-8")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        main(parse_args([str(src), "--out", str(out)]))
    assert out.read_text(encoding="utf-8") == "precious\n"
    run(tmp_path, str(src), "--overwrite")
    assert read_jsonl(out) == [{"instruction": "在吗", "output": "在的在的，怎么啦"}]


def test_an_input_is_never_the_output(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "在吗", "output": "在的在的，怎么啦"}])
    with pytest.raises(UserError, match="would be overwritten"):
        main(parse_args([str(src), "--out", str(src), "--overwrite"]))


def test_persona_names_the_default_output(tmp_path, monkeypatch):
    monkeypatch.setattr(clear_data, "DATA_DIR", tmp_path / "data")
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "在吗", "output": "在的在的，怎么啦"}])
    assert main(parse_args([str(src), "--persona", "girl"])) == 0
    assert read_jsonl(tmp_path / "data" / "girl.jsonl") == [{"instruction": "在吗", "output": "在的在的，怎么啦"}]
    assert (tmp_path / "data" / "girl.jsonl.rejects.jsonl").read_text(encoding="utf-8") == ""


def test_persona_or_out_is_required():
    with pytest.raises(UserError, match="--persona NAME"):
        main(parse_args(["x.jsonl"]))


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"just some notes\nnothing to see\n", "no format clear_data.py knows"),
    (b"{bad\n{worse\n", "no usable rows .*bad_json 2"),
    (b'[{"instruction": "a", "output": "b"},]', "is not valid JSON"),
    (b"[]", "no usable rows"),
])
def test_bad_files_are_one_clear_error(tmp_path, content, message):
    src = tmp_path / "in.txt"
    src.write_bytes(content)
    with pytest.raises(UserError, match=message):
        main(parse_args([str(src), "--out", str(tmp_path / "o.jsonl")]))
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_bytes(b"")
    proc = subprocess.run([sys.executable, str(ROOT / "clear_data.py"), str(src), "--out", str(tmp_path / "o.jsonl")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_summary_reports_lengths_and_warns_when_short_replies_dominate(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": f"问题{i}", "output": f"好呀第{i}个"} for i in range(6)]
                      + [{"instruction": "长", "output": REPLY}])
    summary, _, _ = run(tmp_path, str(src))
    out = capsys.readouterr().out
    assert summary["reply_chars"] == {"mean": 8.7, "median": 5, "p90": 31, "short_share": 0.857}
    assert "rows in 7 = kept 7 + rejected 0" in out
    assert "warning: 86% of kept replies are under 10 characters" in out


def test_mixed_formats_in_one_run(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "今天好累", "output": REPLY}])
    chat = memotrace(tmp_path / "chat.csv", CHAT)
    summary, kept, _ = run(tmp_path, str(a), str(chat), "--me", "小雨")
    assert [f["format"] for f in summary["files"]] == ["records", "wechat-memotrace"]
    assert summary["rows_in"] == 1 + 11 and len(kept) == 4


def test_thousands_of_rows_clean_quickly(tmp_path):
    rows = [{"instruction": f"第{i}个问题", "output": f"回复{i}：先别急，我们一步一步来（我{i % 97}号也这样）加油{i * 7919 % 10007}"}
            for i in range(5000)]
    src = write_jsonl(tmp_path / "big.jsonl", rows + rows[:100])
    start = time.perf_counter()
    summary, kept, _ = run(tmp_path, str(src), "--near-dup", "0.95")
    assert time.perf_counter() - start < 20
    assert summary["rejected"] == {"duplicate": 100}


# ---- the shipped sample exports ---------------------------------------------------------

SHIPPED = [("wechat_memotrace.csv", ["--me", "小雨"], 60), ("wechat_pywxdump.csv", ["--me", "wxid_k3x9yu21"], 30),
           ("wechat_pywxdump_content.csv", ["--me", "wxid_k3x9yu21"], 10),
           ("telegram_result.json", ["--me", "Xiaoyu"], 30), ("qq_export.txt", ["--me", "小雨"], 30),
           ("sharegpt.jsonl", [], 20), ("alpaca.json", [], 20)]


@pytest.mark.parametrize("name, me, minimum", SHIPPED)
def test_shipped_raw_exports_clean_into_a_usable_persona_dataset(tmp_path, name, me, minimum):
    summary, kept, rejects = run(tmp_path, str(RAW / name), *me)
    assert len(kept) >= minimum
    assert read_jsonl(tmp_path / "out.jsonl")  # canonical and readable by the training script
    assert sum("（" in r["output"] for r in kept) >= len(kept) // 3  # her bracket asides survive
    assert not any("[PHONE]" in r.get("text", "") for r in rejects)
    for row in kept:
        assert not is_garbled(row["output"]) and not any(mask_pii(t)[1] for t in (row["instruction"], row["output"]))


def test_qq_sample_is_gbk_and_all_samples_clean_together(tmp_path):
    with pytest.raises(UnicodeDecodeError):
        (RAW / "qq_export.txt").read_bytes().decode("utf-8")
    files = [str(RAW / name) for name, _, _ in SHIPPED]
    summary, kept, _ = run(tmp_path, *files, "--me", "小雨", "--me", "wxid_k3x9yu21", "--me", "Xiaoyu")
    assert summary["rows_in"] == sum(f["rows"] for f in summary["files"])
    assert len(kept) >= 250
