#!/usr/bin/env python3
"""DuckDB side of `runnel-bench-query` (docs/BENCHMARKS.md): runs the given queries on the
aggregator's Parquet files and the dimension CSV, one warm-up run and then `runs` measured runs
each, and prints {name: {"median_ms": ..., "rows": [...]}} as JSON on stdout.

Usage: duckdb_queries.py '{"events": DIR, "products": CSV, "runs": N, "queries": [{"name", "sql"}]}'
Needs the PyPI package `duckdb`.
"""
import json
import statistics
import sys
import time

import duckdb


def sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def main() -> None:
    spec = json.loads(sys.argv[1])
    con = duckdb.connect()
    # The files hold UTC instants; the queries cast them to plain TIMESTAMP in UTC.
    con.execute("SET TimeZone = 'UTC'")
    con.execute(
        "CREATE VIEW events AS SELECT * FROM read_parquet(%s, hive_partitioning = true)"
        % sql_string(spec["events"] + "/**/*.parquet")
    )
    con.execute("CREATE VIEW pages AS SELECT * FROM read_csv_auto(%s)" % sql_string(spec["products"]))
    out = {}
    for query in spec["queries"]:
        rows = con.execute(query["sql"]).fetchall()
        times = []
        for _ in range(spec["runs"]):
            started = time.perf_counter()
            con.execute(query["sql"]).fetchall()
            times.append((time.perf_counter() - started) * 1000.0)
        out[query["name"]] = {
            "median_ms": statistics.median(times),
            "rows": [[v if isinstance(v, (int, float, type(None))) else str(v) for v in row] for row in rows],
        }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
