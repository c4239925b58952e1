"""`vmae-shards`: make manifests, mix the hybrid set, build / verify / describe WebDataset shards."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections import defaultdict
from pathlib import Path

from data_tools.build import BuildError, build_shards
from data_tools.clipcheck import ClipSettings
from data_tools.hybrid import PAPER_WEIGHTS, compose, format_plan
from data_tools.inspect_shards import format_report, inspect, plot_report
from data_tools.manifest import (
    FORMATS,
    VIDEO_EXTS,
    ManifestError,
    labels_path_for,
    read_manifest,
    scan_folder,
    write_manifest,
)

CHECK_EPILOG = """examples:
  vmae-shards verify shards/k710
  vmae-shards verify https://data.example.org/k710/index.json --workers 8
  vmae-shards stats s3://my-bucket/k710/index.json     # through `aws s3 cp`, credentials as for the aws CLI
"""
EPILOG = """examples:
  vmae-shards manifest videos/ --out videos.jsonl
  vmae-shards build --manifest videos.jsonl --out shards/ --workers 8 --reencode
  vmae-shards manifest k400/train/ --out k400.jsonl --labels-from-dirs   # root/<class>/<clip>
  vmae-shards build --manifest k400.jsonl --out shards/k400 --shuffle-seed 0   # picks up k400.labels.json
  vmae-shards build --manifest train.txt --class-names names.txt --out shards/ft   # authors' `path label`
  vmae-shards verify shards/
  vmae-shards serve shards/ --port 8000      # then data.shards.shards=http://HOST:8000/index.json
  vmae-shards hybrid --source k710=k710.csv --source ssv2=ssv2_train.txt ... --out hybrid.jsonl
"""


def _name_value(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"{what} must look like NAME=VALUE, got {text!r}")
    return name, value


def _cmd_manifest(a: argparse.Namespace) -> int:
    rows = scan_folder(a.folder, source=a.source, labels_from_dirs=a.labels_from_dirs, all_files=a.all_files)
    if not rows:  # say why instead of writing an empty manifest
        what = "files" if a.all_files else f"video files ({' '.join(VIDEO_EXTS)}; --all-files lists every file)"
        raise ValueError(f"{a.folder}: no {what} found")
    n = write_manifest(rows, a.out)
    print(f"{n} clips from {a.folder} -> {a.out}")
    if a.labels_from_dirs:
        from vmae_ds.data.labels import LabelMap  # here: the package pulls in torch

        labels = LabelMap.from_dirs(Path(r.path).parent.name for r in rows)
        path = labels.save(labels_path_for(a.out))
        print(f"{len(labels)} class names (sorted folder names) -> {path} (build uses it)")
    return 0


def _cmd_hybrid(a: argparse.Namespace) -> int:
    if a.total is not None and a.total < 1:
        raise ValueError(f"--total must be >= 1, got {a.total}")
    per_source = defaultdict(list)
    for spec in a.source:
        name, path = _name_value(spec, "--source")
        rows = read_manifest(path, a.format, default_source=name)
        if not rows:
            raise ValueError(f"--source {spec}: the manifest has no rows")
        per_source[name].extend(rows)
    weights = {}
    for spec in a.weight:
        name, value = _name_value(spec, "--weight")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--weight {spec}: W must be a number") from None
    rows, plans = compose(dict(per_source), weights, a.total, a.seed)
    write_manifest(rows, a.out)
    print(format_plan(plans))
    print(f"{len(rows)} rows, shuffled across sources (seed {a.seed}) -> {a.out}")
    return 0


def _cmd_build(a: argparse.Namespace) -> int:
    clip = ClipSettings(reencode=a.reencode, short_side=a.short_side, keyint=a.keyint, crf=a.crf,
                        bframes=a.bframes, min_frames=a.min_frames, full_check=a.full_check, backend=a.backend,
                        window_margin=a.window_margin)
    summary = build_shards(a.manifest, a.out, prefix=a.prefix, shard_size=a.shard_size, workers=a.workers,
                           clip=clip, root=a.root, manifest_format=a.format, shuffle_seed=a.shuffle_seed,
                           label_map=a.label_map, progress=not a.quiet)
    print(summary.text())
    return 0


def _cmd_check(a: argparse.Namespace, verify: bool) -> int:
    remote = None
    if "://" in a.dir or a.dir.endswith(".json"):
        from vmae_ds.data.remote import Remote  # here: the package pulls in torch

        commands = dict(_name_value(c, "--command") for c in a.command)
        remote = Remote(timeout_s=a.read_timeout, retries=a.retries, commands=commands)
        if a.dir.endswith(".json") and "://" not in a.dir and not Path(a.dir).is_file():
            raise ValueError(f"{a.dir}: no such index file")
    elif not Path(a.dir).is_dir():  # a user error (typo'd path), not a damaged shard set: one line, exit 2
        raise ValueError(f"{a.dir}: no such folder (give the --out folder of `vmae-shards build`, or the URL of "
                         "its index.json)")
    report = inspect(a.dir, decode_per_shard=a.decode, progress=not a.quiet, workers=a.workers, remote=remote)
    print(format_report(report))
    local = remote is None or (a.dir.endswith(".json") and "://" not in a.dir)
    where = (Path(a.dir) if Path(a.dir).is_dir() else Path(a.dir).parent) if local else Path(".")
    plot = Path(a.plot) if a.plot else where / "stats.png"
    print(f"plot: {plot_report(report, plot)}")
    return 1 if verify and not report.ok else 0


def _cmd_serve(a: argparse.Namespace) -> int:
    from data_tools.serve import ShardHTTPServer

    if not Path(a.dir).is_dir():
        raise ValueError(f"{a.dir}: no such folder")
    server = ShardHTTPServer(a.dir, a.host, a.port, quiet=False)
    index = Path(a.dir) / "index.json"
    print(f"serving {a.dir} at {server.url}/" + (f" (data.shards.shards={server.url}/index.json)"
                                                  if index.is_file() else "") + "; Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _cmd_synth(a: argparse.Namespace) -> int:
    from data_tools.synth import make_videos

    try:
        h, w = (int(x) for x in a.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like HxW, e.g. 96x128, got {a.size!r}") from None
    if a.n < 1 or a.frames < 1:
        raise ValueError(f"--n and --frames must be >= 1, got {a.n} and {a.frames}")
    if a.motion_classes:
        from data_tools.synth import make_motion_videos

        paths = make_motion_videos(a.out, a.n, a.motion_classes, frames=a.frames, size=(h, w), fps=a.fps,
                                   seed=a.seed, codec=a.codec)
        print(f"{len(paths)} {a.codec} clips in {a.motion_classes} motion classes ({a.frames} frames, {h}x{w}, "
              f"{a.fps} fps) -> {a.out}/<class>/")
        return 0
    paths = make_videos(a.out, a.n, frames=a.frames, size=(h, w), fps=a.fps, seed=a.seed, codec=a.codec)
    print(f"{len(paths)} {a.codec} clips ({a.frames} frames, {h}x{w}, {a.fps} fps) -> {a.out}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmae-shards", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    m = sub.add_parser("manifest", help="list the videos of a folder as a JSONL manifest")
    m.add_argument("folder", help="folder to scan recursively")
    m.add_argument("--out", required=True, help="manifest to write (.jsonl)")
    m.add_argument("--source", help="source name for every row (default: the folder's name)")
    m.add_argument("--labels-from-dirs", action="store_true",
                   help="label = index of the clip's parent folder name, sorted (root/<class>/<clip>); the "
                   "class names go to OUT with the suffix .labels.json (m.jsonl -> m.labels.json), which "
                   "build stores with the shards")
    m.add_argument("--all-files", action="store_true",
                   help="list every file, not only video extensions (the build then reports non-videos)")

    h = sub.add_parser("hybrid", help="mix per-source manifests into one shuffled manifest",
                       description="Default weights are the paper's UnlabeledHybrid shares: " +
                       ", ".join(f"{k} {v:.3f}" for k, v in PAPER_WEIGHTS.items()))
    h.add_argument("--source", action="append", required=True, metavar="NAME=MANIFEST",
                   help="one per source (repeat); CSV, TSV, JSONL or the authors' plain lists")
    h.add_argument("--weight", action="append", default=[], metavar="NAME=W",
                   help="override a source's weight (needed for names without a paper default)")
    h.add_argument("--total", type=int, help="rows in the mix (default: all clips of all sources)")
    h.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    h.add_argument("--format", choices=FORMATS, default="auto", help="manifest format (default: by suffix)")
    h.add_argument("--out", required=True, help="mixed manifest to write (.jsonl)")

    b = sub.add_parser("build", help="turn a manifest into prefix-%%06d.tar shards plus index.json",
                       description="Trial-decodes every clip; bad ones go to errors.jsonl with the reason. "
                       "Rerun the same command after a crash to finish the build (finished shards are kept).")
    b.add_argument("--manifest", required=True, help="CSV, TSV, JSONL or authors' list")
    b.add_argument("--out", required=True, help="output folder for shards, index.json, errors.jsonl")
    b.add_argument("--format", choices=FORMATS, default="auto", help="manifest format (default: by suffix)")
    b.add_argument("--root", help="folder that relative paths are under (default: the manifest's folder)")
    b.add_argument("--prefix", default="shard", help="shard name prefix (default 'shard')")
    b.add_argument("--shard-size", type=int, default=1000, help="manifest rows per shard (default 1000)")
    b.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="processes decoding / re-encoding clips (default: CPU count - 1; 0 = no subprocess)")
    b.add_argument("--reencode", action="store_true",
                   help="re-encode to H.264 with short side --short-side and a keyframe every --keyint "
                   "frames (fast seeking in the loader); default: copy the original bytes")
    b.add_argument("--short-side", type=int, default=320, help="re-encode: short side in pixels (default 320)")
    b.add_argument("--keyint", type=int, default=16, help="re-encode: keyframe interval (default 16)")
    b.add_argument("--crf", type=int, default=23, help="re-encode: x264 quality, lower is better (default 23)")
    b.add_argument("--bframes", type=int, default=3, help="re-encode: non-reference B-frames between P-frames, "
                   "which the loader skips unless sampled (default 3; 0: every frame a reference)")
    b.add_argument("--min-frames", type=int, default=16,
                   help="skip clips with fewer frames than this as too short (default 16)")
    b.add_argument("--full-check", action="store_true",
                   help="copy mode: decode every frame to test the clip (default: first, middle and last "
                   "frame; --reencode always decodes every frame)")
    b.add_argument("--shuffle-seed", type=int,
                   help="shuffle rows with this seed before sharding: use it for folder manifests (sorted by "
                   "path, so classes would cluster in shards); hybrid manifests are already mixed")
    b.add_argument("--label-map", "--class-names", metavar="FILE",
                   help="class names: a labels.json, or a text file with one name per line (id = line order) "
                   "or 'id,name' / 'name,id' lines (Kinetics' csv). Class-name labels in the manifest become "
                   "ids, integer labels are checked against it; the shards get labels.json and every sample "
                   "a label_name. Default: the manifest's .labels.json from `manifest --labels-from-dirs`, "
                   "if there")
    b.add_argument("--backend", choices=("decord", "pyav"), default="decord",
                   help="decoder of the trial decode: the one training uses (data.shards.backend); recorded in "
                   "index.json (default decord)")
    b.add_argument("--window-margin", type=int, default=8,
                   help="rows with a start/end window: frames kept each side of it (default 8)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    for name, text in (("verify", "check shards: tar integrity, keys, decoding, counts (exit 1 on damage)"),
                       ("stats", "describe shards: counts per source, duration / resolution histograms")):
        c = sub.add_parser(name, help=text, description=text, epilog=CHECK_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        c.add_argument("dir", help="shard folder (made by vmae-shards build), or its index.json by URL "
                       "(http(s)://, s3://, gs://), or a local index.json with a base_url")
        c.add_argument("--decode", type=int, default=1 if name == "verify" else 0,
                       help="samples per shard to trial-decode; -1 = all (default: %(default)s)")
        c.add_argument("--plot", help="PNG for the histograms (default: DIR/stats.png)")
        c.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                       help="processes reading shards (default: CPU count - 1)")
        c.add_argument("--quiet", action="store_true", help="no progress bar")
        c.add_argument("--command", action="append", default=[], metavar="SCHEME=TEMPLATE",
                       help="remote shards: the command that writes an object to stdout, per URL scheme, with "
                       "{url} (and {offset} if it can start at a byte); default s3 'aws s3 cp {url} -', gs "
                       "'gcloud storage cat -r {offset}- {url}'")
        c.add_argument("--retries", type=int, default=6, help="remote shards: retries of a failed or stalled read, "
                       "each continuing where it stopped (default 6)")
        c.add_argument("--read-timeout", type=float, default=60,
                       help="remote shards: seconds without a byte before a read is retried (default 60)")

    v = sub.add_parser("serve", help="serve a shard folder over HTTP with range requests (resumable reads)",
                       description="A small threaded HTTP server for trying remote shards: answers range requests, "
                       "so a broken read resumes at its byte. Large sets belong behind a real web server or object "
                       "store.")
    v.add_argument("dir", help="shard folder")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 for every interface)")
    v.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free one)")

    s = sub.add_parser("synth", help="write small synthetic clips (tests, demos)")
    s.add_argument("--out", required=True, help="folder for the clips")
    s.add_argument("--n", type=int, default=16, help="number of clips (default 16)")
    s.add_argument("--frames", type=int, default=40, help="frames per clip (default 40)")
    s.add_argument("--size", default="96x128", help="HxW, even numbers (default 96x128)")
    s.add_argument("--fps", type=int, default=25, help="frame rate (default 25)")
    s.add_argument("--seed", type=int, default=0, help="seed of the first clip (default 0)")
    s.add_argument("--codec", choices=("av1", "h264", "h265", "vp9"), default="h264", help="default h264")
    s.add_argument("--motion-classes", type=int, default=0, metavar="K",
                   help="labelled set: --n clips per class into OUT/<class>/ for K of right, left, down, up (a "
                   "square moving that way; colours and background random)")
    return p


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `vmae-shards stats DIR | head` exits quietly
    a = parser().parse_args(argv)
    commands = {"manifest": _cmd_manifest, "hybrid": _cmd_hybrid, "build": _cmd_build, "synth": _cmd_synth,
                "serve": _cmd_serve,
                "verify": lambda x: _cmd_check(x, True), "stats": lambda x: _cmd_check(x, False)}
    try:
        return commands[a.cmd](a)
    except (ManifestError, BuildError, argparse.ArgumentTypeError, ValueError) as e:
        print(f"vmae-shards {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
