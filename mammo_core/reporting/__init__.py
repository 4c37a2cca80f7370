"""The report: its tables, HTML rendering, the paper's claims, run comparison, verdicts.

Modules:
- ``compare``: Side by side of two pipeline runs: their params, their metrics and every table of their reports.
- ``paper_claims``: The values the source paper CLAIMS in its Tables 1-8, transcribed verbatim for the report's
  "paper" column.
- ``report``: The run report: the paper's Tables 1-8 and Figures 9-14 regenerated from the stage artifacts of one run.
- ``report_render``: Render a report (a list of :class:`Section`) as Markdown, as self-contained HTML, and its tables
  as CSV.
- ``verdicts``: Verdicts on the paper's comparative claims: our measured difference, its paired interval, and what it
  says.
"""
