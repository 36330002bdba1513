"""personakit.markdown: the one table writer and number formatters of reports and benchmarks."""
from __future__ import annotations

from personakit.markdown import DASH, code, escape, frac, markdown_table, num, pct


def test_table_has_header_separator_and_one_line_per_row():
    assert markdown_table(["model", "mean len"], [["base", 71.4], ["girl", "40.7"]]) == (
        "| model | mean len |\n|---|---|\n| base | 71.4 |\n| girl | 40.7 |"
    )


def test_a_pipe_or_line_break_in_a_cell_cannot_break_the_row():
    table = markdown_table(["a", "b"], [["x|y", "two\nlines"]])
    assert table.splitlines()[2] == "| x\\|y | two lines |"


def test_table_without_rows_is_just_the_header():
    assert markdown_table(["a"], []) == "| a |\n|---|"


def test_numbers_and_missing_values():
    assert (pct(0.125), pct(0.125, 1), pct(None)) == ("12%", "12.5%", DASH)
    assert (num(0.3777), num(71.44, 1), num(None)) == ("0.38", "71.4", DASH)
    assert (frac(3, 16), frac(None, 16)) == ("3/16", DASH)


def test_code_and_escape():
    assert code("a`b") == "``a`b``" and code("x\ny") == "`x y`"
    assert escape("*hi* <b> | #1") == "\\*hi\\* \\<b\\> \\| \\#1"
