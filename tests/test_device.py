"""The execution device: resolving --device, one layer at a time on it, and the CPU path unchanged.

No GPU exists here, so the walk's placement is checked with the meta device as the execution device: the
layer runs there on shapes alone, and any operation that mixes it with a CPU tensor fails.
"""
from __future__ import annotations

import contextlib
import hashlib

import pytest
import torch
from conftest import tiny_llama
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import lowbit as lb
from lowbit import device as dev
from lowbit import walk
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.methods import quantize_
from lowbit.models.families import family_for
from lowbit.quantizer import QuantSpec, codes_of

CUDA0 = torch.device("cuda", 0)


def test_auto_is_the_cpu_without_an_accelerator():
    assert dev.resolve_device("auto") == torch.device("cpu") == dev.resolve_device(None) == dev.resolve_device("cpu")


@pytest.mark.parametrize("spec, message", [("cuda", "no cuda device"), ("cuda:1", "no cuda device"),
                                           ("xpu", "no xpu device"), ("tpu", "not a device lowbit runs on"),
                                           ("gpu0", "not a device lowbit runs on")])
def test_a_device_this_machine_lacks_is_one_clear_error(spec, message):
    with pytest.raises(LowbitError, match=message):
        dev.resolve_device(spec)


def test_a_cuda_index_past_the_last_device_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve_device("cuda") == CUDA0 and dev.resolve_device("auto") == CUDA0
    with pytest.raises(LowbitError, match="there are 2 cuda devices"):
        dev.resolve_device("cuda:2")


@pytest.mark.parametrize("command", ["eval", "quantize", "qat"])
def test_cli_device_cuda_without_cuda_exits_2_with_one_line(command, capsys):
    extra = ["-o", "unused-dir"] if command == "quantize" else []
    assert main([command, "--device", "cuda", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lowbit: error: --device cuda: this machine has no cuda device")


def test_placed_moves_a_module_there_and_back_even_on_error():
    moves = []

    class Spy(nn.Linear):
        def to(self, *args, **kwargs):
            moves.append(args[0])
            return self

    layer = Spy(2, 2)
    with dev.placed(layer, CUDA0):
        assert moves == [CUDA0]
    assert moves == [CUDA0, torch.device("cpu")]
    moves.clear()
    with pytest.raises(RuntimeError, match="boom"), dev.placed(layer, CUDA0):
        raise RuntimeError("boom")
    assert moves == [CUDA0, torch.device("cpu")]
    moves.clear()
    with dev.placed(layer, torch.device("cpu")), dev.placed(layer, None):
        pass
    assert moves == []  # already home: nothing moves


def test_to_device_reaches_tensors_inside_containers():
    with FakeTensorMode(allow_non_fake_inputs=True):
        moved = dev.to_device(((torch.ones(2), 3), {"mask": torch.zeros(1)}, [torch.ones(1)]), CUDA0)
    assert moved[0][0].device == CUDA0 and moved[0][1] == 3
    assert moved[1]["mask"].device == CUDA0 and moved[2][0].device == CUDA0


def _keep_home_on_exit(monkeypatch):
    """The walk's ``placed``, except that leaving also puts the layer's own CPU parameters back: meta tensors
    hold no data to copy back (the way back is tested on its own above)."""
    real = dev.placed

    @contextlib.contextmanager
    def placed(module, device):
        saved = [(m, dict(m._parameters)) for m in module.modules()]
        inner = real(module, device)
        inner.__enter__()
        try:
            yield module
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):  # the way back only: the body's errors raise
                inner.__exit__(None, None, None)
            for m, params in saved:
                m._parameters.update(params)

    monkeypatch.setattr(walk, "placed", placed)
    monkeypatch.setattr(walk, "fits", lambda nbytes, device, share=0.5: True)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    return [t for o in items for t in _tensors(o)]


def test_walk_puts_only_the_current_layer_and_what_it_reads_on_the_execution_device(monkeypatch):
    _keep_home_on_exit(monkeypatch)
    model = tiny_llama(layers=3)
    family = family_for(model)
    layers = model.get_submodule(family.layers)
    seen = []

    def process(ctx: walk.LayerContext) -> None:
        others = {p.device for i, lay in enumerate(layers) if i != ctx.index for p in lay.parameters()}
        call_tensors = _tensors(ctx.call.full)
        seen.append((ctx.index, {p.device for p in ctx.layer.parameters()}, others,
                     {x.device for x in ctx.linear_inputs.values()}, {b.device for b in ctx.batches()},
                     {t.device for t in call_tensors}, ctx.device))

    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    meta, cpu = torch.device("meta"), torch.device("cpu")
    walk.walk_layers(model, family, calib, process, batch_size=2, device=meta)
    assert [s[0] for s in seen] == [0, 1, 2]
    for index, own, others, inputs, batches, call, where in seen:
        assert own == {meta} and others == {cpu}, index
        assert inputs == batches == {meta} and where == meta, index
        assert call == {meta}, index  # masks and rotary tables travel with the layer


def _fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.detach().float().contiguous().numpy().tobytes())
    for _, m in sorted(model.named_modules()):
        qt = codes_of(m)
        if qt is not None:
            h.update(qt.q.numpy().tobytes() + qt.scale.float().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("make", [lambda s: lb.AWQConfig(s), lambda s: lb.GPTQConfig(s, act_order=True),
                                  lambda s: lb.BlockwiseConfig(s, fast=True, steps=4, e2e_steps=2)],
                         ids=["awq", "gptq-r", "blockwise"])
def test_device_cpu_is_bit_identical_to_no_device(make):
    spec = QuantSpec(bits=3, group_size=32)
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    prints = []
    for device in (None, "cpu"):
        model = tiny_llama(layers=2)
        quantize_(model, make(spec), calib, device=device)
        prints.append(_fingerprint(model))
    assert prints[0] == prints[1]
