"""train/flops.py: the spec-peak table MFU on a GPU/TPU is quoted against, and the warmed matmul
measurement beside it (no timing is asserted)."""

import pytest

from train import flops


@pytest.mark.parametrize("kind,tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312),
    ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5e", 197), ("TPU v5", 459), ("TPU v5p", 459),
    ("TPU v6 lite", 918),
])
def test_spec_peak_by_device_kind(kind, tflops):
    peak, source = flops.spec_peak(kind, "bfloat16")
    assert peak == tflops * 1e12
    assert "TFLOPS" in source  # every figure names its sheet


@pytest.mark.parametrize("kind", ["cpu", "TPU v4 lite", "NVIDIA RTX A1000", "NVIDIA L4", "TPU7x", "TPU v5 litex"])
def test_spec_peak_unknown_chip_is_none(kind):
    assert flops.spec_peak(kind) is None


def test_spec_peak_only_for_half_precision():
    assert flops.spec_peak("NVIDIA H100 80GB HBM3", "float16")[0] == 989e12
    assert flops.spec_peak("NVIDIA H100 80GB HBM3", "float32") is None


def test_matmul_samples_count_and_validation():
    samples = flops.matmul_flops_samples("float32", (64, 64, 64), warmup=2, repeats=3)
    assert len(samples) == 3 and all(s > 0 for s in samples)
    with pytest.raises(ValueError, match="warmup=0"):
        flops.matmul_flops_samples("float32", (8, 8, 8), warmup=0)
