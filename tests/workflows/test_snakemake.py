"""The Snakemake workflow, run for real (``--cores 2``), gives the same bytes as ``nuclick-wsi batch``."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, SUB_ENV, batch_cli, deterministic_files, leftovers, make_cohort

WORKFLOWS = ROOT / "workflows"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("snakemake") is None,
                                reason="snakemake is not installed (pip install -e .[hpc])")


def snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or shutil.which("snakemake")
    cmd = [exe] if exe else [sys.executable, "-m", "snakemake"]
    env = {**SUB_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{SUB_ENV.get('PATH', '')}"}
    return subprocess.run([*cmd, "-s", str(WORKFLOWS / "Snakefile"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_workflow_matches_batch(tmp_path):
    manifest = make_cohort(tmp_path / "cohort", n=2, clicks=5)
    out = tmp_path / "smk-out"
    config = ["--config", f"manifest={manifest}", f"outdir={out}", "threads=1"]
    run = snakemake("--cores", "2", *config, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    ref = batch_cli(manifest, tmp_path / "batch-out")
    assert ref.returncode == 0, ref.stderr
    smk = deterministic_files(out)
    assert smk == deterministic_files(tmp_path / "batch-out")
    assert {"s0.geojson", "s1.geojson", "s0.labels.zarr/.zattrs"} <= set(smk)
    assert leftovers(out) == []
    summary = (out / "batch-summary.csv").read_text().splitlines()
    assert [line.split(",")[:2] for line in summary[1:]] == [["s0", "complete"], ["s1", "complete"]]
    # nothing left to do: a second run is a no-op
    again = snakemake("--cores", "2", *config, cwd=tmp_path)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_bad_manifest_stops_the_workflow_before_any_job(tmp_path):
    make_cohort(tmp_path, n=1, weights=False)
    (tmp_path / "bad.csv").write_text("slide,points\nslides/s0.tif,clicks/none.csv\nslides/none.tif,clicks/s0.csv\n")
    res = snakemake("-n", "--cores", "1", "--config", f"manifest={tmp_path / 'bad.csv'}", f"outdir={tmp_path / 'o'}",
                    cwd=tmp_path)
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "line 2" in text and "line 3" in text


def test_slurm_profile_and_array_script():
    import yaml

    profile = yaml.safe_load((WORKFLOWS / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    res = profile["set-resources"]["segment"]
    assert {"slurm_partition", "runtime", "mem_mb", "gpu"} <= set(res) | set(profile["default-resources"])
    script = (WORKFLOWS / "slurm" / "array.sbatch").read_text()
    assert "SLURM_ARRAY_TASK_ID" in script and "--task-index" in script
    assert subprocess.run(["bash", "-n", str(WORKFLOWS / "slurm" / "array.sbatch")]).returncode == 0


def test_proposals_target_runs_propose_per_row(tmp_path):
    import torch

    from nuclick_wsi.io.annotations import read_prompts
    from nuclick_wsi.model.weights import build_network, save_checkpoint

    manifest = make_cohort(tmp_path / "cohort", n=2, clicks=5)
    torch.manual_seed(0)
    det = tmp_path / "det.pt"  # an untrained detector: the target's plumbing, not its quality, is tested
    save_checkpoint(det, build_network("s2d-detector", {"widths": [8, 16, 32]}), "s2d-detector", {"widths": [8, 16, 32]},
                    {"task": "detect", "mpp": 0.5, "patch_size": 256, "postprocess": {"threshold": 0.0}})
    out = tmp_path / "smk-out"
    run = snakemake("--cores", "2", "--config", f"manifest={manifest}", f"outdir={out}", "threads=1",
                    f"detector_weights={det}", "--", "proposals", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    for stem in ("s0", "s1"):
        prompts = read_prompts(out / "proposals" / f"{stem}.proposals.geojson")
        assert prompts.format == "qupath" and all(c.class_name == "Proposed" for c in prompts.clicks)
    assert not (out / "batch-summary.csv").exists()  # `all` (segment) was not run


def test_slurm_profile_suggests_only_what_the_slurm_plugin_accepts():
    """The profile's comments suggested slurm_extra: "'--gres=gpu:1'", which the installed SLURM executor
    plugin refuses (it manages --gres/--gpus itself): every slurm_extra the profile shows must pass its check."""
    import re
    from types import SimpleNamespace

    validation = pytest.importorskip("snakemake_executor_plugin_slurm.validation")
    text = (WORKFLOWS / "profiles" / "slurm" / "config.yaml").read_text()
    for extra in re.findall(r"slurm_extra:\s*\"([^\"]*)\"", text):
        validation.validate_slurm_extra(SimpleNamespace(resources=SimpleNamespace(slurm_extra=extra.strip("'"))))
