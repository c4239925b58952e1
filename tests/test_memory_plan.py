"""The memory plan (vmae_ds.memory): activation bytes per checkpointing choice derived from one count, checked
against exact counts of the checkpointed model; the choice `auto` makes for a card; the one-line refusal of a
run that cannot fit, before any weights are built; and `--check` printing the plan."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from engine_helpers import ROOT, env, write_config

from vmae_ds.engine.run_config import load_run_config
from vmae_ds.memory.activations import checkpoint_counts, profile_objective
from vmae_ds.memory.fake import fake_cpu
from vmae_ds.memory.plan import MemoryPlanError, plan
from vmae_ds.memory.saved_tensors import SavedTensorCounter
from vmae_ds.memory.states import GIB, zero_state_bytes
from vmae_ds.objectives import MAEObjective

RECIPE_B = ROOT / "configs" / "pretrain" / "vit_base_hybrid.yaml"
RECIPE_G = ROOT / "configs" / "pretrain" / "vit_giant_hybrid.yaml"


def _exact_saved(cfg, mode: str, k: int) -> int:
    """Saved bytes of two samples with the model really checkpointed (the counter sees checkpoint inputs)."""
    obj = MAEObjective(cfg)
    obj.setup(torch.device("cpu"))
    one = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"batch_size": 1}),
                                 "data": cfg.data.model_copy(update={"num_sample": 2})})
    raw = next(iter(MAEObjective(one).build_loader(0, 1)))
    batch = obj.to_device(raw)
    with torch.device("meta"):
        model = obj.build_model().to(torch.bfloat16)
    with fake_cpu() as fm:
        model = model.to_empty(device="cpu").train()
        counter = SavedTensorCounter([*model.parameters(), *model.buffers()])
        model.set_activation_checkpointing(mode, k, fn=counter.checkpoint_fn)
        with counter:
            obj.loss(model, {"video": fm.from_tensor(batch["video"]), "sel": batch["sel"]})
    return counter.activation_bytes


def test_profile_prices_every_checkpointing_choice_exactly_at_vit_b_size():
    cfg = load_run_config(RECIPE_B, ["data.kind=synthetic"])
    prof = profile_objective(MAEObjective, cfg)
    assert 2 * prof.total == _exact_saved(cfg, "none", 0)
    with torch.device("meta"):
        model = MAEObjective(cfg).build_model()
    assert checkpoint_counts(model, "full", 0) == {"encoder.blocks": 12, "decoder.blocks": 4}
    assert checkpoint_counts(model, "selective", 5) == {"encoder.blocks": 5, "decoder.blocks": 0}
    for mode, k in (("selective", 5), ("full", 0)):
        assert 2 * prof.saved(checkpoint_counts(model, mode, k)) == _exact_saved(cfg, mode, k), (mode, k)
    # one sample's input as the objective hands it over: ImageNet-normalised fp32 16 x 224 x 224 + token indices
    assert prof.batch_bytes >= 3 * 16 * 224 * 224 * 4
    # real ViT-B shapes: 8 x 14 x 14 tokens, the tube mask hides int(0.9 * 196) = 176 a frame, 768 wide, bf16
    assert prof.stacks["encoder.blocks"][0][1] == 8 * (196 - 176) * 768 * 2


def test_zero_states_per_stage_and_world():
    ds = {"zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 5e7}}
    p = 1_000_000_000
    one = zero_state_bytes(p, ds, 1, "bf16", fused_adam=True)
    assert (one.weights, one.master, one.moments, one.grads) == (2 * p, 4 * p, 8 * p, 2 * p)
    assert one.buffers == 0 and one.step_extra == 4 * p  # the update's fp32 gradients
    many = zero_state_bytes(p, ds, 64, "bf16", fused_adam=True)
    assert many.weights == 2 * p and many.master == 4 * -(-p // 64) and many.buffers == 2 * 2 * 5e7
    three = zero_state_bytes(p, {"zero_optimization": {"stage": 3}}, 64, "bf16", fused_adam=True)
    assert three.weights == 2 * -(-p // 64)  # partitioned weights; gathered layers are buffers
    assert zero_state_bytes(p, ds, 1, "bf16", fused_adam=False).step_extra == 12 * p  # foreach AdamW temporaries


def test_auto_picks_the_fastest_choice_that_fits_the_card():
    cfg = load_run_config(RECIPE_G, ["data.kind=synthetic"])
    ds = {"zero_optimization": {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 5e7},
          "train_micro_batch_size_per_gpu": 128}
    prof = profile_objective(MAEObjective, cfg)
    big = plan(cfg, ds, 1, MAEObjective, 141 * GIB, "a device of", 0.15, fused_adam=True, profile=prof)
    assert big.choice.label == "none"
    small = plan(cfg, ds, 1, MAEObjective, 80 * GIB, "a device of", 0.15, fused_adam=True, profile=prof)
    assert small.choice.mode == "selective" and 1 <= small.choice.num_blocks < 40
    assert small.peak <= small.budget < small.peaks["none"]
    # one block fewer would not fit: the choice is the least recompute that fits
    fewer = small.choice.num_blocks - 1
    if fewer:
        k = dict(small.choice.ckpt, **{"encoder.blocks": fewer})
        from vmae_ds.memory.plan import peak_bytes
        assert peak_bytes(small.states, small.profile, k, 128) > small.budget
    assert small.max_micro_batch >= 128
    with pytest.raises(MemoryPlanError, match=r"micro-batch 128 samples needs about .* GiB per device even with "
                                              r"every block checkpointed .* largest micro-batch that fits is \d+"):
        plan(cfg, ds, 1, MAEObjective, 24 * GIB, "a device of", 0.15, fused_adam=True, profile=prof)


def test_check_prints_the_plan_and_a_run_that_cannot_fit_stops_before_building(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vmae_ds.pretrain", "--config", str(RECIPE_G), "--check",
                        "--gpu-memory-gib", "80", "--world-size", "8", "data.kind=synthetic"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "memory estimate (per device, micro-batch 128 samples)" in r.stdout
    assert "chosen by activation_checkpointing.mode auto" in r.stdout
    assert "largest micro-batch that fits" in r.stdout and "config OK" in r.stdout

    cfg = write_config(tmp_path / "big.yaml", name="big", output_dir=str(tmp_path / "runs"),
                       model={"name": "vit_base_patch16", "attention": "sdpa"},
                       masks={"encoder": "tube", "encoder_ratio": 0.9, "decoder": "running_cell",
                              "decoder_ratio": 0.5},
                       activation_checkpointing={"mode": "none", "memory_gib": 4},
                       optim={"batch_size": 64})
    r = subprocess.run([sys.executable, "-m", "vmae_ds.pretrain", "--config", str(cfg)], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.stdout + r.stderr)[-2000:]
    err = [ln for ln in r.stderr.splitlines() if "memory:" in ln]
    assert len(err) == 1 and "needs about" in err[0] and "with checkpointing none" in err[0], r.stderr[-2000:]
    assert "engine ready" not in r.stdout and not (tmp_path / "runs" / "big" / "checkpoints").exists()


@pytest.mark.distributed
def test_estimated_peak_matches_a_real_engine_step_on_two_ranks(tmp_path):
    """ZeRO-2 with every block checkpointed and ZeRO-3 without, bf16, ViT-B width at the real token count: the
    estimate against the profiler's peak of one whole step (with the CPU's foreach AdamW)."""
    from engine_helpers import run

    cfg = write_config(tmp_path / "c.yaml", precision="bf16",
                       model={"name": "vit_base_patch16", "attention": "sdpa", "depth": 2, "decoder_depth": 1},
                       masks={"encoder": "tube", "encoder_ratio": 0.9, "decoder": "running_cell",
                              "decoder_ratio": 0.5},
                       data={"kind": "synthetic", "num_sample": 2, "synthetic": {"num_videos": 16}},
                       optim={"batch_size": 2, "clip_grad": 1.0})
    code, log = run(str(cfg), str(tmp_path / "out.json"), log=tmp_path / "log",
                    script=str(ROOT / "tests" / "memory_peak_step.py"))
    assert code == 0, log[-3000:]
    import json
    res = json.loads((tmp_path / "out.json").read_text())
    assert set(res) == {"zero2", "zero3"}
    for stage, r in res.items():
        assert abs(r["estimate"] - r["measured"]) <= 0.15 * r["measured"], (stage, r)
