"""Reports and comparisons from run directories: ``simlab report`` (HTML + PNG) and ``simlab compare``.

``write_report(run_dir)`` writes ``run_dir/report/index.html`` and returns its path; the command-line
parsers live in :mod:`simlab.report.commands`, the comparison logic in :mod:`simlab.compare`.
"""

from __future__ import annotations

from simlab.report.html import ReportError, write_report

__all__ = ["ReportError", "write_report"]
