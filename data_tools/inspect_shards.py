"""`verify` and `stats`: read every shard end to end and report integrity, keys, decodability and histograms.

The shards are a local folder, or an index.json by URL (http(s)://, s3://, gs://) or with a base_url: remote
shards are read with the loader's retries (vmae_ds.data.remote), so a flaky connection is not damage."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import re
import tarfile
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from tqdm import tqdm

from data_tools.build import INDEX
from data_tools.clipcheck import BadClip, decode_sample_check
from data_tools.manifest import VIDEO_EXTS
from data_tools.workpool import quiet_decoders

if TYPE_CHECKING:
    from vmae_ds.data.remote import Remote

SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
VIDEO_EXT_SET = {e.lstrip(".") for e in VIDEO_EXTS}


@dataclass
class Report:
    shards: int = 0
    damaged: list[str] = field(default_factory=list)  # one line per problem, naming the shard/key
    samples: int = 0
    decoded: int = 0
    per_source: Counter = field(default_factory=Counter)
    durations: list[float] = field(default_factory=list)
    resolutions: Counter = field(default_factory=Counter)
    fps: Counter = field(default_factory=Counter)
    read: dict = field(default_factory=dict)  # bytes_read, read_ms, retries

    @property
    def ok(self) -> bool:
        return not self.damaged


def _shard_list(folder: Path, problems: list[str]) -> tuple[list[str], dict | None]:
    tars = sorted(folder.glob("*.tar"))
    index_path = folder / INDEX
    if not index_path.exists():
        problems.append(f"{index_path}: missing (not built by vmae-shards build, or build not finished)")
        return [str(p) for p in tars], None
    try:
        index = json.loads(index_path.read_text())
        listed = [folder / s["file"] for s in index["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        problems.append(f"{index_path}: unreadable index ({e})")
        return [str(p) for p in tars], None
    for p in listed:
        if not p.exists():
            problems.append(f"{p.name}: listed in {INDEX} but missing")
    for p in sorted(set(tars) - set(listed)):
        problems.append(f"{p.name}: shard not listed in {INDEX}")
    return [str(p) for p in sorted(set(tars) | {p for p in listed if p.exists()})], index


def _remote_list(spec: str, remote: Remote, problems: list[str]) -> tuple[list[str], dict | None, dict[str, int]]:
    """Shards of an index.json by URL (or a local one with a base_url): the listed ones (a remote folder
    cannot be listed, so unlisted shards are not seen)."""
    from vmae_ds.data.shards import ShardSpecError, load_index  # here: the package pulls in torch

    try:
        found = load_index(spec, remote)
    except ShardSpecError as e:
        problems.append(str(e).removeprefix("shards: "))
        return [], None, {}
    if found is None:
        problems.append(f"{spec}: not an index.json URL (give the URL of the index, or of its folder)")
        return [], None, {}
    index, shard_set = found
    return shard_set.urls, index, shard_set.sizes


def _read_shard(url: str, decode_n: int, backend: str = "decord", remote: Remote | None = None,
                size: int | None = None) -> tuple[Report, list[str]]:
    """Read one whole shard (runs in a worker): its partial report and its keys in order."""
    report = Report(shards=1)
    samples: dict[str, dict[str, bytes | int]] = defaultdict(dict)
    order: list[str] = []
    name = url.rsplit("/", 1)[-1]
    try:
        with _open(url, remote, report.read, size) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.rsplit("/", 1)[-1].partition(".")
                data = tar.extractfile(m).read()  # reading every byte is the integrity check
                if key not in samples:
                    order.append(key)
                if ext in samples[key]:
                    report.damaged.append(f"{name}: key {key!r} has two '{ext}' members")
                # Keep bytes only where needed (json, videos to decode): memory stays small.
                samples[key][ext] = data if ext == "json" or len(order) <= decode_n else len(data)
    except (tarfile.TarError, OSError, EOFError) as e:  # remote: after the retries
        report.damaged.append(f"{name}: tar damaged ({e}) after {len(order)} samples")
    for key in order:
        parts = samples[key]
        if not SAFE_KEY.match(key):
            report.damaged.append(f"{name}: unsafe key {key!r} (only letters, digits, '_' and '-')")
        videos = [e for e in parts if e in VIDEO_EXT_SET]
        if len(videos) != 1 or "json" not in parts:
            report.damaged.append(f"{name}: key {key!r} has members {sorted(parts)}; "
                                  "expected one video and one json")
            continue
        try:
            meta = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            report.damaged.append(f"{name}: key {key!r}: bad json ({e})")
            continue
        video = parts[videos[0]]
        if isinstance(video, bytes):
            try:
                decode_sample_check(video, backend)
                report.decoded += 1
            except BadClip as e:
                report.damaged.append(f"{name}: key {key!r}: {e}")
        report.samples += 1
        report.per_source[str(meta.get("source", "unknown"))] += 1
        if meta.get("duration") is not None:
            report.durations.append(float(meta["duration"]))
        if meta.get("width") and meta.get("height"):
            report.resolutions[f"{meta['width']}x{meta['height']}"] += 1
        if meta.get("fps"):
            report.fps[round(float(meta["fps"]), 2)] += 1
    return report, order


def _open(url: str, remote: Remote | None, counts: dict, size: int | None) -> BinaryIO:
    """A local shard as it is; a remote one through the loader's resumable reads (retries, timeouts)."""
    if remote is None:
        return open(url, "rb")
    from vmae_ds.data.remote import BLOCK, ShardStream

    return io.BufferedReader(ShardStream(url, remote, counts, size), BLOCK)


def _merge(total: Report, part: Report) -> None:
    for k, v in part.read.items():
        total.read[k] = total.read.get(k, 0) + v
    total.shards += part.shards
    total.samples += part.samples
    total.decoded += part.decoded
    total.damaged += part.damaged
    total.per_source.update(part.per_source)
    total.durations += part.durations
    total.resolutions.update(part.resolutions)
    total.fps.update(part.fps)


def is_shard_url(spec: str) -> bool:
    """A shard set read through URLs: an index.json by URL, or a local index.json with a base_url (a local
    index without one stands for its folder)."""
    if "://" in spec:
        return True
    if not spec.endswith(".json") or not Path(spec).is_file():
        return False
    try:
        return bool(json.loads(Path(spec).read_text()).get("base_url"))
    except (ValueError, AttributeError):
        return False


def inspect(folder: str | Path, decode_per_shard: int = 1, progress: bool = True, workers: int = 1,
            remote: Remote | None = None) -> Report:
    """Check every shard in `folder` (or of an index.json by URL) against its index. decode_per_shard < 0
    decodes every sample."""
    report = Report()
    sizes: dict[str, int] = {}
    if str(folder).endswith(".json") and not is_shard_url(str(folder)):
        folder = Path(folder).parent
    if is_shard_url(str(folder)):
        from vmae_ds.data.remote import Remote

        remote = remote or Remote()
        shards, index, sizes = _remote_list(str(folder), remote, report.damaged)
    elif not Path(folder).is_dir():
        report.damaged.append(f"{folder}: not a folder")
        return report
    else:
        shards, index, remote = *_shard_list(Path(folder), report.damaged), None
    counts = {s["file"]: s["samples"] for s in index["shards"]} if index else {}
    decode_n = 1 << 62 if decode_per_shard < 0 else decode_per_shard
    seen: dict[str, str] = {}
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=quiet_decoders) \
        if workers > 1 else None
    # decode with the decoder the build trial-decoded with (the one training uses)
    backend = (index or {}).get("settings", {}).get("backend", "decord")
    args = (shards, repeat(decode_n), repeat(backend), repeat(remote), [sizes.get(u) for u in shards])
    results = pool.map(_read_shard, *args) if pool else map(_read_shard, *args)
    try:
        for url, (part, keys) in tqdm(zip(shards, results), total=len(shards), unit="shard", desc="verify",
                                      disable=not progress):
            _merge(report, part)
            name = url.rsplit("/", 1)[-1]
            for key in keys:
                if key in seen:
                    report.damaged.append(f"{name}: key {key!r} also in {seen[key]}")
                seen[key] = name
            if name in counts and counts[name] != part.samples:
                report.damaged.append(f"{name}: {part.samples} readable samples, index says {counts[name]}")
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    if index and report.samples != index.get("total_samples"):
        report.damaged.append(f"{INDEX}: total_samples {index.get('total_samples')} but found {report.samples}")
    if not shards and not report.damaged:
        report.damaged.append(f"{folder}: no .tar shards")
    return report


def _hist_lines(values: list[float], bins: int = 10, width: int = 40) -> list[str]:
    if not values:
        return ["  (none)"]
    lo, hi = min(values), max(values)
    if hi == lo:
        return [f"  {lo:8.2f}          {len(values):>8} {'#' * width}"]
    step = (hi - lo) / bins or 1.0
    counts = Counter(min(int((v - lo) / step), bins - 1) for v in values)
    top = max(counts.values())
    return [f"  {lo + i * step:8.2f}-{lo + (i + 1) * step:<8.2f} {counts.get(i, 0):>8} "
            f"{'#' * round(width * counts.get(i, 0) / top)}" for i in range(bins)]


def format_report(report: Report) -> str:
    lines = [f"shards: {report.shards}  samples: {report.samples}  decode-checked: {report.decoded}  "
             f"problems: {len(report.damaged)}", "per source:"]
    for src, n in sorted(report.per_source.items()):
        lines.append(f"  {src:<16}{n:>9}  {100 * n / max(report.samples, 1):5.1f}%")
    lines.append("duration (s):")
    lines += _hist_lines(report.durations)
    lines.append("resolution (WxH), most common:")
    lines += [f"  {r:<12}{n:>9}" for r, n in report.resolutions.most_common(10)]
    lines.append("fps, most common: " + ", ".join(f"{f:g} ({n})" for f, n in report.fps.most_common(5)))
    if report.read.get("bytes_read"):
        mb, secs = report.read["bytes_read"] / 1e6, report.read.get("read_ms", 0) / 1000
        lines.append(f"read: {mb:.1f} MB, {secs:.1f} s blocked on reads"
                     + (f" ({mb / secs:.1f} MB/s)" if secs > 0 else "") + f", {report.read.get('retries', 0)} retries")
    lines += [f"DAMAGED {p}" for p in report.damaged]
    lines.append("OK" if report.ok else f"FAILED: {len(report.damaged)} problem(s)")
    return "\n".join(lines)


def plot_report(report: Report, path: str | Path) -> Path:
    """Duration, resolution and per-source histograms in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].hist(report.durations or [0], bins=30, color="tab:blue")
    axes[0].set(title="clip duration", xlabel="seconds", ylabel="clips")
    res = report.resolutions.most_common(12)
    axes[1].bar([r for r, _ in res], [n for _, n in res], color="tab:orange")
    axes[1].set(title="resolution (most common)", ylabel="clips")
    axes[1].tick_params(axis="x", rotation=45)
    src = sorted(report.per_source.items())
    axes[2].bar([s for s, _ in src], [n for _, n in src], color="tab:green")
    axes[2].set(title="clips per source", ylabel="clips")
    fig.suptitle(f"{report.samples} samples in {report.shards} shards")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
