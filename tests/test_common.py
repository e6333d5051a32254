"""toolkit/common.py: the GPU facts a run on CUDA depends on, decided from names and capabilities alone,
and the table of device facts (CUDA, Apple's MPS, the CPU) that train.py takes its settings from."""
import pytest
import torch

from conftest import TRAIN, main_of
from toolkit import common
from toolkit.common import gpu_peak_flops, native_bf16


# NVIDIA's datasheets, not the table: the dense bf16 tensor-core figure in TFLOPS (fp16 for the
# V100), as printed, or half the "with sparsity" figure where that is the one printed. The names are
# as torch.cuda.get_device_name spells them.
@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 1979 / 2),    # H100 SXM: BF16 1,979 TFLOPS with sparsity
    ("NVIDIA H100 PCIe", 1513 / 2),         # H100 PCIe: 1,513 with sparsity
    ("NVIDIA H100 NVL", 1671 / 2),          # H100 NVL: 1,671 with sparsity
    ("NVIDIA H200", 1979 / 2),              # H200 SXM: 1,979 with sparsity
    ("NVIDIA H200 NVL", 1671 / 2),          # H200 NVL: 1,671 with sparsity
    ("NVIDIA A100-SXM4-40GB", 312),         # A100: BF16 312 TFLOPS, 624 with sparsity
    ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA L40S", 362.05),                # L40S: 362.05, 733 with sparsity
    ("NVIDIA L40", 181.05),                 # L40: 181.05, 362.1 with sparsity
    ("NVIDIA A10", 125),                    # A10: 125, 250 with sparsity
    ("NVIDIA L4", 242 / 2),                 # L4: 242 with sparsity
    ("Tesla V100-SXM2-16GB", 125),          # V100 SXM2: tensor performance 125 TFLOPS
    ("Tesla V100-PCIE-16GB", 112),          # V100 PCIe: tensor performance 112 TFLOPS
])
def test_a_gpus_peak_is_its_datasheets_dense_bf16_figure(name, tflops):
    assert gpu_peak_flops(name) == pytest.approx(tflops * 1e12, rel=2e-3)


def test_torchs_spellings_of_one_gpu_find_the_same_peak():
    peaks = {gpu_peak_flops(n) for n in ("NVIDIA A100-SXM4-80GB", "nvidia a100 sxm4 80gb", "NVIDIA_A100_SXM4_80GB")}
    assert len(peaks) == 1 and None not in peaks


@pytest.mark.parametrize("names", [("NVIDIA L4", "NVIDIA L40", "NVIDIA L40S"), ("NVIDIA A10", "NVIDIA A100-SXM4-40GB"),
                                   ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL")])
def test_a_name_inside_another_or_a_variant_of_a_family_gets_a_peak_of_its_own(names):
    assert len({gpu_peak_flops(n) for n in names}) == len(names)


@pytest.mark.parametrize("name", ["NVIDIA GH200 480GB", "NVIDIA B200", "NVIDIA A10G", "NVIDIA L400"])
def test_a_gpu_no_row_names_gets_no_peak_rather_than_a_relatives(name):
    assert gpu_peak_flops(name) is None


def test_the_peak_of_a_cuda_device_is_that_of_the_gpu_torch_names_there(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: asked.append(d) or "NVIDIA A100-SXM4-40GB")
    assert common.peak_flops("cuda:1") == pytest.approx(312e12, rel=2e-3) and asked == ["cuda:1"]


def test_the_cpu_has_no_peak_and_cuda_is_not_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: pytest.fail("asked cuda for the CPU's name"))
    assert common.peak_flops("cpu") is None


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


def machine(monkeypatch, cuda, mps):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, chosen", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_takes_cuda_then_apples_mps_then_the_cpu(monkeypatch, cuda, mps, chosen):
    machine(monkeypatch, cuda, mps)
    assert common.resolve_device("auto") == chosen


def test_on_mps_auto_is_float32_and_both_half_precisions_are_taken(monkeypatch):
    machine(monkeypatch, False, True)
    assert common.resolve_dtype("auto", "mps") == "float32"
    assert [common.resolve_dtype(d, "mps") for d in ("bfloat16", "float16")] == ["bfloat16", "float16"]
    with pytest.raises(SystemExit, match=r"--dtype=float16 is not supported on cpu; use float32 or bfloat16"):
        common.resolve_dtype("float16", "cpu")


@pytest.mark.parametrize("device", ["mps", "cuda:1"])
def test_a_device_torch_does_not_find_is_refused_in_one_line(monkeypatch, device):
    machine(monkeypatch, False, False)
    with pytest.raises(SystemExit, match=rf"--device={device}, but torch finds no such device here"):
        common.resolve_device(device)


def test_train_py_takes_its_settings_from_the_devices_row(data, tmp_path, monkeypatch):
    # the CPU given MPS's row: train.py then steps with fused AdamW and scales float16 losses, as on a Mac
    kernels = []
    for name in ("_fused_adamw_", "_amp_foreach_non_finite_check_and_unscale_"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _n=name, _r=real, **k: kernels.append(_n) or _r(*a, **k))
    flags = [*TRAIN, f"--data_dir={data}", "--max_iters=2", "--eval_interval=2", "--ckpt_interval=0"]
    main_of("train.py", *flags, f"--out_dir={tmp_path / 'cpu'}", "--dtype=float32")
    assert kernels == []  # the CPU's own row: no fused AdamW, no loss scaling
    monkeypatch.setitem(common.DEVICES, "cpu", common.DEVICES["mps"])
    log = main_of("train.py", *flags, f"--out_dir={tmp_path / 'mps'}", "--dtype=float16")
    assert kernels.count("_fused_adamw_") == 2 * 2  # 2 steps of 2 parameter groups (decayed or not)
    assert kernels.count("_amp_foreach_non_finite_check_and_unscale_") == 2  # the GradScaler, at every step
    assert "step 2:" in log
