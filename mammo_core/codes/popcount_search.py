"""Compiled top-k Hamming search over byte planes: one streaming pass, distances never leave the cache.

Why compiled: numpy's XOR + ``bitwise_count`` + add over the planes, then a separate selection pass,
writes and re-reads a million-byte distance row per plane and per step. On an AVX2 core that kept one
query at ~3x the memory-bandwidth bound of reading the codes once (issue 18, goal 4), whatever the
layout. Numba (LLVM) turns the loops below into vectorised byte popcounts, and the selection runs on
each chunk while its distances are still in L1, so a query reads each code once and little else.

The search (:func:`knn_planes`) walks the database in chunks of rows. Per query and chunk it computes
the chunk's distances (three planes per pass, accumulated in a chunk-sized buffer), then counts, with one
vectorised compare, the rows strictly below the query's current cutoff. Only when some are does it look
at them one by one, appending (row, distance) to the query's candidates and counting them per distance.
The cutoff is the smallest distance d with at least k candidates at or below d; a later row at distance
d has a larger index than those already kept, so with ties broken by index it can never enter the top k,
hence "strictly below". After the first chunk the cutoff is tight, and on real and random codes alike
almost every chunk is dismissed by the vectorised count. Candidate lists are compacted back to exactly k
rows when full, so memory is k + chunk rows per query.

Ranking contract (the same as :mod:`mammo_core.codes.retrieval`'s): by distance, ties by database index.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# Rows per chunk: the chunk's planes (6 x 2048 bytes for 48-bit codes) plus two distance rows stay in a
# core's 32 KiB L1 while every query of a batch is scored against them.
CHUNK_ROWS = 2048


@intrinsic
def _popcount8(typingctx, byte):
    """LLVM's ``ctpop`` on the low byte of an integer: vectorised by LLVM (a table lookup in SIMD registers
    on AVX2). Any integer type is taken because numba widens ``uint8 ^ uint8`` to a machine-size integer."""
    if not isinstance(byte, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if byte.bitwidth > 8:
            value = builder.trunc(value, ir.IntType(8))
        return builder.ctpop(value)

    return types.uint8(byte), codegen


@njit(boundscheck=False, nogil=True, cache=True)
def _chunk_distances(planes, query, start, stop, out):
    """``out[:stop - start]`` = distances from ``query`` (n_bytes,) to rows ``start:stop`` of ``planes``.

    Slices rather than ``planes[j, start + i]``: a non-negative loop index is what lets numba drop its
    negative-index check, without which LLVM does not vectorise the loop (10x slower).
    """
    n_bytes = planes.shape[0]
    rows = stop - start
    for i in range(rows):
        out[i] = 0
    j = 0
    while j + 3 <= n_bytes:  # three planes per pass: a third of the read-modify-writes of ``out``
        a = planes[j, start:stop]
        b = planes[j + 1, start:stop]
        c = planes[j + 2, start:stop]
        qa, qb, qc = query[j], query[j + 1], query[j + 2]
        for i in range(rows):
            out[i] += _popcount8(a[i] ^ qa) + _popcount8(b[i] ^ qb) + _popcount8(c[i] ^ qc)
        j += 3
    while j < n_bytes:
        a = planes[j, start:stop]
        qa = query[j]
        for i in range(rows):
            out[i] += _popcount8(a[i] ^ qa)
        j += 1


@njit(boundscheck=False, nogil=True, cache=True)
def _chunk_distances_pair(planes, query, other, start, stop, out, other_out):
    """:func:`_chunk_distances` for two queries in one pass: each plane byte is loaded once for both."""
    n_bytes = planes.shape[0]
    rows = stop - start
    for i in range(rows):
        out[i] = 0
        other_out[i] = 0
    j = 0
    while j + 3 <= n_bytes:
        a = planes[j, start:stop]
        b = planes[j + 1, start:stop]
        c = planes[j + 2, start:stop]
        qa, qb, qc = query[j], query[j + 1], query[j + 2]
        oa, ob, oc = other[j], other[j + 1], other[j + 2]
        for i in range(rows):
            x, y, z = a[i], b[i], c[i]
            out[i] += _popcount8(x ^ qa) + _popcount8(y ^ qb) + _popcount8(z ^ qc)
            other_out[i] += _popcount8(x ^ oa) + _popcount8(y ^ ob) + _popcount8(z ^ oc)
        j += 3
    while j < n_bytes:
        a = planes[j, start:stop]
        qa, oa = query[j], other[j]
        for i in range(rows):
            out[i] += _popcount8(a[i] ^ qa)
            other_out[i] += _popcount8(a[i] ^ oa)
        j += 1


@njit(boundscheck=False, nogil=True, cache=True)
def _count_below(dist, rows, limit):
    """Rows among the first ``rows`` of ``dist`` with a distance below ``limit`` (a vectorised count)."""
    count = 0
    for i in range(rows):
        count += dist[i] < limit
    return count


@njit(boundscheck=False, nogil=True, cache=True)
def _cutoff(per_distance, k):
    """(d, candidates below d): the smallest distance d with at least k candidates at or below it, or
    (-1, all candidates) while there are fewer than k."""
    below = 0
    for d in range(per_distance.shape[0]):
        if below + per_distance[d] >= k:
            return d, below
        below += per_distance[d]
    return -1, below


@njit(boundscheck=False, nogil=True, cache=True)
def _compact(rows, dists, filled, per_distance, k):
    """Keep the k best candidates in place (all below the cutoff, then the first ties at it); returns k or fewer."""
    cutoff, below = _cutoff(per_distance, k)
    if cutoff < 0:  # fewer than k candidates: all of them stay
        return filled
    ties_wanted = k - below
    kept = 0
    for r in range(filled):
        d = dists[r]
        if d < cutoff or (d == cutoff and ties_wanted > 0):
            if d == cutoff:
                ties_wanted -= 1
            rows[kept] = rows[r]
            dists[kept] = d
            kept += 1
    per_distance[:] = 0
    for r in range(kept):
        per_distance[dists[r]] += 1
    return kept


@njit(boundscheck=False, nogil=True, cache=True)
def _take(dist, rows, start, k, q, cand_rows, cand_dists, filled, per_distance, limit):
    """Add query q's rows of this chunk that can still enter its top k to its candidates; tighten its cutoff."""
    lim = limit[q]
    if _count_below(dist, rows, lim) == 0:
        return
    capacity = cand_rows.shape[1]
    f = filled[q]
    if f + rows > capacity:
        f = _compact(cand_rows[q], cand_dists[q], f, per_distance[q], k)
    for i in range(rows):
        if dist[i] < lim:
            cand_rows[q, f] = start + i
            cand_dists[q, f] = dist[i]
            per_distance[q, dist[i]] += 1
            f += 1
    filled[q] = f
    cutoff, _ = _cutoff(per_distance[q], k)
    if cutoff >= 0:
        limit[q] = cutoff


@njit(boundscheck=False, nogil=True, cache=True)
def _knn(planes, queries, k, chunk_rows, dist_dtype_sample):
    n_bytes, n = planes.shape
    n_queries = queries.shape[0]
    n_distances = n_bytes * 8 + 1
    dist = np.empty(chunk_rows, dist_dtype_sample.dtype)
    dist_other = np.empty(chunk_rows, dist_dtype_sample.dtype)
    capacity = k + chunk_rows
    cand_rows = np.empty((n_queries, capacity), np.int64)
    cand_dists = np.empty((n_queries, capacity), dist_dtype_sample.dtype)
    filled = np.zeros(n_queries, np.int64)
    per_distance = np.zeros((n_queries, n_distances), np.int64)
    limit = np.full(n_queries, n_distances, np.int64)  # strict: rows at distance >= limit cannot enter
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        rows = stop - start
        q = 0
        while q < n_queries:
            if q + 1 < n_queries:
                _chunk_distances_pair(planes, queries[q], queries[q + 1], start, stop, dist, dist_other)
                _take(dist, rows, start, k, q, cand_rows, cand_dists, filled, per_distance, limit)
                _take(dist_other, rows, start, k, q + 1, cand_rows, cand_dists, filled, per_distance, limit)
                q += 2
            else:
                _chunk_distances(planes, queries[q], start, stop, dist)
                _take(dist, rows, start, k, q, cand_rows, cand_dists, filled, per_distance, limit)
                q += 1
    out_rows = np.empty((n_queries, k), np.int64)
    out_dists = np.empty((n_queries, k), dist_dtype_sample.dtype)
    for q in range(n_queries):
        kept = _compact(cand_rows[q], cand_dists[q], filled[q], per_distance[q], k)
        written = 0
        for d in range(n_distances):  # candidates are in index order: one stable pass per distance
            if per_distance[q, d] == 0:
                continue
            for r in range(kept):
                if cand_dists[q, r] == d:
                    out_rows[q, written] = cand_rows[q, r]
                    out_dists[q, written] = d
                    written += 1
            if written >= k:
                break
    return out_rows, out_dists


def knn_planes(planes: np.ndarray, queries: np.ndarray, k: int, dist_dtype: type[np.unsignedinteger],
               chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of byte ``planes`` (n_bytes, N) for each packed query (Q, n_bytes), in one pass.

    Returns (Q, k) int64 rows and (Q, k) ``dist_dtype`` distances, nearest first, ties by row index.
    ``1 <= k <= N`` is the caller's to check; ``dist_dtype`` must hold ``8 * n_bytes``. ``chunk_rows``
    defaults to :data:`CHUNK_ROWS` (read at call time, so a test can make chunks tiny).
    """
    planes = np.ascontiguousarray(planes, dtype=np.uint8)
    queries = np.ascontiguousarray(queries, dtype=np.uint8)
    chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows
    return _knn(planes, queries, int(k), int(chunk_rows), np.zeros(1, dtype=dist_dtype))
