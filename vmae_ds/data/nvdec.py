"""`backend: nvdec`: the sampled frames decoded by the GPU's video decoder (NVDEC, through PyNvVideoCodec).

Split between the two sides of the loader so that everything that decides *what* a batch holds stays where
it is on the CPU path:
- worker (CPU): reads the shard, opens the container without decoding (frame count, frame size), and draws
  the frame indices and the num_sample multi-scale crop boxes from the same generator in the same order as
  the CPU path. It sends a `ClipPlan` (compressed bytes, indices, boxes) instead of decoded crops, so
  positions, exact epochs, resume and masks are those of the CPU path, and IPC carries compressed clips.
- main process: the batch is an `NvdecBatch`; `.to(device)` (the objectives' `batch["video"].to(...)`, run by
  the prefetcher on its side stream) decodes each clip on the GPU straight into device memory, crops and
  resizes there, and returns uint8 (B, 3, T, S, S) on the device, as the CPU path's batch would be after its
  copy. A clip the GPU decoder cannot handle is decoded by the CPU path (PyAV) instead, and counted.

Frames differ from the CPU path's within a tolerance, not bit for bit: NVDEC's YUV -> RGB conversion is not
FFmpeg's, and the resize runs in float on the GPU (the CPU path's uint8 kernel rounds in fixed point; the two
differ by at most 1 level on the same input, tests/test_data_nvdec.py).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vmae_ds.data.config import DataConfig
from vmae_ds.data.decode import DecodeError, PyAVReader
from vmae_ds.data.transforms import crop_resize_thwc, multiscale_crop_box, to_tchw

log = logging.getLogger("vmae_ds.data")
RECENT = 32


class NvdecUnavailable(ValueError):
    """backend nvdec cannot run here; the message says why in one line."""


def check_available() -> None:
    """Refuse in one line when there is no CUDA device or no working PyNvVideoCodec."""
    if not torch.cuda.is_available():
        raise NvdecUnavailable("data.backend nvdec decodes on the GPU, and there is no CUDA device here "
                               "(torch.cuda.is_available() is False): use backend pyav or decord")
    try:
        import PyNvVideoCodec  # noqa: F401
    except ImportError:
        raise NvdecUnavailable("data.backend nvdec needs PyNvVideoCodec (pip install -r requirements-gpu.txt)") \
            from None
    except Exception as e:  # it checks the driver's video libraries when imported
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise NvdecUnavailable(f"data.backend nvdec: PyNvVideoCodec cannot start here: {first} (containers need "
                               f"NVIDIA_DRIVER_CAPABILITIES to include 'video')") from None


@dataclass
class ClipPlan:
    """What the GPU has to make of one clip: the frames to decode and the crops to cut from them."""

    data: bytes
    indices: list[int]
    boxes: list[tuple[int, int, int, int]]
    size: tuple[int, int]  # (H, W) the boxes were drawn for
    key: str = ""


def plan_clip(data: bytes, meta: dict, cfg: DataConfig, gen: torch.Generator, key: str = "") -> ClipPlan:
    """Worker side: the CPU path's draws (indices, then crop boxes) without decoding a frame."""
    from vmae_ds.data.stream import clip_frame_indices  # here: stream.py imports this module

    reader = PyAVReader(data)
    idx = clip_frame_indices(reader.num_frames, meta, cfg, gen)
    h, w = reader.height, reader.width
    if min(h, w) * min(cfg.scales) < 1:
        raise DecodeError(f"frames of {w}x{h} are too small to crop")
    boxes = [multiscale_crop_box(h, w, cfg.input_size, tuple(cfg.scales), gen) for _ in range(cfg.num_sample)]
    return ClipPlan(data, idx, boxes, (h, w), key)


def crop_views(frames_thwc: torch.Tensor, boxes: list[tuple[int, int, int, int]], size: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) on any device -> uint8 (len(boxes), 3, T, size, size): each box cut and resized
    bilinearly with antialiasing, in float (uint8 resize kernels are CPU-only), rounded back to uint8."""
    x = frames_thwc.permute(0, 3, 1, 2)  # (T, 3, H, W) view
    t = x.shape[0]
    out = torch.empty((len(boxes), 3, t, size, size), dtype=torch.uint8, device=x.device)
    for i, (top, left, ch, cw) in enumerate(boxes):
        crop = x[:, :, top:top + ch, left:left + cw]
        if (ch, cw) != (size, size):
            crop = F.interpolate(crop.float(), size=(size, size), mode="bilinear", align_corners=False,
                                 antialias=True).round_().clamp_(0, 255).to(torch.uint8)
        out[i] = crop.permute(1, 0, 2, 3)
    return out


def cpu_views(plan: ClipPlan, size: int) -> torch.Tensor:
    """The CPU path for one plan (PyAV decode, uint8 crops): (num_sample, 3, T, size, size) on the CPU,
    bit-identical to what `backend: pyav` gives for the same clip and draws."""
    reader = PyAVReader(plan.data)
    uniq = sorted(set(plan.indices))
    frames = to_tchw(reader.get(uniq))
    if len(uniq) != len(plan.indices):
        frames = frames[[uniq.index(i) for i in plan.indices]]
    if tuple(frames.shape[-2:]) != plan.size:
        raise DecodeError(f"decoded frames are {tuple(frames.shape[-2:])}, the container said {plan.size}")
    return torch.stack([crop_resize_thwc(frames, b, size).permute(3, 0, 1, 2) for b in plan.boxes])


def _indexed(device: torch.device | str) -> torch.device:
    """'cuda' -> 'cuda:<current>' (the decoder and torch.cuda.set_device need the index)."""
    device = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None \
        else device


def _torch_context(device: torch.device) -> int:
    """The CUDA context torch uses on `device` (its primary context), so the decoder's frames live where torch's
    tensors do; 0 (the decoder picks) if the driver cannot be asked."""
    import ctypes

    torch.cuda.set_device(device)
    torch.empty(1, device=device)  # makes torch's context current on this thread
    try:
        ctx = ctypes.c_void_p()
        if ctypes.CDLL("libcuda.so.1").cuCtxGetCurrent(ctypes.byref(ctx)) == 0 and ctx.value:
            return int(ctx.value)
    except OSError:
        pass
    return 0


@dataclass
class NvdecStats:
    gpu_clips: int = 0
    cpu_fallback: int = 0
    failed: int = 0
    recent: list[str] = field(default_factory=list)

    def note(self, kind: str, key: str, e: Exception) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.recent = (self.recent + [f"{key}: {type(e).__name__}: {e}"[:300]])[-RECENT:]

    def as_dict(self) -> dict:
        return {"gpu_clips": self.gpu_clips, "cpu_fallback_clips": self.cpu_fallback, "failed_clips": self.failed,
                "recent": list(self.recent)}


THREADS = 4  # clips decoded at once: a GPU has several NVDEC engines, and PyNvVideoCodec releases the GIL


class NvdecDecoder:
    """Main-process side: GPU decoding of plans (THREADS clips at once, each thread on its own CUDA stream), with
    the CPU path as the per-clip fallback (counted)."""

    def __init__(self, cfg: DataConfig, gpu: bool = True):
        self.size, self.num_sample = cfg.input_size, cfg.num_sample
        self.stats = NvdecStats()
        self.gpu = gpu  # False: every clip through the CPU path (tests of the plumbing on a machine without one)
        self._nvc = None
        self._context = 0
        self._lock = threading.Lock()
        self._local = threading.local()  # per decoding thread: its CUDA stream
        self._pool: ThreadPoolExecutor | None = None

    def batch(self, plans: list[ClipPlan]) -> NvdecBatch:
        return NvdecBatch(plans, self)

    def _gpu_frames(self, plan: ClipPlan, device: torch.device) -> torch.Tensor:
        """uint8 (T, H, W, 3) on `device`, the plan's frames in its order, decoded by NVDEC on this thread's
        current stream (the decoder writes, then the copy out of its buffers runs, in that stream's order)."""
        with self._lock:
            if self._nvc is None:
                import PyNvVideoCodec as nvc

                self._context = _torch_context(device)
                self._nvc = nvc
        nvc, stream = self._nvc, torch.cuda.current_stream(device)
        uniq = sorted(set(plan.indices))
        dec = nvc.SimpleDecoder(plan.data, gpu_id=device.index or 0, cuda_context=self._context,
                                cuda_stream=stream.cuda_stream, use_device_memory=True,
                                output_color_type=nvc.OutputColorType.RGB)
        if len(dec) < uniq[-1] + 1:
            raise DecodeError(f"NVDEC sees {len(dec)} frames, frame {uniq[-1]} was sampled")
        decoded = dec.get_batch_frames_by_index(uniq)
        if len(decoded) != len(uniq):
            raise DecodeError(f"NVDEC returned {len(decoded)} of {len(uniq)} frames")
        frames = torch.stack([torch.from_dlpack(f) for f in decoded])  # copied out of the decoder's buffers
        if len(uniq) != len(plan.indices):
            frames = frames[[uniq.index(i) for i in plan.indices]]
        if frames.dim() != 4 or frames.shape[-1] != 3 or tuple(frames.shape[1:3]) != plan.size:
            raise DecodeError(f"NVDEC frames are {tuple(frames.shape)}, expected (T, {plan.size[0]}, "
                              f"{plan.size[1]}, 3)")
        return frames

    def views(self, plan: ClipPlan, device: torch.device) -> torch.Tensor | None:
        """(num_sample, 3, T, S, S) uint8 on `device`; None when neither decoder can read the clip."""
        device = _indexed(device)
        if self.gpu and device.type == "cuda":
            try:
                out = crop_views(self._gpu_frames(plan, device), plan.boxes, self.size)
                with self._lock:
                    self.stats.gpu_clips += 1
                return out
            except Exception as e:  # any clip NVDEC cannot take: the CPU path decodes this one
                with self._lock:
                    self.stats.note("cpu_fallback", plan.key, e)
                log.warning("data: nvdec could not decode %s (%s); decoded on the CPU instead", plan.key, e)
        else:
            with self._lock:
                self.stats.cpu_fallback += 1
        try:
            return cpu_views(plan, self.size).to(device)
        except Exception as e:
            with self._lock:
                self.stats.note("failed", plan.key, e)
            log.warning("data: %s could not be decoded on the GPU or the CPU (%s); its rows repeat another clip "
                        "of the batch", plan.key, e)
            return None

    def all_views(self, plans: list[ClipPlan], device: torch.device) -> list[torch.Tensor | None]:
        """views() of every plan, in order; on CUDA THREADS at once, each thread on its own stream, the caller's
        stream made to wait for all of them (and the results marked as used by it)."""
        if device.type != "cuda" or len(plans) == 1:
            return [self.views(p, device) for p in plans]
        caller = torch.cuda.current_stream(device)

        def work(plan: ClipPlan) -> tuple[torch.Tensor | None, torch.cuda.Stream]:
            if getattr(self._local, "stream", None) is None:
                self._local.stream = torch.cuda.Stream(device)
            s = self._local.stream
            with torch.cuda.device(device), torch.cuda.stream(s):
                return self.views(plan, device), s

        if self._pool is None:
            self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="nvdec")
        done = list(self._pool.map(work, plans))
        for s in {id(s): s for _, s in done}.values():
            caller.wait_stream(s)
        for v, _ in done:
            if v is not None:
                v.record_stream(caller)  # made on a decoding stream, read on the caller's: no early reuse
        return [v for v, _ in done]


class NvdecBatch:
    """A batch's clips, decoded when moved: `.to(device)` -> uint8 (B, 3, T, S, S) on `device` (B = clips x
    num_sample, clip-major, as the CPU path). Rows of a clip that no decoder can read repeat the previous
    readable clip's (counted in `stats()['nvdec']['failed_clips']`, named in its 'recent')."""

    def __init__(self, plans: list[ClipPlan], decoder: NvdecDecoder):
        self.plans, self.decoder = plans, decoder
        t, s = len(plans[0].indices), decoder.size
        self.shape = torch.Size((len(plans) * decoder.num_sample, 3, t, s, s))
        self.dtype = torch.uint8
        self._done: dict[str, torch.Tensor] = {}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        device = _indexed(device)
        if str(device) not in self._done:
            views = self.decoder.all_views(self.plans, device)
            good = [v for v in views if v is not None]
            if not good:
                raise DecodeError(f"no clip of the batch could be decoded: {[p.key for p in self.plans]}")
            last = good[0]
            for i, v in enumerate(views):
                views[i] = last = v if v is not None else last
            self._done = {str(device): torch.cat(views)}
        return self._done[str(device)]
