"""Binary codes packed into bits, Hamming search by popcount, and retrieval quality measured honestly.

Codes are stored the way ``codes.h5`` stores them: ``numpy.packbits`` along each row (uint8, most
significant bit first, the last byte zero-padded). Search XORs the packed codes byte plane by byte plane
and counts the set bits, so one query touches ``ceil(q / 8)`` bytes per database row and nothing else
(DESIGN.md section 8): top-k search in one compiled pass (:mod:`mammo_core.codes.popcount_search`), full
distance rows and MAP with numpy (``np.bitwise_count`` on numpy >= 2, a 256-entry table otherwise).

Rankings are by Hamming distance with ties broken by database index (a stable order), so MAP and
precision@k are reproducible numbers rather than artefacts of an unstable sort: with 12-bit codes most
distances tie, and an unstable sort could move MAP by several points between runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_HAVE_BITWISE_COUNT = hasattr(np, "bitwise_count")
# Cap on query x database cells evaluated at once by MAP / precision@k, so memory stays bounded
_CELLS_PER_CHUNK = 1 << 22
# Queries searched together by knn_batch, sharing each database chunk while it is in cache
_QUERIES_PER_BLOCK = 16


def pack_codes(bits: np.ndarray) -> np.ndarray:
    """(N, q) array of 0/1 -> (N, ceil(q/8)) uint8, ``np.packbits`` order (the ``codes.h5`` layout)."""
    bits = np.asarray(bits)
    if bits.ndim != 2:
        raise ValueError(f"codes must be a 2-D (N, q) array, got shape {bits.shape}")
    if bits.size and not np.isin(bits, (0, 1)).all():
        raise ValueError("codes must contain only 0 and 1 (binarise relaxed codes first)")
    return np.packbits(bits.astype(np.uint8, copy=False), axis=1)


def unpack_codes(packed: np.ndarray, q: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: (N, ceil(q/8)) uint8 -> (N, q) uint8 of 0/1."""
    packed = _as_packed(packed, "packed codes")
    if packed.shape[1] != _n_bytes(q):
        raise ValueError(f"{q}-bit codes take {_n_bytes(q)} bytes per row, got {packed.shape[1]}")
    return np.unpackbits(packed, axis=1, count=q)


def popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per element of an unsigned integer array (uint8 result)."""
    if _HAVE_BITWISE_COUNT:
        return np.bitwise_count(words)
    return _popcount_lookup(words)


def _popcount_lookup(words: np.ndarray) -> np.ndarray:
    """Portable popcount: a 256-entry table over the bytes of each element (numpy < 2 has no bitwise_count)."""
    words = np.ascontiguousarray(words)
    per_byte = _BYTE_POPCOUNT[words.view(np.uint8)].reshape(*words.shape, words.itemsize)
    return per_byte.sum(axis=-1, dtype=np.uint8)


@dataclass(frozen=True)
class HammingIndex:
    """A database of packed codes laid out as byte planes, built once so each query only XORs and counts.

    ``planes`` is (n_bytes, N) uint8: plane j holds byte j of every code (the packed rows, transposed). A
    query XORs each plane with its own byte j, counts the bits of every byte and adds the planes up. Byte
    planes rather than one uint64 word per row because byte popcounts vectorise (numpy's ``bitwise_count``
    and LLVM's ``ctpop`` alike) where a uint64 one is one scalar instruction per element, and because a
    48-bit code then costs the 6 bytes it holds, not 8. Top-k search runs compiled
    (:mod:`mammo_core.codes.popcount_search`); :meth:`distances` is plain numpy, the independent reference
    the tests hold the compiled search to.
    """

    planes: np.ndarray

    @classmethod
    def from_packed(cls, db_packed: np.ndarray) -> HammingIndex:
        db_packed = _as_packed(db_packed, "database codes")
        if db_packed.shape[0] == 0:
            raise ValueError("the code database is empty: there is nothing to search")
        return cls(planes=np.ascontiguousarray(db_packed.T))

    def __len__(self) -> int:
        return self.planes.shape[1]

    @property
    def n_bytes(self) -> int:
        """Bytes per packed code (``ceil(q / 8)``)."""
        return self.planes.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of codes one query reads: the whole database once, nothing else (the bandwidth bound)."""
        return self.planes.nbytes

    @property
    def distance_dtype(self) -> type[np.unsignedinteger]:
        """uint8 while every distance fits (codes up to 255 bits), uint16 past that."""
        return np.uint8 if self.n_bytes * 8 <= 255 else np.uint16

    def distances(self, query_packed: np.ndarray) -> np.ndarray:
        """Hamming distance from one packed query (n_bytes,) to every row: (N,) uint8 (uint16 past 255 bits)."""
        query = self.query_bytes(query_packed)
        out = np.zeros(len(self), dtype=self.distance_dtype)
        for plane, byte in zip(self.planes, query, strict=True):
            out += popcount(plane ^ byte)
        return out

    def query_bytes(self, query_packed: np.ndarray) -> np.ndarray:
        """One packed query checked against the database's code length: (n_bytes,) uint8."""
        query = np.asarray(query_packed)
        if query.dtype != np.uint8 or query.ndim != 1:
            raise ValueError(f"a query must be one packed uint8 row, got dtype {query.dtype} shape {query.shape}")
        if query.shape[0] != self.n_bytes:
            raise ValueError(
                f"code lengths differ: query has {query.shape[0]} bytes ({query.shape[0] * 8} bits packed), "
                f"database has {self.n_bytes} bytes ({self.n_bytes * 8} bits packed)"
            )
        return query


def hamming_distances(query_packed: np.ndarray, db: np.ndarray | HammingIndex) -> np.ndarray:
    """Hamming distances from one packed query to a packed database (or a prebuilt :class:`HammingIndex`)."""
    return _index(db).distances(query_packed)


def knn(query_packed: np.ndarray, db: np.ndarray | HammingIndex, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows by Hamming distance, nearest first, ties broken by database index.

    Returns (indices int64, distances). ``k`` larger than the database returns the whole database.
    """
    index = _index(db)
    indices, distances = _search(index, index.query_bytes(query_packed)[None, :], k)
    return indices[0], distances[0]


def knn_batch(queries_packed: np.ndarray, db: np.ndarray | HammingIndex, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn` for many queries at once: (Q, k) indices and distances, row i answering query i.

    Same answers as calling :func:`knn` per query; cheaper per query because each database chunk is read
    from memory once for a group of queries and from cache by the others (:mod:`mammo_core.codes.popcount_search`).
    """
    index = _index(db)
    queries = _as_packed(queries_packed, "query codes")
    if queries.shape[1] != index.n_bytes:
        raise ValueError(
            f"code lengths differ: query codes have {queries.shape[1]} bytes per row, "
            f"database has {index.n_bytes} bytes"
        )
    return _search(index, queries, k)


def _search(index: HammingIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k for each packed query (Q, n_bytes): the compiled one-pass search, in groups of queries.

    A group shares each database chunk while it is in cache (:mod:`mammo_core.codes.popcount_search`);
    groups bound the candidate buffers at ``_QUERIES_PER_BLOCK x (k + chunk)`` rows.
    """
    # Imported here: numba costs ~0.35 CPU-s to import, and every `mammo` command imports this module (the
    # stage keys' closure) while only a search needs the compiled kernel.
    from mammo_core.codes import popcount_search

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, len(index))
    indices = np.empty((queries.shape[0], k), dtype=np.int64)
    distances = np.empty((queries.shape[0], k), dtype=index.distance_dtype)
    for first in range(0, queries.shape[0], _QUERIES_PER_BLOCK):
        group = slice(first, first + _QUERIES_PER_BLOCK)
        indices[group], distances[group] = popcount_search.knn_planes(
            index.planes, queries[group], k, index.distance_dtype)
    return indices, distances


def stable_ranking(query_packed: np.ndarray, db: np.ndarray | HammingIndex) -> np.ndarray:
    """The whole database ordered by Hamming distance to the query, ties by index (what MAP scores)."""
    return np.argsort(hamming_distances(query_packed, db), kind="stable")


def mean_average_precision(
    query_codes: np.ndarray, query_labels: np.ndarray, db_codes: np.ndarray, db_labels: np.ndarray
) -> float:
    """MAP over the full Hamming ranking (ties by database index), relevance = same class.

    All codes are packed rows (``pack_codes``). AP of one query = mean, over the positions of its relevant
    database items in the ranking, of the precision at that position. Queries whose class is absent from the
    database have no defined AP and are left out of the mean (NaN if every query is such); they cannot occur
    when the database is the training split and every class is represented there.
    """
    ap = _per_query(query_codes, query_labels, db_codes, db_labels, _average_precision)
    ap = ap[~np.isnan(ap)]
    return float(ap.mean()) if ap.size else float("nan")


def average_precisions(
    query_codes: np.ndarray, query_labels: np.ndarray, db_codes: np.ndarray, db_labels: np.ndarray
) -> np.ndarray:
    """Each query's AP (NaN where its class is absent from the database): what MAP averages.

    Per query, so that two decoders' retrieval can be compared on the same queries with a paired
    bootstrap over patients (:func:`mammo_core.evaluation.paired_bootstrap.paired_mean_difference`).
    """
    return _per_query(query_codes, query_labels, db_codes, db_labels, _average_precision)


def precision_at_k(
    query_codes: np.ndarray, query_labels: np.ndarray, db_codes: np.ndarray, db_labels: np.ndarray, k: int
) -> float:
    """Mean over queries of the fraction of the k nearest (stable ranking) sharing the query's class."""
    db_rows = np.asarray(db_codes).shape[0]
    if not 1 <= k <= db_rows:
        raise ValueError(f"precision@k needs 1 <= k <= database size, got k={k} for {db_rows} database codes")
    return float(_per_query(query_codes, query_labels, db_codes, db_labels,
                            lambda rel: rel[:, :k].mean(axis=1)).mean())


def _average_precision(relevant: np.ndarray) -> np.ndarray:
    """Row-wise AP of boolean relevance in ranked order; NaN where a row has no relevant item."""
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    n_relevant = hits[:, -1]
    precision_sum = np.where(relevant, hits / ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_relevant > 0, precision_sum / n_relevant, np.nan)


def _per_query(query_codes, query_labels, db_codes, db_labels, score) -> np.ndarray:
    """Apply ``score`` to the ranked same-class relevance matrix, in query chunks of bounded memory."""
    query_codes = _as_packed(query_codes, "query codes")
    db_codes = _as_packed(db_codes, "database codes")
    query_labels = np.asarray(query_labels)
    db_labels = np.asarray(db_labels)
    if db_codes.shape[0] == 0:
        raise ValueError("the code database is empty: there is nothing to rank against")
    if query_codes.shape[1] != db_codes.shape[1]:
        raise ValueError(
            f"code lengths differ: query codes have {query_codes.shape[1]} bytes per row, "
            f"database codes have {db_codes.shape[1]}"
        )
    if query_labels.shape != (query_codes.shape[0],) or db_labels.shape != (db_codes.shape[0],):
        raise ValueError(
            f"one label per code expected: {query_labels.shape} labels for {query_codes.shape[0]} queries, "
            f"{db_labels.shape} labels for {db_codes.shape[0]} database codes"
        )
    if query_codes.shape[0] == 0:
        raise ValueError("there are no query codes to evaluate")
    db_words = _to_words(db_codes)  # (N, W)
    chunk = max(1, _CELLS_PER_CHUNK // (db_words.shape[0] * db_words.shape[1]))
    scores = []
    for start in range(0, query_codes.shape[0], chunk):
        q_words = _to_words(query_codes[start:start + chunk])  # (C, W)
        dist = popcount(q_words[:, None, :] ^ db_words[None, :, :]).sum(axis=2, dtype=np.uint16)
        order = np.argsort(dist, axis=1, kind="stable")
        relevant = db_labels[order] == query_labels[start:start + chunk, None]
        scores.append(score(relevant))
    return np.concatenate(scores)


@dataclass(frozen=True)
class BitStatistics:
    """How binary the relaxed codes already are, and how much their bits say beyond each other.

    - ``fraction_binary``: share of relaxed values exactly 0 or 1 (what the piece-wise threshold yields).
    - ``fraction_outside_band``: share with ``|s - 0.5| > eps``, comparable across decoders (a sigmoid alone
      never reaches exactly 0 or 1, but it can leave the band).
    - ``bit_balance``: mean over bits of ``|p_j - 0.5|`` where ``p_j`` is the share of ones in bit j after
      binarisation at 0.5; 0 = every bit splits the data in half, 0.5 = every bit is constant.
    - ``constant_bits``: bits that take one value on every row (they carry nothing).
    - ``mean_abs_correlation``: mean |Pearson correlation| over pairs of non-constant binarised bits;
      the paper's "less redundant bits" claim, measured (NaN with fewer than two non-constant bits).
    """

    n_codes: int
    n_bits: int
    eps: float
    fraction_binary: float
    fraction_outside_band: float
    bit_balance: float
    constant_bits: int
    mean_abs_correlation: float
    ones_per_bit: tuple[float, ...]

    def as_metrics(self) -> dict[str, float]:
        """The scalar statistics (for tracking), without the per-bit vector."""
        return {
            "fraction_binary": self.fraction_binary,
            "fraction_outside_band": self.fraction_outside_band,
            "bit_balance": self.bit_balance,
            "constant_bits": float(self.constant_bits),
            "mean_abs_correlation": self.mean_abs_correlation,
        }


def bit_statistics(relaxed: np.ndarray, eps: float = 0.1) -> BitStatistics:
    """Statistics of relaxed codes (N, q) in [0, 1] before binarisation; see :class:`BitStatistics`."""
    relaxed = np.asarray(relaxed, dtype=np.float64)
    if relaxed.ndim != 2 or relaxed.shape[0] == 0 or relaxed.shape[1] == 0:
        raise ValueError(f"relaxed codes must be a non-empty (N, q) array, got shape {relaxed.shape}")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must lie in [0, 0.5), got {eps}")
    bits = (relaxed >= 0.5).astype(np.float64)
    ones = bits.mean(axis=0)
    varying = (ones > 0.0) & (ones < 1.0)
    if varying.sum() >= 2:
        corr = np.corrcoef(bits[:, varying], rowvar=False)
        off_diagonal = corr[~np.eye(corr.shape[0], dtype=bool)]
        mean_abs_corr = float(np.abs(off_diagonal).mean())
    else:
        mean_abs_corr = float("nan")
    return BitStatistics(
        n_codes=relaxed.shape[0],
        n_bits=relaxed.shape[1],
        eps=float(eps),
        fraction_binary=float(((relaxed == 0.0) | (relaxed == 1.0)).mean()),
        fraction_outside_band=float((np.abs(relaxed - 0.5) > eps).mean()),
        bit_balance=float(np.abs(ones - 0.5).mean()),
        constant_bits=int((~varying).sum()),
        mean_abs_correlation=mean_abs_corr,
        ones_per_bit=tuple(float(p) for p in ones),
    )


def _n_bytes(q: int) -> int:
    if q < 1:
        raise ValueError(f"a code needs at least 1 bit, got q={q}")
    return (q + 7) // 8


def _as_packed(codes: np.ndarray, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ValueError(f"{what} must be packed uint8 rows (N, bytes), got dtype {codes.dtype} shape {codes.shape}")
    return codes


def _to_words(packed: np.ndarray) -> np.ndarray:
    """(N, n_bytes) uint8 -> (N, ceil(n_bytes/8)) uint64, zero-padded on the right (a view when already aligned)."""
    n, n_bytes = packed.shape
    width = -(-n_bytes // 8) * 8
    if width == n_bytes and packed.flags.c_contiguous:
        return packed.view(np.uint64)
    padded = np.zeros((n, width), dtype=np.uint8)
    padded[:, :n_bytes] = packed
    return padded.view(np.uint64)


def _index(db: np.ndarray | HammingIndex) -> HammingIndex:
    return db if isinstance(db, HammingIndex) else HammingIndex.from_packed(db)
