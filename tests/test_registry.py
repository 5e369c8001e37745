"""One declaration per method (lowbit.methods.REGISTRY): the runner, the CLI, the exports and bench/ all read it."""
from __future__ import annotations

import argparse

import pytest

import lowbit
from lowbit import QuantSpec, SpecMap
from lowbit.errors import LowbitError
from lowbit.experiment import MethodOptions, make_config
from lowbit.methods import (
    REGISTRY,
    ActQuantConfig,
    AWQConfig,
    AWQGPTQConfig,
    BlockwiseConfig,
    GPTQConfig,
    Pipeline,
    QATConfig,
    RotationConfig,
    RTNConfig,
    SalientConfig,
    SmoothQuantConfig,
    needs_calibration,
)

SPEC = QuantSpec(bits=3, group_size=32)


def steps_of(config) -> list:
    return list(config.steps) if isinstance(config, Pipeline) else [config]


@pytest.mark.parametrize("name", REGISTRY.names())
def test_each_method_builds_its_declared_config_and_the_methods_it_chains(name):
    declared = REGISTRY[name]
    config = make_config(name, SPEC, MethodOptions())
    if declared.config is None:
        assert config is None
        return
    built = steps_of(config)
    assert type(built[0]) is declared.config
    for chained in declared.chains:  # each chained method's config is inside: a field, or a later step
        cls = REGISTRY[chained].config
        assert any(isinstance(getattr(built[0], f, None), cls) for f in ("awq", "gptq")) or \
            any(type(s) is cls for s in built[1:]), (name, chained)
    assert REGISTRY.of(built[0]) is declared
    assert needs_calibration(config) == declared.calibrates(built[0])


def test_what_each_build_composes():
    assert [type(s) for s in steps_of(make_config("smoothquant", SPEC, MethodOptions()))] == [SmoothQuantConfig,
                                                                                             RTNConfig]
    both = make_config("awq+gptq", SPEC, MethodOptions(act_order=True, n_grid=7))
    assert isinstance(both, AWQGPTQConfig) and both.gptq.act_order and both.awq.n_grid == 7
    bw = make_config("blockwise", SPEC, MethodOptions(act_order=False, n_grid=7))
    assert isinstance(bw, BlockwiseConfig) and bw.gptq.act_order and bw.awq.n_grid == 7  # its start is GPTQ-R
    qat = make_config("qat", SPEC, MethodOptions(a_bit=8))
    assert isinstance(qat, QATConfig) and qat.a_bit == 8 and isinstance(qat.awq, AWQConfig)  # no run-time step
    awq = steps_of(make_config("awq", SPEC, MethodOptions(a_bit=8, rotate=True)))
    assert [type(s) for s in awq] == [RotationConfig, AWQConfig, ActQuantConfig]
    assert make_config("fp", None, MethodOptions()) is None
    assert isinstance(make_config("fp", None, MethodOptions(a_bit=8)), ActQuantConfig)


def test_calibration_follows_each_config():
    assert not needs_calibration(SalientConfig(SPEC, by="weight"))
    assert needs_calibration(SalientConfig(SPEC, by="activation"))
    assert not needs_calibration(AWQConfig(SPEC, load_search="scales.safetensors"))
    assert not needs_calibration(RTNConfig(SPEC)) and needs_calibration(GPTQConfig(SPEC))
    assert needs_calibration(Pipeline((RotationConfig(), ActQuantConfig(granularity="tensor", static=True))))
    assert not needs_calibration(Pipeline((RotationConfig(), ActQuantConfig())))


def test_refusals_come_from_the_declarations():
    with pytest.raises(LowbitError, match="unknown method 'awq2'; choose from fp, rtn"):
        make_config("awq2", SPEC, MethodOptions())
    with pytest.raises(LowbitError, match="unknown method 'rotation'"):  # a step, not a --method choice
        make_config("rotation", SPEC, MethodOptions())
    mixed = SpecMap(SPEC, {"model.layers.0.mlp.down_proj": QuantSpec(bits=4, group_size=32)})
    with pytest.raises(LowbitError, match="works with rtn, awq, gptq, awq\\+gptq, smoothquant, imatrix, blockwise"):
        make_config("qat", mixed, MethodOptions())
    with pytest.raises(LowbitError, match="GGUF block type"):
        make_config("qat", QuantSpec(format="q4_0"), MethodOptions())
    with pytest.raises(TypeError, match="no quantization handler for str"):
        REGISTRY.of("awq")


def test_the_cli_the_exports_and_bench_read_the_registry():
    from lowbit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    method = {name: next(a for a in p._actions if a.dest == "method") for name, p in sub.choices.items()
              if name in ("eval", "quantize")}
    assert tuple(method["eval"].choices) == REGISTRY.names()
    assert set(method["quantize"].choices) == set(REGISTRY.names(packs=True)) | set(REGISTRY.refusals())
    for m in REGISTRY:
        if m.config is not None:
            assert getattr(lowbit, m.config.__name__) is m.config and m.config.__name__ in lowbit.__all__
