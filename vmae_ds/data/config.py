"""Loader settings. Defaults are the VideoMAE V2 pretraining recipe (16 x stride 4, SSv2 stride 2, 224)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DataConfig(BaseModel):
    """What to read and how to sample it. Mask settings are not here: the engine passes a `mask_fn`."""

    model_config = ConfigDict(extra="forbid")

    shards: str = Field(description="the index.json written by vmae-shards build (a path or an http(s)://, "
                        "s3://, gs:// URL), a folder holding one (or a folder of .tar shards), or a brace pattern "
                        "of paths or URLs ('d/shard-{000000..000099}.tar'; resampled only: no sample counts)")
    base_url: str | None = Field(None, description="read the shards that index.json lists from BASE_URL/<file> "
                                 "(http(s)://, s3://, gs://, a folder) instead of next to index.json; overrides "
                                 "the index's own base_url")
    read_timeout_s: float = Field(60, gt=0, description="a remote shard read that delivers no byte for this long "
                                  "is retried (HTTP: socket timeout; command-line clients: no output)")
    read_retries: int = Field(6, ge=0, description="retries of a remote shard read that failed or stalled; each "
                              "continues at the byte reached (HTTP range request, else a re-read that skips what "
                              "was delivered). After them the shard is named, skipped for this epoch (its samples "
                              "counted missing) and read again next epoch")
    retry_backoff_s: float = Field(1.0, ge=0, description="wait before the first retry; doubles with each retry in "
                                   "a row (at most 60 s, with jitter)")
    remote_commands: dict[str, str] = Field(default_factory=dict, description="command per URL scheme that writes "
                                            "the object to stdout, with {url} and optionally {offset} (start at that "
                                            "byte). Defaults: s3 'aws s3 cp {url} -', gs 'gcloud storage cat -r "
                                            "{offset}- {url}'")
    cache_dir: str | None = Field(None, description="keep remote shards read in full in this local folder "
                                  "(atomic writes, verified against index.json's sizes) and read them from there "
                                  "next time")
    cache_gib: float = Field(50, gt=0, description="bound on cache_dir: least recently used shards are removed "
                             "first")
    num_frames: int = Field(16, ge=1, description="frames per clip")
    sampling: Literal["stride", "segments"] = Field(
        "stride", description="stride: num_frames frames sampling_rate apart from a random start (VideoMAE); "
        "segments: the window cut into num_frames segments, one frame from each (random in training, test views "
        "as segment_style says; TSN / UMT's sparse sampling, the whole clip whatever its length)")
    segment_style: Literal["tsn", "sparse", "even"] = Field(
        "tsn", description="sampling: segments: how the window is cut and where test views sit. tsn: floor(L/T)-"
        "frame segments, test views at c/n of a segment (VideoMAE V2 SSv2, UMT pretraining and SSv2); sparse: "
        "UMT's Kinetics fine-tuning ((L-1)/T segments, views at (c+1)/(n+1)); even: proportional segments "
        "covering every frame, views at (c+0.5)/n")
    sampling_rate: int = Field(4, ge=1, description="temporal stride between sampled frames (sampling: stride)")
    frame_spacing: Literal["exact", "linspace"] | None = Field(
        None, description="sampling: stride, training: exact (i x stride from a random start, the authors' "
        "pretraining) or linspace (T points over a random T x stride window, their fine-tuning); null: the "
        "objective's (pretraining exact, fine-tuning linspace)")
    stride_views: Literal["authors", "even"] = Field(
        "authors", description="sampling: stride, test views: authors (starts on the stride grid, "
        "int(c (count - T) / (n - 1))) or even (starts spread over every frame offset, rounded)")
    antialias: bool | None = Field(None, description="antialias the bilinear resizes; null: as the authors "
                                   "(pretraining crops yes, through PIL; fine-tuning crops and test views no)")
    source_sampling_rate: dict[str, int] = Field(default_factory=lambda: {"ssv2": 2},
                                                 description="stride per source, overrides sampling_rate")
    input_size: int = Field(224, ge=8, description="crop size after the multi-scale crop and resize")
    scales: tuple[float, ...] = Field((1, .875, .75, .66), description="crop sizes as shares of the short side")
    num_sample: int = Field(4, ge=1, description="repeated augmentation: crops (and masks) per decoded clip")
    num_workers: int = Field(2, ge=0, description="decoding processes per rank (0 = in the main process)")
    resampled: bool | None = Field(None, description="None (default): exact epochs when sample counts are known "
                                   "(index.json), else resampled. True: endless passes, each a seeded permutation "
                                   "of all shards that every rank x worker reader walks from its own rotation "
                                   "offset. False: exact epochs (every sample once per epoch across all ranks and "
                                   "workers; needs index.json)")
    shuffle_block: int = Field(16, ge=1, description="shuffle what a reader reads of each shard within blocks "
                               "of this many clips (memory: block x clip size per worker); 1 = shard order")
    backend: Literal["decord", "pyav", "nvdec"] = Field(
        "decord", description="decord | pyav: decoded in the loader workers (pyav skips the non-reference frames "
        "nobody sampled: fastest on shards built with --reencode); nvdec: the GPU's video decoder (PyNvVideoCodec, "
        "requirements-gpu.txt), the workers only read and plan, pretraining loader only")
    pin_memory: bool = Field(True, description="pin batches (only when CUDA is available)")
    persistent_workers: bool = Field(True, description="no effect (kept so configs that set it still load): "
                                     "a loader's workers live until close() or a crash/hang restart")
    prefetch_factor: int = Field(2, ge=1, description="batches each worker keeps ready (at most; lowered so that "
                                 "workers x prefetch x batch bytes stay under max_inflight_gib)")
    max_inflight_gib: float = Field(8.0, gt=0, description="bound on the batches in flight per rank, in GiB "
                                    "(they live in shm_path until the training loop takes them)")
    shm_path: str = Field("/dev/shm", description="where worker batches are shared; checked at start for "
                          "room for the batches in flight of every rank on the node")
    decode_timeout_s: float = Field(300, gt=0, description="a worker stuck this long on one sample is killed, "
                                    "the sample quarantined, and the workers restarted")
    max_bad_shards_in_a_row: int = Field(20, ge=1, description="give up (with the names) after this many "
                                         "consecutive shards that yield no sample")
    max_corrupt_in_a_row: int = Field(200, ge=1, description="give up (with the latest errors) after this many "
                                      "consecutive samples that cannot be decoded or transformed: a broken "
                                      "decoder or transform, not bad data")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.scales or any(not 0 < s <= 1 for s in self.scales):
            raise ValueError(f"scales must be in (0, 1], got {self.scales}")
        if any(v < 1 for v in self.source_sampling_rate.values()):
            raise ValueError(f"source_sampling_rate values must be >= 1, got {self.source_sampling_rate}")
        return self

    def stride_for(self, source: str) -> int:
        return self.source_sampling_rate.get(source, self.sampling_rate)
