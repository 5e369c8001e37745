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


def test_family_tables_compare_row_by_row_with_their_export_checks():
    settings = {"model": "gemma3-270m", "group_size": 128}
    rows = [{"label": "AWQ", "w_bit": 4, "ppl": 23.46578, "packed_ppl": 23.4658, "gguf_ppl": 23.4628},
            {"label": "RTN", "w_bit": 4, "ppl": 35.0105}]
    old = {"settings": settings, "rows": rows}
    lines, same = reproduce.compare_family(old, {"settings": settings, "rows": [dict(r) for r in rows]})
    assert same and all(" same   same" in ln for ln in lines[2:])
    moved = [dict(rows[0], gguf_ppl=23.47), rows[1]]  # the model's PPL is the same; its GGUF file's is not
    lines, same = reproduce.compare_family(old, {"settings": settings, "rows": moved})
    assert not same
    lines, same = reproduce.compare_family(old, {"settings": settings, "rows": rows[:1]})
    assert not same and "(not run)" in lines[-1]
