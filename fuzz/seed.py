#!/usr/bin/env python3
"""Writes fuzz/corpus/<target>/ seeds from the repository's own fixtures, in the input layout
each entry point in common/src/fuzzing.rs, agent/src/fuzzing.rs and config/src/fuzzing.rs reads
(a selector byte first where the entry point takes one). Run from anywhere; rerun after the
fixtures change. Inputs the fuzzer finds are added beside the seeds by `cargo fuzz run`."""

import hashlib
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"


def put(target: str, data: bytes) -> None:
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"seed-{hashlib.sha256(data).hexdigest()[:16]}").write_bytes(data)


def main() -> None:
    for path in sorted((ROOT / "common/tests/golden").glob("*.bin")):
        put("frames", path.read_bytes())
    snowplow = ROOT / "agent/tests/fixtures/snowplow"
    for path in sorted(snowplow.glob("*")):
        if path.name.endswith(".expected.json"):
            continue
        data = path.read_bytes()
        # get_* fixtures are query strings (odd selector); the rest are POST bodies.
        put("snowplow", (b"\x01" if path.name.startswith("get_") else b"\x00") + data)
    calls = ["track", "page", "screen", "identify", "group", "alias", "batch"]
    for path in sorted((ROOT / "agent/tests/fixtures/segment").glob("*")):
        call = next((i for i, c in enumerate(calls) if c in path.name), 0)
        put("segment", bytes([call]) + path.read_bytes())
        put("segment", bytes([call]) + path.read_bytes() + b"\x00Basic a2V5Og==")
    telemetry = b'{"temp":21.5,"status":"ok","event_id":"e-1"}'
    for selector, payload in [(0, telemetry), (0, b"[" + telemetry + b"," + telemetry + b"]"),
                              (0, b"\x00\x01not json"), (1, b"ON"), (1, b"\xff\xfe"), (2, b"\x00\xff")]:
        put("mqtt", bytes([selector]) + b"plant/berlin/press-4/telemetry\x00" + payload)
    for body in [telemetry, b"[" + telemetry + b"]", telemetry + b"\n" + telemetry,
                 b'{"name":"page_view","timestamp":"2026-11-25T01:00:00Z","tags":["a"]}']:
        put("json", body)
    for path in sorted((ROOT / "config/examples").glob("*.toml")):
        put("config", path.read_bytes())
    for path in sorted((ROOT / "packaging/config").glob("*.toml")):
        put("config", path.read_bytes())


if __name__ == "__main__":
    main()
