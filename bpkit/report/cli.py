"""``bpkit-report RUN_DIR [--out report.html]``: write a run's (or a sweep's) report and print its path."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bpkit.errors import BpkitConfigError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bpkit-report`` console script.

    Exit status: 0 on success (malformed lines of the record are skipped and counted in the report), 2 for a path
    that is no run (a missing path, a directory named like the record, an unreadable or empty record), with the
    reason on stderr; 1 with one line on stderr if writing the report fails for any other reason.

    Example::

        $ bpkit-report outputs/2024-05-01/12-00-00
        outputs/2024-05-01/12-00-00/bpkit_report.html: No problems found
    """
    parser = argparse.ArgumentParser(
        prog="bpkit-report",
        description="Diagnose a bpkit run (or compare the jobs of a Hydra multirun sweep) and write a "
                    "self-contained HTML report with PNG figures.")
    parser.add_argument("run_dir", help="a run directory, its bpkit_record.jsonl, or a Hydra multirun directory")
    parser.add_argument("--out", default=None,
                        help="HTML file to write (default: RUN_DIR/bpkit_report.html); PNGs go to <out stem>_files/")
    parser.add_argument("--print", dest="show", action="store_true", help="also print the findings as text")
    args = parser.parse_args(argv)

    from bpkit.diagnosis.findings import diagnose, summary_line
    from bpkit.record import read_run
    from bpkit.report.write import REPORT_NAME, collect_jobs, is_multirun, several_runs, write_report

    try:
        several = several_runs(args.run_dir)
        path = write_report(args.run_dir, args.out)
        if several:  # never one run silently picked among several: each listed, each reported, and a comparison
            jobs = collect_jobs(args.run_dir)
            print(f"{len(jobs)} runs found under {args.run_dir}; the report of each and a comparison ({path}):")
            for job in jobs:
                line = summary_line(job.findings, job.run) if job.run is not None else job.error
                print(f"  {job.path / REPORT_NAME if job.run is not None else job.path}: {line}")
        elif is_multirun(args.run_dir):
            print(path)
        else:
            run = read_run(args.run_dir)
            findings = diagnose(run)
            print(f"{path}: {summary_line(findings, run)}")
            if args.show:
                for f in findings:
                    print(f.text())
    except BpkitConfigError as err:
        print(f"bpkit-report: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a report that cannot be drawn: one line, not a traceback
        print(f"bpkit-report: error: could not write the report of {args.run_dir}: {type(err).__name__}: {err}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
