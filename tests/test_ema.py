"""finetune.ema: the moving average of the weights, sharded over ranks, under ZeRO-1 and ZeRO-3.

In-process: the sharded average over 2 simulated ranks equals a hand-computed one, and reassembles from rank
files. With 2 real DeepSpeed CPU ranks (a fine-tuning run on real H.264 shards with sparse segments and an
interpolated position table, ZeRO-3): the EMA after every step equals the average computed by hand from each
step's consolidated weights; the run evaluates model and EMA with segments at its end; vmae-eval and vmae-export
read the EMA back; a run killed with SIGKILL and resumed ends with the same EMA, bit for bit. ZeRO-1 in bf16:
the average of the bf16 weights the model computes with, by hand.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from engine_helpers import ROOT, metrics, objective_sections, pointer, run, start, wait_for, write_config
from safetensors.torch import load_file

from vmae_ds.engine.ema import ShardedEMA, read_ema_weights
from vmae_ds.models import create_classifier

DECAY = 0.7


def hand_average(weights: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """timm's ModelEma: start at the first weights, then ema = decay ema + (1 - decay) w after every step."""
    ema = {k: v.float().clone() for k, v in weights[0].items()}
    for w in weights[1:]:
        ema = {k: decay * ema[k] + (1 - decay) * w[k].float() for k in ema}
    return ema


def test_sharded_average_over_two_ranks_is_the_hand_computed_one(tmp_path):
    torch.manual_seed(0)
    model = create_classifier("vit_tiny_debug", 4)
    named = list(model.named_parameters())
    names, shapes = [n for n, _ in named], [tuple(p.shape) for _, p in named]
    ranks = [ShardedEMA(names, shapes, DECAY, r, 2) for r in (0, 1)]
    assert sum(len(r.pieces) for r in ranks) >= len(names) and sum(r.chunk for r in ranks) >= ranks[0].total
    seen = [{k: v.detach().clone() for k, v in model.state_dict().items() if k in names}]
    for r in ranks:
        r.start(model, stage3=False)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items() if k in names})
        for r in ranks:
            r.update(model, stage3=False)
    for r in ranks:
        torch.save({"objective": {"ema": r.state_dict()}}, tmp_path / f"rank_{r.rank:05d}.pt")
    got, want = read_ema_weights(tmp_path), hand_average(seen, DECAY)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-7), k
    assert not torch.allclose(got["head.weight"], seen[-1]["head.weight"])  # an average, not the last weights
    fresh = ShardedEMA(names, shapes, DECAY, 1, 2)
    fresh.load_state_dict(ranks[1].state_dict())
    assert torch.equal(fresh.shadow, ranks[1].shadow) and fresh.updates == 5
    with pytest.raises(ValueError, match="over 2 rank"):
        ShardedEMA(names, shapes, DECAY, 0, 3).load_state_dict(ranks[0].state_dict())


# ------------------------------------------------------------------ real DeepSpeed ranks
STEPS = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_helpers import build, make_corpus, shared_dir

    corpus = make_corpus(shared_dir(tmp_path_factory, "data_corpus"))
    return build(corpus, shared_dir(tmp_path_factory, "data_shards", create=False))


def init_file(tmp_path) -> str:
    """Starting weights at the registry grid (4 frames of 32 px: 2 x 4 x 4 tokens), head included."""
    from safetensors.torch import save_file

    path = tmp_path / "init.safetensors"
    torch.manual_seed(3)
    save_file(create_classifier("vit_tiny_debug", 4).state_dict(), str(path))
    return str(path)


def consolidated(run_dir, step: int) -> dict[str, torch.Tensor]:
    from vmae_ds.export import consolidate

    return consolidate(run_dir / "checkpoints" / f"step_{step:08d}")


@pytest.mark.distributed
def test_zero3_ema_is_the_hand_average_is_evaluated_exported_and_resumes_exactly(tmp_path, shards, capsys):
    from vmae_ds.evaluate import main as vmae_eval
    from vmae_ds.export import main as vmae_export
    from vmae_ds.models.pos_embed import interpolated_table

    init = init_file(tmp_path)
    sections = objective_sections(tmp_path, "classify")
    ft = {**sections["finetune"], "init": init, "ema": {"enabled": True, "decay": DECAY},
          "eval": {"shards": str(shards), "num_clips": 2, "num_crops": 1, "batch_size": 2, "num_workers": 0}}
    data = {"kind": "shards", "num_sample": 2,
            "shards": {"shards": str(shards), "sampling": "segments", "segment_style": "tsn", "num_workers": 1}}
    common = dict(output_dir=str(tmp_path / "runs"), objective="classify", masks=None, finetune=ft, data=data,
                  model={"name": "vit_tiny_debug", "attention": "sdpa", "num_frames": 8},
                  optim={"max_steps": STEPS, "epochs": 4, "warmup_epochs": 1},
                  checkpoint={"every_steps": 1, "keep_last": STEPS}, logging={"every_steps": 1, "tensorboard": False})
    code, log = run("--config", str(write_config(tmp_path / "a.yaml", name="a", **common)), log=tmp_path / "a.log",
                    entry="classify")
    assert code == 0, log[-4000:]
    run_a = tmp_path / "runs" / "a"

    # the EMA after steps 3 and 6 = the hand average of the initial and every step's consolidated weights
    weights = [{k: v for k, v in load_file(init).items()}] + [consolidated(run_a, s) for s in range(1, STEPS + 1)]
    for s in (3, STEPS):
        got, want = read_ema_weights(run_a / "checkpoints" / f"step_{s:08d}"), hand_average(weights[:s + 1], DECAY)
        assert sorted(got) == sorted(want)
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7), (s, k, float((got[k] - want[k]).abs().max()))
    assert not torch.allclose(got["head.weight"], weights[-1]["head.weight"])

    # end of training: model and EMA scored on sparse segments, with the interpolated position table
    reports = {w: json.loads((run_a / d / "eval.json").read_text()) for w, d in (("model", "eval"),
                                                                               ("ema", "eval_ema"))}
    for r in reports.values():
        assert r["extra"]["clips"].startswith("8 frames, segments (tsn)") and r["count"] == 16
    assert "\neval: top-1" in log and "\nEMA (decay 0.7) eval: top-1" in log
    assert "position table: (4, 4, 4) tokens, interpolated" in log

    # vmae-export --weights ema: the average and the table; vmae-eval --ema of the run: the same scores
    out = tmp_path / "ema.safetensors"
    assert vmae_export([str(run_a), str(out), "--weights", "ema"]) == 0
    exported = load_file(str(out))
    assert torch.equal(exported["pos_embed"], interpolated_table((2, 4, 4), (4, 4, 4), 48))
    assert all(torch.equal(exported[k], got[k]) for k in got)
    assert vmae_export([str(run_a), str(tmp_path / "hf"), "--format", "hf"]) == 2  # transformers cannot hold the table
    assert "position table is interpolated" in capsys.readouterr().err
    assert vmae_eval([str(run_a), "--ema", "--workers", "0", "--out", str(tmp_path / "eval_ema")]) == 0
    again = json.loads((tmp_path / "eval_ema" / "eval.json").read_text())
    assert again["extra"]["clips"] == reports["ema"]["extra"]["clips"]
    assert again["top1"] == reports["ema"]["top1"] and again["confusion"] == reports["ema"]["confusion"]
    # the exported file alone: its metadata carries the run's clips and views, its pos_embed the table
    assert vmae_eval([str(out), "--model", "vit_tiny_debug", "--frames", "8", "--shards", str(shards),
                      "--workers", "0", "--out", str(tmp_path / "eval_file")]) == 0
    alone = json.loads((tmp_path / "eval_file" / "eval.json").read_text())
    assert alone["extra"]["clips"] == again["extra"]["clips"] and alone["extra"]["views"] == "2 clips x 1 crops"
    assert alone["confusion"] == again["confusion"]

    # killed with SIGKILL after step 3's checkpoint, resumed: the same losses and the same EMA, bit for bit
    cfg_b = write_config(tmp_path / "b.yaml", name="b", debug={"step_sleep_s": 0.5}, **common)
    run_b = tmp_path / "runs" / "b"
    proc = start("--config", str(cfg_b), log=tmp_path / "b.log", entry="classify")
    try:
        wait_for(lambda: pointer(run_b) == "step_00000003", 300, "checkpoint step 3", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert max(metrics(run_b)) < STEPS
    code, log = run("--config", str(cfg_b), "--resume", "auto", "debug.step_sleep_s=0", "finetune.eval.shards=null",
                    log=tmp_path / "c.log", entry="classify")
    assert code == 0, log[-4000:]
    assert "at step 3" in log
    want_m, got_m = metrics(run_a), metrics(run_b)
    assert [got_m[s]["loss"] for s in range(1, STEPS + 1)] == [want_m[s]["loss"] for s in range(1, STEPS + 1)]
    final_b = read_ema_weights(run_b / "checkpoints" / f"step_{STEPS:08d}")
    assert all(torch.equal(final_b[k], got[k]) for k in got)


@pytest.mark.distributed
def test_zero1_bf16_ema_averages_the_bf16_weights(tmp_path):
    """ZeRO-1, bf16: the model computes with bf16 copies of the fp32 master weights; the fp32 EMA averages them."""
    init = init_file(tmp_path)
    sections = objective_sections(tmp_path, "classify")
    steps = 3
    sections["finetune"] = {**sections["finetune"], "init": init, "ema": {"enabled": True, "decay": DECAY}}
    cfg = write_config(tmp_path / "z1.yaml", name="z1", output_dir=str(tmp_path / "runs"), precision="bf16",
                       deepspeed_config=str(ROOT / "ds_configs" / "zero1.json"), **sections,
                       optim={"max_steps": steps}, checkpoint={"every_steps": 1, "keep_last": steps},
                       logging={"every_steps": 1, "tensorboard": False})
    code, log = run("--config", str(cfg), log=tmp_path / "z1.log", entry="classify")
    assert code == 0, log[-4000:]
    run_dir = tmp_path / "runs" / "z1"

    bf16 = [{k: v.bfloat16() for k, v in load_file(init).items()}]
    bf16 += [{k: v.bfloat16() for k, v in consolidated(run_dir, s).items()} for s in range(1, steps + 1)]
    got, want = read_ema_weights(run_dir / "checkpoints" / f"step_{steps:08d}"), hand_average(bf16, DECAY)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-8), (k, float((got[k] - want[k]).abs().max()))
    # what bf16 rounding alone would leave: the fp32 masters' average differs from the bf16 weights' one
    fp32 = hand_average([load_file(init)] + [consolidated(run_dir, s) for s in range(1, steps + 1)], DECAY)
    assert any(not torch.allclose(fp32[k], want[k], rtol=1e-6, atol=1e-8) for k in want)
