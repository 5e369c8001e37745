"""bench/reproduce.py: a re-measured row is set beside the latest earlier row of the same settings."""
from __future__ import annotations

from conftest import load_bench

reproduce = load_bench("reproduce.py", "bench_reproduce")
BASE = {"tool": "lowbit", "method": "awq", "model": "smollm2-135m", "split": "wikitext-2 test", "windows": 16,
        "bits": 3, "group": 64, "seed": 0, "calib_samples": 16, "calib_seq_len": 512, "propagate": "float"}
MEASURED = {"ppl": 41.3071, "kld_mean": 0.65741, "top1_agreement": 0.6001, "bits_per_weight": 3.297}


def test_same_row_reproduces_and_a_moved_digit_does_not():
    old = [dict(BASE, commit="a", **MEASURED, ppl_extra=1),
           dict(BASE, commit="b", **dict(MEASURED, ppl=99.0))]  # the latest earlier row is the reference
    lines, same = reproduce.compare(old, [dict(BASE, commit="c", **dict(MEASURED, ppl=99.0))])
    assert same and "same" in lines[1] and " b " in lines[1]
    lines, same = reproduce.compare(old, [dict(BASE, commit="c", **dict(MEASURED, kld_mean=0.65749))])
    assert not same and "DIFFERS" in lines[1]  # 0.6575 vs 0.6574 as printed


def test_other_settings_or_the_same_commit_are_no_reference():
    old = [dict(BASE, commit="c", **MEASURED), dict(BASE, commit="a", **dict(MEASURED), propagate="quantized")]
    lines, same = reproduce.compare(old, [dict(BASE, commit="c", **MEASURED)])
    assert not same and "no earlier row" in lines[1]
