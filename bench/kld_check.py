"""An independent check of ``lowbit eval --kld``: the mean KL divergence of RTN W4 g64 to the float model,
computed here from the full logits with nothing of lowbit's evaluation code.

The float model and its RTN copy come from the public Python API (``lowbit.load_model``, ``lowbit.quantize_``);
the windows are cut here from WikiText-2 test as the protocol says (whole text tokenized once, non-overlapping
2048-token windows); KL(P_float || Q_rtn) is summed over the vocabulary in float64 with torch. The CLI's row is
run as a subprocess (or read from ``--row``), and both means are printed with their relative difference.

    LOWBIT_DATA_DIR=../shared/data python bench/kld_check.py            # exit 1 if they differ by more than 1 %
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import lowbit  # noqa: E402
from bench import harness  # noqa: E402  (the shared run arguments)


def protocol_windows(tokenizer, data_dir: Path, seq_len: int, n: int) -> torch.Tensor:
    text = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_bytes().decode("utf-8").replace("\r\n", "\n")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def mean_kld(reference, model, windows: torch.Tensor, rows: int = 512) -> tuple[float, int]:
    """Mean over predicted positions of sum_v p (log p - log q), in float64, and the number of positions."""
    total, count = 0.0, 0
    for w in windows:
        p_logits = reference(w[None], use_cache=False).logits[0, :-1]
        q_logits = model(w[None], use_cache=False).logits[0, :-1]
        for s in range(0, p_logits.shape[0], rows):
            lp = F.log_softmax(p_logits[s:s + rows].double(), -1)
            lq = F.log_softmax(q_logits[s:s + rows].double(), -1)
            total += F.kl_div(lq, lp, log_target=True, reduction="sum").item()
        count += p_logits.shape[0]
    return total / count, count


def cli_row(args) -> dict:
    if args.row:
        return json.loads(Path(args.row).read_text().strip().splitlines()[-1])
    cmd = [str(Path(sys.executable).parent / "lowbit"), "eval", "--model", args.model, "--method", "rtn", "--w-bit",
           str(args.bits), "--group-size", str(args.group_size), "--max-windows", str(args.windows), "--seq-len",
           str(args.seq_len), "--kld", "--json"]
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_run_args(p, "model", "group_size")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--row", help="the JSON row of an earlier `lowbit eval ... --kld --json` run, instead of running it")
    args = p.parse_args()
    data_dir = Path(os.environ.get("LOWBIT_DATA_DIR", REPO.parent / "shared" / "data"))

    row = cli_row(args)
    reference, tok = lowbit.load_model(args.model)
    model = copy.deepcopy(reference)
    lowbit.quantize_(model, lowbit.RTNConfig(lowbit.QuantSpec(bits=args.bits, group_size=args.group_size)))
    windows = protocol_windows(tok, data_dir, args.seq_len, args.windows)
    direct, positions = mean_kld(reference, model, windows)

    cli = row["kld_mean"]
    rel = abs(cli - direct) / direct
    print(f"model {args.model}, RTN W{args.bits} g{args.group_size}, {args.windows} x {args.seq_len}-token windows "
          f"of WikiText-2 test, {positions} predicted positions")
    print(f"lowbit eval --kld   kld_mean = {cli:.6f}   (ppl {row['ppl']:.3f}, float {row['ppl_ref']:.3f})")
    print(f"direct (float64)    kld_mean = {direct:.6f}")
    print(f"relative difference: {rel:.2e} ({'within' if rel <= 0.01 else 'NOT within'} 1 %)")
    return 0 if math.isfinite(rel) and rel <= 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
