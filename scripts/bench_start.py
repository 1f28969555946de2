#!/usr/bin/env python3
"""Benchmark: what the supervisor adds to a cold start and to a crash recovery.

    .venv/bin/python scripts/bench_start.py [--rounds 5] [--llama-server PATH]

Same machine, same tiny model (already in the store), one run, alternating:

  child alone   spawn llama-server, poll GET /health every 2 ms until it answers 200
  serve         ``llama-supervisor serve`` from exec until it prints "<name> ready";
                split into interpreter + imports + config + store check (until the child is
                spawned) and spawn-to-ready as the supervisor sees it
  recovery      kill -9 the ready child; time until the supervisor reports ready again,
                against the backoff it chose plus the child's own start time

Writes bench/start.json and bench/start.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchlib import CLI, MODEL, ROOT, llama_server, publish, serve_argv

ARGS = ["--ctx-size", "512", "--threads", "1"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_alone(binary: str, model: Path) -> float:
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [binary, "--model", str(model), "--host", "127.0.0.1", "--port", str(port), *ARGS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/health", timeout=1
                ) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.002)
    finally:
        proc.terminate()
        proc.wait()


class Serve:
    """``llama-supervisor serve`` with its stderr JSON events timestamped as they arrive."""

    def __init__(self, config: Path) -> None:
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(
            serve_argv(config),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: queue.Queue[tuple[float, dict[str, object]]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                self.events.put((time.perf_counter() - self.start, event))

    def wait_event(self, name: str, timeout: float = 60) -> tuple[float, dict[str, object]]:
        deadline = time.monotonic() + timeout
        while True:
            at, event = self.events.get(timeout=max(deadline - time.monotonic(), 0.01))
            if event.get("event") == name:
                return at, event

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    args = parser.parse_args()
    binary = llama_server()
    digest = hashlib.sha256(MODEL.read_bytes()).hexdigest()

    alone: list[float] = []
    to_spawn: list[float] = []
    spawn_to_ready: list[float] = []
    total: list[float] = []
    recovery: list[float] = []
    expected_recovery: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        store = Path(tmp) / "store"
        config = Path(tmp) / "bench.toml"
        config.write_text(
            f'[model]\nname = "tiny-llama"\nurl = "file:{MODEL}"\nsha256 = "{digest}"\n'
            f"size_bytes = {MODEL.stat().st_size}\n"
            f'[store]\ndir = "{store}"\n'
            f'[backend]\ncommand = "{binary}"\nargs = {json.dumps(ARGS)}\n'
            f"[gateway]\nport = 0\n"
        )
        # Put the model into the store once: "cold start with the model in the store".
        subprocess.run(
            [str(CLI), "fetch", "--config", str(config)],
            check=True,
            capture_output=True,
        )
        blob_dir = store / "blobs"
        blob = next(blob_dir.iterdir())
        for _ in range(args.rounds):
            alone.append(child_alone(binary, blob))
            serve = Serve(config)
            spawned_at, _ = serve.wait_event("child.spawned")
            ready_at, _ = serve.wait_event("child.ready")
            assert serve.proc.stdout is not None
            serve.proc.stdout.readline()  # "<name> ready"
            total.append(time.perf_counter() - serve.start)
            to_spawn.append(spawned_at)
            spawn_to_ready.append(ready_at - spawned_at)
            # crash recovery
            child = next(iter(__import__("psutil").Process(serve.proc.pid).children()))
            killed_at = time.perf_counter() - serve.start
            os.kill(child.pid, signal.SIGKILL)
            _, scheduled = serve.wait_event("child.restart_scheduled")
            again_at, _ = serve.wait_event("child.ready")
            recovery.append(again_at - killed_at)
            delay = scheduled["delay_s"]
            assert isinstance(delay, float | int)
            expected_recovery.append(float(delay) + alone[-1])
            serve.stop()

    med = statistics.median
    rows = {
        "child_alone_s": med(alone),
        "serve_total_s": med(total),
        "serve_until_spawn_s": med(to_spawn),
        "serve_spawn_to_ready_s": med(spawn_to_ready),
        "overhead_total_s": med(total) - med(alone),
        "overhead_after_spawn_s": med(spawn_to_ready) - med(alone),
        "recovery_s": med(recovery),
        "backoff_plus_child_start_s": med(expected_recovery),
    }
    table = "\n".join(
        [
            "| measure | median |",
            "|---|---|",
            f"| child alone: spawn to first 200 on /health | {rows['child_alone_s'] * 1000:.0f} ms |",
            f"| serve: exec to ready | {rows['serve_total_s'] * 1000:.0f} ms |",
            f"| of which: interpreter, imports, config, store check (exec to spawn) | {rows['serve_until_spawn_s'] * 1000:.0f} ms |",
            f"| of which: spawn to ready, as the supervisor sees it | {rows['serve_spawn_to_ready_s'] * 1000:.0f} ms |",
            f"| overhead over the child alone, after the spawn | {rows['overhead_after_spawn_s'] * 1000:+.0f} ms |",
            f"| overhead over the child alone, from exec | {rows['overhead_total_s'] * 1000:+.0f} ms |",
            f"| kill -9 to ready again | {rows['recovery_s'] * 1000:.0f} ms |",
            f"| chosen backoff + child alone | {rows['backoff_plus_child_start_s'] * 1000:.0f} ms |",
        ]
    )
    raw = {
        "alone": alone,
        "total": total,
        "to_spawn": to_spawn,
        "spawn_to_ready": spawn_to_ready,
        "recovery": recovery,
        "expected_recovery": expected_recovery,
    }
    publish(
        args.out,
        "start",
        f"scripts/bench_start.py, {args.rounds} rounds",
        table,
        {"medians": rows, "raw": raw},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
