"""Defaults that a committed dev search chose are the configs' defaults (bench/results/dev_choices.jsonl).

The choice rule is the one bench/report.py prints: among a search's rows of its latest base and commit, the lowest
dev KLD. A default changed by hand, or a search re-run with another outcome, fails here until the two agree.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lowbit import QuantSpec
from lowbit.methods import AWQConfig, BlockwiseConfig
from lowbit.options import options_of

ROWS = Path(__file__).resolve().parent.parent / "bench" / "results" / "dev_choices.jsonl"
SEARCHES = {"blockwise-w3": BlockwiseConfig, "awq-propagate": AWQConfig}


def chosen(search: str) -> list[str]:
    found = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    found = [r for r in found if r["search"] == search]
    assert found, f"no rows of the dev search {search!r}"
    last = [r for r in found if (r["base"], r["commit"]) == (found[-1]["base"], found[-1]["commit"])]
    return shlex.split(min(last, key=lambda r: r["kld_mean"])["candidate"])


@pytest.mark.parametrize("search", SEARCHES)
def test_defaults_are_the_choice_of_the_committed_dev_search(search):
    cls = SEARCHES[search]
    choice = chosen(search)
    assert choice, "the search kept the base: nothing to compare"
    by_flag = {o.flag: o for o in options_of(cls)}
    defaults = cls(QuantSpec(bits=3, group_size=32))
    for flag, text in zip(choice[::2], choice[1::2]):
        o = by_flag[flag]
        assert getattr(defaults, o.field) == (o.parse or type(o.default))(text), flag
