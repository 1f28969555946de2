#!/usr/bin/env python3
"""Benchmark: verified fetch against the usual two passes, side by side, in one run.

    .venv/bin/python scripts/bench_fetch.py [--sizes-mib 256 1024] [--rounds 3]

Serves a file of random bytes over loopback HTTPS (a separate server process, trustme
certificates) and times, round-robin so that every contender sees the same machine state:

  (a) ``llama-supervisor fetch``  download + sha256 + fsync + install, in one pass
  (b) ``curl -o`` then ``sha256sum``  the usual two passes
  (c) ``curl -o`` alone
  (d) ``sha256sum`` alone (file in the page cache)

Dirty pages are flushed (``sync``) before every run, so no contender pays for another's
writeback. It reports medians, the ratio a / max(c, d) (1.0 = hashing fully hidden behind the
transfer) and a's peak RSS (sampled every 5 ms), and writes bench/fetch.json and bench/fetch.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import trustme
from benchlib import CLI, ROOT, publish

SERVER = r"""
import http.server, os, ssl, sys
path, cert, port_file = sys.argv[1], sys.argv[2], sys.argv[3]
size = os.path.getsize(path)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        with open(path, "rb", buffering=0) as f:
            while True:
                block = f.read(1 << 20)
                if not block:
                    break
                self.wfile.write(block)
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert)
httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
with open(port_file, "w") as f:
    f.write(str(httpd.server_address[1]))
httpd.serve_forever()
"""


def timed(argv: list[str], *, sample_rss: bool = False) -> tuple[float, int]:
    """Run argv after flushing dirty pages (so no contender pays for another's writeback);
    wall seconds, and the peak RSS sampled every 5 ms when asked (0 otherwise)."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    if sample_rss:
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, ps.memory_info().rss)
            time.sleep(0.005)
    _out, err = proc.communicate()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {err.decode(errors='replace')[-2000:]}")
    return elapsed, peak


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def bench_size(
    size_mib: int, rounds: int, work: Path, cert_pem: Path, ca_pem: Path
) -> dict[str, object]:
    data_path = work / f"model-{size_mib}.bin"
    with open(data_path, "wb") as handle:
        for _ in range(size_mib):
            handle.write(os.urandom(1 << 20))
    digest = _sha256_file(data_path)
    size = data_path.stat().st_size

    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(data_path), str(cert_pem), str(port_file)]
    )
    try:
        while not port_file.exists() or not port_file.read_text():
            time.sleep(0.05)
        origin = f"https://127.0.0.1:{port_file.read_text()}"
        url = origin + "/models/m.bin"
        store = work / "store"
        config = work / "bench.toml"
        config.write_text(
            f'[model]\nname = "bench"\nurl = "{url}"\nsha256 = "{digest}"\nsize_bytes = {size}\n'
            f'allowed_sources = ["{origin}/models/"]\nca_bundle = "{ca_pem}"\n'
            f'[store]\ndir = "{store}"\n'
        )
        out = work / "curl.out"
        cli = [
            str(CLI),
            "--log-format",
            "json",
            "fetch",
            "--config",
            str(config),
        ]
        curl = ["curl", "-sS", "--fail", "--cacert", str(ca_pem), "-o", str(out), url]
        results: dict[str, list[float]] = {"a": [], "b": [], "c": [], "d": []}
        rss: list[int] = []
        for _ in range(rounds):
            shutil.rmtree(store, ignore_errors=True)
            elapsed, peak = timed(cli, sample_rss=True)
            results["a"].append(elapsed)
            rss.append(peak)

            out.unlink(missing_ok=True)
            t1, _ = timed(curl)
            t2, _ = timed(["sha256sum", str(out)])
            results["b"].append(t1 + t2)

            out.unlink(missing_ok=True)
            t3, _ = timed(curl)
            results["c"].append(t3)

            t4, _ = timed(["sha256sum", str(data_path)])
            results["d"].append(t4)
        shutil.rmtree(store, ignore_errors=True)
        out.unlink(missing_ok=True)
    finally:
        server.terminate()
        server.wait()
        data_path.unlink()
    med = {key: statistics.median(values) for key, values in results.items()}
    return {
        "size_mib": size_mib,
        "rounds": rounds,
        "median_s": med,
        "all_s": results,
        "throughput_mib_s": {key: size_mib / value for key, value in med.items()},
        "ratio_a_over_max_c_d": med["a"] / max(med["c"], med["d"]),
        "ratio_a_over_b": med["a"] / med["b"],
        "peak_rss_mib_a": max(rss) / (1 << 20),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    args = parser.parse_args()

    ca = trustme.CA()
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp:
        work = Path(tmp)
        cert_pem = work / "server.pem"
        ca_pem = work / "ca.pem"
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert_pem))
        ca.cert_pem.write_to_path(str(ca_pem))
        rows = [bench_size(size, args.rounds, work, cert_pem, ca_pem) for size in args.sizes_mib]

    lines = [
        "| size | (a) fetch | (b) curl + sha256sum | (c) curl | (d) sha256sum | a / max(c, d) | a / b | peak RSS of (a) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        med = row["median_s"]
        assert isinstance(med, dict)
        lines.append(
            f"| {row['size_mib']} MiB | {med['a']:.2f} s | {med['b']:.2f} s | {med['c']:.2f} s | "
            f"{med['d']:.2f} s | {row['ratio_a_over_max_c_d']:.2f} | {row['ratio_a_over_b']:.2f} | "
            f"{row['peak_rss_mib_a']:.0f} MiB |"
        )
    table = "\n".join(lines)
    publish(args.out, "fetch", "scripts/bench_fetch.py", table, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
