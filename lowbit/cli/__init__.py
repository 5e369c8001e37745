"""The ``lowbit`` command: parse, call the API, print tables. No quantization logic here.

One module per subcommand, each with ``add_parser(sub)`` and ``run(args)``; :mod:`.common` holds what
they share. A method's options come from its config dataclass (:mod:`lowbit.options`).
"""
from __future__ import annotations

import argparse
import sys

from ..distributed import finish
from ..errors import LowbitError
from . import compare, evaluate, export, generate, inspect_layer, number_format, qat, quantize, sensitivity
from .common import Parser

SUBCOMMANDS = (evaluate, quantize, qat, generate, export, compare, sensitivity, inspect_layer, number_format)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lowbit", description="Low-bit quantization of LLMs: RTN, salient FP16, AWQ, GPTQ, "
                                               "SmoothQuant, QAT, activation quantization; packed files, GGUF and "
                                               "compressed-tensors exports; evaluated by perplexity.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    finally:
        finish()


__all__ = ["build_parser", "main"]
