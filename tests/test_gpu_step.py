"""Training-step checks that matter on a GPU: no host sync inside the step (CUDA only), and every attention
kernel on bf16 weights (as DeepSpeed's bf16 mode trains them, not autocast) against fp32 math, at head dims 64
and ViT-g's 88 (on the CPU with the kernels it has, on CUDA with all of them)."""

from __future__ import annotations

import pytest
import torch

from vmae_ds.attention import flash_attn_available
from vmae_ds.engine.run_config import RunConfig
from vmae_ds.masking import TokenGrid, make_masks
from vmae_ds.models import create_pretrain_model
from vmae_ds.objectives.mae import MAEObjective

CUDA = torch.cuda.is_available()
SIZES = {"depth": 2, "decoder_depth": 1, "num_frames": 8, "img_size": 128}  # 4 x 8 x 8 tokens


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_step_has_no_host_sync():
    cfg = RunConfig.model_validate({"precision": "bf16", "model": {"name": "vit_base_patch16", **SIZES}})
    obj = MAEObjective(cfg)
    obj.setup(torch.device("cuda"))
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (4, 3, 8, 128, 128), dtype=torch.uint8, generator=g).pin_memory()
    enc, dec = make_masks("tube", 0.9, "running_cell", 0.5, 4, obj.grid(), generator=g)
    batch = obj.to_device({"video": video, "encoder_mask": enc, "decoder_mask": dec})
    model = create_pretrain_model("vit_base_patch16", attention="sdpa", **SIZES).cuda().to(torch.bfloat16)
    obj.loss(model, batch)[0].backward()  # warm-up: kernels chosen, caches filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = obj.loss(model, batch)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss.detach()).item()


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not CUDA, reason="needs CUDA")]), "cpu"])
@pytest.mark.parametrize("heads,dim", [(12, 768), (16, 1408)])  # head dims 64 and ViT-g's 88
def test_bf16_weights_kernels_agree_with_fp32_math(device, heads, dim):
    torch.manual_seed(0)
    model = create_pretrain_model("vit_base_patch16", dim=dim, num_heads=heads, attention="math",
                                  **SIZES).to(device)
    enc, dec = make_masks("tube", 0.9, "running_cell", 0.5, 2, TokenGrid(4, 8, 8), device=device)
    video = torch.randn(2, 3, 8, 128, 128, device=device)
    ref = model(video, enc, dec).float()
    model = model.to(torch.bfloat16)
    kernels = ["math", "sdpa"] + (["flash_attn"] if device == "cuda" and flash_attn_available() else [])
    for kernel in kernels:
        model.kernel.requested = kernel  # one KernelChoice, shared by every block
        model.kernel._resolved.clear()
        out = model(video.to(torch.bfloat16), enc, dec).float()
        torch.testing.assert_close(out, ref, atol=6e-2, rtol=6e-2, msg=kernel)
        assert model.kernel.used == kernel


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_sync_counter_names_where_each_sync_was_made():
    from vmae_ds.engine.device import SyncCounter

    x = torch.ones(4, device="cuda")
    counter = SyncCounter(torch.device("cuda"))
    counter.start()
    x.sum().item()  # one sync, made on this line
    (x * 2).sum().item()  # and one here
    torch.cuda.synchronize()  # explicit: set_sync_debug_mode does not see it, the counter's wrapper does
    counted = counter.stop()
    assert sum(counted.values()) >= 3, counted
    assert all(where.startswith("tests/test_gpu_step.py:") for where in counted), counted
    assert sum(v for k, v in counted.items() if k.endswith("(synchronize)")) == 1, counted
    assert torch.cuda.synchronize.__module__ == "torch.cuda"  # unwrapped again
    assert torch.cuda.get_sync_debug_mode() == 0  # restored


def test_sync_sources_are_named_from_the_package_folder():
    from vmae_ds.engine.device import _short

    assert _short("/opt/torch/.venv/lib/python3.12/site-packages/deepspeed/runtime/zero/stage3.py") == \
        "deepspeed/runtime/zero/stage3.py"
    assert _short("/tmp/site/deepspeed/runtime/engine.py") == "deepspeed/runtime/engine.py"
    assert _short("/work/checkout/vmae_ds/engine/trainer.py") == "vmae_ds/engine/trainer.py"
