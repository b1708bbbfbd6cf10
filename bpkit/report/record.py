"""Read a run's ``bpkit_record.jsonl`` robustly: while the run is still writing it, or after a crash
left a truncated last line.

The reader lives with the record's format in :mod:`bpkit.record` (one definition for the writer and the
readers); the names are re-exported here for the report and for existing imports.
"""

from __future__ import annotations

from bpkit.record import RECORD_NAME, Histogram, RunData, alerts_from, find_record, find_records, read_record, read_run

__all__ = ["RECORD_NAME", "Histogram", "RunData", "alerts_from", "find_record", "find_records", "read_record",
           "read_run"]
