"""``python -m crisp.report DIR [DIR ...]``: the ablation tables of one study folder or several sweeps.

Writes ``report.md``, ``report.csv``, ``report.png`` (and ``report-tasks.png`` across tasks) into the
first DIR or ``--out`` (:mod:`crisp.report` says what the tables hold), prints the tables, and
exits 1 when a results.json below the dirs cannot be used (each is named on the terminal), 2 when a
dir does not exist or holds no results.
"""

from __future__ import annotations

import argparse
import sys

from crisp.core.results import FILENAME
from crisp.report import CSV, MARKDOWN, PNG, ReportError, collect, format_all, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crisp.report", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help=f"study or sweep directories; every {FILENAME} "
                                                               "below is read")
    parser.add_argument("--out", metavar="DIR", help="where to write the report (default: the first DIR)")
    parser.add_argument("--wandb-project", metavar="NAME", help="also log the table to this W&B project")
    parser.add_argument("--quiet", action="store_true", help="do not print the tables")
    args = parser.parse_args(argv)
    log_wandb = {"project": args.wandb_project} if args.wandb_project else None
    try:
        records = collect(args.dirs)
        summary = write_report(args.dirs, args.out, log_wandb, records=records)
    except ReportError as error:
        print(f"crisp.report: {error}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(format_all(summary))
    print(f"crisp.report: wrote {MARKDOWN}, {CSV}, {PNG} to {args.out or args.dirs[0]}", file=sys.stderr)
    bad = [r for r in records if r.get("unusable")]  # unreadable, another schema, or incomplete
    for record in bad:
        print(f"crisp.report: cannot use {record['results_path']}: {record['error']['message']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
