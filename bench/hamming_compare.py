"""Hamming k-NN of an earlier revision and of this tree, side by side in one process on one core.

``bench/hamming.py`` measures one version; on a shared machine two runs of it minutes apart do not see
the same load. This runs both versions of ``mammo_core/codes/retrieval.py`` (the revision's, read with
``git show``, and the working tree's) on the same codes and queries, in interleaved rounds, and prints
per-query milliseconds (wall and CPU), the batched figures and each version's ratio to the same
copy-bandwidth bound: over the packed codes (6 bytes per 48-bit code, what ``bench/hamming.py`` now uses)
and over one uint64 word per code (8 bytes, what it used before the byte planes). Medians over rounds.
Every answer is checked equal between versions and between the single and batched modes.

Prints one JSON line. Usage: python bench/hamming_compare.py [--before 6988ebb] [--rounds 5]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, before numpy loads
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mammo_core.codes import retrieval  # noqa: E402


def module_at(revision: str, tmp: Path):
    """``mammo_core/codes/retrieval.py`` as it was at ``revision``, imported under another name."""
    source = subprocess.run(["git", "show", f"{revision}:mammo_core/codes/retrieval.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = tmp / "retrieval_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("retrieval_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--before", default="6988ebb", help="git revision to compare against")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=64)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"before": module_at(args.before, Path(tmp)), "after": retrieval}
    rng = np.random.default_rng(0)
    db = retrieval.pack_codes(rng.integers(0, 2, size=(args.n, 48), dtype=np.uint8))
    queries = retrieval.pack_codes(rng.integers(0, 2, size=(args.queries, 48), dtype=np.uint8))
    indexes = {name: module.HammingIndex.from_packed(db) for name, module in versions.items()}
    clocks = (time.perf_counter, time.thread_time)

    def timed(call):
        starts = [clock() for clock in clocks]
        result = call()
        return result, np.array([clock() - start for clock, start in zip(clocks, starts, strict=True)])

    src = np.ones(256 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # page the destination in
    for name, module in versions.items():
        module.knn(queries[0], indexes[name], args.k)  # warm-up
    single = {name: [] for name in versions}
    batched = {name: [] for name in versions}
    bandwidth = []
    reference = None
    for _ in range(args.rounds):
        bandwidth.append(src.nbytes / timed(lambda: np.copyto(dst, src))[1])
        for name, module in versions.items():
            answers, times = [], []
            for query in queries:
                answer, took = timed(lambda q=query, m=module, i=indexes[name]: m.knn(q, i, args.k))
                answers.append(answer)
                times.append(took)
            single[name].append(np.median(times, axis=0))
            (idx, dist), took = timed(lambda m=module, i=indexes[name]: m.knn_batch(queries, i, args.k))
            batched[name].append(took / args.queries)
            pairs = zip(answers, idx, dist, strict=True)
            if not all(np.array_equal(a[0], i) and np.array_equal(a[1], d) for a, i, d in pairs):
                raise SystemExit(f"{name}: batched and one-at-a-time searches disagree")
            reference = (idx, dist) if reference is None else reference
            if not (np.array_equal(reference[0], idx) and np.array_equal(reference[1], dist)):
                raise SystemExit("the two versions disagree")
    bandwidth = np.array(bandwidth)
    out = {"bench": "hamming_compare", "before": args.before, "rounds": args.rounds, "n_codes": args.n,
           "k": args.k, "queries": args.queries,
           "copy_bandwidth_gb_per_s": {c: round(float(np.median(bandwidth[:, j])) / 1e9, 2)
                                       for j, c in enumerate(("wall", "cpu"))}}
    for name in versions:
        s, b = np.array(single[name]), np.array(batched[name])
        for j, clock in enumerate(("wall", "cpu")):
            bound_ms = {width: 1e3 * width * args.n / bandwidth[:, j] for width in (6, 8)}
            out[f"{name}_{clock}"] = {
                "ms_per_query": round(float(np.median(s[:, j])) * 1e3, 3),
                "batched_ms_per_query": round(float(np.median(b[:, j])) * 1e3, 3),
                "batched_speedup": round(float(np.median(s[:, j] / b[:, j])), 2),
                "ratio_to_bound_6_bytes": round(float(np.median(1e3 * s[:, j] / bound_ms[6])), 2),
                "ratio_to_bound_8_bytes": round(float(np.median(1e3 * s[:, j] / bound_ms[8])), 2),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
