"""`backend: nvdec`: refused in one line without CUDA; on the CPU its plumbing (worker-side plans, the same draws,
positions, masks, exact epochs and resume as the CPU path, the per-clip CPU path) is checked with every clip on the
CPU path; the GPU decode itself is compared with the CPU path's frames under the `gpu` mark."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import webdataset as wds
from data_helpers import REPO, build, make_corpus, reader_positions, shared_dir

from data_tools.synth import write_video
from vmae_ds.data import (
    DataConfig,
    EvalLoader,
    build_finetune_loader,
    build_pretrain_loader,
    default_mask_fn,
    nvdec,
    token_grid,
)
from vmae_ds.data.decode import PyAVReader
from vmae_ds.data.stream import MultiScaleCrops, decode_clip, parse_sample
from vmae_ds.data.transforms import crop_resize_thwc, multiscale_crop_box

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    corpus = make_corpus(shared_dir(tmp_path_factory, "data_corpus"))
    return build(corpus, shared_dir(tmp_path_factory, "data_shards", create=False))


def cfg_for(shards, backend: str, **kw) -> DataConfig:
    base = dict(shards=str(shards), num_frames=4, sampling_rate=2, input_size=32, num_sample=2, num_workers=2,
                resampled=False, backend=backend)
    return DataConfig(**{**base, **kw})


def loader_for(cfg: DataConfig, rank: int = 0, world: int = 2):
    return build_pretrain_loader(cfg, batch_size=4, rank=rank, world_size=world, seed=7,
                                 mask_fn=default_mask_fn(token_grid(cfg, patch=8)))


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_nvdec_is_refused_in_one_line_without_cuda(shards, tmp_path):
    with pytest.raises(nvdec.NvdecUnavailable) as e:
        loader_for(cfg_for(shards, "nvdec"))
    assert str(e.value) == ("data.backend nvdec decodes on the GPU, and there is no CUDA device here "
                            "(torch.cuda.is_available() is False): use backend pyav or decord")
    # what a user types: the run stops before any start-up, one line on stderr, exit 2
    r = subprocess.run([sys.executable, "-m", "vmae_ds.pretrain", "--config", "configs/pretrain/vit_base_hybrid.yaml",
                        "data.kind=shards", f"data.shards.shards={shards}", "data.shards.backend=nvdec", "--check"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                                   "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == ["vmae-pretrain: error: data.shards.backend nvdec decodes on the GPU, "
                                             "and there is no CUDA device here (torch.cuda.is_available() is False): "
                                             "use backend pyav or decord"], r.stderr


def test_nvdec_is_refused_where_it_cannot_apply(shards, monkeypatch):
    monkeypatch.setattr(nvdec, "check_available", lambda: None)  # past the CUDA check, to reach these
    with pytest.raises(nvdec.NvdecUnavailable, match="custom per-clip transform"):
        build_finetune_loader(cfg_for(shards, "nvdec"), batch_size=4, rank=0, world_size=1, seed=0,
                              transform=lambda frames, gen, meta: [])
    with pytest.raises(nvdec.NvdecUnavailable, match="EvalLoader decodes its test-time views in the workers"):
        EvalLoader(cfg_for(shards, "nvdec"), batch_size=2, rank=0, world_size=1)


def test_nvdec_plumbing_gives_the_cpu_paths_batches_positions_and_resume(shards, monkeypatch):
    """Workers send plans, the main process decodes them (here every clip on the CPU path, as a clip NVDEC
    cannot take would be): videos, keys, masks, labels, positions and a resume equal backend pyav's."""
    monkeypatch.setattr(nvdec, "check_available", lambda: None)  # no GPU here: the decode falls back per clip
    cpu, gpu = loader_for(cfg_for(shards, "pyav")), loader_for(cfg_for(shards, "nvdec"))
    want, got = list(cpu), []
    it = iter(gpu)
    for k, b in enumerate(it):
        assert isinstance(b["video"], nvdec.NvdecBatch) and b["video"].shape == want[k]["video"].shape
        got.append({**b, "video": b["video"].to("cpu")})
        if k == 0:
            state = gpu.state_dict()
    assert len(got) == len(want) == 4  # 16 clips / 2 ranks / 2 clips per batch: one exact epoch
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a["video"], b["video"]) and a["keys"] == b["keys"]
        assert torch.equal(a["encoder_mask"], b["encoder_mask"]) and torch.equal(a["decoder_mask"], b["decoder_mask"])
    assert reader_positions(gpu.state_dict()) == reader_positions(cpu.state_dict())
    st = gpu.stats()
    assert st["nvdec"]["cpu_fallback_clips"] == 8 and st["nvdec"]["gpu_clips"] == 0 and st["decoded_clips"] == 8
    resumed = loader_for(cfg_for(shards, "nvdec"))
    resumed.load_state_dict(json.loads(json.dumps(state)))
    again = [b["video"].to("cpu") for b in resumed]
    assert len(again) == 3 and all(torch.equal(v, w["video"]) for v, w in zip(again, want[1:], strict=True))
    for ld in (cpu, gpu, resumed):
        ld.close()


def _first_clip(shards) -> tuple[bytes, dict]:
    sample = next(iter(wds.WebDataset(str(sorted(shards.glob("*.tar"))[0]), shardshuffle=False, empty_check=False)))
    sample["__shard__"] = "s"
    return parse_sample(sample)


def test_plans_draw_what_the_cpu_path_draws(shards):
    """A worker's plan, made without decoding, holds the CPU path's frame indices and crop boxes."""
    data, meta = _first_clip(shards)
    cfg = cfg_for(shards, "nvdec", num_sample=4)
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    plan = nvdec.plan_clip(data, meta, cfg, a, "k")
    frames = decode_clip(data, meta, cfg.model_copy(update={"backend": "pyav"}), b)  # draws the indices
    want = torch.stack([c.permute(3, 0, 1, 2) for c in MultiScaleCrops(cfg)(frames, b, meta)])  # the boxes
    assert plan.size == tuple(frames.shape[-2:]) and len(plan.boxes) == 4
    assert torch.equal(nvdec.cpu_views(plan, cfg.input_size), want)
    # and the two generators are still in step: the plan drew exactly as many numbers
    assert torch.equal(torch.randint(0, 2 ** 30, (4,), generator=a), torch.randint(0, 2 ** 30, (4,), generator=b))


@pytest.mark.parametrize("size", [(48, 64), (240, 320)])
def test_float_crops_are_within_one_level_of_the_cpu_paths_uint8_crops(size, tmp_path):
    """The GPU resizes in float (no uint8 kernel there); on the same frames that differs from the CPU path's
    fixed-point uint8 resize by at most one level, and not at all where a box needs no resize."""
    path = write_video(tmp_path / "v.mp4", 4, size, 25, seed=1, gop=4)
    frames = torch.from_numpy(PyAVReader(path.read_bytes()).get(list(range(4))))  # (T, H, W, 3)
    gen = torch.Generator().manual_seed(0)
    s = 32 if size[0] == 48 else 224
    boxes = [multiscale_crop_box(*size, s, (1, .875, .75, .66), gen) for _ in range(8)]
    boxes.append((0, 0, s, s))
    float_views = nvdec.crop_views(frames, boxes, s)
    for i, box in enumerate(boxes):
        ref = crop_resize_thwc(frames.permute(0, 3, 1, 2), box, s).permute(3, 0, 1, 2)
        diff = (float_views[i].int() - ref.int()).abs()
        assert diff.max() <= 1, (box, int(diff.max()))
        assert diff.float().mean() < 0.35  # most pixels agree exactly
    assert torch.equal(float_views[-1], frames[:, :s, :s].permute(3, 0, 1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device with NVDEC and PyNvVideoCodec")
def test_nvdec_frames_match_the_cpu_path_and_unusable_clips_fall_back(shards, tmp_path):
    """Real NVDEC decodes: the loader's batches equal the CPU path's in everything but the pixels, and the
    pixels agree within the colour-conversion tolerance; an H.264 4:4:4 clip (NVDEC decodes 4:2:0 only) falls
    back to the CPU path, counted."""
    cpu, gpu = loader_for(cfg_for(shards, "pyav"), world=1), loader_for(cfg_for(shards, "nvdec"), world=1)
    for a, b in zip(list(cpu), list(gpu), strict=True):
        video = b["video"].to("cuda")
        assert video.is_cuda and video.dtype == torch.uint8 and video.shape == a["video"].shape
        assert a["keys"] == b["keys"] and torch.equal(a["encoder_mask"], b["encoder_mask"])
        diff = (video.cpu().int() - a["video"].int()).abs().float()
        # NVDEC's NV12 -> RGB kernel is not swscale's (rounding, chroma siting); both BT.601 limited range
        assert diff.mean() < 3.0 and torch.quantile(diff.flatten()[::97], 0.99) < 24, (diff.mean(), diff.max())
    assert gpu.stats()["nvdec"]["gpu_clips"] == 16 and gpu.stats()["nvdec"]["cpu_fallback_clips"] == 0
    clip = write_video(tmp_path / "yuv444.mp4", 24, (48, 64), 25, seed=2)
    import av

    with av.open(str(clip)) as src, av.open(str(tmp_path / "hi444.mp4"), "w") as dst:
        out = dst.add_stream("libx264", rate=25)
        out.width, out.height, out.pix_fmt = 64, 48, "yuv444p"
        for f in src.decode(video=0):
            dst.mux(out.encode(f.reformat(format="yuv444p")))
        dst.mux(out.encode())
    dec = nvdec.NvdecDecoder(cfg_for(shards, "nvdec"))
    plan = nvdec.plan_clip((tmp_path / "hi444.mp4").read_bytes(), {}, cfg_for(shards, "nvdec"),
                           torch.Generator().manual_seed(0), "hi444")
    views = dec.views(plan, torch.device("cuda"))
    assert views is not None and torch.equal(views.cpu(), nvdec.cpu_views(plan, 32))
    assert dec.stats.cpu_fallback == 1 and "hi444" in dec.stats.recent[0]
