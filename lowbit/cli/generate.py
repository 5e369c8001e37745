"""``lowbit generate``: text and tokens/s from a model, packed or not."""
from __future__ import annotations

import json
import sys

from ..errors import LowbitError
from .common import add_model_args, positive


def run(args) -> int:
    from ..generate import generate
    from ..models.loading import load_model, model_source

    model_source(args.model)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, kernel=args.kernel)
    if tok is None:
        raise LowbitError(f"{args.model} has no tokenizer")
    g = generate(model, tok, args.prompt, args.max_new_tokens, chat=args.chat)
    print(g.text)
    stats = {"prompt_tokens": g.prompt_tokens, "new_tokens": g.new_tokens,
             "prompt_tokens_per_s": round(g.prompt_tokens_per_s, 2),
             "decode_tokens_per_s": round(g.decode_tokens_per_s, 2),
             "seconds": round(g.prefill_seconds + g.decode_seconds, 3)}
    if args.json:
        print(json.dumps(stats))
    else:
        print(f"\n{g.new_tokens} new tokens: {stats['decode_tokens_per_s']:.1f} tokens/s decode, "
              f"{g.prompt_tokens} prompt tokens: {stats['prompt_tokens_per_s']:.1f} tokens/s "
              f"({stats['seconds']:.2f} s in all)", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a model (e.g. a packed one) and report tokens/s")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=positive, default=128, help="tokens to generate (default 128)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--kernel", choices=("auto", "int4", "int4x2", "int8", "unpack", "dequant"), default="auto",
                   help="for a packed model: kernel per linear (default auto: as recorded in the model)")
    p.add_argument("--threads", type=positive, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the timing as one JSON object as the last line")
    p.set_defaults(func=run)
