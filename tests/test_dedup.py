"""De-duplication primitives of ``tbps select``: exact groups, near-duplicate search, greedy keep."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tbps.curate.dedup import exact_duplicates, greedy_keep, near_duplicate_pairs, normalise_caption


def _naive_greedy(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The definition, row by row: keep a row unless a kept better row is its neighbour."""
    better = [[] for _ in range(n)]
    for a, b in zip(i.tolist(), j.tolist()):
        better[max(a, b)].append(min(a, b))
    kept: set[int] = set()
    dup = np.full(n, -1)
    for v in range(n):
        hits = [u for u in better[v] if u in kept]
        if hits:
            dup[v] = min(hits)
        else:
            kept.add(v)
    return dup


@pytest.mark.parametrize("seed", range(5))
def test_greedy_keep_equals_the_row_by_row_definition(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        n = int(rng.integers(1, 40))
        m = int(rng.integers(0, 80))
        i, j = rng.integers(0, n, m), rng.integers(0, n, m)
        i, j = i[i != j], j[i != j]
        assert greedy_keep(n, i, j).tolist() == _naive_greedy(n, i, j).tolist()


def test_greedy_keep_chain_keeps_both_ends():
    # 0~1 and 1~2, but 0 and 2 are not alike: 1 goes (duplicate of 0), 2 stays.
    dup = greedy_keep(3, np.array([0, 1]), np.array([1, 2]))
    assert dup.tolist() == [-1, 0, -1]


def _naive_exact(w0, w1, valid):
    first, out = {}, []
    for p in range(len(w0)):
        if not valid[p]:
            continue
        key = (int(w0[p]), int(w1[p]))
        if key in first:
            out.append((p, first[key]))
        else:
            first[key] = p
    return sorted(out)


@pytest.mark.parametrize("shift", [0, 20, 32, 40, 63])
def test_exact_duplicates_equals_grouping_on_both_words(shift):
    # Few distinct values, shifted so the shared bits sit below, across and above bit 32,
    # plus w1 collisions: every path (32-bit screen, 64-bit word, 128-bit key) is exercised.
    rng = np.random.default_rng(shift)
    for _ in range(30):
        n = int(rng.integers(1, 60))
        w0 = rng.integers(0, 4, n).astype(np.uint64) << np.uint64(shift)
        w1 = rng.integers(0, 2, n).astype(np.uint64)
        valid = rng.random(n) < 0.8
        gone, first = exact_duplicates(w0, w1, valid)
        assert sorted(zip(gone.tolist(), first.tolist())) == _naive_exact(w0, w1, valid)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("A man, in RED.", "a man in red", True),
        ("  a\tman  in red!! ", "a man in red", True),
        ("t-shirt", "t shirt", True),
        ("x\u2014y", "x y", True),  # em dash is punctuation
        ("a\u00a0b", "a b", True),  # no-break space is whitespace
        ("a man in red", "a man in blue", False),
        ("tshirt", "t shirt", False),
    ],
)
def test_normalise_caption(a, b, same):
    got = pl.select(normalise_caption(pl.lit(pl.Series([a, b])))).to_series().to_list()
    assert (got[0] == got[1]) is same


def _planted(n: int, d: int, dups: int, cos: float, seed: int) -> np.ndarray:
    """Random unit vectors, the last ``dups`` rows each a copy of an earlier row at cosine ``cos``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n - dups, dups, replace=False)
    z = rng.standard_normal((dups, d)).astype(np.float32)
    z -= (z * x[src]).sum(1, keepdims=True) * x[src]
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    x[n - dups :] = cos * x[src] + np.sqrt(1 - cos**2) * z
    return x


def test_near_pairs_exact_search_matches_brute_force():
    x = _planted(500, 16, 40, 0.97, seed=0)
    i, j, stats = near_duplicate_pairs(x, 0.95)
    sims = x @ x.T
    want = {(a, b) for a, b in zip(*np.nonzero(sims >= 0.95)) if a < b}
    assert stats["method"] == "exact"
    assert set(zip(i.tolist(), j.tolist())) == want
    assert len(want) >= 40


def test_near_pairs_clustered_search_finds_the_planted_pairs_and_nothing_false():
    x = _planted(3000, 64, 150, 0.98, seed=1)
    exact_i, exact_j, _ = near_duplicate_pairs(x, 0.95)
    i, j, stats = near_duplicate_pairs(x, 0.95, exact_below=0, n_clusters=24, project_dim=32)
    assert stats["method"] == "clustered" and stats["clusters"] == 24
    found, want = set(zip(i.tolist(), j.tolist())), set(zip(exact_i.tolist(), exact_j.tolist()))
    assert found <= want  # every reported pair is verified on the full vectors
    assert len(found & want) / len(want) >= 0.95
    # The same call gives the same pairs (fixed seeds).
    i2, j2, _ = near_duplicate_pairs(x, 0.95, exact_below=0, n_clusters=24, project_dim=32)
    assert i2.tolist() == i.tolist() and j2.tolist() == j.tolist()
