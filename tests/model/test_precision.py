"""precision=auto: never a path slower than fp32; probes cached per machine and network."""

from __future__ import annotations

import json

import pytest
import torch

from nuclick_wsi.model import precision as P
from nuclick_wsi.errors import NuclickError
from nuclick_wsi.model.architectures.s2d_unet import S2DUNet

CPU = torch.device("cpu")


def _cpu(bf16: bool, amx: bool = False):
    return lambda: {"model": "Test CPU", "capability": "AVX512" if bf16 else "AVX2", "avx512_bf16": bf16,
                    "amx": amx, "threads": 2}


@pytest.fixture
def net():
    return S2DUNet((8, 8, 8, 8)).eval()


def test_cpu_without_native_bf16_gets_fp32_without_probing(monkeypatch, net, tmp_path):
    monkeypatch.setattr(P, "cpu_description", _cpu(False))

    def probe(*a, **k):
        raise AssertionError("no probe on a CPU without native bf16")

    choice = P.choose_precision(net, CPU, "auto", patch_size=32, probe=probe, cache=tmp_path / "c.json")
    assert choice.name == "fp32" and choice.dtype is None
    assert "without native bf16" in choice.reason and "AVX2" in choice.reason


@pytest.mark.parametrize("speeds, expected", [({"fp32": 100.0, "bf16": 300.0}, "bf16"),
                                              ({"fp32": 100.0, "bf16": 14.0}, "fp32"),
                                              ({"fp32": 100.0, "bf16": 103.0}, "fp32")])
def test_auto_takes_the_measured_faster_path_and_caches_it(monkeypatch, net, tmp_path, speeds, expected):
    monkeypatch.setattr(P, "cpu_description", _cpu(True))
    calls = []

    def probe(net_, device, dtype, **k):
        name = "fp32" if dtype is None else "bf16"
        calls.append(name)
        return speeds[name]

    cache = tmp_path / "c.json"
    first = P.choose_precision(net, CPU, "auto", patch_size=32, arch_key="x", probe=probe, cache=cache)
    assert first.name == expected and first.measured == speeds
    assert sorted(calls) == ["bf16", "fp32"]
    second = P.choose_precision(net, CPU, "auto", patch_size=32, arch_key="x", probe=probe, cache=cache)
    assert second.name == expected and len(calls) == 2 and "cached" in second.reason
    # another network shape is probed again
    P.choose_precision(net, CPU, "auto", patch_size=32, arch_key="y", probe=probe, cache=cache)
    assert len(calls) == 4 and len(json.loads(cache.read_text())) == 2


def test_bf16_instructions_without_torch_avx512_kernels_get_fp32(monkeypatch, net, tmp_path):
    cpu = _cpu(True)()
    monkeypatch.setattr(P, "cpu_description", lambda: dict(cpu, capability="AVX2"))  # ATEN_CPU_CAPABILITY=avx2
    choice = P.choose_precision(net, CPU, "auto", patch_size=32, cache=tmp_path / "c.json",
                                probe=lambda *a, **k: pytest.fail("no probe"))
    assert choice.name == "fp32"


def test_unwritable_cache_still_chooses_and_says_so(monkeypatch, net, tmp_path):
    monkeypatch.setattr(P, "cpu_description", _cpu(True, amx=True))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    choice = P.choose_precision(net, CPU, "auto", patch_size=32, probe=lambda *a, **k: 10.0,
                                cache=blocker / "c.json")
    assert choice.name == "fp32" and "not writable" in choice.reason


def test_explicit_precisions_and_errors(net):
    assert P.choose_precision(net, CPU, "bf16", patch_size=32).dtype is torch.bfloat16
    assert P.choose_precision(net, CPU, "fp32", patch_size=32).reason.startswith("asked for")
    with pytest.raises(NuclickError, match="unknown precision"):
        P.choose_precision(net, CPU, "int4", patch_size=32)


def test_real_probe_measures_and_restores_training_mode():
    net = S2DUNet((8, 8, 8, 8)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    speed = P.probe_speed(net, CPU, None, patch_size=32, batch=2, repeats=1)
    assert speed > 0 and net.training
    # eval mode during the probe: BatchNorm statistics untouched
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_cpu_description_reports_what_decides():
    d = P.cpu_description()
    assert d["capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(d["avx512_bf16"], bool) and isinstance(d["amx"], bool) and d["threads"] >= 1


def test_training_on_a_gpu_with_bf16_trains_in_bf16(monkeypatch):
    """auto's fp16 on CUDA is for inference: training takes bf16 where the GPU has it, else fp16 with loss scaling."""
    from nuclick_wsi.model.precision import PrecisionChoice, for_training, grad_scaler

    fp16 = PrecisionChoice("fp16", "CUDA: fp16 autocast")
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert for_training(fp16, cuda).name == "bf16" and "loss scaling" in for_training(fp16, cuda).reason
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert for_training(fp16, cuda) is fp16
    cpu_choice = PrecisionChoice("fp32", "CPU without native bf16")
    assert for_training(cpu_choice, torch.device("cpu")) is cpu_choice
    assert grad_scaler(torch.device("cpu"), torch.bfloat16) is None and grad_scaler(torch.device("cpu"), None) is None
    scaler = grad_scaler(torch.device("cpu"), torch.float16)
    assert scaler is not None and scaler.get_scale() > 1


def test_fp16_training_scales_its_loss_and_learns():
    """The shared loop trains under fp16 autocast through the loss scaler (a gradient of 1e-8 survives it)."""
    from nuclick_wsi.training.train import optimise

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(5, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x = torch.rand(8, 5, 16, 16)
    target = (x[:, :1] > 0.5).float()
    batch = lambda: (x, lambda logits: torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target))  # noqa: E731
    first, _ = optimise(net, opt, batch, 1, torch.device("cpu"), torch.float16, lambda *a: None, 0, lambda: 0.0, None)
    later, _ = optimise(net, opt, batch, 30, torch.device("cpu"), torch.float16, lambda *a: None, 1, lambda: 0.0, None)
    assert later / 30 < first and all(torch.isfinite(p).all() for p in net.parameters())
    # what the scaler is for: a loss this small has gradients below fp16's smallest number
    tiny = lambda: (x, lambda logits: logits.float().mean() * 1e-8)  # noqa: E731
    before = [p.detach().clone() for p in net.parameters()]
    optimise(net, opt, tiny, 1, torch.device("cpu"), torch.float16, lambda *a: None, 0, lambda: 0.0, None)
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
