"""Compose the UnlabeledHybrid mix from per-source manifests, spread evenly so every shard mixes sources.

Default weights are the paper's shares of its 1.35 M clips (VideoMAE V2, section 5 of our facts file):
K710 48.8 %, SSv2 12.5 %, AVA 1.5 %, WebVid2M subset 18.5 %, Instagram 18.5 %.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from data_tools.manifest import ClipRow, ManifestError

PAPER_WEIGHTS = {"k710": 0.488, "ssv2": 0.125, "ava": 0.015, "webvid": 0.185, "instagram": 0.185}
# Other spellings people use for the same sources.
SOURCE_ALIASES = {"kinetics710": "k710", "kinetics": "k710", "k400": "k710", "sthsthv2": "ssv2",
                  "something-something-v2": "ssv2", "webvid2m": "webvid", "ig": "instagram"}


@dataclass
class SourcePlan:
    name: str
    available: int
    weight: float
    target: int

    @property
    def repeat(self) -> float:
        return self.target / self.available if self.available else 0.0


def canonical(name: str) -> str:
    key = name.strip().lower()
    return SOURCE_ALIASES.get(key, key)


def plan_mix(sizes: dict[str, int], weights: dict[str, float] | None = None,
             total: int | None = None) -> list[SourcePlan]:
    """Clips to take per source: target_s = round(total * w_s / sum w); total defaults to all clips."""
    weights = dict(weights or {})
    resolved = {}
    for name in sizes:
        w = weights.pop(name, PAPER_WEIGHTS.get(canonical(name)))
        if w is None:
            raise ManifestError(f"source '{name}' has no default weight: pass --weight {name}=W")
        if w < 0:
            raise ManifestError(f"source '{name}': weight must be >= 0, got {w}")
        resolved[name] = float(w)
    if weights:
        raise ManifestError(f"--weight given for unknown source(s): {sorted(weights)} (have {sorted(sizes)})")
    wsum = sum(resolved.values())
    if wsum <= 0:
        raise ManifestError("all source weights are zero")
    total = sum(sizes.values()) if total is None else total
    plans = [SourcePlan(n, sizes[n], resolved[n], round(total * resolved[n] / wsum)) for n in sizes]
    for p in plans:
        if p.target and not p.available:
            raise ManifestError(f"source '{p.name}' has weight {p.weight} but its manifest is empty")
    return plans


def _take(rows: list[ClipRow], k: int, rng: random.Random) -> list[ClipRow]:
    """k rows: a subsample without repeats, or whole passes (each reshuffled) plus a partial one."""
    out: list[ClipRow] = []
    while len(out) < k:
        batch = rows[:]
        rng.shuffle(batch)
        out.extend(batch[: k - len(out)])
    return out


def compose(per_source: dict[str, list[ClipRow]], weights: dict[str, float] | None = None,
            total: int | None = None, seed: int = 0) -> tuple[list[ClipRow], list[SourcePlan]]:
    """The mixed, shuffled rows plus the plan. Each row's `source` is set to its source name.

    Spreading: the k-th of n_s rows of source s gets the sort key (k + u) / n_s, u ~ U(0, 1), so every
    window of the output (hence every shard) holds each source in close to its share.
    """
    plans = plan_mix({n: len(r) for n, r in per_source.items()}, weights, total)
    rng = random.Random(seed)
    keyed: list[tuple[float, int, ClipRow]] = []
    for si, plan in enumerate(plans):
        chosen = _take(per_source[plan.name], plan.target, rng)
        n = len(chosen)
        for k, row in enumerate(chosen):
            row = ClipRow(**{**row.__dict__, "source": plan.name})
            keyed.append(((k + rng.random()) / n, si, row))
    keyed.sort(key=lambda t: (t[0], t[1]))
    return [r for _, _, r in keyed], plans


def format_plan(plans: list[SourcePlan]) -> str:
    total = sum(p.target for p in plans) or 1
    lines = [f"{'source':<14}{'available':>11}{'weight':>9}{'taken':>11}{'share':>8}{'repeat':>8}"]
    for p in plans:
        lines.append(f"{p.name:<14}{p.available:>11}{p.weight:>9.3f}{p.target:>11}"
                     f"{100 * p.target / total:>7.1f}%{p.repeat:>8.2f}")
    lines.append(f"{'total':<14}{sum(p.available for p in plans):>11}{'':>9}{total:>11}")
    if any(p.repeat > 1 for p in plans):
        lines.append("note: repeat > 1 means clips of that source appear more than once (upsampled)")
    return "\n".join(lines)


