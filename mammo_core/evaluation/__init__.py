"""Measuring results: metrics, figures, paired bootstrap, the shortcut probe, seed summaries, latency.

Modules:
- ``figures``: Figures shared by stages and the report: confusion matrices and validation curves (matplotlib, Agg).
- ``latency``: The one latency timer: zero-argument calls timed interleaved, median milliseconds per call.
- ``metrics``: Classification metrics, patient-level bootstrap confidence intervals, and the paper's diversity tables.
- ``paired_bootstrap``: Paired bootstrap of a metric difference between two models scored on the same patients.
- ``seed_summary``: Summaries of a paired comparison repeated over training seeds (Table 4: hash decoder vs FC
  ablation).
- ``shortcut_probe``: Shortcut probe: can statistics of a patch that say nothing about its tissue predict its class?
"""
