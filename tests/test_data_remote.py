"""Shards over HTTP and S3: exact epochs, reads that resume where a connection broke, unreachable shards named
and counted, the optional local cache, remote index.json and base_url, verify / stats, eval over URLs.

Real servers on 127.0.0.1 only, started and stopped here: a standard-library HTTP server with faults
(tests/shard_server.py) and moto's S3 server read through the AWS command-line client. Shards: the real
H.264 clips of data_helpers, 7, 3, 11 and 1 per shard.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from data_helpers import all_keys, run_cli, sized_shards
from shard_server import ShardServer
from test_data_sampling import cfg_for, endless, keys_of, loader_for

from vmae_ds.data import EvalLoader
from vmae_ds.data.remote import Remote, ShardOpener, ShardStream, ShardUnreachable, fetch
from vmae_ds.data.shards import ShardSpecError, config_shards, resolve_set
from vmae_ds.objectives.classify import class_names_of

NAMES = [f"uneven-{s:06d}.tar" for s in range(4)]
GONE = NAMES[3]  # always 404
FAST = {"read_timeout_s": 1.5, "read_retries": 2, "retry_backoff_s": 0.05}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return sized_shards(tmp_path_factory)


def without(folder: Path, tmp: Path, name: str) -> Path:
    """A copy of the folder that lacks one shard (the local twin of a shard the server never gives)."""
    out = shutil.copytree(folder, tmp / "local")
    (out / name).unlink()
    return out


def keys_in(name: str) -> Counter:
    return Counter(k for k in all_keys() if k.startswith(name + "/"))


def epochs(loaders, n: int) -> list[list[dict]]:
    """Each rank's batches of its first n exact epochs (one clip a batch). A skipped sample lets the worker
    that skipped it run ahead of the others, so each batch is placed by the epoch its worker was reading,
    from the worker's saved position."""
    out = []
    for ld in loaders:
        stream, got = endless(ld), []
        while ld.epoch < n:
            batch = next(stream)
            st = ld.state_dict()
            p = st["positions"][(st["batches"] - 1) % st["num_workers"]]  # batch k comes from worker k % W
            if p["epoch"] - (p["chunk"] == 0 and p["offset"] == 0) < n:  # at (e, 0, 0): it ended epoch e - 1
                got.append(batch)
        out.append(got)
    return out


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["keys"] == y["keys"] and all(torch.equal(x[k], y[k]) for k in ("video", "encoder_mask", "decoder_mask"))
        for x, y in zip(a, b, strict=True))


def test_http_epochs_with_faults_read_every_reachable_key_once_as_the_local_folder_does(folder, tmp_path):
    faults = {NAMES[0]: ["stall"], NAMES[1]: ["503"], NAMES[2]: ["cut"]}
    with ShardServer(folder, faults=faults, gone={GONE}) as srv:
        cfg = cfg_for(f"{srv.url}/index.json", **FAST)
        loaders = [loader_for(cfg, rank=r, world=2) for r in (0, 1)]
        got = epochs(loaders, 2)
        stats = [ld.stats() for ld in loaders]
        for ld in loaders:
            ld.close()
        size = {n: (folder / n).stat().st_size for n in NAMES}
        # the broken reads continued at the byte they reached, with a range request (other readers of the
        # shard, which start it anew, may come in between)
        assert srv.requests(NAMES[2])[0] == (None, 200) and (size[NAMES[2]] // 2, 206) in srv.requests(NAMES[2])
        assert srv.requests(NAMES[0])[0] == (None, 200) and (size[NAMES[0]] // 3, 206) in srv.requests(NAMES[0])
        assert srv.requests(NAMES[1])[0] == (None, 503)
        # the unreachable shard: 1 + 2 retries in each epoch, tried again in the second (and maybe already in
        # the third by a worker reading ahead)
        gone = srv.requests(GONE)
        assert len(gone) in (6, 9) and set(gone) == {(None, 404)}
    reachable = all_keys() - keys_in(GONE)
    want = reachable + reachable
    assert keys_of([b for bs in got for b in bs]) == want  # every reachable key exactly once an epoch
    assert sum(s["missing_samples"] for s in stats) == 2
    unreachable = Counter()
    for s in stats:
        unreachable.update(s["unreachable_shards"])
    assert unreachable == {GONE: 2}
    assert sum(s["read_retries"] for s in stats) >= 3 + 2 * 2
    assert all(s["bytes_read"] > 0 and s["read_s"] > 0 for s in stats)

    local = without(folder, tmp_path, GONE)  # the same set on a local folder, the lost shard absent
    ref_loaders = [loader_for(cfg_for(local, **FAST), rank=r, world=2) for r in (0, 1)]
    ref = epochs(ref_loaders, 2)
    for ld in ref_loaders:
        ld.close()
    assert all(same(a, b) for a, b in zip(got, ref, strict=True))  # bit-identical batches


def test_without_range_support_the_read_is_redone_and_what_was_delivered_skipped(folder):
    faults = {NAMES[2]: ["cut", "stall"], NAMES[0]: ["cut"]}
    with ShardServer(folder, ranges=False, faults=faults) as srv:
        loader = loader_for(cfg_for(f"{srv.url}/index.json", num_workers=1, **FAST))
        got = list(loader)  # one exact epoch on one rank
        loader.close()
        size = (folder / NAMES[2]).stat().st_size
        # asked from the byte reached, answered with the whole file: the client dropped what it had
        assert srv.requests(NAMES[2]) == [(None, 200), (size // 2, 200), (size // 2, 200)]
    assert keys_of(got) == all_keys()
    st = loader.stats()
    assert st["read_retries"] == 3 and st["missing_samples"] == 0 and st["unreachable_shards"] == {}


def test_stream_reads_resume_and_give_up_with_the_name(folder):
    data = (folder / NAMES[2]).read_bytes()
    with ShardServer(folder, faults={NAMES[2]: ["cut", "503", "stall"]}, gone={GONE}) as srv:
        counts: dict = {}
        with ShardStream(f"{srv.url}/{NAMES[2]}", Remote(timeout_s=1, retries=3, backoff_s=0.01), counts,
                         size=len(data)) as s:
            assert s.read() == data
        assert counts["retries"] == 3 and counts["bytes_read"] == len(data)
        with pytest.raises(ShardUnreachable, match=r"unreachable after 2 tries \(last: HTTP 404"):
            fetch(f"{srv.url}/{GONE}", Remote(retries=1, backoff_s=0.01))
        # another size than the index says: not retried, named
        with pytest.raises(OSError, match=f"{NAMES[2]} is {len(data)} bytes at the source, index.json says 5"):
            ShardStream(f"{srv.url}/{NAMES[2]}", Remote(), size=5).read()


def test_remote_index_base_url_and_one_line_errors(folder, tmp_path):
    with ShardServer(folder, gone={"nope.json"}) as srv:
        by_url = resolve_set(f"{srv.url}/index.json")
        assert by_url.urls == [f"{srv.url}/{n}" for n in NAMES] and by_url.counts == [7, 3, 11, 1]
        assert resolve_set(f"{srv.url}/").urls == by_url.urls  # the folder's URL: its index.json
        assert by_url.sizes[by_url.urls[2]] == (folder / NAMES[2]).stat().st_size
        # a local index.json whose shards are elsewhere: its own base_url, or data.shards.base_url
        index = json.loads((folder / "index.json").read_text())
        (tmp_path / "index.json").write_text(json.dumps({**index, "base_url": srv.url}))
        assert resolve_set(str(tmp_path / "index.json")).urls == by_url.urls
        cfg = cfg_for(folder, base_url="s3://bucket/k710")
        assert config_shards(cfg).urls[0] == "s3://bucket/k710/uneven-000000.tar"
        with pytest.raises(ShardSpecError) as e:
            resolve_set(f"{srv.url}/nope.json", Remote(retries=0))
        assert str(e.value) == f"shards: index {srv.url}/nope.json could not be read: unreachable after 1 tries " \
                               "(last: HTTP 404 Not Found)"
        assert class_names_of(f"{srv.url}/index.json") == ["a", "b", "c"]
        # a brace list of URLs (no counts): resampled passes
        loader = loader_for(cfg_for(f"{srv.url}/uneven-{{000000..000003}}.tar", num_workers=0))
        assert loader.mode == "resampled" and len(keys_of([next(endless(loader)) for _ in range(3)])) == 3
    with pytest.raises(ShardSpecError, match="no command for ftp:// URLs .* set data.shards.remote_commands.ftp"):
        resolve_set("ftp://host/shard-{000..003}.tar")
    with pytest.raises(ShardSpecError, match="index s3://b/k/index.json could not be read: no-such-cli: command "
                                             "not found"):  # at once: no retry can install a client
        resolve_set("s3://b/k/index.json", Remote(commands={"s3": "no-such-cli cat {url}"}))


def test_cache_keeps_whole_shards_verified_lru_and_atomic(folder, tmp_path):
    sizes = {n: (folder / n).stat().st_size for n in NAMES}
    big = sorted(sizes.values())[-2:]  # room for the two largest shards
    with ShardServer(folder, faults={NAMES[1]: ["cut"]}) as srv:
        urls = {n: f"{srv.url}/{n}" for n in NAMES}
        remote = Remote(retries=0, cache_dir=str(tmp_path / "cache"), cache_gib=sum(big) / 2 ** 30)
        opener = ShardOpener(remote, {urls[n]: sizes[n] for n in NAMES})

        def read(name: str) -> tuple[bytes, dict]:
            counts: dict = {}
            with opener.open(urls[name], counts) as f:
                return f.read(), counts

        assert read(NAMES[2])[0] == (folder / NAMES[2]).read_bytes()
        again, counts = read(NAMES[2])
        assert again == (folder / NAMES[2]).read_bytes() and counts["cached_bytes"] == sizes[NAMES[2]]
        assert "bytes_read" not in counts
        assert len(srv.requests(NAMES[2])) == 1  # the second read came from the cache
        with pytest.raises(ShardUnreachable):
            read(NAMES[1])  # a broken read (no retries here): no copy
        assert sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir()) == [NAMES[2]]
        read(NAMES[0])
        read(NAMES[2])  # used again: the most recent
        read(NAMES[1])  # over the bound: the least recently used copy (shard 0) goes
        cached = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir())
        assert cached == sorted([NAMES[1], NAMES[2]]) and not list((tmp_path / "cache").glob(".*"))
        # a damaged copy (other size than the index's) is dropped and the shard read again
        copy = next((tmp_path / "cache").glob(f"*-{NAMES[2]}"))
        copy.write_bytes(copy.read_bytes()[:1000])
        assert read(NAMES[2])[0] == (folder / NAMES[2]).read_bytes() and len(srv.requests(NAMES[2])) == 2

        # a loader through the cache: the second epoch reads only what the first did not read whole
        cfg = cfg_for(f"{srv.url}/index.json", cache_dir=str(tmp_path / "c2"), num_workers=1)
        loader = loader_for(cfg)
        first = list(loader)
        before = len(srv.log)
        second = list(loader)
        loader.close()
        assert keys_of(first) == keys_of(second) == all_keys()
        assert len(srv.log) - before < len(NAMES) and loader.stats()["cached_bytes"] > 0


def test_verify_over_http_names_the_unreachable_shard_and_survives_a_cut(folder):
    with ShardServer(folder, faults={NAMES[2]: ["cut"]}, gone={GONE}) as srv:
        r = run_cli("verify", f"{srv.url}/index.json", "--workers", "2", "--quiet", "--retries", "1",
                    "--plot", os.devnull)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "shards: 4  samples: 21  decode-checked: 3  problems: 3" in r.stdout
    assert "2 retries" in r.stdout  # the cut shard once, the gone one once
    assert f"DAMAGED {GONE}: tar damaged (unreachable after 2 tries (last: HTTP 404 Not Found)) after 0 " \
           "samples" in r.stdout
    assert f"DAMAGED {GONE}: 0 readable samples, index says 1" in r.stdout


def test_eval_loader_over_http_scores_every_video_once(folder):
    with ShardServer(folder, faults={NAMES[2]: ["cut"]}) as srv:
        cfg = cfg_for(f"{srv.url}/index.json", **FAST)
        loader = EvalLoader(cfg, batch_size=4, rank=0, world_size=1, num_clips=1, num_crops=1)
        batches = list(loader)
    valid = [k for b in batches for k, v in zip(b["keys"], b["valid"], strict=True) if v]
    assert Counter(valid) == all_keys()


@pytest.fixture
def s3(folder, monkeypatch):
    """moto's S3 server on 127.0.0.1 holding the shards in s3://shards/k710/; the aws CLI pointed at it."""
    pytest.importorskip("moto.server", reason="moto[s3] + flask (requirements.txt) provide the S3 server")
    import boto3
    from engine_helpers import free_port
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # the venv's aws
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="shards")
    for f in [*NAMES, "index.json"]:
        client.upload_file(str(folder / f), "shards", f"k710/{f}")
    try:
        yield "s3://shards/k710"
    finally:
        server.stop()


def test_an_exact_epoch_from_s3_through_the_aws_cli(s3, tmp_path):
    if shutil.which("aws") is None:
        pytest.skip("the aws command-line client (awscli in requirements.txt) is not installed")
    cfg = cfg_for(f"{s3}/index.json", read_timeout_s=30)  # a python CLI per read: slow on a busy machine
    loaders = [loader_for(cfg, rank=r, world=2) for r in (0, 1)]
    got = epochs(loaders, 1)
    stats = [ld.stats() for ld in loaders]
    for ld in loaders:
        ld.close()
    assert keys_of([b for bs in got for b in bs]) == all_keys()
    assert sum(s["missing_samples"] + s["read_retries"] for s in stats) == 0


def test_a_stalled_client_command_is_killed_and_restarted_at_the_byte_reached(folder, tmp_path):
    # a client that stalls once (1000 bytes, then silence past the timeout), then serves from {offset}
    marker = tmp_path / "stalled"
    cmd = (f'f="$(echo {{url}} | cut -c8-)"; if [ ! -e {marker} ]; then touch {marker}; head -c 1000 "$f"; '
           'sleep 30; fi; tail -c +$(({offset} + 1)) "$f"')
    remote = Remote(timeout_s=1, retries=2, backoff_s=0.01, commands={"mock": cmd})
    counts: dict = {}
    with ShardStream(f"mock://{folder / NAMES[2]}", remote, counts) as s:
        data = s.read()
    assert data == (folder / NAMES[2]).read_bytes() and counts["retries"] == 1


def test_extract_reads_the_videos_of_a_shard_set_by_url(folder, tmp_path):
    from safetensors.torch import save_file
    from test_extract import _extract

    from vmae_ds.models import create_classifier

    small = tmp_path / "small"  # the 3- and 1-clip shards: 4 videos
    small.mkdir()
    index = json.loads((folder / "index.json").read_text())
    index["shards"] = [e for e in index["shards"] if e["file"] in (NAMES[1], NAMES[3])]
    index["total_samples"] = 4
    for e in index["shards"]:
        shutil.copy(folder / e["file"], small / e["file"])
    (small / "index.json").write_text(json.dumps(index))
    save_file(create_classifier("vit_tiny_debug", 3).state_dict(), str(tmp_path / "w.safetensors"))
    with ShardServer(small, faults={NAMES[1]: ["cut"]}) as srv:
        r = _extract(str(tmp_path / "w.safetensors"), "--model", "debug", "--videos", f"{srv.url}/index.json",
                     "--out", str(tmp_path / "f"), "--sampling-rate", "2", "--stride", "8", "--batch", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "features: 4 of 4 videos" in r.stdout
    rows = [json.loads(line) for line in (tmp_path / "f" / "index.jsonl").read_text().splitlines()]
    assert [row["path"] for row in rows] == [k for k in sorted(keys_in(NAMES[1]) + keys_in(NAMES[3]))]


def test_read_metrics_per_rank_and_the_progress_line():
    from vmae_ds.engine.storage_report import StorageMeter, read_totals, storage_line

    meter = StorageMeter()
    stats = [{"bytes_read": 10_000_000, "read_retries": 2, "read_s": 1.5, "missing_samples": 3,
              "unreachable_shards": {"a.tar": 1}},
             {"bytes_read": 4_000_000, "cached_bytes": 2_000_000, "unreachable_shards": {"a.tar": 1, "b.tar": 2}}]
    first = meter.fields([read_totals(s) for s in stats])
    assert first["data_read_mb_s"] is None  # no rate without a previous record of this process
    assert storage_line(first) == " | read 7.00 MB a rank, 2 MB from cache, 2 retries | unreachable shards 2: " \
                                  "a.tar, b.tar (3 samples missing)"
    meter._last = (meter._last[0] - 2.0, meter._last[1])  # as if the previous record were 2 s ago
    stats[0]["bytes_read"] += 50_000_000
    rec = meter.fields([read_totals(s) for s in stats])
    assert rec["data_read_mb_s"] == pytest.approx([25.0, 0.0], abs=0.1) and rec["data_read_mb"] == [60.0, 4.0]
    assert rec["data_unreachable"] == {"a.tar": 2, "b.tar": 2} and rec["data_read_retries"] == [2, 0]
    assert storage_line(rec).startswith(" | read 12.5 MB/s a rank (slowest rank 1: 0.00), 2 MB from cache") or \
        storage_line(rec).startswith(" | read 12.4 MB/s a rank (slowest rank 1: 0.00), 2 MB from cache")


def test_a_run_on_the_local_folder_continues_elastically_over_http(folder):
    from test_data_elastic import rest_of_epoch, saved

    states, read = saved([loader_for(cfg_for(folder), rank=r, world=2) for r in (0, 1)], 4)
    with ShardServer(folder, faults={NAMES[2]: ["cut"], NAMES[0]: ["503"]}) as srv:
        new = loader_for(cfg_for(f"{srv.url}/index.json", **FAST), world=1)  # 2 ranks -> 1, folder -> URL
        assert any("epoch 0: 14 samples not yet read" in line for line in new.load_elastic(states))
        rest, _ = rest_of_epoch(new)
        new.close()
    assert rest + read == all_keys()  # none skipped, none repeated
