"""What every benchmark shares: where results go and what they ran on. Scripts run from the repository root
(``python benchmarks/<name>.py``); this folder is then on ``sys.path``, so ``import common`` works."""

from __future__ import annotations

from pathlib import Path

from densepr.machine import machine_info

RESULTS = Path(__file__).parent / "results"


__all__ = ["RESULTS", "machine_info"]
