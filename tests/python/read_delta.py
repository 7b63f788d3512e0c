#!/usr/bin/env python3
"""Reads Runnel's events table as an outside engine does: with the PyPI `deltalake` package.

The end-to-end tests (tests/tests/delta_readers.rs, tests/tests/delta_crash.rs) run it with the
Python that RUNNEL_TEST_PYTHON names (`.ci/run` makes a venv with `deltalake` and `pyarrow`). It
opens the table's latest version and prints one JSON line per version it read:

    {"version": 12, "n_rows": 500, "n_distinct": 500, "duplicates": [],
     "max_seq": {"edge-1": 500}, "txn": {"runnel-agent-edge-1": 500}, "n_files": 3}

- n_rows: rows of that version; n_distinct: distinct (agent_id, seq) among them;
- duplicates: up to 5 (agent_id, seq, count) that appear more than once;
- max_seq: the highest seq of each agent_id in that version;
- txn: the version of the Delta transaction identifier (`txn` action) of each app id: Runnel's
  `runnel-agent-<agent id>` for every agent in the data, plus every --app-id (null: none);
- n_files: data files of that version.

The rows are read by pyarrow's Parquet reader (Arrow C++) from the files that version lists, so
nothing of Runnel's own reading code is involved.

Once (the default) it reads the latest version and exits (status 1 with the error on stderr when
that fails). With --watch it polls for new versions every --interval seconds and prints a line
per new version until it is killed, its parent exits, or --max-seconds pass; a read that fails
prints {"version": ..., "error": "..."} and polling goes on.

Table location: a local directory, or s3://bucket/prefix with storage options given as
-o KEY=VALUE (for an S3-compatible test server such as moto: AWS_ENDPOINT_URL=http://127.0.0.1:PORT,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION=us-east-1, AWS_ALLOW_HTTP=true; reading needs
no locking or rename option).
"""

import argparse
import json
import os
import sys
import time

import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

APP_ID_PREFIX = "runnel-agent-"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("location", help="table directory or s3://bucket/prefix")
    parser.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a storage option (repeatable), such as AWS_ENDPOINT_URL=http://127.0.0.1:5000",
    )
    parser.add_argument(
        "--app-id",
        action="append",
        default=[],
        help="also report the txn version of this app id (repeatable)",
    )
    parser.add_argument("--watch", action="store_true", help="poll for new versions")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between polls")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=900.0,
        help="with --watch: stop after this long (a safety net for a forgotten process)",
    )
    args = parser.parse_args(argv)
    options = {}
    for option in args.option:
        key, sep, value = option.partition("=")
        if not sep:
            parser.error(f"--option {option!r} is not KEY=VALUE")
        options[key] = value
    args.storage_options = options
    return args


def read_version(table, extra_app_ids):
    """What one loaded version of `table` holds (a dict for the JSON line)."""
    version = table.version()
    rows = table.to_pyarrow_table(columns=["agent_id", "seq"])
    by_key = rows.group_by(["agent_id", "seq"]).aggregate([([], "count_all")])
    duplicates = by_key.filter(pc.greater(by_key["count_all"], 1)).slice(0, 5).to_pylist()
    by_agent = rows.group_by("agent_id").aggregate([("seq", "max")]).to_pylist()
    max_seq = {row["agent_id"]: row["seq_max"] for row in by_agent}
    app_ids = [APP_ID_PREFIX + agent for agent in sorted(max_seq)] + list(extra_app_ids)
    txn = {app_id: table.transaction_version(app_id) for app_id in app_ids}
    return {
        "version": version,
        "n_rows": rows.num_rows,
        "n_distinct": by_key.num_rows,
        "duplicates": [[d["agent_id"], d["seq"], d["count_all"]] for d in duplicates],
        "max_seq": max_seq,
        "txn": txn,
        "n_files": len(table.file_uris()),
    }


def emit(line):
    sys.stdout.write(json.dumps(line, sort_keys=True) + "\n")
    sys.stdout.flush()


def once(args):
    table = DeltaTable(args.location, storage_options=args.storage_options)
    emit(read_version(table, args.app_id))


def watch(args):
    parent = os.getppid()
    deadline = time.monotonic() + args.max_seconds
    table = None
    last = None
    while time.monotonic() < deadline and os.getppid() == parent:
        version = None
        try:
            if table is None:
                table = DeltaTable(args.location, storage_options=args.storage_options)
            else:
                table.update_incremental()
            version = table.version()
            if version != last:
                emit(read_version(table, args.app_id))
                last = version
        except Exception as error:  # noqa: BLE001 - every failure is reported to the test
            # Before the table exists (the aggregator creates it at its first start) there is
            # nothing to read yet; anything else is reported.
            if table is not None or not isinstance(error, TableNotFoundError):
                emit({"version": version, "error": f"{type(error).__name__}: {error}"})
            table = None
        time.sleep(args.interval)


def main(argv):
    args = parse_args(argv)
    if args.watch:
        watch(args)
    else:
        once(args)


if __name__ == "__main__":
    main(sys.argv[1:])
    # Leave without the interpreter's teardown: deltalake's and pyarrow's native thread pools
    # can abort the process there ("terminate called without an active exception", SIGABRT),
    # seen once in CI after every line had been printed. Errors above still exit with 1.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
