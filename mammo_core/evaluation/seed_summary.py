"""Summaries of a paired comparison repeated over training seeds (Table 4: hash decoder vs FC ablation).

Why seeds: a single training run of each decoder confounds the method with its initialisation and batch
order; on small test sets the MAP gap between two decoders can be of the size of the seed-to-seed spread.
Each seed trains both variants (same seed for both: same shuffle, same permutation), so the difference is
taken per seed (paired) and summarised by its mean, sample standard deviation, range and the number of
seeds on which A beats B. With fewer than two seeds the standard deviation is NaN (unknown), never 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd


def paired_seed_summary(by_seed: pd.DataFrame, group: str, a: str, b: str,
                        extra_means: Sequence[str] = ()) -> pd.DataFrame:
    """One row per ``group`` value from per-seed rows (columns ``group``, ``seed``, ``a``, ``b``).

    Columns: ``group``, ``n_seeds``; for ``a`` and ``b``: mean (the bare name), ``_std``, ``_min``, ``_max``;
    for the paired difference ``{a}_minus_{b}``: the same four plus ``{a}_wins`` (seeds with a > b); and
    the mean of each ``extra_means`` column. ValueError names a missing column or a duplicated seed.
    """
    needed = [group, "seed", a, b, *extra_means]
    missing = [c for c in needed if c not in by_seed.columns]
    if missing:
        raise ValueError(f"per-seed table lacks column(s) {missing}; has {list(by_seed.columns)}")
    if by_seed.duplicated([group, "seed"]).any():
        raise ValueError(f"per-seed table repeats a ({group}, seed) pair; each seed must appear once per {group}")
    diff = f"{a}_minus_{b}"
    frame = by_seed.assign(**{diff: by_seed[a] - by_seed[b]})
    rows = []
    for value, part in frame.groupby(group, sort=True):
        row: dict[str, float | int] = {group: value, "n_seeds": len(part)}
        for column in (a, b, diff):
            values = part[column].astype(float)
            row[column] = float(values.mean())
            row[f"{column}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            row[f"{column}_min"] = float(values.min())
            row[f"{column}_max"] = float(values.max())
        row[f"{a}_wins"] = int((part[diff] > 0).sum())
        for column in extra_means:
            row[column] = float(part[column].astype(float).mean())
        rows.append(row)
    return pd.DataFrame(rows)
