"""Markdown comparison reports: header, summary with legend, readings, chart, every reply side by side.

Both comparison scripts write their report here. Only the lines that start with TIMING_PREFIX
change between two runs of the same command; everything else is a function of the inputs.
"""
from __future__ import annotations

import io
import shlex
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from .evaluation import BASE, Evaluation, ModelSpec
from .files import write_text_atomic
from .markdown import DASH, code, escape, frac, markdown_table, num, pct
from .metrics import LENGTH_BINS, LOOP_N, LOOP_TIMES, NEAR_COPY, STUTTER_UNITS, STYLE_COMPONENTS, attribution_accuracy, length

TIMING_PREFIX = "- timing: "


# ---- formatting ----------------------------------------------------------------------------

def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that reproduces this run, shell-quoted."""
    return shlex.join(["python", script, *argv])


def quote(text: str) -> list[str]:
    if not text.strip():
        return ["> *(empty reply)*"]
    return [f"> {escape(line)}" if line.strip() else ">" for line in text.strip().splitlines()]


def _system(spec: ModelSpec) -> str:
    return code(spec.system) if spec.system else "none (the chat template's default, if it has one)"


# ---- sections ------------------------------------------------------------------------------

def header_lines(ev: Evaluation, *, command: str, arguments: dict, generated: datetime, wall: float,
                 versions: dict[str, str], base_note: str) -> list[str]:
    d, p, s = ev.decoding, ev.prompts, ev.seconds
    splits = [f"{a.name} seed {ev.data[a.name].split_seed} val_fraction {ev.data[a.name].val_fraction}"
              for a in ev.adapters if ev.data[a.name].ok]
    lines = [
        f"{TIMING_PREFIX}generated {generated.astimezone(UTC).isoformat(timespec='seconds')}",
        f"{TIMING_PREFIX}wall time {wall:.1f} s (load {s['load']:.1f} s, generation {s['generation']:.1f} s, "
        f"perplexity {s['perplexity']:.1f} s, scoring {s['scoring']:.1f} s)",
        f"- command: {code(command)}",
        "- resolved arguments: " + code(" ".join(f"{k}={v}" for k, v in sorted(arguments.items()))),
        f"- base model: {code(ev.base_id)}, fingerprint {code(ev.fingerprint)}",
        f"- device: {ev.device}, {ev.dtype}, 4-bit {'yes' if ev.quantized else 'no'}"
        + (f"; {ev.cpu_precision}" if ev.cpu_precision else ""),
        "- adapters:",
    ]
    for a in ev.adapters:
        data = ev.data[a.name]
        lines.append(
            f"  - {a.name}: {code(a.path)}, weights sha256 {code(a.weights_sha256())}, training data "
            f"{code(data.recorded_path or DASH)} sha256 {code(data.recorded_sha256 or DASH)} ({data.status})"
            + (f", trained in {a.meta.cpu_precision['dtype']} on CPU" if a.meta.cpu_precision else "")
        )
    lines.append("- system prompts (rendered with the tokenizer's chat template):")
    lines += [f"  - {spec.name}: {_system(spec)}" for spec in ev.specs]
    lines += [
        f"  - note: {base_note}",
        f"- prompt set: {code(p.path)}, sha256 {code(p.sha256)}, {len(p.prompts)} of {p.total} prompts, language {p.language}",
        "- decoding: " + ", ".join(f"{k}={v}" for k, v in d.as_dict().items()) + f", batch_size={ev.batch_size}"
        + (" (greedy: temperature, top_p and top_k unused)" if not d.do_sample else ""),
        f"- seeds: generation seed {d.seed} (torch.manual_seed before every batch of {ev.batch_size} prompts, so a prompt's "
        f"randomness depends only on the seed, the batch size and its position); held-out splits (from persona.json): "
        + (", ".join(splits) or "none (no verified training data)"),
        f"- metric settings: too short = under {ev.too_short_units} units; loop = a {LOOP_N}-unit sequence {LOOP_TIMES}+ times "
        f"or a 1-3-unit block repeated over {STUTTER_UNITS}+ units; "
        f"near copy = character-trigram Jaccard >= {NEAR_COPY}; persona markers from {code(ev.markers_file)} ({p.language}) for "
        + (", ".join(ev.markers) or "no persona"),
        "- library versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]
    return lines


def _row_label(spec: ModelSpec) -> str:
    return f"{spec.name} (vs {spec.reference})" if spec.adapter is None and spec.reference else spec.name


def summary_lines(ev: Evaluation) -> list[str]:
    rows = []
    for spec in ev.specs:
        m = ev.metrics[spec.name]
        ppl = ev.perplexity.get(spec.adapter) if spec.adapter else None
        rows.append([
            _row_label(spec), str(m.n), num(m.mean_length, 1), num(m.median_length, 1), frac(m.too_short, m.n),
            pct(m.keyword_any), pct(m.keyword_fraction), num(m.distinct_2), frac(m.loops, m.n), frac(m.cut_off, m.n),
            str(m.retried), num(m.style.combined if m.style else None), frac(m.exact_copies, m.n), frac(m.near_copies, m.n),
            pct(m.marker_rate),
            DASH if ppl is None or ppl.tuned is None else f"{ppl.base:.2f} → {ppl.tuned:.2f}",
        ])
    headers = ["model", "replies", "mean len", "median len", "too short", "keyword hit", "keyword share", "distinct-2",
               "loops", "cut off", "retried", "style dist", "exact copies", "near copies", "marker rate", "held-out ppl base → tuned"]
    return [markdown_table(headers, rows)]


def legend_lines(ev: Evaluation) -> list[str]:
    return [
        "Legend. Lengths are in units: one per CJK character, one per latin word. "
        f"*too short*: replies under {ev.too_short_units} units. "
        "*keyword hit*: share of prompts with keywords whose reply contains at least one (case-insensitive); "
        "*keyword share*: mean share of a prompt's keywords the reply contains. "
        "*distinct-2*: distinct unit bigrams / all unit bigrams (1 = never repeats itself). "
        f"*loops*: replies where some {LOOP_N}-unit sequence occurs {LOOP_TIMES}+ times without overlap, or a block of "
        f"1-3 units repeats back to back over {STUTTER_UNITS}+ units; "
        "*cut off*: replies that hit --max-new-tokens without an end-of-turn token; "
        "*retried*: replies regenerated for being shorter than --min-reply-chars. "
        "*style dist*: 0..1 distance to the persona's training replies, the mean of six components "
        "(length histogram, modal particles, punctuation, emoji, catchphrases, character 1-3-grams; "
        "0 = same style, see the components table). "
        "*exact/near copies*: replies equal to a training reply once case, spaces and punctuation are dropped / "
        f"with character-trigram Jaccard >= {NEAR_COPY} to one. "
        "*marker rate*: share of replies matching any of the persona's marker regexes from personas.json. "
        "*held-out ppl*: perplexity of the persona's held-out replies (llm.py's validation split) under the base and "
        "under the adapter; lower means the model predicts that persona's unseen replies better. "
        "A base row marked *(vs NAME)* is measured against NAME's data and markers, as a baseline.",
    ]


def style_lines(ev: Evaluation) -> list[str]:
    rows = []
    for spec in ev.specs:
        style = ev.metrics[spec.name].style
        if style:
            rows.append([_row_label(spec), *(num(style.components[c]) for c in STYLE_COMPONENTS), num(style.combined)])
    if not rows:
        return ["No persona has verified training data, so there is no style distance."]
    return [markdown_table(["model", *STYLE_COMPONENTS, "combined"], rows),
        "",
        f"length: total variation distance of reply-length histograms (bins <{', <'.join(map(str, LENGTH_BINS))}, "
        f"{LENGTH_BINS[-1]}+ units); particles, punctuation, emoji: weighted-Jaccard distance of per-unit rates; "
        "catchphrases: weighted-Jaccard distance of how many replies use each of the persona's 20 most widespread "
        "2-/3-unit phrases; char_ngrams: cosine distance of character 1-3-gram counts. Each is 0..1.",
    ]


def matrix_lines(ev: Evaluation) -> list[str]:
    names = [a.name for a in ev.adapters]
    style = [[s.name, *(num(ev.style_matrix[s.name][n]) for n in names)] for s in ev.specs]
    markers = [[s.name, *(pct(ev.marker_matrix[s.name][n]) for n in names)] for s in ev.specs]
    return [
        "Style distance of each model's replies (rows) to each persona's training replies (columns); "
        "a persona's own column should hold its row's smallest number.",
        "",
        markdown_table(["model", *names], style),
        "",
        "Persona marker rate: share of each model's replies (rows) matching each persona's markers (columns).",
        "",
        markdown_table(["model", *names], markers),
    ]


def attribution_lines(ev: Evaluation) -> list[str]:
    assert ev.attribution is not None
    classes = [BASE] + [a.name for a in ev.adapters if ev.data[a.name].ok]
    rows = []
    for spec in ev.specs:
        predicted = ev.attribution[spec.name]
        acc = attribution_accuracy(predicted, spec.name if spec.name in classes else None)
        rows.append([spec.name, *(str(predicted.count(c)) for c in classes), pct(acc)])
    missing = [a.name for a in ev.adapters if not ev.data[a.name].ok]
    return [
        "A multinomial naive Bayes classifier over character 1-3-grams (uniform priors) learns each persona from its "
        "training replies and the base from the base's own replies to these prompts. A base reply is classified "
        "leave-one-out (its own counts removed first), so no reply is classified by a model that saw it. "
        "Rows: the model that wrote the replies; columns: the class they were assigned to; "
        "each model's replies should land in its own column.",
        "",
        markdown_table(["model", *classes, "accuracy"], rows),
    ] + (["", f"No class for {', '.join(missing)}: no verified training data."] if missing else [])


def _data_mean_length(ev: Evaluation, name: str) -> float | None:
    replies = ev.data[name].train_replies
    return statistics.fmean(length(r) for r in replies) if replies else None


def reading_lines(ev: Evaluation) -> list[str]:
    base = ev.metrics[BASE]
    lines = []
    for spec in ev.specs:
        if spec.adapter is None:
            continue
        m, n, name = ev.metrics[spec.name], ev.metrics[spec.name].n, spec.name
        parts = []
        data_len = _data_mean_length(ev, name)
        if data_len:
            ratio = m.mean_length / data_len
            how = "longer than" if ratio > 1.5 else "shorter than" if ratio < 2 / 3 else "about as long as"
            parts.append(f"{how} its data (mean {m.mean_length:.1f} vs {data_len:.1f} units; base {base.mean_length:.1f})")
        answered, base_answered = m.keyword_prompts - m.keyword_misses, base.keyword_prompts - base.keyword_misses
        if answered < base_answered:
            # Style learned, question ignored: the failure a persona must not hide, so it is said first.
            parts.insert(0, f"ignores the question on {m.keyword_misses}/{m.keyword_prompts} prompts; "
                            f"the base answered {base_answered}/{base.keyword_prompts}")
        elif m.keyword_prompts:
            parts.append(f"ignores the question (no keyword) on {m.keyword_misses}/{m.keyword_prompts} prompts with keywords "
                         f"(base {base.keyword_misses}/{base.keyword_prompts})")
        if m.exact_copies is not None:
            copies = m.exact_copies + m.near_copies
            parts.append(f"copies training replies on {copies}/{n} ({m.exact_copies} exact, {m.near_copies} near)"
                         if copies else "copies no training reply")
        for count, what in ((m.loops, "loops"), (m.cut_off, "hits the token limit"), (m.too_short, "is too short")):
            if count:
                parts.append(f"{what} on {count}/{n}")
        if m.retried:
            parts.append(f"{m.retried} replies regenerated for --min-reply-chars")
        own, from_base = ev.style_matrix[name][name], ev.style_matrix[BASE][name]
        if own is not None and from_base is not None:
            closer = "closer than" if own < from_base else "no closer than"
            parts.append(f"style distance to its data {own:.2f}, {closer} the base ({from_base:.2f})")
        if m.marker_rate is not None:
            parts.append(f"persona markers in {pct(m.marker_rate)} of replies (base {pct(ev.marker_matrix[BASE][name])})")
        ppl = ev.perplexity[name]
        if ppl.tuned is not None:
            trend = "better" if ppl.tuned < ppl.base else "not better"
            parts.append(f"held-out perplexity {ppl.base:.2f} → {ppl.tuned:.2f} ({trend} at predicting its unseen replies)")
        else:
            parts.append(f"no held-out perplexity: {ppl.note}")
        if ev.attribution is not None and ev.data[name].ok:
            parts.append(f"attributed to itself on {ev.attribution[name].count(name)}/{n}")
        lines.append(f"- **{name}**: " + "; ".join(parts) + ".")
    return lines


def reply_lines(ev: Evaluation) -> list[str]:
    sep = "、" if ev.prompts.language == "zh" else ", "
    lines: list[str] = []
    for i, prompt in enumerate(ev.prompts.prompts):
        lines += ["", f"### {prompt.id} · {prompt.category}", "", f"**Prompt:** {escape(prompt.prompt)}", ""]
        if prompt.history:
            lines += ["**Earlier turns:**", ""]
            for user, reply in prompt.history:
                lines += [f"- user: {escape(user)}", f"- reply: {escape(reply)}"]
            lines.append("")
        lines += [f"**Keywords:** {sep.join(code(k) for k in prompt.keywords) if prompt.keywords else DASH}"]
        for spec in ev.specs:
            m = ev.metrics[spec.name]
            flags = "; ".join(m.flags[i])
            size = f"{m.lengths[i]} unit" + ("" if m.lengths[i] == 1 else "s")
            lines += ["", f"**{spec.name}** · {size}" + (f" · {flags}" if flags else ""), "",
                      *quote(ev.replies[spec.name][i].text)]
    return lines


def console_lines(ev: Evaluation) -> list[str]:
    """One fixed-format line per model for the terminal."""
    out = []
    for spec in ev.specs:
        m = ev.metrics[spec.name]
        out.append(
            f"{spec.name}: mean len {m.mean_length:.1f}, keyword hit {pct(m.keyword_any)}, distinct-2 {num(m.distinct_2)}, "
            f"loops {m.loops}/{m.n}, style dist {num(m.style.combined if m.style else None)}, marker rate {pct(m.marker_rate)}"
        )
    return out


# ---- chart ---------------------------------------------------------------------------------

def chart_png(ev: Evaluation) -> bytes:
    """Reply-length box plot and per-model metric bars; fixed size, no timestamp, so reruns repeat."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [s.name for s in ev.specs]
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    ax1.boxplot([ev.metrics[n].lengths for n in names], tick_labels=names)
    ax1.set_title("reply length (units)")
    series = {
        "keyword hit": [ev.metrics[n].keyword_any for n in names],
        "marker rate": [ev.metrics[n].marker_rate for n in names],
        "style distance": [ev.metrics[n].style.combined if ev.metrics[n].style else None for n in names],
    }
    if ev.attribution is not None:
        classes = {BASE} | {a.name for a in ev.adapters if ev.data[a.name].ok}
        series["attributed to itself"] = [attribution_accuracy(ev.attribution[n], n if n in classes else None) for n in names]
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax2.bar(xs, [float("nan") if v is None else v for v in values], width, label=label)
    ax2.set_xticks(range(len(names)), names)
    ax2.set_ylim(0, 1.3)
    ax2.set_yticks([0, 0.25, 0.5, 0.75, 1])
    ax2.set_title("metrics per model (0..1)")
    ax2.legend(fontsize=8, loc="upper center", ncol=len(series))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ---- the whole report ----------------------------------------------------------------------

def render(ev: Evaluation, *, title: str, command: str, arguments: dict, generated: datetime, wall: float,
           chart_name: str, base_note: str, matrices: bool) -> str:
    import importlib.metadata as md

    from .versions import library_versions

    versions = {**library_versions(), "matplotlib": md.version("matplotlib")}
    lines = [f"# {title}", "", "## Run", "",
             *header_lines(ev, command=command, arguments=arguments, generated=generated, wall=wall,
                           versions=versions, base_note=base_note),
             "", "## Summary", "", *summary_lines(ev), "", *legend_lines(ev),
             "", "## Style distance components", "", *style_lines(ev)]
    if matrices:
        lines += ["", "## Persona matrices", "", *matrix_lines(ev)]
    if ev.attribution is not None:
        lines += ["", "## Attribution", "", *attribution_lines(ev)]
    lines += ["", "## Reading", "", *reading_lines(ev),
              "", "## Chart", "", f"![reply lengths and metrics per model]({chart_name})",
              "", "## Replies", *reply_lines(ev)]
    return "\n".join(lines) + "\n"


def write_report(ev: Evaluation, out: str | Path, *, title: str, command: str, arguments: dict, started: float,
                 base_note: str, matrices: bool) -> tuple[Path, Path]:
    """Write the chart next to the report, then the report; both atomically. Returns their paths."""
    import time

    out = Path(out)
    chart = out.with_suffix(".png")
    write_text_atomic(chart, chart_png(ev))
    text = render(ev, title=title, command=command, arguments=arguments, generated=datetime.now(UTC),
                  wall=time.time() - started, chart_name=chart.name, base_note=base_note, matrices=matrices)
    write_text_atomic(out, text)
    return out, chart
