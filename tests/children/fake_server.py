#!/usr/bin/env python3
"""A stand-in for llama-server where llama.cpp cannot produce the case.

Takes llama-server's arguments (--port, --alias, ...) plus ``--mode``:
  exit         print a line and exit 3 at once
  ignore-term  ignore SIGTERM; serve GET /health -> 200
  silent       write nothing, listen nowhere, sleep
  print-env    print the environment (names, and the API key's value), then serve /health
  chatty       print lines as fast as it can, serve /health
"""

import argparse
import http.server
import os
import signal
import sys
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--mode", required=True)
args, _rest = parser.parse_known_args()


class Health(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a: object) -> None:
        pass

    def do_GET(self) -> None:
        body = b'{"status":"ok"}'
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve() -> None:
    http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Health).serve_forever()


if args.mode == "exit":
    print("fake: failing on purpose", flush=True)
    sys.exit(3)
if args.mode == "silent":
    while True:
        time.sleep(1)
if args.mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("fake: ignoring SIGTERM", flush=True)
if args.mode == "print-env":
    print("fake env names: " + " ".join(sorted(os.environ)), flush=True)
    print("fake key: " + os.environ.get("LLAMA_API_KEY", "none"), flush=True)
if args.mode == "chatty":

    def chatter() -> None:
        n = 0
        while True:
            n += 1
            print(f"fake line {n}", flush=True)

    threading.Thread(target=chatter, daemon=True).start()
serve()
