"""``bpkit-report``: a run's diagnosis in plain words, and its figures, as a self-contained HTML file.

Example::

    from bpkit.report import write_report, read_run, diagnose

    path = write_report("outputs/2024-05-01/12-00-00")   # -> .../bpkit_report.html (+ PNGs)
    for finding in diagnose(read_run("outputs/2024-05-01/12-00-00")):
        print(finding.text())
"""

from bpkit.diagnosis.findings import NO_PROBLEMS, NO_STATISTICS, Finding, diagnose, summary_line, train_loss_keys
from bpkit.record import RunData, find_record, read_run
from bpkit.report.write import REPORT_NAME, is_multirun, write_multirun_report, write_report

__all__ = ["NO_PROBLEMS", "NO_STATISTICS", "REPORT_NAME", "Finding", "RunData", "diagnose", "find_record",
           "is_multirun", "read_run", "summary_line", "train_loss_keys", "write_multirun_report", "write_report"]
