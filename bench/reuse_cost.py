"""What a cached rerun pays for complete keys and verified reuse, measured on a finished store.

Reports, for the params' stage keys: the key computation (first call in a process, which parses the
import graph, and a repeat), and the verification of every sealed folder those keys name (of every sealed
folder in the store when they name none): sizes only (the old check), full sha256 with no hash cache (the
first rerun after sealing elsewhere or copying a store), and sha256 through a warm
:class:`mammo_core.storage.verified_files.VerifiedFiles` (every later rerun). The store is only read: the hash
cache used here lives in a temporary folder. With ``--rerun`` it also times a whole ``mammo run`` on the
store (everything cached), for the fraction; that adds MLflow runs to the store.

Usage: python bench/reuse_cost.py --store STORE [-p params/smoke.yaml] [--rerun]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammo_core.config import load_params  # noqa: E402
from mammo_core.storage.store import ArtifactStore  # noqa: E402
from mammo_core.storage.verified_files import VerifiedFiles  # noqa: E402
from tasks import registry  # noqa: E402


def _timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("-p", "--params", type=Path, default=Path("params/smoke.yaml"))
    ap.add_argument("--rerun", action="store_true", help="also time a whole cached `mammo run`")
    args = ap.parse_args()
    params = load_params(args.params)
    keys_first_s, keys = _timed(lambda: registry.stage_keys(params))
    keys_again_s, _ = _timed(lambda: registry.stage_keys(params))
    art = ArtifactStore(args.store)
    current = [f for f in (art.find(name, key) for name, key in keys.items()) if f is not None]
    # every sealed folder of the store when the current keys name none (the code changed since it was made)
    folders = current or [f for d in sorted((art.root / "stages").glob("*/*")) if not d.name.startswith(".")
                          and (f := art.find(d.parent.name, d.name)) is not None]
    files = sum(len(f.manifest.get("files", [])) for f in folders)
    size = sum(e["size"] for f in folders for e in f.manifest.get("files", []))
    sizes_s, _ = _timed(lambda: [art.check_sizes(f) for f in folders])
    with tempfile.TemporaryDirectory() as cache_root:
        cold = VerifiedFiles(cache_root)
        cold_s, _ = _timed(lambda: [art.verify(f, sha256_of=cold.sha256) for f in folders])
        cold.save()
        warm = VerifiedFiles(cache_root)
        warm_s, _ = _timed(lambda: [art.verify(f, sha256_of=warm.sha256) for f in folders])
        assert warm.hashed == 0
    result = {
        "folders_verified": len(folders), "of_current_keys": len(current), "files": files, "bytes": size,
        "keys_first_call_s": round(keys_first_s, 3), "keys_repeat_s": round(keys_again_s, 3),
        "verify_sizes_only_s": round(sizes_s, 3), "verify_sha256_no_cache_s": round(cold_s, 3),
        "sha256_MB_per_s": round(size / 1e6 / cold_s, 1) if cold_s else None,
        "verify_sha256_warm_cache_s": round(warm_s, 3),
    }
    if args.rerun:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        rerun_s, proc = _timed(lambda: subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "-p", str(args.params), "--store", str(args.store)],
            env=env, capture_output=True, text=True))
        result["cached_rerun_s"] = round(rerun_s, 1)
        result["cached_rerun_exit"] = proc.returncode
        for name in ("keys_first_call_s", "verify_sha256_no_cache_s", "verify_sha256_warm_cache_s"):
            result[f"{name[:-2]}_fraction_of_rerun"] = round(result[name] / rerun_s, 4)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
