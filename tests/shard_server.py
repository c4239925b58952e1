"""A real HTTP server on 127.0.0.1 serving a shard folder, with faults injected per file and request.

Faults: per file, one action for each of its first requests, then normal service: "cut" (the connection is
closed after half of the body), "stall" (a third of the body, then nothing for `stall_s`), "503"; `gone` files
are always 404. Range requests (bytes=N-) are answered with 206 unless `ranges=False` (then the whole file,
200, as servers without range support do). Every request is logged as (file, range start or None, status).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ShardServer:
    def __init__(self, folder: Path, *, ranges: bool = True, faults: dict[str, list[str]] | None = None,
                 gone: set[str] | None = None, stall_s: float = 4.0):
        self.folder, self.ranges, self.stall_s = Path(folder), ranges, stall_s
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.gone = set(gone or ())
        self.log: list[tuple[str, int | None, int]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                owner._serve(self)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a client that went away mid-response (what the faults provoke)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def requests(self, name: str) -> list[tuple[int | None, int]]:
        with self.lock:
            return [(start, status) for n, start, status in self.log if n == name]

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        name = h.path.split("?", 1)[0].rsplit("/", 1)[-1]
        path = self.folder / name
        m = re.match(r"bytes=(\d+)-$", h.headers.get("Range", ""))
        start = int(m.group(1)) if m else None
        with self.lock:
            action = self.faults[name].pop(0) if self.faults.get(name) else "ok"
            if name in self.gone or not path.is_file():
                action = "404"
            status = {"404": 404, "503": 503}.get(action, 206 if start and self.ranges else 200)
            self.log.append((name, start, status))
        if status in (404, 503):
            h.send_error(status)
            return
        data = path.read_bytes()
        body = data[start:] if status == 206 else data
        h.send_response(status)
        h.send_header("Content-Type", "application/x-tar")
        h.send_header("Content-Length", str(len(body)))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Accept-Ranges", "bytes" if self.ranges else "none")
        h.end_headers()
        if action == "cut":
            h.wfile.write(body[:len(body) // 2])
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        if action == "stall":
            h.wfile.write(body[:len(body) // 3])
            h.wfile.flush()
            time.sleep(self.stall_s)
            body = body[len(body) // 3:]
        try:
            h.wfile.write(body)
        except OSError:
            pass  # the client gave up on the stalled read
