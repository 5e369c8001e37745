"""lowbit's named recipes for bench rows: a label, the CLI's ``--method`` and the options it adds.

One table for every benchmark (headline, peers, ship check), so a row called "gptq-r" means the
same command wherever it appears. GPTQ-R orders columns by decreasing Hessian diagonal
(``--act-order``, llm-compressor's default "static" order); block-wise-fast is the short recipe.
"""
from __future__ import annotations

RECIPES: dict[str, tuple[str, list[str]]] = {
    "fp": ("fp", []), "rtn": ("rtn", []), "awq": ("awq", []), "gptq-r": ("gptq", ["--act-order"]),
    "awq+gptq-r": ("awq+gptq", ["--act-order"]), "blockwise-fast": ("blockwise", ["--fast"]), "qat": ("qat", [])}


def command(label: str) -> list[str]:
    """``--method M`` and the recipe's options, for ``lowbit eval`` or ``lowbit quantize``."""
    method, options = RECIPES[label]
    return ["--method", method, *options]
