"""Issue 12 case 4: duplicate clicks in O(n) memory, with the rule ``segment`` always had."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from nuclick_wsi.guidance.duplicates import duplicate_of


def _old_rule(xs, ys, r):
    """The duplicate rule segment always had (every pair within r; later of an unmarked pair)."""
    of = np.full(len(xs), -1)
    for i, j in sorted(cKDTree(np.stack([xs, ys], 1)).query_pairs(r)):
        if of[i] < 0 and of[j] < 0:
            of[j] = i
    return of


def test_duplicates_match_the_old_rule_on_random_clicks():
    rng = np.random.default_rng(12)
    for t in range(200):
        n = int(rng.integers(0, 300))
        span = float(rng.choice([4, 30, 500]))
        xs, ys = rng.uniform(0, span, n), rng.uniform(0, span, n)
        if t % 3 == 0:
            xs, ys = np.round(xs), np.round(ys)  # distances exactly at the radius
        r = float(rng.choice([0.7, 2.0, 3.5]))
        np.testing.assert_array_equal(duplicate_of(xs, ys, r), _old_rule(xs, ys, r))


_CROWD = """
import resource, sys, numpy as np
from types import SimpleNamespace
from nuclick_wsi.guidance.clicks import check_clicks
from nuclick_wsi.records import Click, Prompts
n = int(sys.argv[1])
prompts = Prompts(clicks=[Click(x=50.0, y=50.0) for _ in range(n)])
slide = SimpleNamespace(width=1000, height=1000)
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))  # 1 GiB more, at most
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
reasons = check_clicks(prompts, slide, 2.0)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(sum(r is None for r in reasons), sum(r is not None and r.startswith("duplicate (of click 0") for r in reasons), grew)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc needed to bound memory")
def test_many_clicks_at_one_spot_fit_in_memory():
    n = 20_000  # 2 * 10^8 pairs: tens of GB as a pair list
    res = subprocess.run([sys.executable, "-c", _CROWD, str(n)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    kept, dup, grew_kib = map(int, res.stdout.split())
    assert (kept, dup) == (1, n - 1)
    assert grew_kib < 200 * 1024
