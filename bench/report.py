"""Regenerate the tables of README.md and docs/*.md from the row files in bench/results/*.jsonl.

A generated table sits between `<!-- table:NAME -->` and `<!-- /table -->`; TABLES below says, as data, which row
file and rows (selected by keys) it shows and which columns, formatted how.

    python bench/report.py            # rewrite every marked table in place
    python bench/report.py --check    # exit 1, naming each cell that differs from the rows
"""
from __future__ import annotations

import argparse
import functools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import read_rows  # noqa: I001  (bench/ is not a package)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/*.md")
MARKER = re.compile(r"<!-- table:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /table -->", re.S)
NONE = "–"  # a value not measured (yet)


@dataclass(frozen=True)
class Col:
    """One column: its title, the row's key (dotted for nested keys) or a function of the row, a number format."""
    title: str
    get: str | Callable[[dict], object]
    fmt: str = "{}"
    right: bool = True

    def cell(self, row: dict) -> str:
        if callable(self.get):
            value = self.get(row)
        else:
            value = row
            for part in self.get.split("."):
                value = value.get(part) if isinstance(value, dict) else None
        if value is None or value == "":
            return NONE if self.right else ""
        return self.fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Pick:
    """The last row of `file` whose keys equal `where` (a re-measured row is appended, so it wins); `cells` fixes
    some cells by column title (labels)."""
    file: str
    where: dict
    cells: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Every:
    """Every row of `file` whose keys equal `where`, in file order; with `latest_by`, only the last row of each value
    of that key (a file re-measured by later code), where its first stood."""
    file: str
    where: dict = field(default_factory=dict)
    latest_by: str | None = None


@dataclass(frozen=True)
class Spread:
    """One line for the rows of `file` whose keys equal `where`, one per seed (the last of each seed): the mean of
    each number in `keys`, `<key>_range` as "min–max", and `seeds` as their count."""
    file: str
    where: dict
    cells: dict = field(default_factory=dict)
    keys: tuple = ("ppl", "kld_mean", "top1_agreement", "bits_per_weight", "seconds")
    fmt: str = "{:.3f}"

    def combine(self, found: list[dict]) -> dict:
        per_seed = {r.get("seed"): r for r in found}
        rows = list(per_seed.values())
        out = dict(rows[-1], seeds=len(rows))
        for key in self.keys:
            values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if values:
                out[key] = sum(values) / len(values)
                lo, hi = self.fmt.format(min(values)), self.fmt.format(max(values))
                out[f"{key}_range"] = lo if lo == hi else f"{lo}–{hi}"
        return out


@dataclass(frozen=True)
class Either:
    """`first` where its row file has rows for it, else `then` (a re-measured row replacing a legacy one)."""
    first: Pick | Spread
    then: Pick | Spread


@dataclass(frozen=True)
class Declared:
    """One row per --method choice that lowbit's registry declares (lowbit.methods.REGISTRY), not a row file."""


def declared_rows() -> list[dict]:
    """What each declaration says, as cells: the methods table cannot drift from the code."""
    sys.path.insert(0, str(ROOT))  # this checkout's lowbit
    from lowbit.experiment import MethodOptions
    from lowbit.methods import REGISTRY
    from lowbit.quantizer import QuantSpec

    yes = {True: "yes", False: ""}
    out = []
    for m in REGISTRY:
        if not m.selectable or m.config is None:
            continue
        first = m.build(QuantSpec(bits=4, group_size=64), MethodOptions())[0]
        out.append({"method": f"`{m.name}`", "summary": m.summary,
                    "runs": ", then ".join(f"`{c}`" for c in m.chains) if m.chains else "",
                    "calibrates": yes[m.calibrates(first)], "mixed": yes[m.mixed], "packs": yes[m.packs],
                    "streams": yes[m.streams], "trains": yes[m.trains],
                    "page": f"[{Path(m.page).name}]({m.page})" if m.page else ""})
    return out


@dataclass(frozen=True)
class Heading:
    """A bold line across the table (a section of rows)."""
    text: str


@dataclass(frozen=True)
class Table:
    columns: tuple[Col, ...]
    rows: tuple[Pick | Every | Spread | Either | Heading, ...]


def matches(row: dict, where: dict) -> bool:
    """Every key equal (a frozenset: any of its values; None stands for a key the row lacks)."""
    return all(row.get(key) in value if isinstance(value, frozenset) else row.get(key) == value
               for key, value in where.items())


def measured(row: dict) -> str:
    """The row's date, and 'legacy' for rows carried over from the float32-scale results."""
    date = (row.get("date") or "")[:10]
    return f"{date} legacy" if row.get("legacy") else date


def pct(key: str) -> Callable[[dict], str | None]:
    def get(row: dict) -> str | None:
        value = row.get(key)
        return None if value is None else f"{value:+g} %"
    return get


def over_fp(row: dict) -> str | None:
    return None if row.get("vs_fp") is None else f"{row['vs_fp']:+.1f}%"


@functools.lru_cache(maxsize=1)
def _dev_rows() -> tuple[dict, ...]:
    """The dev searches' rows, read once per report (every row of a dev-choice table asks)."""
    return tuple(read_rows(ROOT / "bench" / "results" / "dev_choices.jsonl"))


def chosen_on_dev(row: dict) -> str:
    """'chosen' for the candidate with the lowest dev KLD among its search's rows at the same commit (one run, or
    candidates run one invocation each): the rule bench/dev_choice.py applies, recomputed from the rows so the table
    cannot disagree with them."""
    run = [r for r in _dev_rows()
           if (r.get("search"), r.get("base"), r.get("commit")) == (row.get("search"), row.get("base"),
                                                                   row.get("commit"))]
    best = min(run, key=lambda r: r["kld_mean"])
    return "**chosen**" if best["candidate"] == row["candidate"] else ""


def candidate(row: dict) -> str:
    return f"`{row['candidate']}`" if row.get("candidate") else "(the defaults of its commit)"


PPL, BPW, SEC = "{:.3f}", "{:.3f}", "{:.0f}"
MEASURED = Col("measured", measured, right=False)

# ---------------------------------------------------------------------------------------------------- the tables
PTQ = "ptq_table"


# the commands of issue 33's one peers run (bench/peers.py resumes by key: the same run, continued)
_FULL = ("--bits 3 4 --max-windows 8 --lowbit-methods awq gptq-r awq+gptq-r blockwise-fast "
         "--out results/peers_full.json --gptqmodel-venv /work/main/.venv-gptqmodel "
         "--autoround-venv /work/main/.venv-autoround")
PEERS_FULL = tuple(f"python bench/peers.py --peers {peers} {args}" for peers in ("gptqmodel", "gptqmodel autoround")
                   for args in (_FULL, _FULL.split(" --gptqmodel-venv")[0])) + (
    # 2026-12-08 (295f9e8): AutoRound first, then the rest of the same run
    "python bench/peers.py --peers autoround --bits 3 4 --lowbit-methods none --max-windows 8 "
    "--out results/peers_full.json",
    "python bench/peers.py --peers autoround gptqmodel --bits 3 4 --lowbit-methods awq gptq-r awq+gptq-r "
    "blockwise-fast --max-windows 8 --out results/peers_full.json")
HEADLINE = {"split": "wikitext-2 test", "windows": 16, "model": "smollm2-135m",
            "threads": None}  # rows at the machine's default thread count (--threads rows measure the spread)
LOWBIT_METHODS = (("rtn", "RTN"), ("gptq-r", "GPTQ-R (act-order)"), ("awq", "AWQ"), ("awq+gptq-r", "AWQ+GPTQ-R"))


def _headline_rows() -> tuple:
    """lowbit's packed files (bench/headline.py, float16 scales, mean over seeds) beside the peers' rows."""
    out: list = [Pick("headline", {"method": "fp", **HEADLINE}, {"method": "float", "W": "16"})]
    for bits in (3, 4):
        out.append(Heading(f"W{bits} g64"))
        for method, label in LOWBIT_METHODS:
            legacy = Pick(PTQ, {"method": method, "bits": bits, "section": f"W{bits} g64, weights only"},
                          {"method": label})
            # rows of each method's propagation as chosen on dev; rows from before rows said (2026-12-06) ran quantized
            awq = {"awq": {"propagate": "float"},
                   "awq+gptq-r": {"propagate": frozenset({None, "quantized"})}}.get(method, {})
            out.append(Either(Spread("headline", {"method": method, "bits": bits, "group": 64, **HEADLINE, **awq},
                                     {"method": label}), legacy))
            if method in ("gptq-r", "awq"):  # llm-compressor's row of the same method
                out.append(Pick("peers", {"tool": "llm-compressor", "method": method[:4], "bits": bits},
                                {"method": "GPTQ (act-order)" if method == "gptq-r" else "AWQ"}))
        legacy = (Pick("blockwise", {"bits": 3, "recipe": "default", "alone": True}, {"method": "block-wise"})
                  if bits == 3 else Pick("peers_blockwise", {"tool": "lowbit", "bits": 4, "recipe": "default"},
                                         {"method": "block-wise"}))
        blockwise = Either(Spread("headline", {"method": "blockwise-fast", "bits": bits, "group": 64, **HEADLINE},
                                  {"method": "block-wise (--fast, chosen on dev)"}), legacy)
        out += [blockwise,
                Pick("peers_blockwise", {"tool": "autoround", "bits": bits}, {"method": "AutoRound, 50 iterations"})]
    w2 = Either(Spread("headline", {"method": "blockwise-fast", "bits": 2, "group": 64, **HEADLINE},
                       {"method": "block-wise (--fast, chosen on dev)"}),
                Pick("blockwise", {"bits": 2, "recipe": "w2"}, {"method": "block-wise, W2 recipe"}))
    out += [Heading("W2 g64"), w2,
            Pick("peers_blockwise", {"tool": "autoround", "bits": 2}, {"method": "AutoRound, 50 iterations"})]
    return tuple(out)


def _dev_choices(*searches: str) -> Table:
    return Table(
        (Col("search", "search", right=False), Col("candidate (beside the shared options)", candidate, right=False),
         Col("dev KLD", "kld_mean", "{:.4f}"), Col("dev PPL", "ppl", PPL),
         Col("same top token", "top1_agreement", "{:.3f}"), Col("quantize s", "seconds", SEC),
         Col("dtype", "dtype", right=False), Col("", chosen_on_dev, right=False), MEASURED),
        tuple(Every("dev_choices", {"search": name}) for name in searches))


TABLES: dict[str, Table] = {
    # README: one line per method and width; peers beside lowbit's row of the same method
    "headline": Table(
        (Col("method", "method", right=False), Col("tool", "tool", right=False), Col("W", "bits"),
         Col("PPL", "ppl", PPL), Col("PPL range", "ppl_range", right=False), Col("seeds", "seeds"),
         Col("KLD", "kld_mean", "{:.4f}"), Col("same top token", "top1_agreement", "{:.3f}"),
         Col("bits/weight", "bits_per_weight", BPW), Col("quantize s", "seconds", SEC), MEASURED),
        _headline_rows()),
    # docs/results.md: the lecture's PTQ methods side by side
    "ptq": Table(
        (Col("method", "label", right=False), Col("W", "bits"), Col("A", "a_label", right=False),
         Col("PPL", "ppl", PPL), Col("vs FP", over_fp), Col("quant s", "seconds", "{:.1f}"), MEASURED),
        tuple(x for section in (
            "float", "W3 g64, weights only", "W4 g64, weights only", "W8A8 (W8 per channel, A8 per tensor, static)",
            "W8A8 (W8 per channel, A8 per token, dynamic)", "W4A8 (W4 g64, A8 per token, dynamic)",
            "W4A4 (W4 g64, A4 per token, dynamic)")
            for x in (Heading(section), Every(PTQ, {"section": section})))),
    # docs/results.md: llm-compressor beside lowbit, one run
    "peers": Table(
        (Col("tool", "tool", right=False), Col("method", "method", right=False), Col("bits", "bits"),
         Col("recipe", "recipe", right=False), Col("PPL", "ppl", PPL), Col("quantization s", "seconds", "{:.1f}"),
         Col("threads", "machine.threads"), Col("load at start", "load_avg", "{:.2f}"), MEASURED),
        (Every("peers", {"legacy": True}),)),
    # docs/results.md: GPTQModel at its defaults, one run
    "peers-gptqmodel": Table(
        (Col("tool", "tool", right=False), Col("method", "method", right=False), Col("bits", "bits"),
         Col("recipe", "recipe", right=False), Col("PPL", "ppl", PPL), Col("quantization s", "seconds", "{:.1f}"),
         Col("threads", "machine.threads"), Col("load at start", "load_avg", "{:.2f}"), MEASURED),
        (Every("peers", {"run": "gptqmodel 2026-12-06"}),)),
    # docs/results.md: issue 33's one run at full strength (GPTQModel, AutoRound 200 iterations, lowbit), with KLD
    "peers-full": Table(
        (Col("tool", "tool", right=False), Col("method", "method", right=False), Col("bits", "bits"),
         Col("recipe", "recipe", right=False), Col("PPL", "ppl", PPL), Col("KLD", "kld_mean", "{:.4f}"),
         Col("same top token", "top1_agreement", "{:.3f}"), Col("quantization s", "seconds", "{:.1f}"),
         Col("load at start", "load_avg", "{:.2f}"), Col("commit", "commit", right=False), MEASURED),
        (Every("peers", {"windows": 8, "command": frozenset(PEERS_FULL)}),)),
    # docs/blockwise.md: block-wise against AutoRound on two texts
    "blockwise-peers": Table(
        (Col("g64, 16 windows", "label", right=False), Col("PPL WikiText-2", "ppl", PPL),
         Col("PPL Jargon File", "ppl_second", PPL), Col("quantize s", "seconds", SEC),
         Col("threads", "machine.threads"), MEASURED),
        (Pick("peers_blockwise", {"method": "fp", "venv": ".venv"}),
         *(Pick("peers_blockwise", {"tool": tool, "bits": bits, **({"recipe": "default"} if tool == "lowbit" else {})})
           for bits in (3, 4, 2) for tool in ("autoround", "lowbit")),
         Pick("peers_blockwise", {"tool": "lowbit", "bits": 2, "recipe": "w2"}))),
    # docs/blockwise.md: block-wise's packed files, times per recipe and machine load
    "blockwise-runs": Table(
        (Col("W", "bits"), Col("recipe", "label", right=False), Col("PPL WikiText-2", "ppl", PPL),
         Col("PPL Jargon File", "ppl_second", PPL), Col("quantize s", "seconds", SEC),
         Col("MB on disk", "file_mb", "{:.1f}"), Col("threads", "machine.threads"),
         Col("load at start", "load_avg", "{:.2f}"), Col("commit", "commit", right=False), MEASURED),
        (Every("blockwise"),)),
    # docs/kld.md: lowbit's KL divergence against llama-perplexity's on the same files and token ids
    "kld-llamacpp": Table(
        (Col("file", "type", right=False), Col("positions", "positions"),
         Col("llama.cpp KLD", "llama_cpp.kld_mean", "{:.6f}"), Col("lowbit KLD", "lowbit.kld_mean", "{:.6f}"),
         Col("difference", "relative_difference", "{:.2%}"),
         Col("lowbit, ggml's 8-bit activations", "lowbit_ggml_activations.kld_mean", "{:.6f}"),
         Col("difference ", "lowbit_ggml_activations.relative_difference", "{:.2%}"),
         Col("median llama.cpp / lowbit", lambda r: f"{r['llama_cpp']['kld_median']:.4f} / "
                                                     f"{r['lowbit']['kld_median']:.4f}", right=False),
         Col("99 % llama.cpp / lowbit", lambda r: f"{r['llama_cpp']['kld_p99']:.3f} / {r['lowbit']['kld_p99']:.3f}",
             right=False),
         Col("same top token (llama.cpp)", "llama_cpp.top1_agreement", "{:.3f}"), MEASURED),
        (Pick("kld_llamacpp", {"type": "Q4_K_M"}), Pick("kld_llamacpp", {"type": "Q2_K"}))),
    # README: the --method choices, read from lowbit's registry
    "methods": Table(
        (Col("method", "method", right=False), Col("what it does", "summary", right=False),
         Col("builds on", "runs", right=False), Col("calibrates", "calibrates", right=False),
         Col("bit allocation", "mixed", right=False), Col("packs", "packs", right=False),
         Col("streams", "streams", right=False), Col("trains", "trains", right=False),
         Col("page", "page", right=False)),
        (Declared(),)),
    # docs/blockwise.md, docs/design.md: the dev-split searches (bench/dev_choice.py), every candidate and the choice
    "dev-choices-blockwise": _dev_choices("blockwise-w3", "blockwise-w2"),
    "dev-choices-awq": _dev_choices("awq-propagate", "awq-gptq-propagate"),
}


def _gguf(model: str, table: str) -> Table:
    return Table(
        (Col("recipe", "recipe", right=False), Col("source", "source", right=False), Col("MB", "file_mb", "{:.1f}"),
         Col("bits / linear weight", "bits_per_weight", "{:.2f}"), Col("PPL (llama.cpp)", "ppl", PPL),
         Col("PPL (lowbit protocol)", "ppl_lowbit", PPL), Col("PPL Jargon File (llama.cpp)", "ppl_second", PPL),
         Col("gap to F32 recovered vs imatrix", pct("gap_recovered_pct")),
         Col("linear types", "linear_types", right=False), MEASURED),
        (Every("gguf_ppl", {"model": model, "table": table}),))


# docs/gguf.md: --gguf AUTO against fixed recipes at the same file size (lowbit's protocol, then llama.cpp's)
TABLES["gguf-auto"] = Table(
    (Col("file", "recipe", right=False), Col("bytes", "file_bytes", "{:,}"),
     Col("bits / linear weight", "bits_per_weight", "{:.4f}"), Col("PPL", "ppl", PPL),
     Col("KLD mean", "kld_mean", "{:.4f}"), Col("KLD 99 %", "kld_p99", PPL),
     Col("same top token", "top1_agreement", "{:.2%}"), Col("linear types", "linear_types", right=False),
     Col("load at start", "load_avg", "{:.2f}"), MEASURED),
    (Every("gguf_auto", {"model": "smollm2-135m"}),))
def _frontier(model: str) -> Table:
    """bench/gguf_frontier.py's rows of one model: llama.cpp's recipes and lowbit's AUTO mixes, by llama.cpp."""
    return Table(
        (Col("file", "label", right=False), Col("bytes", "file_bytes", "{:,}"),
         Col("bits / linear weight", "bits_per_weight", "{:.3f}"), Col("PPL", "ppl", PPL),
         Col("KLD mean", "kld_mean", "{:.5f}"), Col("predicted KLD", "predicted_kld", "{:.5f}"),
         Col("KLD 99.9 %", "kld_p999", PPL),
         Col("same top token", "top1_agreement", "{:.2%}"), Col("PPL Jargon File", "second_text.jargon.ppl", PPL),
         Col("KLD Jargon File", "second_text.jargon.kld_mean", "{:.5f}"), Col("quantize s", "seconds", "{:.1f}"),
         Col("load at start", "load_avg", "{:.2f}"), Col("linear types", "linear_types", right=False),
         Col("commit", "commit", "{:.7}", right=False), MEASURED),
        (Every("gguf_frontier", {"model": model}, latest_by="label"),))


# docs/gguf.md: a GGUF model's tensors re-fit onto their own types (bench/gguf_requant.py), and other files' tensors
TABLES["gguf-requant"] = Table(
    (Col("model", "model", right=False), Col("weights of", "who", right=False), Col("type", "type", right=False),
     Col("tensors", "tensors"),
     Col("same bytes", "same_bytes"), Col("weights moved", "weights_moved", "{:,}"), Col("of", "weights", "{:,}"),
     Col("commit", "commit", right=False), MEASURED),
    (Every("gguf_requant"),))
TABLES["gguf-frontier"] = _frontier("smollm2-135m")
TABLES["gguf-frontier-gemma3"] = _frontier("gemma3-270m")
TABLES["gguf"] = _gguf("smollm2-135m", "recipes")
TABLES["gguf-q2k-blockwise"] = _gguf("smollm2-135m", "q2k-blockwise")
TABLES["gguf-gemma3"] = _gguf("gemma3-270m", "recipes")
TABLES["gguf-gemma3-blockwise"] = _gguf("gemma3-270m", "blockwise")


# ---------------------------------------------------------------------------------------------------- the work
def render(table: Table, rows_dir: Path) -> list[str]:
    """The table's markdown lines from the row files in `rows_dir`."""
    cache: dict[str, list[dict]] = {}

    def rows_of(name: str) -> list[dict]:
        if name not in cache:
            cache[name] = read_rows(rows_dir / f"{name}.jsonl")
        return cache[name]

    lines = ["| " + " | ".join(c.title for c in table.columns) + " |",
             "| " + " | ".join("---:" if c.right else "---" for c in table.columns) + " |"]
    for item in table.rows:
        if isinstance(item, Heading):
            lines.append("| " + " | ".join([f"**{item.text}**"] + [""] * (len(table.columns) - 1)) + " |")
            continue
        if isinstance(item, Declared):
            for row in declared_rows():
                lines.append("| " + " | ".join(c.cell(row) for c in table.columns) + " |")
            continue
        if isinstance(item, Either):
            has_rows = (item.first.file + ".jsonl") in {p.name for p in rows_dir.glob("*.jsonl")}
            first = has_rows and any(matches(r, item.first.where) for r in rows_of(item.first.file))
            item = item.first if first else item.then
        found = [r for r in rows_of(item.file) if matches(r, item.where)]
        if isinstance(item, (Pick, Spread)):
            if not found:
                raise ValueError(f"no row in {item.file}.jsonl has {item.where}")
            found = [item.combine(found) if isinstance(item, Spread) else found[-1]]
        if isinstance(item, Every) and item.latest_by:
            found = list({r.get(item.latest_by): r for r in found}.values())
        fixed = getattr(item, "cells", {})
        for row in found:
            lines.append("| " + " | ".join(fixed.get(c.title, c.cell(row)) for c in table.columns) + " |")
    return lines


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def diff(name: str, written: list[str], wanted: list[str], where: str) -> list[str]:
    """One message per cell of the written table that differs from the wanted one."""
    problems = []
    if len(written) != len(wanted):
        problems.append(f"{where}: table {name} has {len(written)} lines, its rows give {len(wanted)}")
    header = _cells(wanted[0]) if wanted else []
    for i, (have, want) in enumerate(zip(written, wanted)):
        a, b = _cells(have), _cells(want)
        if len(a) != len(b):
            problems.append(f"{where}: table {name}, line {i + 1} has {len(a)} cells, its rows give {len(b)}")
            continue
        for j, (x, y) in enumerate(zip(a, b)):
            if x != y:
                label = b[0] if i > 1 else "header"
                problems.append(f"{where}: table {name}, row '{label}', column '{header[j]}': "
                                f"the doc says {x!r}, the rows give {y!r}")
    return problems


def process(text: str, rows_dir: Path, where: str, tables: dict[str, Table] | None = None,
            seen: set | None = None) -> tuple[str, list[str]]:
    """(text with every marked table regenerated, the differences found in the text as it was)."""
    tables = TABLES if tables is None else tables
    problems: list[str] = []

    def replace(m: re.Match) -> str:
        name = m.group("name")
        if name not in tables:
            problems.append(f"{where}: marker table:{name} names no table in bench/report.py's TABLES")
            return m.group(0)
        if seen is not None:
            seen.add(name)
        written = [line for line in m.group("body").splitlines() if line.strip()]
        wanted = render(tables[name], rows_dir)
        problems.extend(diff(name, written, wanted, where))
        return f"<!-- table:{name} -->\n" + "\n".join(wanted) + "\n<!-- /table -->"

    return MARKER.sub(replace, text), problems


def doc_files(root: Path) -> list[Path]:
    return [p for pattern in DOCS for p in sorted(root.glob(pattern))]


def check(root: Path = ROOT, rows_dir: Path | None = None, write: bool = False) -> list[str]:
    """The differences between the docs' generated tables and the rows; with `write`, fix them in place."""
    rows_dir = rows_dir or root / "bench" / "results"
    problems, seen = [], set()
    for path in doc_files(root):
        text = path.read_text()
        new, found = process(text, rows_dir, str(path.relative_to(root)), seen=seen)
        problems += found
        if write and new != text:
            path.write_text(new)
    problems += [f"table {name} is declared in bench/report.py but no doc has <!-- table:{name} -->"
                 for name in TABLES if name not in seen and root == ROOT]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its rows")
    args = parser.parse_args(argv)
    try:
        problems = check(write=not args.check)
    except (ValueError, OSError) as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    if args.check:
        for p in problems:
            print(p)
        return 1 if problems else 0
    changed = [p for p in problems if "declared in bench/report.py" not in p]
    print(f"rewrote the tables ({len(changed)} cells or lines were out of date)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
