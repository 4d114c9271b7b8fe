"""The inference runtime: OpenVINO gives PyTorch's probabilities, auto keeps the faster, errors are clear."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nuclick_wsi.model.runtime as R
from nuclick_wsi.errors import NuclickError
from nuclick_wsi.model.precision import PrecisionChoice
from nuclick_wsi.model.predictor import Predictor
from nuclick_wsi.model.weights import LoadedModel, build_network

CPU = torch.device("cpu")
FP32 = PrecisionChoice("fp32", "test")
pytestmark = pytest.mark.skipif(R.openvino_version() is None, reason="OpenVINO is a core dependency; not installed here")


def small_model(seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    net = build_network("s2d-unet", {"widths": [8, 16, 32, 64]})
    for m in net.modules():  # non-trivial batch-norm statistics, so eval mode matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return LoadedModel(net.eval(), "s2d-unet", {"widths": [8, 16, 32, 64]},
                       {"task": "nuclei", "mpp": 0.25, "patch_size": 64})


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("NUCLICK_WSI_RUNTIME", raising=False)


def test_openvino_gives_pytorchs_probabilities(tmp_path):
    model = small_model()
    x = np.random.default_rng(0).random((6, 5, 64, 64), dtype=np.float32)
    ov = Predictor(model, "cpu", "fp32", runtime="openvino")
    pt = Predictor(small_model(), "cpu", "fp32", runtime="torch")
    assert ov.runtime.name == "openvino" and "openvino" in ov.description
    np.testing.assert_allclose(ov(x), pt(x), atol=1e-4)
    # the batch size does not change a patch's result
    np.testing.assert_allclose(ov(x[:2]), ov(x)[:2], atol=1e-6)
    # tta goes through the compiled network too
    tta = Predictor(small_model(), "cpu", "fp32", runtime="openvino", tta=True)
    np.testing.assert_allclose(tta(x), Predictor(small_model(), "cpu", "fp32", runtime="torch", tta=True)(x), atol=1e-4)


def test_converted_network_is_cached_on_disk(tmp_path):
    net = small_model().net
    R.OpenVinoNet(net, patch_size=64, cache_dir=tmp_path)
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".bin", ".xml"]
    stamp = next(tmp_path.glob("*.xml")).stat().st_mtime_ns
    R.OpenVinoNet(net, patch_size=64, cache_dir=tmp_path)  # read back, not converted again
    assert next(tmp_path.glob("*.xml")).stat().st_mtime_ns == stamp
    R.OpenVinoNet(small_model(seed=1).net, patch_size=64, cache_dir=tmp_path)  # other weights: another file
    assert len(list(tmp_path.glob("*.xml"))) == 2


def test_auto_keeps_the_faster_runtime_and_caches_the_probe(tmp_path, no_env):
    net = small_model().net

    def ov_fast(fn, x):
        return 200.0 if isinstance(fn, R.OpenVinoNet) else 100.0

    def ov_marginal(fn, x):
        return 103.0 if isinstance(fn, R.OpenVinoNet) else 100.0

    cache = tmp_path / "c.json"
    first = R.choose_runtime(net, CPU, "auto", precision=FP32, arch="s2d-unet", patch_size=64, cache=cache,
                             probe=ov_fast)
    assert first.name == "openvino" and first.measured == {"torch": 100.0, "openvino": 200.0}
    assert isinstance(first.engine, R.OpenVinoNet) and "OpenVINO" in first.reason
    again = R.choose_runtime(net, CPU, "auto", precision=FP32, arch="s2d-unet", patch_size=64, cache=cache,
                             probe=lambda fn, x: pytest.fail("probed again"))
    assert again.name == "openvino" and again.reason.endswith("(cached probe)") and again.engine is not None
    slow = R.choose_runtime(net, CPU, "auto", precision=FP32, arch="s2d-unet", patch_size=64,
                            cache=tmp_path / "d.json", probe=ov_marginal)
    assert slow.name == "torch" and slow.engine is None  # under 5 % is not worth a second runtime


def test_auto_without_openvino_or_off_the_list_stays_on_pytorch(monkeypatch, no_env):
    net = small_model().net
    other = R.choose_runtime(net, CPU, "auto", precision=FP32, arch="test-disk", patch_size=64)
    assert other.name == "torch" and "not tried for test-disk" in other.reason
    monkeypatch.setattr(R, "openvino_version", lambda: None)
    missing = R.choose_runtime(net, CPU, "auto", precision=FP32, arch="s2d-unet", patch_size=64)
    assert missing.name == "torch" and "not installed" in missing.reason
    with pytest.raises(NuclickError, match="openvino package is not installed"):
        R.choose_runtime(net, CPU, "openvino", precision=FP32, arch="s2d-unet", patch_size=64)


def test_conversion_failure_is_said(monkeypatch, tmp_path, no_env):
    def broken(*a, **k):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(R, "OpenVinoNet", broken)
    choice = R.choose_runtime(small_model().net, CPU, "auto", precision=FP32, arch="s2d-unet", patch_size=64,
                              cache=tmp_path / "c.json")
    assert choice.name == "torch" and "could not convert s2d-unet: RuntimeError" in choice.reason


def test_environment_and_bad_requests(monkeypatch):
    net = small_model().net
    monkeypatch.setenv("NUCLICK_WSI_RUNTIME", "torch")
    assert R.choose_runtime(net, CPU, "auto", precision=FP32, arch="s2d-unet", patch_size=64).reason == \
        "NUCLICK_WSI_RUNTIME=torch"
    with pytest.raises(NuclickError, match="unknown runtime 'onnx'"):
        R.choose_runtime(net, CPU, "onnx", precision=FP32, arch="s2d-unet", patch_size=64)
    with pytest.raises(NuclickError, match="fp32 or bf16, not cpu fp16"):
        R.choose_runtime(net, CPU, "openvino", precision=PrecisionChoice("fp16", "x"), arch="s2d-unet", patch_size=64)


def test_openvino_predictor_serves_threads_at_once(tmp_path):
    """batch --slides-in-flight 2 shares one Predictor between two slides' threads: the single OpenVINO
    infer request failed one slide with 'RuntimeError: Infer Request is busy'."""
    from concurrent.futures import ThreadPoolExecutor

    ov = R.OpenVinoNet(small_model().net, patch_size=64, cache_dir=tmp_path)
    xs = [np.random.default_rng(k).random((4, 5, 64, 64), dtype=np.float32) for k in range(4)]
    alone = [ov(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            together = list(pool.map(ov, xs))
            for a, b in zip(alone, together):
                np.testing.assert_array_equal(a, b)
