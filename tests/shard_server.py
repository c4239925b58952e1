"""`vmae-shards serve`'s server with faults injected per file and request, for the remote-shard tests.

Faults: per file, one action for each of its first requests, then normal service: "cut" (the connection is
closed after half of the body), "stall" (a third of the body, then nothing for `stall_s`), "503"; `gone` files
are always 404. `ranges=False` answers range requests with the whole file (200), as servers without range
support do. Every request is logged as (file, range start or None, status). 127.0.0.1 only.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from data_tools.serve import RangeRequestHandler, ShardHTTPServer


class _FaultyHandler(RangeRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        srv: ShardServer = self.server.owner
        name = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
        self.ranges = srv.ranges
        start = self.range_start()
        with srv.lock:
            action = srv.faults[name].pop(0) if srv.faults.get(name) else "ok"
            if name in srv.gone or not (srv.folder / name).is_file():
                action = "404"
            status = {"404": 404, "503": 503}.get(action, 206 if start else 200)
            srv.log.append((name, self.requested_start(), status))
        if status in (404, 503):
            self.send_error(status)
            return
        f = self.send_head()
        body = f.read()
        f.close()
        if action == "cut":
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if action == "stall":
            self.wfile.write(body[:len(body) // 3])
            self.wfile.flush()
            time.sleep(srv.stall_s)
            body = body[len(body) // 3:]
        try:
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up on the stalled read


class ShardServer:
    def __init__(self, folder: Path, *, ranges: bool = True, faults: dict[str, list[str]] | None = None,
                 gone: set[str] | None = None, stall_s: float = 4.0):
        self.folder, self.ranges, self.stall_s = Path(folder), ranges, stall_s
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.gone = set(gone or ())
        self.log: list[tuple[str, int | None, int]] = []
        self.lock = threading.Lock()
        self.httpd = ShardHTTPServer(folder, handler=_FaultyHandler)
        self.httpd.owner = self
        self.url = self.httpd.url

    def __enter__(self) -> ShardServer:
        self.httpd.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.stop()

    def requests(self, name: str) -> list[tuple[int | None, int]]:
        with self.lock:
            return [(start, status) for n, start, status in self.log if n == name]
