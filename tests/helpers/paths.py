"""Where the repository and its params files are, for tests that start `mammo` or read repository files."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "params" / "smoke.yaml"
