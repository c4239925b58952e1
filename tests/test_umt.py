"""Unmasked Teacher: the semantic mask, the alignment loss, the FLOPs count, and the ZeRO-3 bf16 step at real
widths against a plain model."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import ROOT, run

from vmae_ds.losses import alignment_loss
from vmae_ds.masking import attention_visible


def test_attention_mask_keeps_an_exact_count_per_frame_in_order():
    attn = torch.rand(3, 8, 196)
    vis = attention_visible(attn, 0.8)
    keep = 196 - int(0.8 * 196)  # 40 per frame, UMT's rule
    assert vis.shape == (3, 8 * keep)
    frames = vis // 196
    for t in range(8):
        assert ((frames == t).sum(dim=1) == keep).all()
    assert (vis.diff(dim=1) > 0).all()  # ascending, no repeats: t-major token order
    assert vis.min() >= 0 and vis.max() < 8 * 196


def test_attention_mask_follows_the_attention_weights():
    # one frame, 10 patches: patch 0 carries 60 % of the attention, patches 1-9 share the rest
    attn = torch.tensor([[[0.6] + [0.4 / 9] * 9]]).expand(2000, 1, 10)
    g = torch.Generator().manual_seed(0)
    vis = attention_visible(attn, 0.8, generator=g)  # keeps 2 of 10
    picked = torch.bincount(vis.flatten(), minlength=10).float() / 2000
    # without replacement, P(patch 0 among the 2 drawn) = 0.6 + 0.4 * 0.6 / (1 - 0.4 / 9) = 0.851
    want0 = 0.6 + 0.4 * 0.6 / (1 - 0.4 / 9)
    assert abs(float(picked[0]) - want0) < 0.03
    assert (picked[1:] - (2 - want0) / 9).abs().max() < 0.03  # the rest share the other draws evenly
    # uniform attention: every patch about equally often (2/10)
    uniform = attention_visible(torch.ones(2000, 1, 10), 0.8, generator=g)
    share = torch.bincount(uniform.flatten(), minlength=10).float() / 2000
    assert (share - 0.2).abs().max() < 0.04


def test_alignment_loss_is_two_minus_two_cosine():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, N=2, D=2), unit vectors
    t = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # same, then orthogonal
    assert alignment_loss([s], [t]).item() == pytest.approx((0 + 2) / 2)
    opposite = -s
    assert alignment_loss([s, s], [s, opposite]).item() == pytest.approx((0 + 4) / 2)  # mean over layers
    with pytest.raises(ValueError, match="one each per aligned layer"):
        alignment_loss([s], [s, s])


def test_umt_flops_count_student_and_teacher_apart():
    from vmae_ds.models import get_spec
    from vmae_ds.models.clip_teacher import clip_flops_per_image, get_clip_spec
    from vmae_ds.objectives.umt import umt_flops

    spec = get_spec("B", num_frames=8, tubelet_size=1)
    f = umt_flops(spec, get_clip_spec("clip_b16"), 224, 6, 0.8)
    assert f["teacher"] == 8 * clip_flops_per_image("clip_b16", 224, num_align_layers=6)
    # the student runs 40 of 196 tokens per frame: far below a full ViT-B on 8 x 196 tokens
    from vmae_ds.flops import classifier_flops
    full = 3 * classifier_flops(spec, 400).total
    assert 0.1 * full < f["model"] < 0.35 * full


@pytest.mark.distributed
def test_zero3_bf16_first_step_matches_plain_model(tmp_path):
    from vmae_ds.models.clip_teacher import random_openai_state_dict, save_openai_state_dict

    teacher = save_openai_state_dict(random_openai_state_dict("clip_b16", seed=0), tmp_path / "clip_b16.pt")
    code, log = run(str(teacher), str(tmp_path / "out.json"), log=tmp_path / "log.txt",
                    script=str(ROOT / "tests" / "umt_step.py"))
    assert code == 0, log[-4000:]
    r = json.loads((tmp_path / "out.json").read_text())
    assert 0 < r["loss"] < 4 and r["loss"] == pytest.approx(r["ref_loss"], rel=1e-2)
    assert r["applied"]


@pytest.mark.parametrize("style", ["tsn", "sparse", "even"])
def test_sparse_segment_sampling_takes_one_frame_per_segment(style):
    from vmae_ds.data.sampling import eval_segment_indices, segment_indices

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        # segments of 10 frames (sparse: (81 - 1) / 8, its segments include their end frame)
        idx = segment_indices(10, 91 if style == "sparse" else 90, 8, g, style)
        hi = 11 if style == "sparse" else 10
        assert all(10 + 10 * k <= i < 10 + 10 * k + hi for k, i in enumerate(idx)) and idx == sorted(idx), idx
    if style == "even":
        assert segment_indices(0, 80, 8, None, style) == [4, 14, 24, 34, 44, 54, 64, 74]  # the middles
    short = segment_indices(0, 3, 8, g, style)  # a clip shorter than the frames: repeats, never past the end
    assert len(short) == 8 and max(short) <= 2 and short == sorted(short)
    views = eval_segment_indices(0, 80, 8, 2, style)
    assert len(views) == 2 and views[0] != views[1] and all(len(v) == 8 for v in views)
