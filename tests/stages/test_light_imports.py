"""A cached rerun computes every stage's key and reuses every folder: it must not import what only training needs.

Why a test: the registry imports every stage module, and one module-level ``import torch`` (or a helper
module that has one) puts torch, torchvision's detection ops (and through them torch._dynamo), scikit-learn,
OpenCV and matplotlib back on the path of every ``mammo`` command: 7 of a cached rerun's 11 s on two cores.
A fresh interpreter imports what ``mammo run`` imports before its first stage and computes the keys.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers.paths import REPO, SMOKE

HEAVY = ("torch", "torchvision", "sklearn", "scipy.stats", "cv2", "matplotlib", "h5py", "skops", "numba", "pydicom")

SNIPPET = f"""
import json, sys
import flows.cli, flows.pipeline, flows.reuse_check, tasks.run_tracking
from mammo_core.config import load_params
from tasks import registry
weights = ["train.weights=imagenet", "baselines.weights=imagenet", "detect.r50_weights=coco"]
keys = registry.stage_keys(load_params({str(SMOKE)!r}, weights))
print(json.dumps({{"stages": len(keys), "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def test_the_cli_and_every_stage_key_load_no_training_library() -> None:
    out = subprocess.run([sys.executable, "-c", SNIPPET], cwd=REPO, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["stages"] == 11
    assert found["heavy"] == []
