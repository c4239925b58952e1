"""Shards and who reads what: `DataConfig.shards` -> URLs (+ counts), and each reader's samples per epoch.

A reader is one (rank, logical worker) pair, reader id g = rank * workers + w, R = world * workers readers.
Its position is (epoch, chunk, offset): piece `chunk` of its slice of `epoch`, `offset` samples of it consumed.

- PassLayout (resampled, endless): pass p is a seeded permutation of ALL shards, the same for every reader;
  reader g reads it starting at its own rotation offset g * S // R, so every reader sees every shard before any
  repeat, and together the readers touch every shard in the first 1/R of a pass.
- EpochLayout (exact epochs, needs sample counts): epoch e's global order is a seeded shard permutation,
  concatenated. It is cut into `world` contiguous rank ranges, each cut into `workers` contiguous reader ranges,
  all of near-equal length (the +1s are dealt round the ranks / workers in turn, epoch after epoch, so nobody
  drifts). A rank's range depends on the world size only, so changing num_workers on resume is a rank-local
  re-deal. Pieces are parts of one shard; a reader may start or stop inside a shard.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from vmae_ds.data.remote import Remote, fetch, shard_label


class ShardSpecError(ValueError):
    """The shards setting points at nothing usable; the message names the path."""


@dataclass(frozen=True)
class ShardSet:
    """Where the shards are (`urls`), samples per shard (None when unknown) and their sizes in bytes."""

    urls: list[str]
    counts: list[int] | None
    sizes: dict[str, int]


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def _index_url(spec: str) -> str | None:
    """The index.json a URL spec names: itself, or the one in the folder it names (not brace lists / .tar)."""
    if spec.endswith(".json"):
        return spec
    if "{" in spec or spec.endswith(".tar") or spec.startswith("pipe:"):
        return None
    return spec.rstrip("/") + "/index.json"


def _parse_index(text: bytes | str, where: str, base: str, base_url: str | None) -> tuple[dict, ShardSet]:
    try:
        index = json.loads(text)
        entries = index["shards"]
        root = (base_url or index.get("base_url") or base).rstrip("/")
        urls = [f"{root}/{e['file']}" for e in entries]
        counts = [int(e["samples"]) for e in entries]
        sizes = {u: int(e["bytes"]) for u, e in zip(urls, entries, strict=True) if e.get("bytes") is not None}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ShardSpecError(f"shards: {where} is not an index written by vmae-shards build ({e})") from None
    return index, ShardSet(urls, counts, sizes)


def load_index(spec: str, remote: Remote | None = None, base_url: str | None = None) -> tuple[dict, ShardSet] | None:
    """(the index itself, its shard set) when `spec` names an index.json (a path, a URL, or a folder / folder
    URL holding one); None for a folder without one, a brace pattern or a .tar."""
    if _is_url(spec):
        index = _index_url(spec)
        if index is None:
            return None
        try:
            text = fetch(index, remote or Remote())
        except (OSError, ValueError) as e:
            raise ShardSpecError(f"shards: index {index} could not be read: {e}") from None
        return _parse_index(text, index, index.rsplit("/", 1)[0], base_url)
    path = Path(spec)
    if path.is_dir():
        path = path / "index.json"
        if not path.is_file():
            return None
    elif not spec.endswith(".json"):
        return None
    if not path.is_file():
        raise ShardSpecError(f"shards: index file {spec} not found")
    return _parse_index(path.read_text(), str(path), str(path.parent), base_url)


def resolve_set(spec: str, remote: Remote | None = None, base_url: str | None = None) -> ShardSet:
    """The shard set of a `shards` setting: a local or remote index.json (or a folder holding one), a folder
    of .tar files, or a brace pattern of paths or URLs. `base_url` (else the index's own `base_url`) is where
    the listed files are read from instead of next to index.json."""
    remote = remote or Remote()
    indexed = load_index(spec, remote, base_url)
    if indexed is not None:
        out = indexed[1]
    elif Path(spec).is_dir():
        out = ShardSet(sorted(str(p) for p in Path(spec).glob("*.tar")), None, {})
    else:
        urls = list(braceexpand.braceexpand(spec))
        missing = [u for u in urls if not _is_url(u) and not Path(u).exists()]
        if missing:
            raise ShardSpecError(f"shards: {len(missing)} of {len(urls)} shard(s) not found, e.g. {missing[0]}")
        out = ShardSet(urls, None, {})
    if not out.urls:
        raise ShardSpecError(f"shards: no .tar shards found for {spec!r}")
    try:
        remote.check(out.urls[0])
    except ValueError as e:
        raise ShardSpecError(f"shards: {e}") from None
    return out


def resolve_shards(spec: str, remote: Remote | None = None, base_url: str | None = None,
                   ) -> tuple[list[str], list[int] | None]:
    """(urls, samples per shard or None when unknown). Counts come from index.json when there is one."""
    out = resolve_set(spec, remote, base_url)
    return out.urls, out.counts


def config_shards(cfg: object) -> ShardSet:
    """The shard set of a DataConfig (its remote settings and base_url applied)."""
    return resolve_set(cfg.shards, Remote.of(cfg), cfg.base_url)


def shard_name(url: str) -> str:
    return shard_label(url)


def shards_digest(urls: list[str], counts: list[int] | None) -> str:
    """Names and counts, not paths: a moved shard folder still resumes, a changed shard list does not."""
    text = json.dumps([[shard_name(u) for u in urls], counts])
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts; stable across processes and Python versions (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class Piece:
    """Samples of one shard: local indices lo..hi-1, or the listed `picks`; hi=None is the whole shard, length
    unknown (resampled mode)."""

    shard: int
    lo: int = 0
    hi: int | None = None
    picks: tuple[int, ...] | None = None

    def __len__(self) -> int:
        if self.picks is not None:
            return len(self.picks)
        if self.hi is None:
            raise TypeError("a whole-shard piece of unknown length has no len()")
        return self.hi - self.lo

    def indices(self) -> Sequence[int]:
        return self.picks if self.picks is not None else range(self.lo, self.hi)

    def part(self, a: int, b: int) -> Piece:
        """Positions a..b-1 of this piece's indices."""
        if self.picks is not None:
            return Piece(self.shard, picks=self.picks[a:b])
        return Piece(self.shard, self.lo + a, self.lo + b)

    def to_json(self) -> list:
        return [self.shard, list(self.picks)] if self.picks is not None else [self.shard, self.lo, self.hi]

    @staticmethod
    def from_json(v: list) -> Piece:
        return Piece(v[0], picks=tuple(v[1])) if len(v) == 2 else Piece(v[0], v[1], v[2])


def shard_order(num_shards: int, seed: int, epoch: int, what: str) -> list[int]:
    order = list(range(num_shards))
    random.Random(derive_seed(seed, epoch, what)).shuffle(order)
    return order


def near_equal(n: int, parts: int, start: int) -> list[int]:
    """n split into `parts` lengths differing by at most one; the +1s go to parts start, start+1, ... (mod)."""
    base, extra = divmod(n, parts)
    return [base + ((i - start) % parts < extra) for i in range(parts)]


def turn_split(n: int, parts: int, clock: int, per_turn: int = 1) -> list[int]:
    """How many of n consecutive samples, from sample `clock` of a stream read in turns of `per_turn` samples
    by parts 0, 1, ..., parts-1, 0, ... (a rank's workers, one batch each), fall to each part."""
    span = per_turn * parts

    def upto(x: int, i: int) -> int:
        return (x // span) * per_turn + min(max(x % span - i * per_turn, 0), per_turn)

    return [upto(clock + n, i) - upto(clock, i) for i in range(parts)]


def dealt_before(total: int, parts: int, index: int) -> int:
    """How many of `total` items dealt round `parts` in turn (from part 0) went to part `index`."""
    return 0 if total <= index else (total - 1 - index) // parts + 1


def cut(pieces: list[Piece], lengths: list[int]) -> list[list[Piece]]:
    """Consecutive runs of `lengths` samples from a sequence of pieces (pieces are split where needed)."""
    out: list[list[Piece]] = []
    i, used = 0, 0  # piece index, samples of pieces[i] already handed out
    for n in lengths:
        run: list[Piece] = []
        while n > 0:
            take = min(n, len(pieces[i]) - used)
            if take > 0:
                run.append(pieces[i].part(used, used + take))
            used, n = used + take, n - take
            if used == len(pieces[i]):
                i, used = i + 1, 0
        out.append(run)
    return out


def piece_order(piece: Piece, block: int, seed: int) -> list[int]:
    """The local indices of a piece in reading order: shuffled within runs of `block` (a pure function, so a
    resumed reader, or a re-deal, knows exactly which samples the first `offset` ones were)."""
    idx = list(piece.indices())
    if block <= 1:
        return idx
    rng = random.Random(seed)
    out: list[int] = []
    for a in range(0, len(idx), block):
        chunk = idx[a:a + block]
        rng.shuffle(chunk)
        out += chunk
    return out


class PassLayout:
    """Resampled mode: endless passes over all shards, one rotation offset per reader."""

    mode = "resampled"

    def __init__(self, num_shards: int, seed: int, world: int, workers: int, rank: int, *, gen: int = 0,
                 base: int = 0):
        self.num_shards, self.seed, self.world, self.workers, self.rank = num_shards, seed, world, workers, rank
        self.gen, self.base = gen, base
        # readers ask for their slice once per sample: the pass's shuffle of every shard is made once
        self._cache: dict[tuple[int, int], list[Piece]] = {}

    def reader(self, w: int) -> int:
        return self.rank * self.workers + w

    def slice(self, w: int, p: int) -> list[Piece]:
        if p < self.base:
            return []
        if (w, p) not in self._cache:
            if len(self._cache) > 4 * self.workers:
                self._cache.clear()
            order = shard_order(self.num_shards, self.seed, p, "pass")
            s, g = self.num_shards, self.reader(w)
            off = g * s // (self.world * self.workers)
            self._cache[(w, p)] = [Piece(order[(off + i) % s]) for i in range(s)]
        return self._cache[(w, p)]

    def to_json(self) -> dict:
        return {"kind": self.mode, "world": self.world, "workers": self.workers, "rank": self.rank,
                "gen": self.gen, "base": self.base}


class EpochLayout:
    """Exact epochs: which samples reader (rank, w) reads in each epoch; see the module docstring.

    `vpb` is the samples (clips) per batch. After an elastic re-deal, epochs before `base` are given explicitly
    per worker (`explicit`), and the worker turns continue from `origin` (this rank's sample clock at `base`).
    """

    mode = "exact"

    def __init__(self, counts: list[int], seed: int, world: int, workers: int, rank: int, *, vpb: int = 1,
                 gen: int = 0, base: int = 0, origin: int = 0,
                 explicit: dict[int, dict[int, list[Piece]]] | None = None, shuffle: bool = True):
        self.counts, self.seed, self.world, self.workers, self.rank = counts, seed, world, workers, rank
        self.vpb, self.gen, self.base, self.origin, self.shuffle = vpb, gen, base, origin, shuffle
        self.explicit = explicit or {}
        self.total = sum(counts)
        self._cache: dict[tuple[int, int], list[Piece]] = {}

    def reader(self, w: int) -> int:
        return self.rank * self.workers + w

    def _rank_before(self, e: int) -> int:
        """Samples dealt to this rank in standard epochs 0..e-1 (closed form of the rotating +1s)."""
        return e * (self.total // self.world) + dealt_before(e * (self.total % self.world), self.world, self.rank)

    def rank_share(self, e: int) -> int:
        if e < self.base:
            return sum(len(p) for w in range(self.workers) for p in self.explicit.get(w, {}).get(e, []))
        return near_equal(self.total, self.world, (e * self.total) % self.world)[self.rank]

    def slice(self, w: int, e: int) -> list[Piece]:
        if e < self.base:
            return self.explicit.get(w, {}).get(e, [])
        if (w, e) not in self._cache:
            if len(self._cache) > 4 * self.workers:
                self._cache.clear()
            order = shard_order(len(self.counts), self.seed, e, "epoch") if self.shuffle else range(len(self.counts))
            pieces = [Piece(s, 0, self.counts[s]) for s in order if self.counts[s] > 0]
            ranks = near_equal(self.total, self.world, (e * self.total) % self.world)
            mine = cut(pieces, [sum(ranks[:self.rank]), ranks[self.rank]])[1]
            # this rank's sample clock when it starts epoch e: the workers' shares follow their batch turns
            clock = self.origin + self._rank_before(e) - self._rank_before(self.base)
            for v, run in enumerate(cut(mine, turn_split(ranks[self.rank], self.workers, clock, self.vpb))):
                self._cache[(v, e)] = run
        return self._cache[(w, e)]

    def to_json(self) -> dict:
        return {"kind": self.mode, "world": self.world, "workers": self.workers, "rank": self.rank,
                "vpb": self.vpb, "gen": self.gen, "base": self.base, "origin": self.origin,
                "explicit": {str(w): {str(e): [p.to_json() for p in ps] for e, ps in eps.items()}
                             for w, eps in self.explicit.items()}}


Layout = PassLayout | EpochLayout


def layout_from_json(d: dict, num_shards: int, counts: list[int] | None, seed: int) -> Layout:
    if d["kind"] == "resampled":
        return PassLayout(num_shards, seed, d["world"], d["workers"], d["rank"], gen=d["gen"], base=d["base"])
    explicit = {int(w): {int(e): [Piece.from_json(p) for p in ps] for e, ps in eps.items()}
                for w, eps in d.get("explicit", {}).items()}
    return EpochLayout(counts or [], seed, d["world"], d["workers"], d["rank"], vpb=d["vpb"], gen=d["gen"],
                       base=d["base"], origin=d["origin"], explicit=explicit)


def order_seed(seed: int, gen: int, reader: int, epoch: int, chunk: int) -> int:
    return derive_seed(seed, gen, reader, epoch, chunk, "order")


def settle(layout: Layout, w: int, pos: dict) -> None:
    """Move a position past finished pieces and epochs (lengths are known in exact mode only)."""
    empty = 0
    while True:
        pieces = layout.slice(w, pos["epoch"])
        c = pos["chunk"]
        if c < len(pieces) and (pieces[c].hi is None and pieces[c].picks is None or pos["offset"] < len(pieces[c])):
            return
        if c < len(pieces):
            pos["chunk"], pos["offset"] = c + 1, 0
            continue
        empty = empty + 1 if not pieces else 0
        if empty > 4 * layout.world * layout.workers + 8:
            raise RuntimeError(f"reader {layout.reader(w)} has no samples in any epoch (too few samples?)")
        pos["epoch"], pos["chunk"], pos["offset"] = pos["epoch"] + 1, 0, 0


@dataclass
class OldReader:
    """A reader of the run being resumed: its layout, logical worker, position and shuffle block."""

    layout: EpochLayout
    w: int
    pos: dict
    block: int


def unread(readers: list[OldReader]) -> tuple[int, dict[int, list[Piece]]]:
    """(epoch to start at, {epoch: samples nobody has read yet, as pieces in reader order}) for every epoch some
    reader has begun; epochs after those are untouched and can use any layout."""
    for r in readers:
        settle(r.layout, r.w, r.pos)
    first = min(r.pos["epoch"] for r in readers)
    begun = max(r.pos["epoch"] - (r.pos["chunk"] == 0 and r.pos["offset"] == 0) for r in readers)
    left: dict[int, list[Piece]] = {}
    for e in range(first, begun + 1):
        left[e] = []
        for r in readers:
            pieces = r.layout.slice(r.w, e)
            if r.pos["epoch"] < e:
                left[e] += pieces
            elif r.pos["epoch"] == e:
                c, o = r.pos["chunk"], r.pos["offset"]
                if o:
                    seed = order_seed(r.layout.seed, r.layout.gen, r.layout.reader(r.w), e, c)
                    rest = sorted(piece_order(pieces[c], r.block, seed)[o:])
                    left[e].append(Piece(pieces[c].shard, picks=tuple(rest)))
                    c += 1
                left[e] += pieces[c:]
    return first, left


def deal(left: dict[int, list[Piece]], world: int, workers: int, rank: int, clock: int,
         vpb: int) -> tuple[dict[int, dict[int, list[Piece]]], int]:
    """Split each epoch's unread samples among the new readers: contiguous, near-equal ranks, then the
    rank's share by its workers' batch turns from sample `clock` (batches so far x vpb) on.

    Returns ({worker: {epoch: pieces}} of this rank, this rank's sample clock after them).
    """
    explicit: dict[int, dict[int, list[Piece]]] = {w: {} for w in range(workers)}
    dealt = 0
    for e in sorted(left):
        n = sum(len(p) for p in left[e])
        ranks = near_equal(n, world, dealt % world)
        dealt += n
        mine = cut(left[e], [sum(ranks[:rank]), ranks[rank]])[1]
        for w, run in enumerate(cut(mine, turn_split(ranks[rank], workers, clock, vpb))):
            explicit[w][e] = run
        clock += ranks[rank]
    return explicit, clock
