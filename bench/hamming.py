"""Hamming k-NN over 1,000,000 random 48-bit codes on one core, next to the memory-bandwidth lower bound.

The 48-bit codes are packed into 6 bytes and laid out once as one zero-padded uint64 word per row
(``retrieval.HammingIndex``); a query XORs, popcounts and selects the k nearest with stable ties. The bound
is the bytes one query must read (the uint64 words) divided by the measured copy bandwidth of a large array
on this machine (bytes read per second by ``np.copyto``), so ``ms_per_query / bound_ms`` says how far the
search is from streaming the database once.

Prints one JSON line. Usage: python bench/hamming.py [--n 1000000] [--bits 48] [--k 10] [--queries 50]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, before numpy loads
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammo_core import retrieval  # noqa: E402


def pin_to_one_core() -> int | None:
    """Pin the process to one CPU where the OS allows it; returns the core or None."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def copy_bandwidth_bytes_per_s(n_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes read per second when copying a large array (best of ``repeats``; a read+write stream)."""
    src = np.ones(n_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return n_bytes / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--bits", type=int, default=48)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    core = pin_to_one_core()
    rng = np.random.default_rng(args.seed)
    db_packed = retrieval.pack_codes(rng.integers(0, 2, size=(args.n, args.bits), dtype=np.uint8))
    queries = retrieval.pack_codes(rng.integers(0, 2, size=(args.queries, args.bits), dtype=np.uint8))
    index = retrieval.HammingIndex.from_packed(db_packed)
    retrieval.knn(queries[0], index, args.k)  # warm-up: page in the database
    times = []
    for query in queries:
        start = time.perf_counter()
        retrieval.knn(query, index, args.k)
        times.append(time.perf_counter() - start)
    bandwidth = copy_bandwidth_bytes_per_s()
    bytes_per_query = index.words.nbytes
    print(json.dumps({
        "bench": "hamming",
        "n_codes": args.n,
        "bits": args.bits,
        "k": args.k,
        "queries": args.queries,
        "core": core,
        "popcount": "np.bitwise_count" if hasattr(np, "bitwise_count") else "lookup table",
        "ms_per_query": round(1e3 * float(np.median(times)), 3),
        "ms_per_query_p90": round(1e3 * float(np.quantile(times, 0.9)), 3),
        "bytes_scanned_per_query": bytes_per_query,
        "copy_bandwidth_gb_per_s": round(bandwidth / 1e9, 2),
        "bandwidth_bound_ms": round(1e3 * bytes_per_query / bandwidth, 3),
        "goal_ms": 10.0,
    }))


if __name__ == "__main__":
    main()
