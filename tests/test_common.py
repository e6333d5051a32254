"""toolkit/common.py: the GPU facts a run on CUDA depends on, decided from names and capabilities alone."""
import pytest

from toolkit import common
from toolkit.common import gpu_peak_flops, native_bf16


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181e12),
    ("NVIDIA L4", 121e12),
    ("Tesla V100-SXM2-16GB", 125e12),
])
def test_the_peak_flops_of_a_gpu_come_from_the_row_of_its_own_variant(name, peak):
    assert gpu_peak_flops(name) == peak


@pytest.mark.parametrize("name", ["NVIDIA GH200 480GB", "NVIDIA B200", "NVIDIA A10G", "NVIDIA L400"])
def test_a_gpu_no_row_names_gets_no_peak_rather_than_a_relatives(name):
    assert gpu_peak_flops(name) is None


@pytest.mark.parametrize("capability, native", [((7, 0), False), ((7, 5), False), ((8, 0), True),
                                                ((8, 9), True), ((9, 0), True)])
def test_bf16_counts_as_native_from_ampere_on(capability, native):
    assert native_bf16(capability) == native


def test_load_model_reads_the_checkpoint_onto_the_cpu_whatever_the_target_device(tiny_runs, monkeypatch):
    devices = []
    real = common.load_checkpoint
    monkeypatch.setattr(common, "load_checkpoint", lambda path, device: devices.append(device) or real(path, device))
    common.load_model(str(tiny_runs / "topk"), "cpu:0")
    assert devices == ["cpu"]
