"""GPU-only checks of the training step (`gpu` mark; they skip without CUDA and run in `make gpu-check`)."""

from __future__ import annotations

import pytest
import torch

from vmae_ds.attention import flash_attn_available
from vmae_ds.engine.run_config import RunConfig
from vmae_ds.masking import TokenGrid, make_masks
from vmae_ds.models import create_pretrain_model
from vmae_ds.objectives.mae import MAEObjective

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _objective_and_batch():
    cfg = RunConfig.model_validate({"precision": "bf16", "model": {
        "name": "vit_base_patch16", "depth": 2, "decoder_depth": 1, "num_frames": 8, "img_size": 112}})
    obj = MAEObjective(cfg)
    obj.setup(torch.device("cuda"))
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (4, 3, 8, 112, 112), dtype=torch.uint8, generator=g).pin_memory()
    enc, dec = make_masks("tube", 0.9, "running_cell", 0.5, 4, obj.grid(), generator=g)
    return obj, obj.to_device({"video": video, "encoder_mask": enc, "decoder_mask": dec})


def test_step_has_no_host_sync():
    obj, batch = _objective_and_batch()
    model = create_pretrain_model("vit_base_patch16", depth=2, decoder_depth=1, num_frames=8, img_size=112,
                                  attention="sdpa").cuda().to(torch.bfloat16)
    obj.loss(model, batch)[0].backward()  # warm-up: kernels chosen, caches filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = obj.loss(model, batch)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss.detach()).item()


@pytest.mark.parametrize("heads,dim", [(12, 768), (16, 1408)])  # head dims 64 and ViT-g's 88
def test_bf16_weights_kernels_agree_with_fp32_math(heads, dim):
    torch.manual_seed(0)
    model = create_pretrain_model("vit_base_patch16", dim=dim, num_heads=heads, depth=2, decoder_depth=1,
                                  num_frames=8, img_size=112, attention="math").cuda()
    enc, dec = make_masks("tube", 0.9, "running_cell", 0.5, 2, TokenGrid(4, 7, 7), device="cuda")
    video = torch.randn(2, 3, 8, 112, 112, device="cuda")
    ref = model(video, enc, dec).float()
    model = model.to(torch.bfloat16)  # bf16 weights, as DeepSpeed's bf16 mode trains them (not autocast)
    for kernel in ["math", "sdpa"] + (["flash_attn"] if flash_attn_available() else []):
        model.kernel.requested = kernel  # one KernelChoice, shared by every block
        model.kernel._resolved.clear()
        out = model(video.to(torch.bfloat16), enc, dec).float()
        torch.testing.assert_close(out, ref, atol=6e-2, rtol=6e-2, msg=kernel)
