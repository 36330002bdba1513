"""Turn raw chat exports into clean persona pairs, keeping every dropped row and why.

    python clear_data.py data/raw/wechat_memotrace.csv --persona girl --me 小雨

Inputs (format detected per file, --format overrides): alpaca/canonical JSON or JSONL,
ShareGPT, OpenAI `messages`, WeChat CSV (MemoTrace/WeChatMsg, PyWxDump/WeClone), MemoTrace
TXT and JSON, Telegram Desktop JSON, QQ "消息记录" text, QQChatExporter JSON/TXT, WeFlow/EchoTrace
JSON/CSV/TXT, chatlog JSON/CSV/text, WhatsApp "Export chat" text (Android, iOS), DiscordChatExporter
JSON; UTF-8 (with or without BOM), UTF-16 or GBK/GB18030. A folder stands for the export files in
it (an exporter's batch output, or a chunked export).

Writes the canonical JSONL (--out, or data/<persona>.jsonl), <out>.rejects.jsonl with every
rejected row (reason, file, line or message id, text as read) and <out>.summary.json with
the resolved arguments and counts; prints the summary.

Group chats pair the persona's turn with the turn before it, in which everyone else who
spoke is one side, each line prefixed with its speaker's name; --skip-groups drops them.

Counting, so that rows in = kept + rejected accounts for every input exactly once:
- a record (JSON/JSONL line or array item) of alpaca/canonical data is one row;
- in chat exports, ShareGPT and `messages`, a row is either one candidate pair (however many
  message bubbles its two turns merged) or one message that could not be part of a pair
  (system, non_text, empty, unanswered, unprompted); system prompts are metadata, not rows;
- a line that is not valid JSON, or a record or CSV row of the wrong shape, is one row.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from personakit.cleaning import SHORT_REPLY_CHARS, SHORT_SHARE_WARNING, CleanConfig, Cleaner, reply_stats
from personakit.data import dumps_row, write_jsonl, write_text_atomic
from personakit.errors import UserError, run_cli
from personakit.exports import FORMATS, Reject, input_files, read_export
from personakit.flags import check_args
from personakit.pairing import GroupOptions, Windows, export_candidates, resolve_persona

DATA_DIR = Path(__file__).resolve().parent / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # inputs
    p.add_argument("inputs", nargs="+", help="raw export or dataset files, or folders of them; formats may be mixed")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="format of every input (default: detect per file)")
    p.add_argument("--date-order", default="auto", choices=("auto", "dmy", "mdy", "ymd", "ydm"),
                   help="WhatsApp: the order of day, month and year in dates such as 4/10/26 "
                        "(default: decided from the whole file)")
    # whose style
    p.add_argument("--persona", help="persona name; the output defaults to data/<persona>.jsonl")
    p.add_argument("--me", action="append", default=[], metavar="NAME_OR_ID",
                   help="sender name or id whose replies are learned in chat exports; repeat for "
                        "aliases in different exports (default: the export's is-sender flag)")
    # pairing of chat messages
    p.add_argument("--merge-minutes", type=float, default=5.0,
                   help="one sender's messages this close together form one turn")
    p.add_argument("--reply-minutes", type=float, default=60.0,
                   help="a persona turn this soon after the other side's turn is its reply")
    p.add_argument("--session-minutes", type=float, default=360.0,
                   help="a silence this long starts a new session (history does not cross it)")
    p.add_argument("--history-turns", type=int, default=4,
                   help="earlier kept pairs of the same session given as history (0: none)")
    p.add_argument("--skip-groups", action="store_true",
                   help="drop group chats (WeChat @chatroom, Telegram groups, QQ groups) with reason 'group'")
    p.add_argument("--group-speaker-names", choices=("yes", "no"), default="yes",
                   help="in group chats, prefix each prompt line with its speaker's name")
    # filters
    p.add_argument("--min-reply-chars", type=int, default=2,
                   help="replies with fewer content characters (no punctuation/emoji) are low_info")
    p.add_argument("--max-reply-chars", type=int, default=400, help="longer replies are too_long")
    p.add_argument("--near-dup", type=float, default=0.8,
                   help="character 3-gram Jaccard at which a reply duplicates a kept one (0: off)")
    p.add_argument("--pii", choices=("mask", "drop", "keep"), default="mask",
                   help="phone numbers, e-mails, ID and card numbers: mask as [PHONE].., drop the row, or keep")
    # output
    p.add_argument("--out", help="cleaned JSONL path (default: data/<persona>.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p.parse_args(argv)


def output_path(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if args.persona:
        return DATA_DIR / f"{args.persona}.jsonl"
    raise UserError("say where the cleaned data goes: --persona NAME (writes data/NAME.jsonl) or --out FILE")


def check_paths(args: argparse.Namespace, out: Path) -> None:
    """Inputs exist and none of them is an output; an existing output is replaced only with --overwrite."""
    outputs = {p.resolve() for p in (out, *sidecars(out))}
    for name in args.inputs:
        if not Path(name).exists():
            raise UserError(f"input {name} does not exist")
        for path in input_files(Path(name)):
            if path.resolve() in outputs:
                raise UserError(f"input {path} would be overwritten by the output; choose another --out")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it or choose another --out")


def sidecars(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".rejects.jsonl"), out.with_name(out.name + ".summary.json")


def clean_inputs(args: argparse.Namespace, windows: Windows, cleaner: Cleaner) -> tuple[list[Reject], list[dict]]:
    """Read, pair and clean every input in order; the rejects of all files and a line per file."""
    rejects: list[Reject] = []
    files = []
    groups = GroupOptions(args.skip_groups, args.group_speaker_names == "yes")
    for name in [str(p) for arg in args.inputs for p in input_files(Path(arg))]:
        export = read_export(Path(name), args.format, args.date_order)
        resolve_persona(export, args.me)
        candidates, leftovers = export_candidates(export, windows, groups)
        if not candidates:
            seen = ", ".join(f"{r} {n}" for r, n in Counter(r.reason for r in leftovers).most_common())
            raise UserError(f"{name} has no usable rows (rejected while reading: {seen or 'nothing'}); "
                            f"check the file, its --format and --me")
        kept_before = len(cleaner.kept)
        rejects += leftovers + [r for r in map(cleaner.add, candidates) if r]
        files.append({"path": name, "format": export.format, "encoding": export.encoding,
                      "rows": len(candidates) + len(leftovers), "kept": len(cleaner.kept) - kept_before,
                      **({"date_order": export.date_order} if export.format == "whatsapp" else {})})
        dates = f" ({export.date_order} dates)" if export.format == "whatsapp" else ""
        print(f"  {name}: {export.format}{dates}, {export.encoding}, {len(candidates)} candidate pairs, "
              f"{len(leftovers)} rejected while reading/pairing")
    return rejects, files


def main(args: argparse.Namespace) -> int:
    check_args(args)
    out = output_path(args)
    check_paths(args, out)
    windows = Windows(args.merge_minutes * 60, args.reply_minutes * 60, args.session_minutes * 60)
    cleaner = Cleaner(CleanConfig(args.pii, args.min_reply_chars, args.max_reply_chars,
                                  args.near_dup, args.history_turns))
    print(f"clear_data: {len(args.inputs)} input(s), format {args.format}, me {', '.join(args.me) or 'is-sender flag'}, "
          f"pii {args.pii}, windows merge {args.merge_minutes:g}/reply {args.reply_minutes:g}/"
          f"session {args.session_minutes:g} min, history {args.history_turns}, groups "
          f"{'skipped' if args.skip_groups else 'paired'}, reply chars "
          f"{args.min_reply_chars}-{args.max_reply_chars}, near-dup {args.near_dup:g} -> {out}")

    rejects, files = clean_inputs(args, windows, cleaner)
    reasons = Counter(r.reason for r in rejects)
    summary = {"args": vars(args), "files": files, "rows_in": sum(f["rows"] for f in files),
               "kept": len(cleaner.kept), "rejected": dict(sorted(reasons.items())),
               "pii_masked": dict(sorted(cleaner.pii_masked.items())), "reply_chars": reply_stats(cleaner.kept)}
    rejects_path, summary_path = sidecars(out)
    write_text_atomic(rejects_path, "".join(dumps_row(r.to_row()) + "\n" for r in rejects))
    write_text_atomic(summary_path, json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    print_summary(summary)
    if not cleaner.kept:
        raise UserError(f"no rows survived cleaning; {rejects_path} says why each was dropped")
    write_jsonl(out, cleaner.kept)
    print(f"wrote {out} ({len(cleaner.kept)} rows), {rejects_path} ({len(rejects)} rows), {summary_path}")
    return 0


def print_summary(summary: dict) -> None:
    print(f"rows in {summary['rows_in']} = kept {summary['kept']} + rejected {sum(summary['rejected'].values())}")
    for reason, n in sorted(summary["rejected"].items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  rejected {reason:<15} {n}")
    if summary["pii_masked"]:
        print("pii masked: " + ", ".join(f"{k} {v}" for k, v in summary["pii_masked"].items()))
    stats = summary["reply_chars"]
    if stats:
        print(f"kept reply chars: mean {stats['mean']}, median {stats['median']}, p90 {stats['p90']}, "
              f"{stats['short_share']:.0%} under {SHORT_REPLY_CHARS}")
        if stats["short_share"] >= SHORT_SHARE_WARNING:
            print(f"warning: {stats['short_share']:.0%} of kept replies are under {SHORT_REPLY_CHARS} characters; "
                  f"the model will learn to answer that briefly")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
