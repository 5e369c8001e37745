"""The AWQ paper's three-way experiment: RTN vs salient channels kept in FP16 vs AWQ scaling."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .experiment import MethodOptions, Session
from .quantizer import QuantSpec

# label -> (method, salient selection)
COMPARE_METHODS: dict[str, tuple[str, str | None]] = {
    "fp": ("fp", None),
    "rtn": ("rtn", None),
    "salient-activation": ("salient", "activation"),
    "salient-weight": ("salient", "weight"),
    "salient-random": ("salient", "random"),
    "awq": ("awq", None),
}


def run_compare(session: Session, methods: list[str], bits: list[int], group_size: int, sym: bool,
                opts: MethodOptions, log: Callable[[dict], None] | None = None, full_range: bool = False) -> list[dict]:
    """One row per (method, bits); the float model once."""
    rows = []
    for label in methods:
        method, by = COMPARE_METHODS[label]
        for b in ([16] if method == "fp" else bits):
            spec = None
            if method != "fp":
                spec = QuantSpec(bits=b, granularity="group" if group_size else "channel",
                                 group_size=group_size or 64, symmetric=sym, full_range=full_range)
            o = opts.replace(salient_by=by) if by else opts
            row = session.run(method, spec, o, progress=False, label=label).row()
            rows.append(row)
            if log:
                log(row)
    return rows


def save_chart(rows: list[dict], path: Path, title: str = "") -> Path:
    """Bar chart of PPL per method, one panel per bit width, FP as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    widths = sorted({r["w_bit"] for r in rows if r["method"] != "fp"})
    fig, axes = plt.subplots(1, max(1, len(widths)), figsize=(6 * max(1, len(widths)), 4.2), squeeze=False)
    colors = {"rtn": "#c0392b", "awq": "#27ae60"}
    for ax, b in zip(axes[0], widths):
        sel = [r for r in rows if r["w_bit"] == b and r["method"] != "fp"]
        names = [r["method"] for r in sel]
        ppl = [r["ppl"] for r in sel]
        bars = ax.bar(names, ppl, color=[colors.get(n, "#2980b9") for n in names])
        for bar, r in zip(bars, sel):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(),
                    f"{r['ppl']:.1f}\n{r['bits_per_weight']:.2f} b/w",
                    ha="center", va="bottom", fontsize=8)
        if fp is not None:
            ax.axhline(fp, ls="--", color="gray", lw=1, label=f"FP {fp:.2f}")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_title(f"W{b} g{sel[0]['group_size'] or 'ch'}")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_ylim(0, max(ppl) * 1.2)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return path
