"""clear_data.py on MemoTrace TXT/JSON, WhatsApp (Android, iOS) and DiscordChatExporter JSON.

Each fixture is laid out as the exporter writes it (MemoTrace's and DiscordChatExporter's writer
code, WhatsApp's documented export format), under the file name the exporter gives it, and
run through the real CLI: kept rows and reject reasons are checked, and rows in = kept + rejected.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import pytest
from test_clear_data import RAW, run
from test_exports import cli_error, no_system_text

from personakit.exports import read_export

U = "\u202f"   # Android's narrow no-break space before AM/PM
M = "\u200e"   # iOS's left-to-right mark on every text WhatsApp wrote itself


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def no_whatsapp_markup(kept: list[dict]) -> None:
    """Nothing WhatsApp wrote itself reaches a row: notices, media tokens, edit markers, marks."""
    no_system_text(kept)
    texts = [t for r in kept for t in (r["instruction"], r["output"], *(x for p in r.get("history", []) for x in p))]
    assert not [t for t in texts if any(s in t for s in ("end-to-end", "deleted", "security code", "omitted",
                                                         "edited>", "attached", "Missed voice", M))]


# ---- WhatsApp Android, en_US: 12 h, month first, U+202F -------------------------------------

ANDROID_US = f"""4/10/26, 6:58{U}PM - Messages and calls are end-to-end encrypted. Only people in this chat can read, listen to, or share them. Learn more.
4/10/26, 7:01{U}PM - Lin: rough day, my manager moved the deadline to Monday
4/10/26, 7:01{U}PM - Lin: I have to redo the whole deck 😩
4/10/26, 7:03{U}PM - Xiaoyu: ugh, that's so unfair! do the outline tonight and the slides tomorrow, one thing at a time (I once redid a deck at 2am and it showed)
4/10/26, 7:04{U}PM - Xiaoyu: <Media omitted>
4/10/26, 7:05{U}PM - Lin: This message was deleted
4/10/26, 7:06{U}PM - Lin: ok. can you call me later?
my number changed: +1 415 555 0134
4/10/26, 7:08{U}PM - Xiaoyu: sure! I'll ring you at 9, text me at xiaoyu.chen@example.com if I forget <This message was edited>
4/10/26, 7:09{U}PM - Xiaoyu's security code changed. Tap to learn more.
4/13/26, 8:15{U}AM - Lin: the deck went fine!!
4/13/26, 8:20{U}AM - Xiaoyu: YAY told you 🎉 treat yourself to something nice (I'd pick bubble tea, obviously)
"""
US_PAIR1 = ["rough day, my manager moved the deadline to Monday\nI have to redo the whole deck 😩",
            "ugh, that's so unfair! do the outline tonight and the slides tomorrow, one thing at a time "
            "(I once redid a deck at 2am and it showed)"]
US_PAIR2 = ["ok. can you call me later?\nmy number changed: [PHONE]", "sure! I'll ring you at 9, text me at [EMAIL] if I forget"]
US_PAIR3 = ["the deck went fine!!", "YAY told you 🎉 treat yourself to something nice (I'd pick bubble tea, obviously)"]


@pytest.mark.parametrize("me", ["Xiaoyu", "xiaoyu"])
def test_whatsapp_android_12h_month_first(tmp_path, me):
    src = write(tmp_path, "WhatsApp Chat with Xiaoyu.txt", ANDROID_US)
    summary, kept, rejects = run(tmp_path, str(src), "--me", me)
    assert kept == [{"instruction": US_PAIR1[0], "output": US_PAIR1[1]},
                    {"instruction": US_PAIR2[0], "output": US_PAIR2[1], "history": [US_PAIR1]},
                    {"instruction": US_PAIR3[0], "output": US_PAIR3[1]}]   # three days later: a new session
    assert summary["rejected"] == {"system": 3, "non_text": 1}
    assert summary["files"][0] | {"path": None} == {"path": None, "format": "whatsapp", "encoding": "utf-8",
                                                    "rows": 7, "kept": 3, "date_order": "mdy"}
    assert {r["text"] for r in rejects if r["reason"] == "non_text"} == {"[media] <Media omitted>"}
    assert summary["pii_masked"] == {"EMAIL": 1, "PHONE": 1}
    no_whatsapp_markup(kept)


@pytest.mark.parametrize("me", [[], ["Lin"], ["self"], ["you"]])
def test_whatsapp_file_name_tells_the_exporter(tmp_path, me):
    src = write(tmp_path, "WhatsApp Chat with Xiaoyu.txt", ANDROID_US)
    _, kept, _ = run(tmp_path, str(src), *(a for m in me for a in ("--me", m)))
    assert kept == [{"instruction": US_PAIR1[1], "output": "ok. can you call me later?\nmy number changed: [PHONE]"}]


def test_whatsapp_forced_date_order_rejects_lines_that_are_no_date(tmp_path):
    src = write(tmp_path, "WhatsApp Chat with Xiaoyu.txt", ANDROID_US)
    summary, _, rejects = run(tmp_path, str(src), "--me", "Xiaoyu", "--date-order", "dmy")
    bad = [r for r in rejects if r["reason"] == "invalid_row"]
    assert [(r["where"], r["detail"]) for r in bad] == [("line 11", "4/13/26 is no date in dmy order (--date-order)"),
                                                        ("line 12", "4/13/26 is no date in dmy order (--date-order)")]
    assert summary["files"][0]["date_order"] == "dmy"


def test_wrong_me_in_whatsapp_lists_both_sides(tmp_path):
    src = write(tmp_path, "WhatsApp Chat with Xiaoyu.txt", ANDROID_US)
    message = cli_error(tmp_path, str(src), "--me", "Mia")
    assert "Xiaoyu: 4 messages" in message and "Lin / self / 我 / you: 4 messages" in message


# ---- WhatsApp Android, en_GB: 24 h, day first, a group ---------------------------------------

ANDROID_GB_GROUP = """12/04/2026, 09:00 - Messages and calls are end-to-end encrypted. Only people in this chat can read, listen to, or share them. Learn more.
12/04/2026, 09:00 - Lin created group "Hiking 🥾"
12/04/2026, 09:00 - Lin added Xiaoyu and Zhou
12/04/2026, 09:01 - Lin: what time on Saturday?
12/04/2026, 09:01 - Zhou: anything works
12/04/2026, 09:02 - Zhou: not too early pls
12/04/2026, 09:03 - Xiaoyu: 8am at the station? we'd be back for hotpot (I've been craving hotpot all week)
12/04/2026, 09:04 - Zhou: IMG-20260412-WA0003.jpg (file attached)
the trail map
12/04/2026, 09:05 - Zhou left
12/04/2026, 09:06 - Lin: what should we bring?
12/04/2026, 09:07 - Xiaoyu: water, snacks and old shoes (new ones gave me blisters last time)
"""


def test_whatsapp_android_24h_day_first_group_is_attributed_per_speaker(tmp_path):
    src = write(tmp_path, "WhatsApp Chat with Hiking 🥾.txt", ANDROID_GB_GROUP)
    summary, kept, _ = run(tmp_path, str(src), "--me", "Xiaoyu")
    first = ["Lin: what time on Saturday?\nZhou: anything works\nZhou: not too early pls",
             "8am at the station? we'd be back for hotpot (I've been craving hotpot all week)"]
    assert kept == [{"instruction": first[0], "output": first[1]},
                    {"instruction": "Zhou: the trail map\nLin: what should we bring?",
                     "output": "water, snacks and old shoes (new ones gave me blisters last time)", "history": [first]}]
    assert summary["rejected"] == {"system": 4}
    assert summary["files"][0]["date_order"] == "dmy"
    no_whatsapp_markup(kept)


# ---- WhatsApp iOS: _chat.txt, brackets, U+200E marks ----------------------------------------

IOS = f"""[10/04/2026, 18:58:12] Xiaoyu: {M}Messages and calls are end-to-end encrypted. Only people in this chat can read, listen to, or share them.
[10/04/2026, 19:01:58] Lin: can't sleep, big interview tomorrow
[10/04/2026, 19:02:10] Lin: what if I freeze
{M}[10/04/2026, 19:02:30] Lin: {M}sticker omitted
[10/04/2026, 19:03:41] Xiaoyu: you won't! write down three stories you want to tell and read them once before bed (I did that for mine and it saved me)
{M}[10/04/2026, 19:04:02] Xiaoyu: {M}image omitted
[10/04/2026, 19:04:30] Xiaoyu: {M}This message was deleted.
[10/04/2026, 19:05:00] Lin: {M}You deleted this message.
[10/04/2026, 19:06:15] Lin: ok I'll try. call me at 8? my new number is +44 7911 123456
[10/04/2026, 19:07:20] Xiaoyu: deal ☎️ good luck, you've got this {M}<This message was edited>
[10/04/2026, 19:08:00] Xiaoyu: {M}Missed voice call, {M}Tap to call back
[14/04/2026, 12:00:05] Lin: got the job!!!
[14/04/2026, 12:01:30] Xiaoyu: AAAH congrats!! 🎉🎉 dinner on me (I'll even pick a place with real chairs)
"""
IOS_PAIR1 = ["can't sleep, big interview tomorrow\nwhat if I freeze",
             "you won't! write down three stories you want to tell and read them once before bed "
             "(I did that for mine and it saved me)"]


def test_whatsapp_ios_chat_txt(tmp_path):
    src = write(tmp_path, "WhatsApp Chat - Xiaoyu/_chat.txt", IOS)
    summary, kept, rejects = run(tmp_path, str(src), "--me", "Xiaoyu")
    assert kept == [{"instruction": IOS_PAIR1[0], "output": IOS_PAIR1[1]},
                    {"instruction": "ok I'll try. call me at 8? my new number is [PHONE]",
                     "output": "deal ☎️ good luck, you've got this", "history": [IOS_PAIR1]},
                    {"instruction": "got the job!!!",
                     "output": "AAAH congrats!! 🎉🎉 dinner on me (I'll even pick a place with real chairs)"}]
    assert summary["rejected"] == {"system": 4, "non_text": 2}
    assert summary["files"][0]["format"] == "whatsapp"
    no_whatsapp_markup(kept)
    assert sorted(r["text"] for r in rejects if r["reason"] == "non_text") == ["[image] image omitted",
                                                                               "[sticker] sticker omitted"]


@pytest.mark.parametrize("me", [[], ["Lin"], ["self"]])
@pytest.mark.parametrize("text", [IOS, IOS.replace(f"{M}You deleted this message.", "ok")])
def test_whatsapp_ios_notices_and_deletions_tell_the_sides(tmp_path, me, text):
    # Unzipped, _chat.txt sits in a folder named after the chat; loose, the notice written under
    # the friend's name and "You deleted this message" under the exporter's tell the sides.
    for name in ("WhatsApp Chat - Xiaoyu/_chat.txt", "loose/_chat.txt"):
        _, kept, _ = run(tmp_path, str(write(tmp_path, name, text)), *(a for m in me for a in ("--me", m)),
                         out=f"{name.split('/')[0]}.jsonl")
        assert [r["output"].split("\n")[-1] for r in kept] == ["ok I'll try. call me at 8? my new number is [PHONE]"]


IOS_GROUP = f"""[12/04/2026, 09:00:00] Hiking 🥾: {M}Messages and calls are end-to-end encrypted. Only people in this chat can read, listen to, or share them.
[12/04/2026, 09:00:00] Hiking 🥾: {M}Lin created group “Hiking 🥾”
[12/04/2026, 09:00:01] Hiking 🥾: {M}Lin added Xiaoyu and \u202a+44 7911 123456\u202c
[12/04/2026, 09:01:10] Lin: what time on Saturday?
[12/04/2026, 09:01:30] \u202a+44 7911 123456\u202c: anything works
[12/04/2026, 09:03:00] Xiaoyu: 8am at the station? (I'll bring snacks for everyone)
"""


def test_whatsapp_ios_group_with_an_unsaved_number(tmp_path):
    src = write(tmp_path, "WhatsApp Chat - Hiking 🥾/_chat.txt", IOS_GROUP)
    summary, kept, _ = run(tmp_path, str(src), "--me", "Xiaoyu")
    # the unsaved member is named by number: masked like any phone number
    assert kept == [{"instruction": "Lin: what time on Saturday?\n[PHONE]: anything works",
                     "output": "8am at the station? (I'll bring snacks for everyone)"}]
    assert summary["rejected"] == {"system": 3}
    _, kept, _ = run(tmp_path, str(src), "--me", "+44 7911 123456", out="n.jsonl")
    assert kept == [{"instruction": "Lin: what time on Saturday?", "output": "anything works"}]


def header_layouts() -> list[tuple[str, str]]:
    """Every header layout whatstk documents (docs/source/getting_started/hformat.rst and its
    header_format_support.json): day/month/year in four orders, `-` `/` `.`, 2- or 4-digit
    years, 24 h or 12 h, with or without seconds, Android `date, time - ` or iOS `[date time] `."""
    layouts = []
    for order in ("dmy", "mdy", "ymd", "ydm"):
        for sep in "-/.":
            for year in ("%y", "%Y"):
                date = sep.join({"d": "%d", "m": "%m", "y": year}[c] for c in order)
                for clock in ("%H:%M", "%H:%M:%S", "%I:%M %p", "%I:%M:%S %p"):
                    layouts += [(order, f"{date}, {clock} - "), (order, f"[{date} {clock}] ")]
    return layouts


def test_whatsapp_every_documented_header_layout(tmp_path):
    # Two days, so that the file itself says which number is the day, the month and the year.
    moments = [datetime(2026, 4, 23, 19, 1, 5), datetime(2026, 4, 24, 8, 0, 5), datetime(2026, 4, 24, 8, 3, 5)]
    for order, layout in header_layouts():
        src = write(tmp_path, "WhatsApp Chat with Xiaoyu.txt", "".join(
            t.strftime(layout) + line + "\n" for t, line in zip(moments, ("Lin: night!", "Lin: morning", "Xiaoyu: hi"))))
        export = read_export(src)
        messages = export.conversations[0].messages
        assert (export.format, export.date_order) == ("whatsapp", order), layout
        # every moment is at :05 seconds, so layouts without seconds keep the same gaps
        assert [m.time - messages[0].time for m in messages] == [(t - moments[0]).total_seconds() for t in moments], layout
        assert [(m.sender, m.text, m.is_sender) for m in messages] == [
            ("Lin", "night!", True), ("Lin", "morning", True), ("Xiaoyu", "hi", False)], layout


def test_whatsapp_android_notice_under_the_chat_name_tells_the_sides(tmp_path):
    # Some Android versions write the encryption notice under the chat's name, as iOS does.
    text = ("15.04.26, 15:04 - Xiaoyu: Messages and calls are end-to-end encrypted. No one outside of this chat, "
            "not even WhatsApp, can read or listen to them. Tap to learn more.\n"
            "15.04.26, 15:05 - Xiaoyu: are you coming tonight?\n15.04.26, 15:07 - Lin: yes! bringing snacks\n")
    summary, kept, _ = run(tmp_path, str(write(tmp_path, "chat.txt", text)))
    assert kept == [{"instruction": "are you coming tonight?", "output": "yes! bringing snacks"}]
    assert summary["rejected"] == {"system": 1} and summary["files"][0]["date_order"] == "dmy"


# ---- WhatsApp: dates that fit both orders ----------------------------------------------------

AMBIGUOUS = f"""4/10/26, 11:50{U}PM - Lin: are you still up? I can't stop thinking about the move
4/11/26, 12:10{U}AM - Xiaoyu: I'm here! let's list what scares you most, then tackle one thing tomorrow (I did this before my own move)
4/12/26, 9:00{U}AM - Lin: ok the list helped
4/12/26, 9:05{U}AM - Xiaoyu: so proud of you, one box at a time
"""


def test_ambiguous_dates_are_decided_from_the_whole_file(tmp_path):
    # 4/10 -> 4/11 -> 4/12: a day apart read month first, a month apart read day first.
    src = write(tmp_path, "WhatsApp Chat with Xiaoyu.txt", AMBIGUOUS)
    summary, kept, _ = run(tmp_path, str(src), "--me", "Xiaoyu")
    assert summary["files"][0]["date_order"] == "mdy"
    assert [r["output"] for r in kept] == [
        "I'm here! let's list what scares you most, then tackle one thing tomorrow (I did this before my own move)",
        "so proud of you, one box at a time"]
    # read day first, the first reply comes a month after its prompt: no pair
    summary, kept, _ = run(tmp_path, str(src), "--me", "Xiaoyu", "--date-order", "dmy", out="dmy.jsonl")
    assert [r["output"] for r in kept] == ["so proud of you, one box at a time"]
    assert summary["rejected"] == {"unanswered": 1, "unprompted": 1}
    day_first = AMBIGUOUS.replace("4/10/26", "10/4/26").replace("4/11/26", "11/4/26").replace("4/12/26", "12/4/26")
    summary, kept, _ = run(tmp_path, str(write(tmp_path, "b/WhatsApp Chat with Xiaoyu.txt", day_first)),
                           "--me", "Xiaoyu", out="b.jsonl")
    assert summary["files"][0]["date_order"] == "dmy" and len(kept) == 2


def test_whatsapp_in_another_layout_says_what_it_looks_like(tmp_path):
    src = write(tmp_path, "WhatsApp Chat with Xiaoyu.txt", "2026年4月10日 19:01 - Xiaoyu: 你好\n"
                                                           "2026年4月10日 19:02 - Lin: hi\n")
    message = cli_error(tmp_path, str(src), "--me", "Xiaoyu")
    tried = set(re.search(r"\(tried ([^)]*)\)", message).group(1).split(", "))
    assert {"qq", "telegram", "wechat-memotrace-txt", "wechat-memotrace-json", "whatsapp", "discord"} <= tried
    assert "it looks like a WhatsApp export, but no line matched its date pattern" in message
    notes = write(tmp_path, "notes.txt", "just some notes\n")
    assert "matched WhatsApp's date pattern" in cli_error(tmp_path, str(notes), "--format", "whatsapp")
    day_first = write(tmp_path, "d/WhatsApp Chat with Xiaoyu.txt", "13/04/2026, 09:00 - Xiaoyu: hi\n")
    assert "try --date-order dmy" in cli_error(tmp_path, str(day_first), "--date-order", "mdy")


@pytest.mark.parametrize("first, second", [
    ("10.04.26, 19:01 - ", "10.04.26, 19:03 - "),                  # Android, German
    ("10/04/2026 à 19:01 - ", "10/04/2026 à 19:03 - "),            # Android, French
    ("[12.4.2026 klo 19.01.58] ", "[12.4.2026 klo 19.03.10] "),    # iOS, Finnish
    ("10/4/26, 7:01 p. m. - ", "10/4/26, 7:03 p. m. - "),          # Android, Spanish
    ("2026-04-10 19:01 - ", "2026-04-10 19:03 - ")])               # Android, Swedish
def test_whatsapp_layouts_of_other_phone_languages(tmp_path, first, second):
    reply = "oh no! leave it till tomorrow (I always regret late-night decks)"
    src = write(tmp_path, "WhatsApp Chat with Xiaoyu.txt", f"{first}Lin: rough day\n{second}Xiaoyu: {reply}\n")
    _, kept, _ = run(tmp_path, str(src), "--me", "Xiaoyu")
    assert kept == [{"instruction": "rough day", "output": reply}]


# ---- MemoTrace TXT: `{time} {name}`, content, blank line ------------------------------------

MEMOTRACE_TXT = """2024-03-01 20:10:00 林一
今天被导师骂了

2024-03-01 20:10:20 林一
[表情包]

2024-03-01 20:10:40 林一
感觉自己什么都做不好

2024-03-01 20:11:30 小雨
抱抱你！先去吃点好的😋

（我上次被骂完吃了两碗面就好了）

2024-03-01 20:12:00 "小雨" 撤回了一条消息

2024-03-01 20:12:10 林一
[图片]

2024-03-01 20:13:00 林一
你说得对
那我明天再找他聊聊

2024-03-01 20:14:00 小雨
对！聊之前把问题列个清单，有事打我电话13812345678
引用:林一:那我明天再找他聊聊

2024-03-01 20:15:00 小雨
            [链接]:title:如何和导师沟通
            description:十个技巧
            url:https://example.com/a
            name:知乎
            \n\n"""
MT_PAIR1 = ["今天被导师骂了\n感觉自己什么都做不好", "抱抱你！先去吃点好的😋\n\n（我上次被骂完吃了两碗面就好了）"]


def test_memotrace_txt_is_not_read_as_qq_and_drops_quotes(tmp_path):
    src = write(tmp_path, "小雨.txt", MEMOTRACE_TXT)
    summary, kept, rejects = run(tmp_path, str(src), "--me", "小雨")
    assert summary["files"][0]["format"] == "wechat-memotrace-txt"
    assert kept == [{"instruction": MT_PAIR1[0], "output": MT_PAIR1[1]},
                    {"instruction": "你说得对\n那我明天再找他聊聊", "output": "对！聊之前把问题列个清单，有事打我电话[PHONE]",
                     "history": [MT_PAIR1]}]
    assert summary["rejected"] == {"system": 1, "non_text": 3}
    assert sorted(r["text"].split("]")[0] for r in rejects if r["reason"] == "non_text") == ["[image", "[link", "[sticker"]
    assert not any("引用" in t for r in kept for t in (r["instruction"], r["output"]))
    no_system_text(kept)


@pytest.mark.parametrize("me", [[], ["我"], ["林一"], ["self"]])
def test_memotrace_txt_file_name_tells_the_exporter(tmp_path, me):
    src = write(tmp_path, "小雨.txt", MEMOTRACE_TXT)
    _, kept, _ = run(tmp_path, str(src), *(a for m in me for a in ("--me", m)))
    assert kept == [{"instruction": MT_PAIR1[1], "output": "你说得对\n那我明天再找他聊聊"}]


def test_memotrace_txt_group_and_an_unknown_me(tmp_path):
    text = ("2024-03-02 09:00:00 林一\n周六爬山几点集合\n\n2024-03-02 09:00:30 阿周\n我都行\n\n"
            '2024-03-02 09:00:40 "阿周"邀请"小花"加入了群聊\n\n'
            "2024-03-02 09:01:00 小雨\n八点地铁站吧（我馋火锅一周了）\n\n")
    src = write(tmp_path, "爬山小分队.txt", text)
    summary, kept, _ = run(tmp_path, str(src), "--me", "小雨")
    assert kept == [{"instruction": "林一: 周六爬山几点集合\n阿周: 我都行", "output": "八点地铁站吧（我馋火锅一周了）"}]
    assert summary["rejected"] == {"system": 1}
    assert "小雨: 1 messages" in cli_error(tmp_path, str(src), "--me", "小明")


@pytest.mark.parametrize("me", ["Tom's", "Tom\\'s"])
def test_memotrace_txt_names_are_read_unescaped(tmp_path, me):
    # exporter.py's escape_js_and_html writes the remark Tom's as Tom\'s; the file is named Tom's.txt
    text = "2024-03-01 20:10:00 林一\n在吗\n\n2024-03-01 20:11:00 Tom\\'s\n在的在的，怎么啦\n\n"
    src = write(tmp_path, "Tom's.txt", text)
    _, kept, _ = run(tmp_path, str(src), "--me", me)
    assert kept == [{"instruction": "在吗", "output": "在的在的，怎么啦"}]


# ---- MemoTrace JSON: `<remark>_train.json`, already paired by role --------------------------

MEMOTRACE_PROMPT = "你是林一，一个聪明、热情、善良的人，后面的对话来自你的朋友，你要认真地回答他"
MEMOTRACE_JSON = [
    {"conversations": [
        {"role": "system", "content": MEMOTRACE_PROMPT},
        {"role": "user", "content": "今天被导师骂了\n感觉自己什么都做不好"},
        {"role": "assistant", "content": "别难过，晚上请你吃火锅[呲牙]"},
        {"role": "user", "content": "好呀好呀😂 那说好了，七点见，我电话13812345678"},
        {"role": "assistant", "content": "记下了，七点老地方见"}]},
    {"conversations": [
        {"role": "system", "content": MEMOTRACE_PROMPT},
        {"role": "user", "content": "你在干嘛"},
        {"role": "assistant", "content": "在写论文，头都大了"}]},
]


def test_memotrace_json_is_not_read_as_sharegpt(tmp_path):
    src = write(tmp_path, "小雨_train.json", json.dumps(MEMOTRACE_JSON, ensure_ascii=False, indent=4))
    summary, kept, _ = run(tmp_path, str(src))
    assert summary["files"][0]["format"] == "wechat-memotrace-json"
    # MemoTrace's assistant is the exporter; its generated system prompt is no row and no data
    assert kept == [{"instruction": "今天被导师骂了\n感觉自己什么都做不好", "output": "别难过，晚上请你吃火锅[呲牙]"},
                    {"instruction": "好呀好呀😂 那说好了，七点见，我电话[PHONE]", "output": "记下了，七点老地方见",
                     "history": [["今天被导师骂了\n感觉自己什么都做不好", "别难过，晚上请你吃火锅[呲牙]"]]},
                    {"instruction": "你在干嘛", "output": "在写论文，头都大了"}]
    _, same, _ = run(tmp_path, str(src), "--me", "林一", out="me.jsonl")
    assert same == kept


@pytest.mark.parametrize("me", ["小雨", "user"])
def test_memotrace_json_friend_side_by_file_name(tmp_path, me):
    src = write(tmp_path, "小雨_dev.json", json.dumps(MEMOTRACE_JSON, ensure_ascii=False, indent=4))
    summary, kept, _ = run(tmp_path, str(src), "--me", me)
    assert kept == [{"instruction": "别难过，晚上请你吃火锅[呲牙]", "output": "好呀好呀😂 那说好了，七点见，我电话[PHONE]"}]
    assert summary["rejected"] == {"unanswered": 2, "unprompted": 2}


def test_memotrace_json_bad_items_are_counted_and_a_wrong_format_is_one_sentence(tmp_path):
    src = write(tmp_path, "小雨_train.json", json.dumps([*MEMOTRACE_JSON, {"conversations": "oops"}], ensure_ascii=False))
    summary, _, rejects = run(tmp_path, str(src))
    assert summary["rejected"] == {"invalid_row": 1}
    assert rejects[0]["where"] == "item 3"
    whatsapp = write(tmp_path, "WhatsApp Chat with Xiaoyu.txt", ANDROID_US)
    assert "is not MemoTrace JSON" in cli_error(tmp_path, str(whatsapp), "--format", "wechat-memotrace-json")
    assert "is not a DiscordChatExporter JSON export" in cli_error(tmp_path, str(src), "--format", "discord")
    cut = write(tmp_path, "Direct Messages - Xiaoyu [1].json", json.dumps({"guild": DM_GUILD, "messages": []}))
    assert "it looks like a DiscordChatExporter JSON export, but it has no 'channel'" in cli_error(tmp_path, str(cut))


# ---- DiscordChatExporter JSON: as JsonMessageWriter writes it --------------------------------

def dc_user(uid: str, name: str, nickname: str) -> dict:
    return {"id": uid, "name": name, "discriminator": "0000", "nickname": nickname, "color": None, "isBot": False,
            "roles": [], "avatarUrl": f"https://cdn.discordapp.com/avatars/{uid}/a.png"}


LIN_DC = dc_user("400000000000000001", "lin.w", "Lin")
YU_DC = dc_user("400000000000000002", "xiaoyu_99", "Xiaoyu")
ZHOU_DC = dc_user("400000000000000003", "zhou.hikes", "Zhou")


def dc_message(mid: int, kind: str, minute: int, author: dict, content: str = "", **extra) -> dict:
    message = {"id": str(1190000000000000000 + mid), "type": kind, "timestamp": f"2026-04-10T19:{minute:02d}:12.345+01:00",
               "timestampEdited": extra.pop("edited", None), "callEndedTimestamp": extra.pop("call_ended", None),
               "isPinned": False, "content": content, "author": author, "attachments": extra.pop("attachments", []),
               "embeds": [], "stickers": extra.pop("stickers", []), "reactions": [], "mentions": []}
    return {**message, **extra, "inlineEmojis": []}


def dc_export(channel: dict, guild: dict, messages: list[dict]) -> str:
    return json.dumps({"guild": guild, "channel": channel, "dateRange": {"after": None, "before": None},
                       "exportedAt": "2026-04-11T08:00:00.000+01:00", "messages": messages,
                       "messageCount": len(messages)}, ensure_ascii=False, indent=2)


DM_GUILD = {"id": "0", "name": "Direct Messages", "iconUrl": "https://cdn.discordapp.com/embed/avatars/0.png"}
DM_CHANNEL = {"id": "1180000000000000001", "type": "DirectTextChat", "categoryId": None, "category": None,
              "name": "Xiaoyu", "topic": None}
DM_MESSAGES = [
    dc_message(1, "Default", 1, LIN_DC, "my cat knocked my coffee onto my laptop 😭"),
    dc_message(2, "Default", 1, LIN_DC, "it still turns on but the keyboard is sticky"),
    dc_message(3, "Reply", 3, YU_DC, "oh nooo! unplug it and leave it upside down on a towel overnight "
                                     "(I saved mine that way, it still smells like latte)",
               reference={"type": "Default", "messageId": "1190000000000000002", "channelId": DM_CHANNEL["id"],
                          "guildId": None}),
    dc_message(4, "Default", 3, YU_DC, attachments=[{"id": "1", "url": "https://cdn.discordapp.com/attachments/1/towel.png",
                                                    "fileName": "towel.png", "fileSizeBytes": 20311}]),
    dc_message(5, "ChannelPinnedMessage", 4, YU_DC, "Pinned a message."),
    dc_message(6, "Call", 5, LIN_DC, "Started a call that lasted 12 minutes.", call_ended="2026-04-10T19:17:00.000+01:00"),
    dc_message(7, "Default", 20, LIN_DC, "thanks!! also can you send me the repair shop's email?"),
    dc_message(8, "Default", 21, YU_DC, "sure, it's fixit@example.com, tell them I sent you",
               edited="2026-04-10T19:22:00.000+01:00"),
    dc_message(9, "Default", 22, LIN_DC, stickers=[{"id": "7", "name": "Wave", "format": "Apng",
                                                    "sourceUrl": "https://media.discordapp.net/stickers/7.png"}]),
    dc_message(10, "Default", 23, YU_DC, reference={"type": "Forward", "messageId": "5", "channelId": "9", "guildId": None},
               forwardedMessage={"timestamp": "2026-04-01T10:00:00.000+01:00", "timestampEdited": None,
                                 "content": "Repair shop hours: 9-5", "attachments": [], "embeds": [], "stickers": []}),
]
DM_PAIR1 = ["my cat knocked my coffee onto my laptop 😭\nit still turns on but the keyboard is sticky",
            "oh nooo! unplug it and leave it upside down on a towel overnight (I saved mine that way, it still smells like latte)"]


@pytest.mark.parametrize("me", ["Xiaoyu", "xiaoyu_99", "400000000000000002"])
def test_discord_dm(tmp_path, me):
    src = write(tmp_path, "Direct Messages - Xiaoyu [1180000000000000001].json", dc_export(DM_CHANNEL, DM_GUILD, DM_MESSAGES))
    summary, kept, rejects = run(tmp_path, str(src), "--me", me)
    assert summary["files"][0]["format"] == "discord"
    assert kept == [{"instruction": DM_PAIR1[0], "output": DM_PAIR1[1]},
                    {"instruction": "thanks!! also can you send me the repair shop's email?",
                     "output": "sure, it's [EMAIL], tell them I sent you", "history": [DM_PAIR1]}]
    assert summary["rejected"] == {"system": 2, "non_text": 3}
    assert sorted(r["text"] for r in rejects if r["reason"] != "non_text") == ["[system] Pinned a message.",
                                                                               "[system] Started a call that lasted 12 minutes."]
    assert not any("Repair shop hours" in r["output"] for r in kept)


@pytest.mark.parametrize("me", [[], ["self"], ["lin.w"]])
def test_discord_dm_channel_name_tells_the_exporter(tmp_path, me):
    src = write(tmp_path, "Direct Messages - Xiaoyu [1180000000000000001].json", dc_export(DM_CHANNEL, DM_GUILD, DM_MESSAGES))
    _, kept, _ = run(tmp_path, str(src), *(a for m in me for a in ("--me", m)))
    assert kept == [{"instruction": DM_PAIR1[1], "output": "thanks!! also can you send me the repair shop's email?"}]


def test_discord_server_channel_is_a_group_by_nickname(tmp_path):
    guild = {"id": "1170000000000000000", "name": "Hiking Club", "iconUrl": None}
    channel = {"id": "1180000000000000002", "type": "GuildTextChat", "categoryId": "1", "category": "trips",
               "name": "saturday", "topic": "plans"}
    yu = {**YU_DC, "nickname": "Yu 🌸"}
    messages = [dc_message(1, "GuildMemberJoin", 0, ZHOU_DC, "Joined the server."),
                dc_message(2, "Default", 1, LIN_DC, "what time saturday?"), dc_message(3, "Default", 1, ZHOU_DC, "anything works"),
                dc_message(4, "Default", 2, ZHOU_DC, "not too early"),
                dc_message(5, "Default", 3, yu, "8am at the station, then hotpot (I've been craving it all week)")]
    src = write(tmp_path, "Hiking Club - trips - saturday [1180000000000000002].json", dc_export(channel, guild, messages))
    summary, kept, _ = run(tmp_path, str(src), "--me", "xiaoyu_99")
    assert kept == [{"instruction": "Lin: what time saturday?\nZhou: anything works\nZhou: not too early",
                     "output": "8am at the station, then hotpot (I've been craving it all week)"}]
    assert summary["rejected"] == {"system": 1}
    assert "Yu 🌸 / xiaoyu_99 / 400000000000000002: 1 messages" in cli_error(tmp_path, str(src), "--me", "Mia")


# ---- the shipped samples ---------------------------------------------------------------------

@pytest.mark.parametrize("name, me, fmt, minimum", [
    ("WhatsApp Chat with Xiaoyu.txt", "Xiaoyu", "whatsapp", 10),
    ("Direct Messages - Xiaoyu [1180731862214606858].json", "Xiaoyu", "discord", 10),
    ("小雨.txt", "小雨", "wechat-memotrace-txt", 10),
    ("小雨_train.json", "小雨", "wechat-memotrace-json", 8)])
def test_shipped_samples(tmp_path, name, me, fmt, minimum):
    summary, kept, _ = run(tmp_path, str(RAW / name), "--me", me)
    assert summary["files"][0]["format"] == fmt
    assert len(kept) >= minimum
    assert sum(("(" in r["output"]) or ("（" in r["output"]) for r in kept) >= len(kept) // 3
    no_whatsapp_markup(kept)
