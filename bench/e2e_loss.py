"""Block-wise reconstruction's end-to-end pass, ablated: no E2E, next-token cross-entropy, distillation.

The per-layer phase (AWQ+GPTQ-R, then each decoder layer trained against the float layer) is the slow
part and the same for every E2E variant, so it runs once and is saved: ``--block-only --snapshot FILE``
quantizes with ``--e2e-steps 0`` and stores every linear's weight and codes. Each variant then loads the
snapshot into a fresh float model (whose top-k next-token log-probabilities, the distillation teacher, are
taken first), runs :func:`lowbit.methods.blockwise.tune_steps_e2e` and scores the model in memory on
WikiText-2 test and the Jargon File (``bench/second_text.py``). One JSON line per run.

    OMP_NUM_THREADS=1 python bench/e2e_loss.py --bits 2 --block-only --snapshot results/e2e/w2.pt
    OMP_NUM_THREADS=1 python bench/e2e_loss.py --bits 2 --snapshot results/e2e/w2.pt --e2e-steps 0
    OMP_NUM_THREADS=1 python bench/e2e_loss.py --bits 2 --snapshot results/e2e/w2.pt --e2e-loss kd
    OMP_NUM_THREADS=1 python bench/e2e_loss.py --bits 2 --snapshot results/e2e/w2.pt --e2e-loss ce
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402  (the shared run arguments)
from bench.second_text import jargon  # noqa: E402


def cli_args(args, extra: list[str]):
    from lowbit.cli import build_parser

    return build_parser().parse_args(
        ["eval", "--model", args.model, "--method", "blockwise", "--w-bit", str(args.bits), "--group-size",
         str(args.group_size), "--calib-samples", str(args.calib_samples), "--calib-seq-len", "512",
         "--max-windows", str(args.max_windows), *extra])


def block_phase(args, extra: list[str]) -> dict:
    import torch

    from lowbit.cli.common import method_options, session_from_args, spec_from_args
    from lowbit.quantizer import codes_of

    a = cli_args(args, [*extra, "--e2e-steps", "0"])
    session = session_from_args(a)
    start = time.perf_counter()
    res = session.run("blockwise", spec_from_args(a), method_options(a), progress=False, evaluate=False)
    seconds = time.perf_counter() - start
    codes = {name: qt for name, m in session.model.named_modules() if (qt := codes_of(m)) is not None}
    path = Path(args.snapshot)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    torch.save({"weights": session.model.state_dict(), "codes": codes, "args": extra, "bits": args.bits}, tmp)
    tmp.replace(path)
    return {"snapshot": str(path), "block_seconds": round(seconds, 1),
            **{k: v for k, v in res.info.items() if isinstance(v, (int, float, str))}}


def variant(args, extra: list[str], second: Path) -> dict:
    import torch

    from lowbit.cli.common import method_options, session_from_args, spec_from_args
    from lowbit.data import eval_text
    from lowbit.eval.perplexity import perplexity, tokenize_windows
    from lowbit.experiment import make_config
    from lowbit.methods.blockwise import e2e_batch, teacher_top_k, tune_steps_e2e
    from lowbit.models.families import family_for
    from lowbit.models.inventory import quantizable_linears
    from lowbit.quantizer import set_codes

    a = cli_args(args, extra)
    session = session_from_args(a)
    cfg = make_config("blockwise", spec_from_args(a), method_options(a))
    model, calib = session.model, session.calibration()
    kd = cfg.e2e_loss == "kd"
    teacher = teacher_top_k(model, calib, e2e_batch(model, calib, cfg.recipe["batch"])) if kd else None
    snap = torch.load(args.snapshot, weights_only=False)
    if snap["bits"] != args.bits:
        sys.exit(f"error: {args.snapshot} holds a W{snap['bits']} block phase, not W{args.bits}")
    model.load_state_dict(snap["weights"])
    modules = dict(model.named_modules())
    for name, qt in snap["codes"].items():
        set_codes(modules[name], qt)
    start = time.perf_counter()
    steps = cfg.recipe["e2e_steps"]
    info = tune_steps_e2e(model, quantizable_linears(model, family_for(model)), calib, cfg, teacher) if steps else {}
    seconds = time.perf_counter() - start
    wiki = perplexity(model, session.windows, progress=False).ppl
    other = tokenize_windows(session.tokenizer, eval_text(str(second), None), 2048, args.max_windows)
    return {"e2e": info.get("e2e_loss", "none"), "args": extra, "ppl": wiki,
            "ppl_second": perplexity(model, other, progress=False).ppl, "e2e_seconds": round(seconds, 1), **info}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_run_args(p, "model", "group_size", "calib_samples", "max_windows")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--snapshot", required=True, help="the saved per-layer phase (written with --block-only)")
    p.add_argument("--block-only", action="store_true", help="run the per-layer phase and save it")
    args, extra = p.parse_known_args()  # the rest goes to lowbit (--e2e-loss kd, --e2e-steps N, --bw-scale-lr X)
    if args.block_only:
        row = block_phase(args, extra)
    else:
        if not Path(args.snapshot).is_file():
            sys.exit(f"error: no snapshot {args.snapshot}; make it with --block-only first")
        second = jargon()
        row = variant(args, extra, second)
    print(json.dumps({"model": args.model, "bits": args.bits, "group_size": args.group_size, **row}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
