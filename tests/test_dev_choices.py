"""Defaults that a committed dev search chose are the code's defaults (bench/results/dev_choices.jsonl).

The choice rule is the one bench/report.py prints: among a search's rows of its latest base and commit, the lowest
dev KLD. A default changed by hand, or a search re-run with another outcome, fails here until the two agree.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from zoo import tiny_model, tiny_samples

from lowbit import QuantSpec, quantize_
from lowbit.methods import AWQConfig, AWQGPTQConfig, BlockwiseConfig, GPTQConfig, awq, awq_gptq
from lowbit.options import options_of

ROWS = Path(__file__).resolve().parent.parent / "bench" / "results" / "dev_choices.jsonl"
SPEC = QuantSpec(bits=3, group_size=32)


def chosen(search: str) -> list[str]:
    found = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    found = [r for r in found if r["search"] == search]
    assert found, f"no rows of the dev search {search!r}"
    last = [r for r in found if (r["base"], r["commit"]) == (found[-1]["base"], found[-1]["commit"])]
    return shlex.split(min(last, key=lambda r: r["kld_mean"])["candidate"])


def test_block_wise_defaults_are_the_choice_of_its_dev_search():
    choice = chosen("blockwise-w3")
    assert choice, "the search kept the base: nothing to compare"
    by_flag = {o.flag: o for o in options_of(BlockwiseConfig)}
    defaults = BlockwiseConfig(SPEC)
    for flag, text in zip(choice[::2], choice[1::2]):
        o = by_flag[flag]
        assert getattr(defaults, o.field) == (o.parse or type(o.default))(text), flag


@pytest.mark.parametrize(("search", "make", "default"), [
    ("awq-propagate", lambda: AWQConfig(SPEC, n_grid=2, clip=False), awq.PROPAGATE),
    ("awq-gptq-propagate", lambda: AWQGPTQConfig(AWQConfig(SPEC, n_grid=2, clip=False), GPTQConfig(SPEC)),
     awq_gptq.PROPAGATE),
])
def test_each_method_walks_with_the_propagation_its_dev_search_chose(search, make, default, monkeypatch):
    """AWQ's propagation is unset by default and each method fills in its own, as its own search chose; the walk
    is run and the propagation it was given is read off."""
    assert chosen(search) == ["--propagate", default]
    assert AWQConfig(SPEC).propagate is None
    seen = []
    real = awq.walk_layers

    def spy(*args, **kwargs):
        seen.append(kwargs["propagate"])
        return real(*args, **kwargs)

    monkeypatch.setattr(awq, "walk_layers", spy)
    model = tiny_model("llama")
    torch.manual_seed(0)
    quantize_(model, make(), tiny_samples(model, 4, 16))
    assert seen == [default]
