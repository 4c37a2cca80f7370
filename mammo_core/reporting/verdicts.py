"""Verdicts on the paper's comparative claims: our measured difference, its paired interval, and what it says.

Why a fixed rule: a report that lets the reader judge "0.61 vs 0.58" invites reading noise as evidence. Each
claim "X beats Y" is checked on predictions both models made for the same test items, with a paired
bootstrap over patients (:mod:`mammo_core.evaluation.paired_bootstrap`), and gets one of four verdicts:

- ``reproduced``: the whole interval of X - Y lies above 0;
- ``contradicted``: the whole interval lies below 0;
- ``not distinguishable from noise``: the interval contains 0 (or could not be computed);
- ``not tested here``: an artifact the comparison needs is missing, so nothing was measured.

A claim made of several comparisons ("fusion beats every branch") is reproduced only when every part is,
and contradicted as soon as one part is. Plain data and functions; the report reads the artifacts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd

from mammo_core.evaluation.paired_bootstrap import PairedDifference

REPRODUCED = "reproduced"
CONTRADICTED = "contradicted"
NOISE = "not distinguishable from noise"
NOT_TESTED = "not tested here"
VERDICTS = (REPRODUCED, CONTRADICTED, NOISE, NOT_TESTED)


def verdict_of(difference: PairedDifference | None) -> str:
    """The verdict on "B beats A" from the paired difference B - A (None: nothing was measured)."""
    if difference is None:
        return NOT_TESTED
    if math.isnan(difference.low) or math.isnan(difference.high):
        return NOISE
    if difference.low > 0:
        return REPRODUCED
    if difference.high < 0:
        return CONTRADICTED
    return NOISE


def combined(verdicts: Iterable[str]) -> str:
    """One verdict for a claim made of several comparisons (see the module docstring)."""
    parts = list(verdicts)
    if not parts:
        return NOT_TESTED
    if CONTRADICTED in parts:
        return CONTRADICTED
    if all(v == REPRODUCED for v in parts):
        return REPRODUCED
    if NOISE in parts:
        return NOISE
    return NOT_TESTED


@dataclass(frozen=True)
class Comparison:
    """One measured (or untestable) part of a claim: ``better`` is the side the paper says wins.

    ``difference`` is the paired bootstrap of better - worse (None when not paired). Evidence that is not
    a paired bootstrap (unpaired intervals, timings) gives ``values`` (better, worse, low, high) and a
    ``fixed`` verdict decided by its own stated rule.
    """

    better: str
    worse: str
    metric: str
    difference: PairedDifference | None  # better - worse, paired; None when not tested
    source: str = ""  # the artifacts it was computed from, or why it could not be
    values: tuple[float, float, float, float] | None = None
    fixed: str | None = None

    @property
    def verdict(self) -> str:
        return self.fixed if self.fixed is not None else verdict_of(self.difference)


def interval_comparison(better: str, worse: str, metric: str, value_better: float, value_worse: float,
                        ci_better: tuple[float, float] | None, ci_worse: tuple[float, float] | None,
                        source: str) -> Comparison:
    """Two values with their own (unpaired) intervals: reproduced/contradicted only when they do not overlap.

    Weaker than a paired interval (used where no per-item predictions were saved): overlapping intervals
    can still hide a real difference, so overlap reads as "not distinguishable", never as "equal".
    """
    nan = float("nan")
    values = (value_better, value_worse, nan, nan)
    if ci_better is None or ci_worse is None or any(math.isnan(v) for v in (*ci_better, *ci_worse)):
        return Comparison(better, worse, metric, None, f"not tested: no bootstrap interval of {metric} ({source})",
                          values, NOT_TESTED)
    if ci_better[0] > ci_worse[1]:
        verdict = REPRODUCED
    elif ci_better[1] < ci_worse[0]:
        verdict = CONTRADICTED
    else:
        verdict = NOISE
    return Comparison(better, worse, metric, None, f"{source}; intervals {better} [{ci_better[0]:.4f}, "
                      f"{ci_better[1]:.4f}], {worse} [{ci_worse[0]:.4f}, {ci_worse[1]:.4f}]", values, verdict)


SPEED_MARGIN = 0.10  # a latency ratio within 10 % of 1 is not read as faster or slower (no interval on timings)


def speed_comparison(faster: str, slower: str, ms_faster: float, ms_slower: float, source: str) -> Comparison:
    """"faster is faster than slower" from two side-by-side median timings (difference: ms saved)."""
    nan = float("nan")
    values = (ms_faster, ms_slower, nan, nan)
    metric = "latency ms (lower wins; difference = ms saved)"
    if math.isnan(ms_faster) or math.isnan(ms_slower) or ms_slower <= 0:
        return Comparison(faster, slower, metric, None, f"not tested: no latency ({source})", values, NOT_TESTED)
    ratio = ms_faster / ms_slower
    verdict = REPRODUCED if ratio < 1 - SPEED_MARGIN else CONTRADICTED if ratio > 1 + SPEED_MARGIN else NOISE
    return Comparison(faster, slower, metric, None, f"{source}; ratio {ratio:.2f} (median timings, no interval: "
                      f"within {SPEED_MARGIN:.0%} of 1 counts as not distinguishable)", values, verdict)


@dataclass(frozen=True)
class Claim:
    """A comparative claim of the paper and the comparisons that test it."""

    text: str
    where: str  # where the paper makes it
    comparisons: Sequence[Comparison]
    note: str = ""

    @property
    def verdict(self) -> str:
        return combined(c.verdict for c in self.comparisons)


def verdict_table(claims: Sequence[Claim]) -> pd.DataFrame:
    """One row per comparison: the claim, ours (difference and CI), the verdict of the part and of the claim."""
    rows = []
    for claim in claims:
        for c in claim.comparisons or [Comparison("", "", "", None, claim.note or NOT_TESTED)]:
            d = c.difference
            nan = float("nan")
            better, worse, low, high = ((d.b, d.a, d.low, d.high) if d else c.values or (nan, nan, nan, nan))
            difference = better - worse
            if d is None and c.values is not None and c.metric.startswith("latency"):
                difference = worse - better  # ms saved by the side claimed faster
            rows.append({
                "paper claim": claim.text, "paper": claim.where, "claim verdict": claim.verdict,
                "comparison": f"{c.better} - {c.worse}" if c.better else "",
                "metric": c.metric, "claimed better (ours)": better, "other (ours)": worse,
                "difference": difference, "CI low": low, "CI high": high,
                "patients": d.n_patients if d else nan, "verdict": c.verdict, "from": c.source,
            })
    return pd.DataFrame(rows)
