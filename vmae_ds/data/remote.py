"""Reading shard bytes wherever they live, with retries that continue where a read stopped.

Sources: local files; http(s):// (a range request from the byte reached, where the server supports it);
s3://, gs:// and any other scheme through a command-line client that writes the object to stdout (a
command template per scheme, `{url}` and optionally `{offset}`); `pipe:COMMAND` URLs as in WebDataset.

A remote read that fails (connection cut, HTTP error, client exit) or stalls (no byte for `timeout_s`) is
reopened after a backoff at the byte it reached: with a range request, or a command given `{offset}`, or
else by reading the object again and dropping the bytes already delivered. The tar parser above sees one
unbroken byte stream, so a shard is read to its end, every sample once. After `retries` failures in a row
without progress the read raises ShardUnreachable naming the shard. Bytes, read time and retries are
added to a counter dict (a reader's position), so they travel to the training process with the batches.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import select
import shlex
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from http.client import HTTPException
from typing import BinaryIO

log = logging.getLogger("vmae_ds.data")

# what the usual command-line clients need to write an object to stdout; `{offset}`: start at that byte
DEFAULT_COMMANDS = {"s3": "aws s3 cp {url} -", "gs": "gcloud storage cat -r {offset}- {url}"}
READ_COUNTERS = ("bytes_read", "cached_bytes", "read_ms", "retries")
MAX_BACKOFF_S = 60.0
BLOCK = 1 << 20  # bytes per read from the source (a BufferedReader in front keeps tar's small reads cheap)


class ShardUnreachable(OSError):
    """A remote shard that could not be read after all retries; the message names it and the last error."""


class PermanentReadError(OSError):
    """A failure no retry can cure: the read stops at once, naming the cause."""


class ShardChanged(PermanentReadError):
    """The object is not the one the index describes (another size)."""


class _AttemptFailed(OSError):
    """One attempt failed in a way a retry can cure (early end, client exit, stall)."""


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def scheme_of(url: str) -> str:
    return "pipe" if url.startswith("pipe:") else url.split("://", 1)[0].lower() if "://" in url else "file"


def shard_label(url: str) -> str:
    return url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Remote:
    """How remote shards are read: read timeout, retries and backoff, command per scheme, optional cache."""

    timeout_s: float = 60.0
    retries: int = 6
    backoff_s: float = 1.0
    commands: dict[str, str] = field(default_factory=dict)
    cache_dir: str | None = None
    cache_gib: float = 50.0

    @staticmethod
    def of(cfg: object) -> Remote:
        """From a DataConfig (or anything with its fields)."""
        return Remote(timeout_s=cfg.read_timeout_s, retries=cfg.read_retries, backoff_s=cfg.retry_backoff_s,
                      commands=dict(cfg.remote_commands), cache_dir=cfg.cache_dir, cache_gib=cfg.cache_gib)

    def command_for(self, url: str) -> str:
        """The command template for a non-http URL; ValueError naming the scheme when there is none."""
        scheme = scheme_of(url)
        if scheme == "pipe":
            return url[len("pipe:"):]
        template = self.commands.get(scheme) or DEFAULT_COMMANDS.get(scheme)
        if not template:
            raise ValueError(f"no command for {scheme}:// URLs ({url}): set data.shards.remote_commands.{scheme} "
                             f"to a command that writes the object to stdout, e.g. 'mycli cat {{url}}'")
        return template

    def check(self, url: str) -> None:
        """Fail early (ValueError) for a URL this configuration cannot read."""
        if is_remote(url) and scheme_of(url) not in ("http", "https"):
            self.command_for(url)


def _add(sink: dict | None, key: str, n: int) -> None:
    if sink is not None and n:
        sink[key] = sink.get(key, 0) + n


class _HttpSource:
    """One GET from byte `offset` (Range), or from 0 when the server ignores ranges (then `start` is 0)."""

    def __init__(self, url: str, offset: int, timeout: float):
        req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        self.start, self.total, self.resp = 0, None, None
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416 and offset:  # asked for bytes past the end: the object is read to its end
                self.start = offset
                return
            raise _AttemptFailed(f"HTTP {e.code} {e.reason}") from None
        self.resp = resp
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                resp.close()
                raise _AttemptFailed(f"unusable Content-Range {resp.headers.get('Content-Range')!r}")
            self.start = offset
            self.total = int(m.group(2)) if m.group(2) != "*" else None
        elif length is not None:
            self.total = int(length)

    def readinto(self, b: memoryview) -> int:
        if self.resp is None:
            return 0
        data = self.resp.read1(len(b))  # what has arrived: a stall after it keeps those bytes delivered
        b[:len(data)] = data
        return len(data)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        if self.resp is not None:
            self.resp.close()


class _CommandSource:
    """A command writing the object to stdout; `{offset}` in the template starts it at that byte."""

    def __init__(self, template: str, url: str, offset: int, timeout: float):
        self.start = offset if "{offset}" in template else 0
        self.total, self.timeout = None, timeout
        cmd = template.replace("{url}", shlex.quote(url)).replace("{offset}", str(self.start))
        self.what = cmd.split()[0] if cmd.split() else cmd
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=self.err,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.fd = self.proc.stdout.fileno()

    def readinto(self, b: memoryview) -> int:
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"{self.what}: no output for {self.timeout:g} s")
        data = os.read(self.fd, len(b))
        b[:len(data)] = data
        return len(data)

    def finish(self) -> None:
        """At the end of the output: the client must have succeeded."""
        try:
            code = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.what}: did not exit {self.timeout:g} s after its output ended") from None
        if code != 0:
            self.err.seek(0)
            tail = self.err.read()[-300:].decode(errors="replace").strip().replace("\n", " ")
            if code in (126, 127):  # the shell found no such command (or cannot run it)
                raise PermanentReadError(f"{self.what}: command not found or not executable ({tail}); install "
                                         f"it or set data.shards.remote_commands")
            raise _AttemptFailed(f"{self.what} exited with {code}: {tail}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the client and its children
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc.stdout.close()
        self.err.close()


class ShardStream(io.RawIOBase):
    """The bytes of one shard as a resumable, counted stream (see the module docstring).

    `size` (index.json's byte count) is checked against what the source says and reads to; a local file is
    read once (no retries: a missing or short local file stays so). Counters go to `sink`: `bytes_read`
    (or `count_as`), `read_ms` (time blocked on the source), `retries`.
    """

    def __init__(self, url: str, remote: Remote, sink: dict | None = None, size: int | None = None,
                 count_as: str = "bytes_read"):
        super().__init__()
        self.url, self.remote, self.sink, self.size, self.count_as = url, remote, sink, size, count_as
        self.name = url  # shown by the tar parser's error messages
        self.remote_url = is_remote(url)
        self.pos = 0  # bytes delivered
        self.total = size
        self._src = None
        self._fails = 0  # failed attempts since the last delivered byte
        self._ms = 0.0
        self._jitter = random.Random()  # not the data's generators: waits only

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")
        while True:
            try:
                if self._src is None:
                    self._src = self._open()
                t0 = time.perf_counter()
                n = self._src.readinto(view)
                self._timed(t0)
                if n == 0:
                    self._src.finish()  # a client's exit status says more than the missing bytes
                    if self.total is not None and self.pos < self.total:
                        raise _AttemptFailed(f"stream ended at byte {self.pos} of {self.total}")
                    return 0
            except (OSError, HTTPException) as e:
                if not self.remote_url or isinstance(e, PermanentReadError):
                    raise
                self._retry(e)
                continue
            self.pos += n
            self._fails = 0
            _add(self.sink, self.count_as, n)
            return n

    def _timed(self, t0: float) -> None:
        self._ms += (time.perf_counter() - t0) * 1000
        whole = int(self._ms)
        self._ms -= whole
        _add(self.sink, "read_ms", whole)

    def _open(self):
        if not self.remote_url:
            f = open(self.url[len("file://"):] if self.url.startswith("file://") else self.url, "rb")
            f.seek(self.pos)
            return _FileSource(f)
        t0 = time.perf_counter()
        if scheme_of(self.url) in ("http", "https"):
            src = _HttpSource(self.url, self.pos, self.remote.timeout_s)
        else:
            src = _CommandSource(self.remote.command_for(self.url), self.url, self.pos, self.remote.timeout_s)
        try:
            self._agree(src)
            self._skip(src, self.pos - src.start)  # a source that restarted at 0: drop what was delivered
        except BaseException:
            src.close()
            raise
        self._timed(t0)
        return src

    def _agree(self, src) -> None:
        if src.total is None:
            return
        if self.total is not None and src.total != self.total:
            raise ShardChanged(f"{shard_label(self.url)} is {src.total} bytes at the source, "
                               f"{'index.json says' if self.size is not None else 'it was'} {self.total}")
        self.total = src.total

    def _skip(self, src, n: int) -> None:
        buf = memoryview(bytearray(min(max(n, 1), BLOCK)))
        while n > 0:
            got = src.readinto(buf[:min(n, len(buf))])
            if got == 0:
                raise _AttemptFailed(f"stream ended while skipping to byte {self.pos}")
            _add(self.sink, self.count_as, got)
            n -= got

    def _retry(self, e: BaseException) -> None:
        self._close_src()
        self._fails += 1
        what = f"{type(e).__name__}: {e}" if not isinstance(e, _AttemptFailed) else str(e)
        if self._fails > self.remote.retries:
            raise ShardUnreachable(f"unreachable after {self._fails} tries (last: {what[:200]})") from None
        _add(self.sink, "retries", 1)
        wait = min(MAX_BACKOFF_S, self.remote.backoff_s * 2 ** (self._fails - 1)) * self._jitter.uniform(0.5, 1)
        log.info("shard %s: read failed at byte %d (%s); retry %d of %d in %.2f s", shard_label(self.url),
                 self.pos, what[:200], self._fails, self.remote.retries, wait)
        time.sleep(wait)

    def _close_src(self) -> None:
        src, self._src = self._src, None
        if src is not None:
            try:
                src.close()
            except OSError:
                pass

    def close(self) -> None:
        self._close_src()
        super().close()


class _FileSource:
    def __init__(self, f: BinaryIO):
        self.f, self.start, self.total = f, f.tell(), None

    def readinto(self, b: memoryview) -> int:
        return self.f.readinto(b)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.f.close()


class ShardOpener:
    """Opens shards by URL for the readers: counted, resumable, through the cache when one is set.
    `sizes` maps URLs to index.json's byte counts (checked, and what the cache verifies against)."""

    def __init__(self, remote: Remote | None = None, sizes: dict[str, int] | None = None):
        self.remote = remote or Remote()
        self.sizes = sizes or {}
        self._cache = None
        if self.remote.cache_dir:
            from vmae_ds.data.shard_cache import ShardCache

            self._cache = ShardCache(self.remote.cache_dir, self.remote.cache_gib)

    def open(self, url: str, sink: dict | None = None) -> BinaryIO:
        size = self.sizes.get(url)
        raw: io.RawIOBase
        if self._cache is not None and is_remote(url):
            hit = self._cache.lookup(url, size)
            if hit is not None:
                raw = ShardStream(str(hit), self.remote, sink, size, count_as="cached_bytes")
            else:
                raw = self._cache.tee(ShardStream(url, self.remote, sink, size), url)
        else:
            raw = ShardStream(url, self.remote, sink, size)
        return io.BufferedReader(raw, buffer_size=BLOCK)


def fetch(url: str, remote: Remote | None = None) -> bytes:
    """A whole (small) object: index.json, labels.json. At most 2 retries: a wrong URL fails in seconds at
    start-up, not after the minute of backoff a shard read may wait."""
    remote = remote or Remote()
    with ShardStream(url, replace(remote, retries=min(remote.retries, 2))) as s:
        return s.read()
