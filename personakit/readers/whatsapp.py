"""WhatsApp "Export chat" text, as Android and iOS write it.

WhatsApp publishes no writer code. This reader is built from the layouts its export writes on
English-language phones, as described in issue #30 and in public documentation of real exports
(github lucasrodes/whatstk at ba408401490e6dd3ded77e95fa335a510b374518: `docs/source/
getting_started/hformat.rst`, the header formats in `whatstk/whatsapp/assets/
header_format_support.json`, the sample `chats/whatsapp/pokemon.txt`):
  Android  `WhatsApp Chat with Xiaoyu.txt`: `4/10/26, 7:01 PM - Name: text` (12 h, U+202F before
           AM/PM on recent versions) or `10/04/2026, 19:01 - Name: text` (24 h); notices have no
           `Name: ` (`... - Xiaoyu's security code changed. ...`), or the chat's name.
  iOS      `_chat.txt` inside `WhatsApp Chat - Xiaoyu.zip`: `[10/04/2026, 19:01:58] Name: text`;
           every text WhatsApp wrote itself (media omitted, deletions, notices) starts with U+200E,
           and notices are written under the chat's name.
Other phone languages keep these layouts with other separators (`10.04.26, 19:01 - `,
`10/04/2026 à 19:01 - `, `[12.4.2026 klo 19.01.58] `); their notices are recognised only where the
layout marks them (no sender on Android, U+200E on iOS). A message's further lines follow its head
line. Media come as `<Media omitted>`, `image omitted`, `IMG-...jpg (file attached)`,
`<attached: 00000012-PHOTO-...jpg>`; edits add `<This message was edited>`. Replies are exported
without the message they quote, so no quoted text can leak. Whether `4/10` is April or October is
decided once from the whole file (the reading under which every date is valid and the messages
run forward with the smaller gaps), or by --date-order.
"""
from __future__ import annotations

import calendar
import re
from datetime import datetime
from typing import Any

from ..errors import UserError
from ..exports import SELF_ALIASES, Conversation, Export, Message

DATE = r"\d{1,4}[./-]\d{1,2}[./-]\d{1,4}"
TIME = r"\d{1,2}[:.]\d{2}(?:[:.]\d{2})?(?:[ \u202f\u00a0]?[AaPp]\.?[ \u202f\u00a0]?[Mm]\.?)?"
# Between date and time: ", " or a short word in some languages (`12.3.2022 klo 14.08.18`, `à`, `um`).
SEP = r"(?:,? |,? [^\W\d_]{1,5} )"
HEAD = re.compile(rf"^\u200e?(?:\[(?P<idate>{DATE}){SEP}(?P<itime>{TIME})\] "
                  rf"|(?P<adate>{DATE}){SEP}(?P<atime>{TIME}) - )(?P<rest>.*)$")
DATEISH = re.compile(r"^\u200e?\[?\d{1,4}\D{1,3}\d{1,2}\D{1,3}\d{1,4}\D.{0,30}?(?: - |\] )")
# Direction marks: U+200E/F on what WhatsApp wrote, U+202A..U+202E around unsaved numbers.
MARKS = re.compile("[\u200e\u200f\u202a-\u202e]")
EDITED = re.compile(r"\s*<This message was edited>\s*$")
NAMED_FILE = re.compile(r"WhatsApp Chat (?:with|-) (.+?)(?: \(\d+\))?$")

# Text WhatsApp writes after a sender's name that nobody typed (English phones).
WRITTEN = re.compile("|".join((
    r"Messages and calls are end-to-end encrypted\..*",
    r"Messages (?:you send )?to this (?:group|chat) are now secured with end-to-end encryption\..*",
    r"Your security code with .{1,60} changed\..*", r"[^:]{1,60}'s security code changed\..*",
    r"This message was deleted\.?", r"You deleted this message\.?", r"This message was deleted by admin .{1,60}",
    r"Missed (?:voice|video|group voice|group video) call.*", r"Waiting for this message\..*",
)), re.DOTALL)
# Group notices have no sender; a name in them has no colon, so "Zhou: I added sugar" is no notice.
GROUP_NOTICE = re.compile("|".join((
    r"[^:]{1,60} (?:created group|added|removed) .{1,200}", r"[^:]{1,60} (?:left|joined using this group's invite link)",
    r"[^:]{1,60} changed (?:the subject|this group's icon|the group description|their phone number).*",
    r"[^:]{1,60} turned (?:on|off) disappearing messages\..*", r"Disappearing messages .*",
)), re.DOTALL)
DELETED_BY_ME = re.compile(r"You deleted this message\.?")
# iOS, and some Android versions, write these under the chat's name (in a private chat, the friend's).
CHAT_NOTICE = re.compile(r"Messages (?:and calls are end-to-end encrypted|(?:you send )?to this)|Your security code with")
# The first line of a media message: what is omitted or attached.
OMITTED = {"image": "image", "video": "video", "audio": "voice", "sticker": "sticker", "gif": "sticker",
           "document": "file", "contact card": "contact"}
MEDIA_LINE = re.compile(r"<Media omitted>|(?:.* )?(image|video|audio|sticker|GIF|document|Contact card) omitted"
                        r"|<attached: \d+-([A-Z]+)-.*>|([A-Z]{3})-\d{8}-WA\d+\.\w+ \(file attached\)"
                        r"|.+ \(file attached\)|[Ll]ocation: https?://\S+", re.IGNORECASE)
ATTACHED = {"PHOTO": "image", "VIDEO": "video", "AUDIO": "voice", "STICKER": "sticker", "GIF": "sticker",
            "IMG": "image", "VID": "video", "PTT": "voice", "AUD": "voice", "STK": "sticker"}


def detect(text: str, parsed: Any) -> str | None:
    if parsed is None and any(HEAD.match(line) for line in text.splitlines()[:60]):
        return "whatsapp"
    return None


def near_miss(text: str, parsed: Any) -> str | None:
    """Lines that start with some date and then ` - ` or `] ` as WhatsApp's do, in a layout not read."""
    if parsed is None and sum(bool(DATEISH.match(x)) for x in text.splitlines()[:60]) >= 2:
        return ("a WhatsApp export, but no line matched its date pattern (`4/10/26, 7:01 PM - Name: text` "
                "or `[10/04/2026, 19:01:58] Name: text`); export the chat again with the phone set to English")
    return None


def read(export: Export, text: str, _parsed: Any) -> None:
    heads: list[tuple[int, re.Match[str], list[str]]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        match = HEAD.match(line)
        if match:
            heads.append((lineno, match, []))
        elif heads:
            heads[-1][2].append(line)
        elif line.strip():
            export.reject("invalid_row", f"line {lineno}", line, detail="text before the first dated message")
    if not heads:
        raise UserError(f"no line of {export.path} matched WhatsApp's date pattern (`4/10/26, 7:01 PM - Name: "
                        f"text` or `[10/04/2026, 19:01:58] Name: text`); check the file or its --format")
    stamps = [(m["idate"] or m["adate"], m["itime"] or m["atime"]) for _, m, _ in heads]
    if export.date_order == "auto":
        export.date_order = decide_order(stamps)
    elif all(timestamp(date, clock, export.date_order) is None for date, clock in stamps):
        raise UserError(f"no date in {export.path} is valid read as {export.date_order}; "
                        f"try --date-order {decide_order(stamps)} or leave --date-order out")
    conv = Conversation()
    # Android names the file after the chat; iOS names the zip (unzipped: the folder of _chat.txt).
    named = NAMED_FILE.match(export.path.stem) or NAMED_FILE.match(export.path.parent.name)
    chat_names = {named.group(1)} if named else set()
    exporter: set[str] = set()
    for (lineno, match, more), (date, clock) in zip(heads, stamps):
        time = timestamp(date, clock, export.date_order)
        where, rest = f"line {lineno}", match["rest"]
        if time is None:
            export.reject("invalid_row", where, "\n".join([match.group(0), *more]),
                          detail=f"{date} is no date in {export.date_order} order (--date-order)")
            continue
        message = _message(rest, more, where, time)
        if message.kind == "system" and GROUP_NOTICE.fullmatch(message.text):
            conv.group = True
        if message.kind == "system" and message.sender and CHAT_NOTICE.match(message.text):
            chat_names.add(message.sender)
        if message.sender and DELETED_BY_ME.fullmatch(message.text):
            exporter.add(message.sender)
        conv.messages.append(message)
    _sides(conv, chat_names, exporter)
    export.items.append(conv)


def _message(rest: str, more: list[str], where: str, time: float) -> Message:
    plain = MARKS.sub("", rest)
    if ": " not in rest or GROUP_NOTICE.fullmatch(plain) or WRITTEN.fullmatch(plain):
        return Message("", (), "system", "\n".join([plain, *more]), where, time)
    sender, first = rest.split(": ", 1)
    sender = MARKS.sub("", sender).strip()
    written = first.startswith("\u200e")     # iOS: WhatsApp wrote this text, nobody typed it
    lines = [MARKS.sub("", x) for x in (first, *more)]
    body = EDITED.sub("", "\n".join(lines)).strip()
    media = MEDIA_LINE.fullmatch(lines[0].strip())
    if media:
        kind = _media_kind(media)
        caption = EDITED.sub("", "\n".join(lines[1:])).strip()
        if caption:
            # The placeholder goes last so that cleaning leaves "Zhou: caption", not "Zhou:  caption".
            return Message(sender, (sender,), "text", f"{caption} [{kind}]", where, time)
        return Message(sender, (sender,), kind, lines[0].strip(), where, time)
    kind = "system" if written or WRITTEN.fullmatch(body) else "text"
    return Message(sender, (sender,), kind, body, where, time)


def _media_kind(match: re.Match[str]) -> str:
    token = match.group(0).lower()
    if token == "<media omitted>":
        return "media"
    if token.startswith("location"):
        return "location"
    if match.group(1):
        return OMITTED[match.group(1).lower()]
    code = match.group(2) or match.group(3)
    return ATTACHED.get(code.upper(), "file") if code else "file"


def _sides(conv: Conversation, chat_names: set[str], exporter: set[str]) -> None:
    """In a private chat the file or the notices name the friend, a deletion names the exporter."""
    talk = [m for m in conv.messages if m.kind != "system"]
    speakers = {m.sender for m in talk}
    if conv.group or len(speakers) != 2:
        return
    if speakers & exporter:
        mine = speakers & exporter
    elif len(speakers & chat_names) == 1:
        mine = speakers - chat_names
    else:
        return
    for m in talk:
        m.is_sender = m.sender in mine
        if m.is_sender:
            m.ids = tuple(dict.fromkeys((*SELF_ALIASES, "you", m.sender)))


# How the three numbers of a date can be read, most common first (the first wins a tie).
ORDERS = ("dmy", "mdy", "ymd", "ydm")


def decide_order(stamps: list[tuple[str, str]]) -> str:
    """The reading of every date in the file: the one under which the most dates are valid and
    the messages run forward in time with the smaller gaps (a part above 12 is no month)."""
    return min(ORDERS, key=lambda order: (*_disorder(stamps, order), ORDERS.index(order)))


def _disorder(stamps: list[tuple[str, str]], order: str) -> tuple[int, int, float]:
    times = [timestamp(date, clock, order) for date, clock in stamps]
    valid = [t for t in times if t is not None]
    steps = [b - a for a, b in zip(valid, valid[1:])]
    return len(times) - len(valid), sum(s < 0 for s in steps), sum(abs(s) for s in steps)


def timestamp(date: str, clock: str, order: str) -> float | None:
    """Seconds of a head line's date and time read in `order`, or None if it is no date then."""
    parts = dict(zip(order, (int(x) for x in re.split(r"[./-]", date))))
    year = parts["y"] + 2000 if parts["y"] < 100 else parts["y"]
    found = re.match(r"(\d{1,2})[:.](\d{2})(?:[:.](\d{2}))?\W*([AaPp])?", clock)
    if not found:
        return None
    hour, minute, second = int(found[1]), int(found[2]), int(found[3] or 0)
    if found[4]:
        hour = hour % 12 + (12 if found[4].lower() == "p" else 0)
    try:
        moment = datetime(year, parts["m"], parts["d"], hour, minute, second)
    except ValueError:
        return None
    return float(calendar.timegm(moment.timetuple()))
