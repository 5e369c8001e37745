"""The compute dtype follows what the CPU does natively: bfloat16 only where it is not emulated."""
import pytest
import torch

from lowbit import hardware
from lowbit.errors import LowbitError
from lowbit.methods.blockwise import BlockwiseConfig
from lowbit.quantizer import QuantSpec

AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.mark.parametrize("text, native", [(AVX2, False), (SAPPHIRE, True), (ARM, True), ("", False)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch, text, native):
    info = tmp_path / "cpuinfo"
    info.write_text(text)
    flags = hardware.cpu_flags.__wrapped__(str(info))
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    assert hardware.fast_bf16("cpu") is native
    dtype, why = hardware.compute_dtype("auto")
    assert dtype == ("bf16" if native else "fp32") and why.startswith("auto")
    assert hardware.compute_dtype("bf16")[0] == "bf16" and hardware.compute_dtype("fp32")[0] == "fp32"


def test_missing_cpuinfo_means_no_native_bf16(tmp_path):
    assert hardware.cpu_flags.__wrapped__(str(tmp_path / "absent")) == frozenset()


def test_blockwise_trains_in_float32_without_native_bf16(monkeypatch):
    spec, cpu = QuantSpec(bits=3, group_size=8), torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert BlockwiseConfig(spec).bf16_on(cpu) is False
    assert BlockwiseConfig(spec, dtype="bf16").bf16_on(cpu) is True
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert BlockwiseConfig(spec).bf16_on(cpu) is True
    assert BlockwiseConfig(spec, dtype="fp32").bf16_on(cpu) is False
    with pytest.raises(LowbitError, match="dtype"):
        BlockwiseConfig(spec, dtype="fp16")
