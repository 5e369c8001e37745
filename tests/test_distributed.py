"""Data-parallel workers (torch.distributed, gloo): two ranks, each with half the calibration samples and half
the evaluation windows, give the weights and the perplexity of one process, up to summation order: the
workers sum their statistics in float64 where one process sums all tokens at once, so a folded weight may
move by float rounding and a code may flip in a near-tie (bounded below); the workers agree with each other
bit for bit.

The ranks run in spawned processes, as ``torchrun`` would start them; each saves what it produced.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lowbit as lb
from lowbit import distributed
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import perplexity
from lowbit.methods import quantize_
from lowbit.quantizer import QuantSpec

TESTS = str(Path(__file__).resolve().parent)
SPEC = QuantSpec(bits=3, group_size=16)
CONFIGS = {
    "gptq-r": lambda: lb.GPTQConfig(SPEC, act_order=True),
    "imatrix": lambda: lb.ImatrixConfig(QuantSpec(format="q4_0")),
    "salient": lambda: lb.SalientConfig(SPEC, by="activation"),
    "awq": lambda: lb.AWQConfig(SPEC),
    "awq+gptq-r": lambda: lb.AWQGPTQConfig(lb.AWQConfig(SPEC), lb.GPTQConfig(SPEC, act_order=True)),
    "blockwise": lambda: lb.BlockwiseConfig(SPEC, fast=True, steps=2, e2e_steps=0),
}


def _model(family: str):
    """A zoo model, its calibration samples and evaluation windows. ``-partial``: the second worker's share of the
    samples repeats one token, so its tokens reach only the experts that token is routed to."""
    sys.path.insert(0, TESTS)
    from zoo import tiny_model, tiny_samples

    model = tiny_model(family.removesuffix("-partial"))
    calib = tiny_samples(model, n=6, seq=32, seed=1)
    if family.endswith("-partial"):
        calib[3:] = calib[3, 0]
    return model, calib, tiny_samples(model, n=5, seq=32, seed=2)


def _counting(owner, name: str, counts: dict, size) -> None:
    """Replace ``owner.name`` by a wrapper that adds ``size(*args)`` to ``counts[name]``."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        counts[name] = counts.get(name, 0) + size(*args)
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


def _run(family: str, method: str) -> dict:
    """Quantize, evaluate and fingerprint, in this process (one rank of several, or alone); count the inputs this
    worker stood in for (modules that read tokens on the other worker only) and the independent work it did: GPTQ's
    rounded inputs, AWQ's candidate scales scored through a Gram matrix and the rows of its clip search."""
    from lowbit import walk
    from lowbit.methods import awq, gptq

    torch.set_num_threads(1)
    model, calib, windows = _model(family)
    stood_in, agreed, work = [], walk.agreed_inputs, {}
    saved = [(walk, "agreed_inputs"), (gptq.GPTQRounder, "_round"), (awq, "single_linear_losses"),
             (awq, "_clip_ratios")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in saved]

    def counting(inputs, names, *args):
        out = agreed(inputs, names, *args)
        stood_in.extend(n for n in names if n in out and n not in inputs)
        return out

    walk.agreed_inputs = counting
    _counting(gptq.GPTQRounder, "_round", work, lambda *a: 1)
    _counting(awq, "single_linear_losses", work, lambda w0, g, scales, *a: len(scales) if g is not None else 0)
    _counting(awq, "_clip_ratios", work, lambda w, *a: w.shape[0])
    try:
        quantize_(model, CONFIGS[method](), calib)
    finally:
        for owner, name, real in saved:
            setattr(owner, name, real)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.detach().float().contiguous().numpy().tobytes())
    weights = torch.cat([p.detach().flatten() for _, p in sorted(model.named_parameters()) if p.dim() == 2])
    return {"hash": h.hexdigest(), "weights": weights, "ppl": perplexity(model, windows, progress=False).ppl,
            "stood_in": stood_in, "work": work}


def _rank(rank: int, out: str, family: str, method: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    # a file rendezvous (no port to race for); init_from_env then finds the group joined
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    assert distributed.init_from_env(torch.device("cpu")) and distributed.world_size() == 2
    try:
        result = _run(family, method)
    except LowbitError as e:
        result = {"refused": str(e)}
    finally:
        distributed.finish()
    torch.save(result, Path(out) / f"rank{rank}.pt")


def _two_ranks(tmp_path: Path, family: str, method: str) -> list[dict]:
    mp.start_processes(_rank, args=(str(tmp_path), family, method), nprocs=2, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("family, method", [("llama", "gptq-r"), ("llama", "imatrix"), ("llama", "salient"),
                                            ("llama", "awq"), ("llama", "awq+gptq-r"), ("qwen2_moe", "gptq-r"),
                                            ("qwen2_moe", "awq"), ("qwen2_moe-partial", "awq+gptq-r"),
                                            ("qwen2_moe-partial", "imatrix")])
def test_two_workers_give_one_process_weights_and_perplexity(tmp_path, family, method):
    alone = _run(family, method)
    ranks = _two_ranks(tmp_path, family, method)
    assert not any("refused" in r for r in ranks), ranks
    # with partial routing the second worker stands in for experts only the first one's tokens reached
    assert bool(ranks[1]["stood_in"]) == family.endswith("-partial") and not ranks[0]["stood_in"]
    assert ranks[0]["hash"] == ranks[1]["hash"] and ranks[0]["ppl"] == ranks[1]["ppl"], "the workers disagree"
    # float rounding of the summed statistics moves a folded weight by an ulp; a flipped code moves it a grid step
    moved = (~torch.isclose(ranks[0]["weights"], alone["weights"], rtol=1e-5, atol=1e-8)).float().mean().item()
    assert moved <= 1e-3, f"{moved:.2%} of the weights differ from one process's by more than float rounding"
    if method == "gptq-r" and family.startswith("qwen2_moe"):  # routed tokens: float64 Hessian products
        assert moved == 0, f"{moved:.2%} of the weights differ from one process's"
    assert ranks[0]["ppl"] == pytest.approx(alone["ppl"], rel=1e-4)  # the bar: 4 significant digits
    # independent work is shared, not repeated: each worker does part of it and together they do it once
    assert bool(alone["work"]) == method.startswith(("gptq", "awq"))
    assert all(r["work"].keys() == alone["work"].keys() for r in ranks)
    for what, n in alone["work"].items():
        mine = [r["work"][what] for r in ranks]
        assert sum(mine) == n and max(mine) < n, (what, mine, n)


def test_a_method_not_yet_data_parallel_is_refused_on_every_worker(tmp_path):
    ranks = _two_ranks(tmp_path, "llama", "blockwise")
    assert all("blockwise does not run on data-parallel workers yet" in r.get("refused", "") for r in ranks)


def test_one_process_is_the_identity():
    assert not dist.is_initialized() and not distributed.active() and distributed.is_writer()
    x = torch.randn(5, 3)
    assert distributed.share(x) is x and distributed.all_sum(x) is x and distributed.gather_shares(x, 5) is x
    assert torch.equal(distributed.token_mean(x), x.mean(0)) and distributed.token_count(x) == 5


STREAMED = {"awq": lambda: lb.AWQConfig(SPEC, n_grid=4, clip_grid=4), "gptq-r": CONFIGS["gptq-r"],
            "rtn": lambda: lb.RTNConfig(SPEC)}


def _streamed(src: Path, out: Path, method: str) -> dict:
    """A streamed quantization of the checkpoint ``src`` into ``out``, then the packed weights read back."""
    from lowbit.pack.checkpoint import load_packed
    from lowbit.stream import quantize_streamed

    sys.path.insert(0, TESTS)
    from conftest import byte_tokenizer

    torch.set_num_threads(1)
    calib = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    res = quantize_streamed(src, out, STREAMED[method](), calib, byte_tokenizer(), batch_size=2, progress=False,
                            log=lambda _m: None)
    model, _ = load_packed(out)
    weights = torch.cat([m.weight.detach().flatten() for _, m in sorted(model.named_modules())
                         if hasattr(m, "weight") and getattr(m.weight, "dim", lambda: 0)() == 2])
    flops = sum(2 * b * m * k * n * c for (_, _, b, m, k, n), c in res.matmuls.items())
    return {"weights": weights, "files": sorted(p.name for p in out.iterdir()), "flops": flops}


STREAMED_METHODS = ("awq", "gptq-r", "rtn")


def _stream_rank(rank: int, tmp: str) -> None:
    """One worker streaming the checkpoint with every method in turn (one process group for all three)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    distributed.init_from_env(torch.device("cpu"))
    try:
        result = {m: _streamed(Path(tmp) / "src", Path(tmp) / f"workers-{m}", m) for m in STREAMED_METHODS}
    finally:
        distributed.finish()
    torch.save(result, Path(tmp) / f"stream-rank{rank}.pt")


def test_streamed_workers_write_one_process_file(tmp_path):
    """Two workers stream one checkpoint from disk, each calibrating on half the samples; the writer's
    directory holds one process's codes (up to summation order) and no worker's leftovers."""
    from conftest import byte_tokenizer, tiny_llama

    model = tiny_llama(layers=3)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "src", max_shard_size="60KB")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    mp.start_processes(_stream_rank, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"stream-rank{r}.pt", weights_only=False) for r in range(2)]
    for method in STREAMED_METHODS:
        alone, ours = _streamed(tmp_path / "src", tmp_path / f"alone-{method}", method), [r[method] for r in ranks]
        assert ours[0]["files"] == alone["files"] and torch.equal(ours[0]["weights"], ours[1]["weights"]), method
        assert not (tmp_path / f"workers-{method}.partial").exists()
        if method != "rtn":  # each worker ran its half of the calibration samples through the layers
            assert all(0.3 < r["flops"] / alone["flops"] < 0.7 for r in ours), (method, [r["flops"] for r in ours])
        moved = (~torch.isclose(ours[0]["weights"], alone["weights"], rtol=1e-5, atol=1e-8)).float().mean().item()
        assert moved <= (0 if method == "rtn" else 1e-3), f"{method}: {moved:.2%} of the weights differ"
