#!/usr/bin/env python3
"""Benchmark: the gateway against the child alone, side by side, in one run.

    .venv/bin/python scripts/bench_gateway.py [--seconds 5] [--rounds 3] [--backends llama-server llama-cpp-python]

For each backend, one ``llama-supervisor serve`` on the tiny model; the *same* child is then
loaded directly (its port and per-spawn key read from /proc, as only the same user can) and
through the gateway, alternating, with the same load generator:

* non-streaming ``/v1/completions`` (max_tokens 8) with wrk at concurrency 1 and 4:
  requests/s, p50 and p99;
* streaming ``/v1/chat/completions``: time to the first SSE chunk, sequential requests from a
  small asyncio client (the same client for both).

Writes bench/gateway.json and bench/gateway.md; prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from benchlib import MODEL, ROOT, llama_server, publish, serve_argv

BODY = '{"prompt":"hello","max_tokens":8}'
STREAM_BODY = json.dumps(
    {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "stream": True}
).encode()

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY")
if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
""".replace("{BODY}", BODY)


def _ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", value.strip())
    if match is None:
        raise ValueError(value)
    number, unit = float(match.group(1)), match.group(2)
    return number / 1000 if unit == "us" else number * 1000 if unit == "s" else number


def wrk(url: str, concurrency: int, seconds: float, script: Path, key: str) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "BENCH_KEY": key},
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{errors.group(1)} failed requests against {url}")
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99}


async def _first_chunk_times(port: int, key: str, count: int) -> list[float]:
    """Sequential streaming requests, a new connection each (llama-server closes the connection
    after a stream); seconds from connecting to the first SSE data."""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{auth}Content-Length: {len(STREAM_BODY)}\r\n\r\n"
    ).encode() + STREAM_BODY
    times = []
    for _ in range(count):
        start = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n", 1)[0]
        first = True
        while True:  # chunked body: size line, data, CRLF
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if first and size:
                times.append(time.perf_counter() - start)
                first = False
            await reader.readexactly(size + 2)
            if size == 0:
                break
        writer.close()
    return times


def first_chunk_ms(port: int, key: str, count: int) -> float:
    return statistics.median(asyncio.run(_first_chunk_times(port, key, count))) * 1000


class Served:
    """One ``llama-supervisor serve`` and the child it runs."""

    def __init__(self, backend: str, tmp: Path, binary: str) -> None:
        digest = hashlib.sha256(MODEL.read_bytes()).hexdigest()
        if backend == "llama-server":
            backend_toml = f'kind = "llama-server"\ncommand = "{binary}"\nargs = ["--ctx-size", "512", "--threads", "1"]\n'
        else:
            backend_toml = f'kind = "llama-cpp-python"\ncommand = "{sys.executable}"\nargs = ["--n_ctx", "512", "--n_threads", "1"]\n'
        config = tmp / f"{backend}.toml"
        config.write_text(
            f'[model]\nname = "tiny-llama"\nurl = "file:{MODEL}"\nsha256 = "{digest}"\n'
            f'size_bytes = {MODEL.stat().st_size}\n[store]\ndir = "{tmp / "store"}"\n'
            f"[backend]\n{backend_toml}[health]\nstart_timeout_s = 60.0\n"
            f"[admission]\nmax_in_flight = 8\nqueue_bound = 64\n[gateway]\nport = 0\n"
        )
        self.proc = subprocess.Popen(
            serve_argv(config),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        if match is None:
            raise RuntimeError("serve did not become ready")
        self.gateway_port = int(match.group(1))
        child = psutil.Process(self.proc.pid).children()[0]
        cmdline = child.cmdline()
        self.child_port = int(cmdline[cmdline.index("--port") + 1])
        environ = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
        names = (b"LLAMA_API_KEY=", b"API_KEY=")
        self.key = next(
            item.split(b"=", 1)[1].decode() for item in environ if item.startswith(names)
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.communicate(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream-requests", type=int, default=200)
    parser.add_argument("--backends", nargs="+", default=["llama-server", "llama-cpp-python"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    binary = llama_server()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp_name:
        tmp = Path(tmp_name)
        script = tmp / "post.lua"
        script.write_text(WRK_SCRIPT)
        for backend in args.backends:
            served = Served(backend, tmp, binary)
            try:
                direct_url = f"http://127.0.0.1:{served.child_port}/v1/completions"
                gateway_url = f"http://127.0.0.1:{served.gateway_port}/v1/completions"
                wrk(direct_url, 1, 1, script, served.key)  # warm both paths
                wrk(gateway_url, 1, 1, script, "")
                rows: dict[str, Any] = {}
                for concurrency in (1, 4):
                    runs: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
                    for round_ in range(args.rounds):
                        order = ["direct", "gateway"] if round_ % 2 == 0 else ["gateway", "direct"]
                        for path in order:
                            url, key = (
                                (direct_url, served.key) if path == "direct" else (gateway_url, "")
                            )
                            runs[path].append(wrk(url, concurrency, args.seconds, script, key))
                    rows[f"c{concurrency}"] = {
                        path: {
                            metric: statistics.median(r[metric] for r in values)
                            for metric in ("rps", "p50_ms", "p99_ms")
                        }
                        for path, values in runs.items()
                    }
                ttfb: dict[str, list[float]] = {"direct": [], "gateway": []}
                for round_ in range(args.rounds):
                    order = ["direct", "gateway"] if round_ % 2 == 0 else ["gateway", "direct"]
                    for path in order:
                        port, key = (
                            (served.child_port, served.key)
                            if path == "direct"
                            else (served.gateway_port, "")
                        )
                        ttfb[path].append(first_chunk_ms(port, key, args.stream_requests))
                rows["stream_first_chunk_ms"] = {
                    path: statistics.median(v) for path, v in ttfb.items()
                }
                results[backend] = rows
            finally:
                served.stop()

    lines = [
        "| backend | load | direct | through the gateway | ratio / added |",
        "|---|---|---|---|---|",
    ]
    for backend, rows in results.items():
        for concurrency in (1, 4):
            row = rows[f"c{concurrency}"]
            d, g = row["direct"], row["gateway"]
            lines.append(
                f"| {backend} | c={concurrency}, requests/s | {d['rps']:.0f} | {g['rps']:.0f} | {g['rps'] / d['rps']:.2f}x |"
            )
            lines.append(
                f"| {backend} | c={concurrency}, p50 / p99 | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} ms | "
                f"{g['p50_ms']:.2f} / {g['p99_ms']:.2f} ms | {g['p50_ms'] - d['p50_ms']:+.2f} ms p50 |"
            )
        first = rows["stream_first_chunk_ms"]
        lines.append(
            f"| {backend} | stream, first chunk p50 | {first['direct']:.2f} ms | {first['gateway']:.2f} ms | "
            f"{first['gateway'] - first['direct']:+.2f} ms |"
        )
    table = "\n".join(lines)
    publish(
        args.out,
        "gateway",
        f"scripts/bench_gateway.py, {args.rounds} rounds of {args.seconds} s",
        table,
        {"results": results},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
