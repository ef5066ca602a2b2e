"""Runs every cell of the composition matrix (tests/conformance.py): each public
function under each transformation passes its check against a reference, or raises
the documented clear error; cells run in forced-device subprocesses name their
module. The table of docs/concepts/composition.md is the matrix rendered."""

import os

import pytest

from tests import conformance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = conformance.rows()
CHECKED = [(r, t) for r, cells in ROWS.items() for t, c in cells.items() if c.check is not None]


def test_every_cell_is_defined_and_justified():
    for row, cells in ROWS.items():
        assert set(cells) == set(conformance.TRANSFORMS), row
        for t, c in cells.items():
            assert c.status in ("yes", "error", "n/a"), (row, t)
            assert (c.check is not None) or c.where or (c.status == "n/a" and c.note), (row, t)
            if c.where:
                assert os.path.exists(os.path.join(ROOT, c.where)), c.where
            if c.status == "error":
                assert c.check is not None and c.note, (row, t)


@pytest.mark.parametrize("row,transform", CHECKED, ids=[f"{r}-{t}" for r, t in CHECKED])
def test_cell(row, transform, x64):
    ROWS[row][transform].check()


def test_docs_table_is_the_rendered_matrix():
    page = os.path.join(ROOT, "docs", "concepts", "composition.md")
    text = open(page, encoding="utf-8").read()
    start, end = "<!-- conformance:start -->\n", "<!-- conformance:end -->"
    assert start in text and end in text, f"{page} lacks the conformance table markers"
    table = text.split(start, 1)[1].split(end, 1)[0]
    assert table == conformance.markdown(), (
        f"{page}'s composition table is out of date: run `python -m tests.conformance`"
    )
