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
