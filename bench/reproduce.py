"""Do the headline rows reproduce? Re-measured rows beside the stored rows of the same settings, digit by digit.

A refactor that claims "no number moves" re-measures the headline rows at its commit into another row file
(``python bench/headline.py --out headline_repro ...``) and this script sets each one beside the latest
row of the same key measured at an earlier commit in ``bench/results/headline.jsonl``:

    python bench/reproduce.py [--new headline_repro] [--old headline]
    python bench/reproduce.py --family OLD.json NEW.json   # two runs of bench/family_table.py, same settings

It prints PPL, mean KLD, top-1 agreement and bits per weight of both, and whether they are equal as
printed (3, 4, 3 and 3 decimals, as the README prints them) and exactly; it exits 1 when a row differs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rows  # noqa: I001  (bench/ is not a package)

# what makes a row what it is (bench/headline.py's row_key), and the measured fields compared, with the
# decimals the README prints
KEY_FIELDS = ("tool", "method", "model", "split", "windows", "bits", "group", "seed", "calib_samples",
              "calib_seq_len", "threads", "propagate")
MEASURED = (("ppl", 3), ("kld_mean", 4), ("top1_agreement", 3), ("bits_per_weight", 3))


def key(row: dict) -> tuple:
    return tuple(row.get(k) for k in KEY_FIELDS)


def reference(old: list[dict], new: dict) -> dict | None:
    """The latest row with ``new``'s settings measured at another commit."""
    same = [r for r in old if key(r) == key(new) and r.get("commit") != new.get("commit")]
    return same[-1] if same else None


def compare(old: list[dict], new: list[dict]) -> tuple[list[str], bool]:
    lines, all_same = [], True
    header = f"{'row':28s} {'old commit':>10s} {'new commit':>10s} " + " ".join(
        f"{name + ' old':>16s} {name + ' new':>16s}" for name, _ in MEASURED) + "  printed  exact"
    lines.append(header)
    for row in new:
        ref = reference(old, row)
        label = f"{row['method']} W{row.get('bits')} seed {row.get('seed')}"
        if ref is None:
            lines.append(f"{label:28s} (no earlier row with these settings)")
            all_same = False
            continue
        printed = all(_fmt(ref.get(f), d) == _fmt(row.get(f), d) for f, d in MEASURED)
        exact = all(ref.get(f) == row.get(f) for f, _ in MEASURED)
        all_same &= printed
        cells = " ".join(f"{_fmt(ref.get(f), d):>16s} {_fmt(row.get(f), d):>16s}" for f, d in MEASURED)
        lines.append(f"{label:28s} {ref.get('commit', '?'):>10s} {row.get('commit', '?'):>10s} {cells}  "
                     f"{'same' if printed else 'DIFFERS':>7s}  {'same' if exact else 'differs':>5s}")
    return lines, all_same


def compare_family(old: dict, new: dict) -> tuple[list[str], bool]:
    """Two ``bench/family_table.py`` result files of the same settings, row by row: PPL as printed and exactly."""
    if old["settings"] != new["settings"]:
        raise SystemExit(f"different settings: {old['settings']} and {new['settings']}")
    lines = [f"settings {old['settings']}",
             f"{'bits':>4}  {'method':<12} {'PPL old':>18} {'PPL new':>18}  printed  exact  packed / GGUF PPL"]
    rows_new, all_same = {(r["label"], r["w_bit"]): r for r in new["rows"]}, True
    for r in old["rows"]:
        n = rows_new.get((r["label"], r["w_bit"]))
        if n is None:
            lines.append(f"{r['w_bit']:>4}  {r['label']:<12} {r['ppl']:>18.15g} {'(not run)':>18}")
            all_same = False
            continue
        printed, exact = _fmt(r["ppl"], 3) == _fmt(n["ppl"], 3), r["ppl"] == n["ppl"]
        exports = "; ".join(f"{r[k]} -> {n.get(k)}" for k in ("packed_ppl", "gguf_ppl") if k in r)
        all_same &= printed and all(r[k] == n.get(k) for k in ("packed_ppl", "gguf_ppl") if k in r)
        lines.append(f"{r['w_bit']:>4}  {r['label']:<12} {r['ppl']:>18.15g} {n['ppl']:>18.15g}  "
                     f"{'same' if printed else 'DIFFERS':>7s}  {'same' if exact else 'differs':>5s}  {exports}")
    return lines, all_same


def _fmt(value, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new", default="headline_repro", help="the re-measured rows (default headline_repro)")
    p.add_argument("--old", default="headline", help="the stored rows (default headline)")
    p.add_argument("--family", nargs=2, metavar=("OLD", "NEW"),
                   help="instead: two bench/family_table.py result files (JSON) of the same settings")
    args = p.parse_args(argv)
    if args.family:
        import json

        lines, same = compare_family(*(json.loads(Path(f).read_text()) for f in args.family))
        print("\n".join(lines))
        print("every row reproduces as printed" if same else "some rows differ (or were not run)")
        return 0 if same else 1
    new = rows.read_rows(rows.results_path(args.new))
    if not new:
        print(f"no rows in {rows.results_path(args.new)}", file=sys.stderr)
        return 2
    lines, same = compare(rows.read_rows(rows.results_path(args.old)), new)
    print("\n".join(lines))
    print("every row reproduces as printed" if same else "some rows do not reproduce (or have no earlier row)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
