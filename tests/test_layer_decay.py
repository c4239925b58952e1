"""Layer-wise lr decay groups: lr scales per parameter, decay flags, coverage, errors, ZeRO-3 partitioned params."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from engine_helpers import env, free_port

from vmae_ds.engine.layer_decay import LayerDecayError, layer_decay_param_groups, layer_id
from vmae_ds.models import create_classifier

ROOT = Path(__file__).resolve().parents[1]


def expected_scale(name: str, depth: int, decay: float) -> float:
    """The recipe written out by hand: head/fc_norm full lr, block i decay**(depth - i), embedding decay**(depth+1)."""
    if name.startswith(("head.", "fc_norm.")):
        return 1.0
    if name.startswith("blocks."):
        return decay ** (depth - int(name.split(".")[1]))
    assert name.startswith("patch_embed."), name
    return decay ** (depth + 1)


def by_name(model: nn.Module, groups: list[dict]) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, dict] = {}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            assert n not in out, f"{n} is in two groups"
            out[n] = g
    return out


@pytest.mark.parametrize("depth", [2, 12])
def test_lr_scale_and_decay_per_parameter(depth):
    model = create_classifier("vit_tiny_debug", 5, depth=depth)
    groups = layer_decay_param_groups(model, 0.05, 0.75)
    placed = by_name(model, groups)
    assert set(placed) == {n for n, _ in model.named_parameters()}  # every trainable param exactly once
    for name, g in placed.items():
        assert g["lr_scale"] == pytest.approx(expected_scale(name, depth, 0.75), rel=1e-12), name
        # weight matrices (linear, conv) decay; norms, biases and q/v biases do not
        is_matrix = name.endswith(".weight") and "norm" not in name
        assert g["weight_decay"] == (0.05 if is_matrix else 0.0), name
    assert placed["head.weight"]["lr_scale"] == 1.0
    assert placed[f"blocks.{depth - 1}.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.75)
    assert placed["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.75 ** (depth + 1))
    assert placed["blocks.0.attn.q_bias"]["weight_decay"] == 0.0
    # one group per (layer, decay flag): layers 0 .. depth + 1, each with both kinds of parameters
    assert len(groups) == 2 * (depth + 2)
    assert len({g["name"] for g in groups}) == len(groups)


def test_layer_id_mapping_and_errors():
    assert layer_id("patch_embed.proj.weight", 12) == 0
    assert layer_id("pos_embed", 12) == 0
    assert layer_id("cls_token", 12) == 0
    assert layer_id("blocks.0.norm1.weight", 12) == 1
    assert layer_id("blocks.11.attn.qkv.weight", 12) == 12
    assert layer_id("fc_norm.bias", 12) == 13
    assert layer_id("norm.weight", 12) == 13
    assert layer_id("head.weight", 12) == 13
    with pytest.raises(LayerDecayError, match="blocks.12.mlp"):
        layer_id("blocks.12.mlp.fc1.weight", 12)
    with pytest.raises(LayerDecayError, match="'decoder.x'"):
        layer_id("decoder.x", 12)


def test_frozen_and_named_no_decay_and_unknown_modules():
    model = create_classifier("vit_tiny_debug", 5)
    model.cls_token = nn.Parameter(torch.zeros(1, 1, model.dim))
    model.patch_embed.proj.weight.requires_grad_(False)
    placed = by_name(model, layer_decay_param_groups(model, 0.1, 0.9))
    assert "patch_embed.proj.weight" not in placed  # frozen: no group
    assert placed["cls_token"]["weight_decay"] == 0.0  # 3-D but named no-decay
    assert placed["cls_token"]["lr_scale"] == pytest.approx(0.9 ** 3)
    model.extra = nn.Linear(2, 2)
    with pytest.raises(LayerDecayError, match="extra.weight"):
        layer_decay_param_groups(model, 0.1, 0.9)
    with pytest.raises(LayerDecayError, match="no `blocks`"):
        layer_decay_param_groups(nn.Linear(2, 2), 0.1, 0.9)
    with pytest.raises(LayerDecayError, match="layer_decay"):
        layer_decay_param_groups(create_classifier("vit_tiny_debug", 5), 0.1, 0.0)


def test_optimizer_accepts_groups_and_scaled_lr_moves_layers_apart():
    """A real AdamW step with lr * lr_scale: the head moves by lr, the embedding by lr * 0.75**3."""
    model = create_classifier("vit_tiny_debug", 5)
    groups = layer_decay_param_groups(model, 0.0, 0.75)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    for g in opt.param_groups:
        g["lr"] = 1e-3 * g["lr_scale"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 3, 4, 32, 32)).logsumexp(1).sum().backward()
    opt.step()
    # Adam's first step moves every element with a non-zero gradient by exactly lr (sign of the gradient)
    head = (model.head.weight - before["head.weight"]).abs().max().item()
    emb = (model.patch_embed.proj.weight - before["patch_embed.proj.weight"]).abs().max().item()
    assert head == pytest.approx(1e-3, rel=1e-3)
    assert emb == pytest.approx(1e-3 * 0.75 ** 3, rel=1e-3)


ZERO3_SCRIPT = r"""
import json, torch, deepspeed
from vmae_ds.engine.layer_decay import layer_decay_param_groups
from vmae_ds.models import create_classifier

def summary(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: [g["name"], g["lr_scale"], g["weight_decay"]] for g in groups for p in g["params"]}

deepspeed.init_distributed(dist_backend="gloo")
ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
torch.manual_seed(0)
plain = create_classifier("vit_tiny_debug", 5, depth=3)
with deepspeed.zero.Init(config_dict_or_path=ds):
    model = create_classifier("vit_tiny_debug", 5, depth=3)
shapes = {n: list(p.shape) for n, p in model.named_parameters()}
groups = layer_decay_param_groups(model, 0.05, 0.75)
zero, expected_kept = summary(model, groups), [[g["name"], g["lr_scale"]] for g in groups]
engine, opt, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-3), config=ds)
kept = [[g.get("name"), g.get("lr_scale")] for g in engine.optimizer.param_groups]
print("RESULT" + json.dumps({"shapes": shapes, "zero": zero, "kept": kept, "expected_kept": expected_kept,
      "plain": summary(plain, layer_decay_param_groups(plain, 0.05, 0.75))}))
"""


def test_zero3_partitioned_params_grouped_like_plain_model(tmp_path):
    """Under zero.Init a parameter's .shape is (0,): grouping must use ds_shape and match the plain model;
    DeepSpeed's ZeRO-3 optimizer keeps the lr_scale and name keys the train loop reads."""
    e = dict(env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
             WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    p = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT], cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=300)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line is not None, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(line[len("RESULT"):])
    assert r["shapes"]["blocks.0.attn.qkv.weight"] == [0]  # really partitioned
    assert r["zero"] == r["plain"]
    assert r["kept"] == r["expected_kept"]
