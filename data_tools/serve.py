"""`vmae-shards serve`: a shard folder over HTTP with range requests (what resumable reads use).

Python's own `http.server` answers every request with the whole file; this one answers `Range: bytes=N-`
with the rest of the file from byte N (206), so a loader whose connection broke continues where it was.
For trying remote training on one machine or a small cluster; large sets belong behind a real web server
or object store.
"""

from __future__ import annotations

import functools
import re
import shutil
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus `Range: bytes=N-` on files (other range forms get the whole file)."""

    ranges = True

    def requested_start(self) -> int | None:
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "").strip())
        return int(m.group(1)) if m else None

    def range_start(self) -> int | None:
        return self.requested_start() if self.ranges else None

    def send_head(self) -> BinaryIO | None:
        path = Path(self.translate_path(self.path))
        start = self.range_start()
        if start is None or not path.is_file():
            return super().send_head()
        f = open(path, "rb")
        size = path.stat().st_size
        if start >= size:
            f.close()
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        f.seek(start)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return f

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the http.server signature)
        if not getattr(self.server, "quiet", False):
            super().log_message(format, *args)

    def copyfile(self, source: BinaryIO, outputfile: BinaryIO) -> None:
        try:
            shutil.copyfileobj(source, outputfile, 1 << 20)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a reader that stopped early, or gave up on a slow response)


class ShardHTTPServer(ThreadingHTTPServer):
    """Serves `folder` on (host, port) (port 0: any free one, see `.url`) from a thread or the foreground."""

    daemon_threads = True

    def __init__(self, folder: str | Path, host: str = "127.0.0.1", port: int = 0,
                 handler: type[RangeRequestHandler] = RangeRequestHandler, quiet: bool = True):
        self.quiet = quiet
        super().__init__((host, port), functools.partial(handler, directory=str(folder)))
        self.url = f"http://{host}:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    def handle_error(self, request, client_address) -> None:
        if not self.quiet:
            super().handle_error(request, client_address)

    def start(self) -> ShardHTTPServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> ShardHTTPServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
