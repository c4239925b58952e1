"""Turn `DataConfig.shards` (pattern, folder or index.json) into a list of shard URLs (+ sample counts)."""

from __future__ import annotations

import json
from pathlib import Path

import braceexpand


class ShardSpecError(ValueError):
    """The shards setting points at nothing usable; the message names the path."""


def resolve_shards(spec: str) -> tuple[list[str], list[int] | None]:
    """(urls, samples per shard or None when unknown). Counts come from index.json when there is one."""
    path = Path(spec)
    if spec.endswith(".json"):
        if not path.is_file():
            raise ShardSpecError(f"shards: index file {spec} not found")
        try:
            index = json.loads(path.read_text())
            entries = index["shards"]
            urls = [str(path.parent / e["file"]) for e in entries]
            counts = [int(e["samples"]) for e in entries]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ShardSpecError(f"shards: {spec} is not an index written by vmae-shards build ({e})") from None
    elif path.is_dir():
        if (path / "index.json").is_file():
            return resolve_shards(str(path / "index.json"))
        urls, counts = sorted(str(p) for p in path.glob("*.tar")), None
    else:
        urls, counts = list(braceexpand.braceexpand(spec)), None
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
        if missing:
            raise ShardSpecError(f"shards: {len(missing)} of {len(urls)} shard(s) not found, e.g. {missing[0]}")
    if not urls:
        raise ShardSpecError(f"shards: no .tar shards found for {spec!r}")
    return urls, counts
