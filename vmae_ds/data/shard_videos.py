"""Whole videos from a shard set (local, or by URL with the loader's resumable reads), for tools that take
each clip as it is (vmae-extract): shard s goes to rank s % world; ids are the sample keys."""

from __future__ import annotations

import re
from collections.abc import Iterator

from vmae_ds.data.remote import Remote, ShardOpener
from vmae_ds.data.shards import ShardSpecError, load_index, resolve_set, shard_name
from vmae_ds.data.stream import CorruptSample, _tar_samples, initial_position, parse_sample


def is_shard_set(spec: str) -> bool:
    """An index.json (path or URL), a URL, or a folder holding an index.json (not a folder of videos)."""
    try:
        return "://" in spec or load_index(spec) is not None
    except ShardSpecError:
        return spec.endswith(".json")


class ShardVideos:
    """(id, '<shard>/<key>', video bytes) of this rank's shards; unreadable samples and shards go to `errors`."""

    def __init__(self, spec: str, rank: int, world: int, remote: Remote | None = None):
        remote = remote or Remote()
        shards = resolve_set(spec, remote)
        self.total = sum(shards.counts) if shards.counts else None
        self.urls = [u for s, u in enumerate(shards.urls) if s % world == rank]
        self.mine = sum(c for s, c in enumerate(shards.counts) if s % world == rank) if shards.counts else None
        self.opener = ShardOpener(remote, shards.sizes)
        self.errors: list[dict] = []

    def __iter__(self) -> Iterator[tuple[str, str, bytes]]:
        for url in self.urls:
            try:
                for sample in _tar_samples(url, self.opener, initial_position(0)):
                    key = str(sample.get("__key__", "?"))
                    label = f"{shard_name(url)}/{key}"
                    vid = re.sub(r"[^A-Za-z0-9_-]+", "_", key).strip("_") or "video"
                    try:
                        data, _ = parse_sample(sample)
                    except CorruptSample as e:
                        self.errors.append({"id": vid, "path": label, "reason": str(e)[:300]})
                        continue
                    yield vid, label, data
            except Exception as e:  # an unreadable shard (after the retries): named, the rest goes on
                self.errors.append({"id": shard_name(url), "path": url, "reason": f"{type(e).__name__}: {e}"[:300]})
