#!/usr/bin/env python3
"""A stand-in for llama-server where llama.cpp cannot produce the case.

Takes llama-server's arguments (--port, --alias, ...) plus ``--mode``:
  exit         print a line and exit 3 at once
  ignore-term  ignore SIGTERM; serve GET /health -> 200
  silent       write nothing, listen nowhere, sleep
  print-env    print the environment (names, and the API key's value), then serve /health
  chatty       print lines as fast as it can, serve /health
  slow         serve /health, and answer POST /v1/completions after --delay seconds
  stream-gated serve /health; POST /v1/chat/completions streams one SSE event, then waits for
               the file --flag to exist before the rest (so a test can see the first event
               arrive while the stream is still open)

POST routes require the per-spawn key (LLAMA_API_KEY), as llama-server does.
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
parser.add_argument("--delay", type=float, default=0.3)
parser.add_argument("--flag", default="")
args, _rest = parser.parse_known_args()


class Health(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a: object) -> None:
        pass

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(200 if self.path == "/health" else 404, b'{"status":"ok"}')

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if self.headers.get("Authorization") != "Bearer " + os.environ.get("LLAMA_API_KEY", ""):
            self._reply(
                401,
                b'{"error":{"code":401,"message":"Invalid API Key","type":"authentication_error"}}',
            )
            return
        if args.mode == "slow" and self.path == "/v1/completions":
            time.sleep(args.delay)
            self._reply(200, b'{"object":"text_completion","echo":' + body + b"}")
            return
        if args.mode == "stream-gated" and self.path == "/v1/chat/completions":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def chunk(data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            chunk(b'data: {"first":true}\n\n')
            while not os.path.exists(args.flag):
                time.sleep(0.01)
            chunk(b'data: {"second":true}\n\n')
            chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            return
        self._reply(404, b'{"error":"not found"}')


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
