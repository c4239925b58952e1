"""Optional local copies of remote shards (`cache_dir`, `cache_gib`): for sets read many epochs in a row.

A shard read from its start to its end is written next to the read (a temporary name, renamed when
complete: readers on other ranks or workers never see half a file) when its size is what index.json says
(or the server's length, without an index). A hit is checked against that size again and marks the file
as recently used; past `cache_gib` the least recently used copies are removed. Several ranks and workers
may share one folder.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("vmae_ds.data")
GIB = 2 ** 30
DRAIN = 1 << 16  # a reader that stops this close to the end (tar padding) is read to the end for the copy
STALE_TMP_S = 3600  # temporary copies of readers killed mid-shard are removed after an hour


class ShardCache:
    def __init__(self, folder: str, gib: float):
        self.folder, self.bound = Path(folder), int(gib * GIB)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path_for(self, url: str) -> Path:
        digest = hashlib.blake2b(url.encode(), digest_size=8).hexdigest()
        return self.folder / f"{digest}-{url.rsplit('/', 1)[-1]}"

    def lookup(self, url: str, size: int | None) -> Path | None:
        """The local copy of `url`, when there is one of the right size (a wrong one is removed)."""
        path = self.path_for(url)
        try:
            have = path.stat().st_size
        except FileNotFoundError:
            return None
        if size is not None and have != size:
            log.warning("cache: %s is %d bytes, index.json says %d: removed, reading the shard again", path,
                        have, size)
            path.unlink(missing_ok=True)
            return None
        try:
            _used(path)
        except FileNotFoundError:  # evicted by another reader meanwhile
            return None
        return path

    def tee(self, raw: io.RawIOBase, url: str) -> io.RawIOBase:
        return _Tee(raw, self, url)

    def store(self, tmp: Path, url: str) -> None:
        final = self.path_for(url)
        os.replace(tmp, final)
        _used(final)
        self.evict(keep=final)

    def evict(self, keep: Path | None = None) -> None:
        """Remove least recently used copies until the folder is under the bound (never `keep`)."""
        files = []
        now = time.time()
        for p in self.folder.iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                if now - st.st_mtime > STALE_TMP_S:
                    p.unlink(missing_ok=True)
                continue
            files.append((st.st_mtime_ns, st.st_size, p))
        total = sum(s for _, s, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= self.bound:
                break
            if p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size


def _used(path: Path) -> None:
    """Mark as recently used. The clock, not the file system's coarse timestamp tick: two uses a moment
    apart must keep their order."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


class _Tee(io.RawIOBase):
    """Passes a ShardStream's bytes through and writes them to a temporary copy; stores the copy when the
    stream reached its end at the expected size, drops it otherwise."""

    def __init__(self, raw, cache: ShardCache, url: str):
        super().__init__()
        self.raw, self.cache, self.url = raw, cache, url
        self.name = raw.name
        self.tmp = cache.folder / f".{cache.path_for(url).name}.{os.getpid()}.{id(self)}.tmp"
        self.out = open(self.tmp, "wb")
        self.done = self.failed = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            n = self.raw.readinto(b)
        except BaseException:
            self.failed = True
            raise
        if n:
            self.out.write(memoryview(b)[:n])
        else:
            self.done = True
        return n

    def close(self) -> None:
        if self.closed:
            return
        try:
            total = self.raw.total
            if not (self.done or self.failed) and total is not None and 0 <= total - self.raw.pos <= DRAIN:
                buf = bytearray(DRAIN)
                while self.readinto(buf):  # the tar end marker and padding the parser did not ask for
                    pass
            self.out.close()
            if self.done and total is not None and self.raw.pos == total:
                self.cache.store(self.tmp, self.url)
        except OSError as e:  # a full disk or a failed drain costs the copy, never the read
            log.info("cache: %s not stored (%s)", self.url, e)
        finally:
            if not self.out.closed:
                self.out.close()
            self.tmp.unlink(missing_ok=True)
            self.raw.close()
            super().close()
