"""Packed codes, popcount Hamming search, stable k-NN, MAP, precision@k and bit statistics."""

from __future__ import annotations

import numpy as np
import pytest

from mammo_core.codes import popcount_search, retrieval


def _random_bits(n: int, q: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, size=(n, q), dtype=np.uint8)


def _pack_rows(*rows: str) -> np.ndarray:
    return retrieval.pack_codes(np.array([[int(c) for c in row] for row in rows], dtype=np.uint8))


@pytest.mark.parametrize("q", [12, 24, 32, 48, 70])
def test_pack_unpack_roundtrip_and_packbits_layout(q):
    bits = _random_bits(37, q, seed=q)
    packed = retrieval.pack_codes(bits)
    assert packed.dtype == np.uint8 and packed.shape == (37, (q + 7) // 8)
    np.testing.assert_array_equal(packed, np.packbits(bits, axis=1))
    np.testing.assert_array_equal(retrieval.unpack_codes(packed, q), bits)


def test_packing_is_most_significant_bit_first():
    assert _pack_rows("100000000001").tolist() == [[0b10000000, 0b00010000]]


def test_pack_rejects_non_binary_codes():
    with pytest.raises(ValueError, match="only 0 and 1"):
        retrieval.pack_codes(np.array([[0, 2, 1]]))


@pytest.mark.parametrize("q", [12, 24, 32, 48, 64, 100])
def test_hamming_distances_equal_naive_count_on_unpacked_bits(q):
    db_bits = _random_bits(500, q, seed=1)
    query_bits = _random_bits(1, q, seed=2)[0]
    naive = (db_bits != query_bits).sum(axis=1)
    got = retrieval.hamming_distances(retrieval.pack_codes(query_bits[None])[0], retrieval.pack_codes(db_bits))
    np.testing.assert_array_equal(got, naive)
    assert got.max() > 0 and got.min() < q  # the comparison is not trivially all-equal


def test_lookup_table_popcount_matches_bitwise_count():
    words = np.random.default_rng(0).integers(0, 2**63, size=1000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    expected = np.array([bin(int(w)).count("1") for w in words])
    np.testing.assert_array_equal(retrieval._popcount_lookup(words), expected)
    np.testing.assert_array_equal(retrieval.popcount(words), expected)


def test_knn_breaks_ties_by_database_index():
    db = _pack_rows("111100000000", "000000000011", "000000000001", "000000000010", "000000000011")
    query = _pack_rows("000000000000")[0]
    # distances: 4, 2, 1, 1, 2 -> order by (distance, index): 2, 3, 1, 4, 0
    indices, distances = retrieval.knn(query, db, k=4)
    assert indices.tolist() == [2, 3, 1, 4]
    assert distances.tolist() == [1, 1, 2, 2]
    everything, _ = retrieval.knn(query, db, k=50)  # k past the database returns all of it
    assert everything.tolist() == [2, 3, 1, 4, 0]


def test_knn_matches_a_stable_full_sort_on_many_ties():
    db = retrieval.pack_codes(_random_bits(3000, 12, seed=5))  # 12 bits: thousands of ties per distance
    query = retrieval.pack_codes(_random_bits(1, 12, seed=6))[0]
    index = retrieval.HammingIndex.from_packed(db)
    reference = retrieval.stable_ranking(query, db)[:25]
    indices, distances = retrieval.knn(query, index, k=25)
    np.testing.assert_array_equal(indices, reference)
    np.testing.assert_array_equal(distances, retrieval.hamming_distances(query, db)[reference])


def test_empty_database_and_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="empty"):
        retrieval.knn(_pack_rows("1" * 12)[0], np.zeros((0, 2), dtype=np.uint8), k=3)
    with pytest.raises(ValueError, match="query has 6 bytes.*database has 2 bytes"):
        retrieval.hamming_distances(_pack_rows("1" * 48)[0], _pack_rows("1" * 12))
    with pytest.raises(ValueError, match="query codes have 3 bytes.*database codes have 2"):
        retrieval.mean_average_precision(_pack_rows("1" * 24), [0], _pack_rows("1" * 12), [0])
    with pytest.raises(ValueError, match="empty"):
        retrieval.mean_average_precision(_pack_rows("1" * 12), [0], np.zeros((0, 2), dtype=np.uint8), [])


def test_map_on_a_hand_built_ranking():
    # Query 0 (class 0) at 0000: db distances 0 (class 0), 1 (class 1), 1 (class 0), 4 (class 0)
    #   ranking 0, 1, 2, 3 (tie at distance 1 kept in index order) -> relevance 1, 0, 1, 1
    #   AP = (1/1 + 2/3 + 3/4) / 3 = (12 + 8 + 9) / 36 = 29/36
    # Query 1 (class 1) at 1111: db distances 4, 3, 3, 0 -> ranking 3, 1, 2, 0 -> relevance 0, 1, 0, 0
    #   AP = (1/2) / 1 = 1/2
    # MAP = (29/36 + 1/2) / 2 = 47/72
    db = _pack_rows("0000", "1000", "0001", "1111")
    db_labels = np.array([0, 1, 0, 0])
    queries = _pack_rows("0000", "1111")
    result = retrieval.mean_average_precision(queries, np.array([0, 1]), db, db_labels)
    assert result == pytest.approx(47 / 72)
    # precision@2: query 0 -> {0, 1}: 1/2; query 1 -> {3, 1}: 1/2
    assert retrieval.precision_at_k(queries, np.array([0, 1]), db, db_labels, k=2) == pytest.approx(0.5)
    assert retrieval.precision_at_k(queries, np.array([0, 1]), db, db_labels, k=1) == pytest.approx(0.5)


def test_map_is_one_for_perfectly_separated_codes_and_chunking_does_not_change_it(monkeypatch):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=200)
    prototypes = _random_bits(3, 32, seed=9)
    prototypes[1] = 1 - prototypes[0]  # classes far apart
    noisy = prototypes[labels].copy()
    noisy[:, :2] ^= rng.integers(0, 2, size=(200, 2), dtype=np.uint8)  # flip <= 2 bits: still nearest its own
    codes = retrieval.pack_codes(noisy)
    separated = (np.abs(prototypes[:, None, :].astype(int) - prototypes[None]).sum(-1) + np.eye(3) * 99).min()
    assert separated > 4
    assert retrieval.mean_average_precision(codes[:50], labels[:50], codes[50:], labels[50:]) == 1.0
    shuffled = rng.permutation(labels[50:])  # the same codes with scrambled labels score far lower
    low = retrieval.mean_average_precision(codes[:50], labels[:50], codes[50:], shuffled)
    assert low < 0.6
    monkeypatch.setattr(retrieval, "_CELLS_PER_CHUNK", 7)  # many tiny query chunks, same answer
    assert retrieval.mean_average_precision(codes[:50], labels[:50], codes[50:], shuffled) == low


def test_map_skips_queries_whose_class_is_absent_from_the_database():
    db = _pack_rows("0000", "1111")
    result = retrieval.mean_average_precision(_pack_rows("0000", "0000"), np.array([0, 7]), db, np.array([0, 1]))
    assert result == 1.0  # only query 0 has a defined AP


def test_bit_statistics_on_known_codes():
    relaxed = np.array([
        [0.0, 1.0, 0.55, 1.0],
        [1.0, 1.0, 0.30, 0.0],
        [0.0, 1.0, 0.80, 1.0],
        [1.0, 1.0, 0.45, 0.0],
    ])
    stats = retrieval.bit_statistics(relaxed, eps=0.1)
    assert stats.fraction_binary == pytest.approx(12 / 16)
    assert stats.fraction_outside_band == pytest.approx(14 / 16)  # 0.55 and 0.45 are inside the band
    assert stats.ones_per_bit == (0.5, 1.0, 0.5, 0.5)
    assert stats.bit_balance == pytest.approx(0.5 / 4)
    assert stats.constant_bits == 1
    # bits 0 and 3 are exact complements (|r| = 1); bit 2 (binarised 1,0,1,0) equals bit 3 and opposes bit 0
    assert stats.mean_abs_correlation == pytest.approx(1.0)
    assert set(stats.as_metrics()) == {"fraction_binary", "fraction_outside_band", "bit_balance",
                                       "constant_bits", "mean_abs_correlation"}


def test_independent_bits_have_low_correlation():
    relaxed = np.random.default_rng(0).random((4000, 16))
    stats = retrieval.bit_statistics(relaxed)
    assert stats.mean_abs_correlation < 0.03
    assert stats.bit_balance < 0.02
    assert stats.fraction_binary == 0.0


def _brute_force_top_k(query_bits: np.ndarray, db_bits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: distances by comparing unpacked bits, ranked by (distance, index) with Python's sort."""
    dist = (db_bits != query_bits).sum(axis=1)
    order = sorted(range(len(dist)), key=lambda i: (dist[i], i))[:k]
    return np.array(order), dist[order]


@pytest.mark.parametrize("q", [12, 48, 100, 300])
def test_knn_and_knn_batch_equal_a_brute_force_reference(monkeypatch, q):
    # many search chunks, the last one partial, and candidate lists (k + 16 rows) compacted again and again
    monkeypatch.setattr(popcount_search, "CHUNK_ROWS", 16)
    monkeypatch.setattr(retrieval, "_QUERIES_PER_BLOCK", 3)  # several query groups, uneven last group
    db_bits = _random_bits(1001, q, seed=q)
    query_bits = _random_bits(7, q, seed=q + 1)
    db_bits[500] = query_bits[0]  # distance 0 exists, and duplicates make exact ties across the database
    db_bits[900] = query_bits[0]
    index = retrieval.HammingIndex.from_packed(retrieval.pack_codes(db_bits))
    queries = retrieval.pack_codes(query_bits)
    k = 15
    batch_idx, batch_dist = retrieval.knn_batch(queries, index, k)
    assert batch_idx.shape == batch_dist.shape == (7, k)
    for i, query in enumerate(queries):
        ref_idx, ref_dist = _brute_force_top_k(query_bits[i], db_bits, k)
        np.testing.assert_array_equal(retrieval.hamming_distances(query, index), (db_bits != query_bits[i]).sum(1))
        idx, dist = retrieval.knn(query, index, k)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(dist, ref_dist)
        np.testing.assert_array_equal(batch_idx[i], ref_idx)
        np.testing.assert_array_equal(batch_dist[i], ref_dist)
    assert batch_idx[0, :2].tolist() == [500, 900] and batch_dist[0, :2].tolist() == [0, 0]


def test_search_results_are_not_overwritten_by_later_searches():
    db = retrieval.pack_codes(_random_bits(2000, 48, seed=11))
    index = retrieval.HammingIndex.from_packed(db)
    first_idx, first_dist = retrieval.knn(db[3], index, 5)
    kept = (first_idx.copy(), first_dist.copy())
    retrieval.knn(db[1999], index, 5)
    retrieval.knn_batch(db[:40], index, 5)
    assert first_idx[0] == 3 and first_dist[0] == 0
    np.testing.assert_array_equal(first_idx, kept[0])
    np.testing.assert_array_equal(first_dist, kept[1])


def test_knn_batch_refuses_bad_queries():
    db = _pack_rows("1" * 12, "0" * 12)
    with pytest.raises(ValueError, match="query codes have 6 bytes.*database has 2 bytes"):
        retrieval.knn_batch(_pack_rows("1" * 48), db, k=1)
    with pytest.raises(ValueError, match="k must be at least 1"):
        retrieval.knn_batch(_pack_rows("1" * 12), db, k=0)


@pytest.mark.parametrize(("n", "q", "k"), [(1001, 12, 1001), (1001, 12, 40), (20000, 16, 100), (4099, 48, 1)])
def test_knn_with_default_chunks_equals_a_stable_full_sort(n, q, k):
    # Default chunk and block sizes; 12 and 16 bits tie thousands of rows per distance, k = n returns the whole
    # database (the padding rows of the last block must never appear), 4099 rows leave a 3-row last block.
    db_bits = _random_bits(n, q, seed=n + q)
    query_bits = _random_bits(5, q, seed=k)
    db = retrieval.pack_codes(db_bits)
    queries = retrieval.pack_codes(query_bits)
    index = retrieval.HammingIndex.from_packed(db)
    batch_idx, batch_dist = retrieval.knn_batch(queries, index, k)
    for i, query in enumerate(queries):
        dist = (db_bits != query_bits[i]).sum(axis=1)
        reference = np.argsort(dist, kind="stable")[:k]
        idx, got = retrieval.knn(query, index, k)
        np.testing.assert_array_equal(idx, reference)
        np.testing.assert_array_equal(got, dist[reference])
        np.testing.assert_array_equal(batch_idx[i], reference)
        np.testing.assert_array_equal(batch_dist[i], dist[reference])


def test_knn_on_a_constant_database_returns_the_first_rows():
    db = np.zeros((5000, 6), dtype=np.uint8)  # every distance ties: the answer is the lowest indices
    idx, dist = retrieval.knn(retrieval.pack_codes(_random_bits(1, 48, seed=1))[0], db, k=7)
    assert idx.tolist() == list(range(7)) and len(set(dist.tolist())) == 1


def test_index_reads_only_the_packed_code_bytes():
    index = retrieval.HammingIndex.from_packed(retrieval.pack_codes(_random_bits(1000, 48, seed=2)))
    assert index.nbytes == 1000 * 6 and index.n_bytes == 6 and len(index) == 1000


def test_knn_batch_of_no_queries_is_empty():
    idx, dist = retrieval.knn_batch(np.zeros((0, 6), dtype=np.uint8), np.zeros((10, 6), dtype=np.uint8), k=3)
    assert idx.shape == dist.shape == (0, 3)


@pytest.mark.parametrize("chunk_rows", [7, 4096])
def test_knn_on_identical_codes_keeps_the_first_rows_in_index_order(monkeypatch, chunk_rows):
    # Every row at distance 0 and, once the query flips, every row at distance 48: the cutoff never drops
    # below a tie, so which rows survive each compaction decides the answer (the first k by index).
    monkeypatch.setattr(popcount_search, "CHUNK_ROWS", chunk_rows)
    db = retrieval.pack_codes(np.ones((500, 48), dtype=np.uint8))
    same, flipped = db[0], np.zeros(6, dtype=np.uint8)
    indices, distances = retrieval.knn_batch(np.stack([same, flipped]), db, k=20)
    assert indices.tolist() == [list(range(20))] * 2
    assert distances.tolist() == [[0] * 20, [48] * 20]
