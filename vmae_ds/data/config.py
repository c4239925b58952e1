"""Loader settings. Defaults are the VideoMAE V2 pretraining recipe (16 x stride 4, SSv2 stride 2, 224)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DataConfig(BaseModel):
    """What to read and how to sample it. Mask settings are not here: the engine passes a `mask_fn`."""

    model_config = ConfigDict(extra="forbid")

    shards: str = Field(description="brace pattern ('d/shard-{000000..000099}.tar'), a folder of .tar "
                        "shards, or the index.json written by vmae-shards build")
    num_frames: int = Field(16, ge=1, description="frames per clip")
    sampling_rate: int = Field(4, ge=1, description="temporal stride between sampled frames")
    source_sampling_rate: dict[str, int] = Field(default_factory=lambda: {"ssv2": 2},
                                                 description="stride per source, overrides sampling_rate")
    input_size: int = Field(224, ge=8, description="crop size after the multi-scale crop and resize")
    scales: tuple[float, ...] = Field((1, .875, .75, .66), description="crop sizes as shares of the short side")
    num_sample: int = Field(4, ge=1, description="repeated augmentation: crops (and masks) per decoded clip")
    num_workers: int = Field(2, ge=0, description="decoding processes per rank (0 = in the main process)")
    resampled: bool = Field(True, description="draw shards with replacement forever (pretraining). False: "
                            "epochs of len(loader) batches on every rank; each epoch deals a new shard order to "
                            "the rank x worker readers, a reader whose shards run out reads them again, clips "
                            "past a reader's share are left out of that epoch (webdataset-style epochs)")
    shuffle_block: int = Field(16, ge=1, description="shuffle each shard draw within blocks of this many "
                               "clips (memory: block x clip size per worker); 1 = shard order")
    backend: Literal["decord", "pyav"] = "decord"
    pin_memory: bool = Field(True, description="pin batches (only when CUDA is available)")
    persistent_workers: bool = True
    prefetch_factor: int = Field(2, ge=1, description="batches each worker keeps ready")
    max_bad_shards_in_a_row: int = Field(20, ge=1, description="give up (with the names) after this many "
                                         "consecutive shards that yield no sample")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.scales or any(not 0 < s <= 1 for s in self.scales):
            raise ValueError(f"scales must be in (0, 1], got {self.scales}")
        if any(v < 1 for v in self.source_sampling_rate.values()):
            raise ValueError(f"source_sampling_rate values must be >= 1, got {self.source_sampling_rate}")
        return self

    def stride_for(self, source: str) -> int:
        return self.source_sampling_rate.get(source, self.sampling_rate)
