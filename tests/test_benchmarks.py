"""The prepared GPU script runs end to end at toy sizes on a CPU, so the one device run it gets works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks"


def test_gpu_script_runs_every_measurement_at_tiny_sizes(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "gpu.py", "--tiny", "--device", "cpu", "--out", str(out)], cwd=BENCH,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["tiny"] and res["device"] == "cpu"
    assert res["encode"]["passages"] == 64 and res["encode"]["passages_per_s"] > 0
    assert [s["vectors"] for s in res["search"]] == [2000, 5000] and all(s["questions_per_s"] > 0 for s in res["search"])
    assert res["train"]["batch_size"] == 8 and res["train"]["questions_per_s"] > 0
    assert res["reader"]["passages"] == 10 and res["reader"]["median_ms"] > 0


def test_torch_topk_is_exact():
    import numpy as np
    import torch

    from densepr.index.dense import torch_topk

    rng = np.random.default_rng(0)
    x, q = rng.standard_normal((1000, 16)).astype(np.float32), rng.standard_normal((5, 16)).astype(np.float32)
    sc, ix = torch_topk(q, 10, [torch.from_numpy(x[:300]), torch.from_numpy(x[300:])], block=128)
    want = np.argsort(-(q @ x.T), axis=1)[:, :10]
    assert np.array_equal(ix, want) and np.allclose(sc, np.take_along_axis(q @ x.T, want, 1), atol=1e-5)
