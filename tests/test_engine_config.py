"""Run config, DeepSpeed config validation, recipe arithmetic, synthetic data: fast, in-process."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from engine_helpers import ROOT, write_config

from vmae_ds.config import ConfigError
from vmae_ds.engine.ds_setup import load_ds_json, resolve_ds_config
from vmae_ds.engine.optim import derive, lr_at, param_groups
from vmae_ds.engine.run_config import OptimConfig, load_run_config
from vmae_ds.engine.synthetic import SyntheticLoader
from vmae_ds.masking import TokenGrid
from vmae_ds.models import create_pretrain_model


def _derived(cfg, world=2):
    return derive(cfg.optim, world_size=world, num_sample=cfg.data.num_sample, batches_per_epoch=4)


def test_unknown_key_is_one_line_error_naming_it(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_run_config(write_config(tmp_path / "c.yaml"), ["optim.bacth_size=4"])
    msg = str(e.value)
    assert "\n" not in msg and "unknown config key 'optim.bacth_size'" in msg and "batch_size" in msg


def test_mismatched_batch_is_one_line_error_naming_it(tmp_path):
    ds = load_ds_json(ROOT / "ds_configs" / "zero3.json")
    ds["train_micro_batch_size_per_gpu"] = 16
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = load_run_config(write_config(tmp_path / "c.yaml", deepspeed_config=str(tmp_path / "ds.json")))
    with pytest.raises(ConfigError) as e:
        resolve_ds_config(cfg, _derived(cfg))
    msg = str(e.value)
    assert "\n" not in msg and "train_micro_batch_size_per_gpu=16" in msg
    assert "optim.batch_size 2 x data.num_sample 2" in msg and "4" in msg


def test_global_batch_mismatch_names_world_size(tmp_path):
    ds = {"train_batch_size": 64, "zero_optimization": {"stage": 2}}
    cfg = load_run_config(write_config(tmp_path / "c.yaml"))
    with pytest.raises(ConfigError, match=r"train_batch_size=64 .* world size 2"):
        resolve_ds_config(cfg, _derived(cfg), ds)


@pytest.mark.parametrize("bad,match", [({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
                                       ({"fp16": {"enabled": True}}, "fp16 is not supported"),
                                       ({"zero_optimization": {"stage": 0}}, "stage must be 1, 2 or 3"),
                                       ({"bf16": {"enabled": True}}, r"bf16: enabled=True disagrees")])
def test_contradicting_ds_sections_rejected(tmp_path, bad, match):
    cfg = load_run_config(write_config(tmp_path / "c.yaml"))  # precision fp32
    ds = {"zero_optimization": {"stage": 3}, **bad}
    with pytest.raises(ConfigError, match=match):
        resolve_ds_config(cfg, _derived(cfg), ds)


def test_compile_with_zero3_is_refused_in_one_line_and_allowed_with_zero2(tmp_path):
    """Under ZeRO-3 dynamo stops in DeepSpeed's partitioned linear (seen on the CPU): refuse before any start."""
    cfg = load_run_config(write_config(tmp_path / "c.yaml", speed={"compile": True}))
    with pytest.raises(ConfigError, match=r"^speed.compile does not work with ZeRO-3 .*use a stage 1 or 2"):
        resolve_ds_config(cfg, _derived(cfg), {"zero_optimization": {"stage": 3}})
    assert resolve_ds_config(cfg, _derived(cfg), {"zero_optimization": {"stage": 2}})["zero_optimization"]


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_shipped_ds_configs_resolve(tmp_path, name):
    cfg = load_run_config(write_config(tmp_path / "c.yaml", precision="bf16",
                                       deepspeed_config=str(ROOT / "ds_configs" / f"{name}.json")))
    ds = resolve_ds_config(cfg, _derived(cfg))
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 8
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 1.0
    assert AUTO_FREE(ds)


def AUTO_FREE(obj) -> bool:
    if isinstance(obj, dict):
        return all(AUTO_FREE(v) for v in obj.values())
    return obj != "auto"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "vmae_ds.pretrain", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_errors_are_one_line(tmp_path):
    cfg = write_config(tmp_path / "c.yaml")
    r = _cli("--config", str(cfg), "--check", "masks.encoder_ratoi=0.5")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "unknown config key 'masks.encoder_ratoi'" in r.stderr
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 3, "zero_optimization": {"stage": 3}}))
    r = _cli("--config", str(cfg), "--check", f"deepspeed_config={ds}")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "train_batch_size=3" in r.stderr


def test_errors_blame_the_override_that_set_the_field(tmp_path):
    cfg = write_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError) as e:
        load_run_config(cfg, ["model.atention=sdpa"])
    assert str(e.value).startswith("override 'model.atention=sdpa': unknown config key 'model.atention'")
    with pytest.raises(ConfigError) as e:  # a section's own check: the message, not pydantic's prefix + dict
        load_run_config(cfg, ["masks.decoder=running_cell", "masks.decoder_ratio=0.3"])
    assert str(e.value) == ("override 'masks.decoder_ratio=0.3': config field 'masks': decoder_ratio for "
                            "running_cell must be one of (0.25, 0.5, 0.75), got 0.3")
    bad = write_config(tmp_path / "bad.yaml", model={"name": "vit_tiny_debug", "attention": "flsh"})
    with pytest.raises(ConfigError, match=r"bad\.yaml: config field 'model.attention': .* \(got 'flsh'\)"):
        load_run_config(bad, ["optim.batch_size=2"])  # an unrelated override is not blamed


@pytest.mark.parametrize("shards,match", [("no_such_dir", r"1 of 1 shard\(s\) not found, e\.g\. .*no_such_dir"),
                                          ("empty", r"no \.tar shards found for .*empty"),
                                          ("gone/index.json", r"index file .*gone/index\.json not found")])
def test_missing_shards_are_a_one_line_config_error(tmp_path, shards, match):
    (tmp_path / "empty").mkdir()
    cfg = write_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="^data.shards.shards: " + match) as e:
        load_run_config(cfg, ["data.kind=shards", f"data.shards.shards={tmp_path / shards}"])
    assert "\n" not in str(e.value)


def test_missing_ds_json_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"file not found: ds_configs/zero9\.json \(looked under {tmp_path} and "
                                          rf"{ROOT}\)"):
        load_ds_json("ds_configs/zero9.json")
    assert load_ds_json("ds_configs/zero3.json")["zero_optimization"]["stage"] == 3  # found in the checkout
    with pytest.raises(ConfigError, match=rf"^deepspeed_config {tmp_path}: cannot read it \(Is a directory\)$"):
        load_ds_json(str(tmp_path))


def test_help_explains_usage():
    r = _cli("--help")
    assert r.returncode == 0
    for word in ("--resume", "auto", "deepspeed --num_gpus", "vmae-export", "key.sub=value"):
        assert word in r.stdout


@pytest.mark.parametrize("recipe,lr,warmup", [("vit_base_hybrid", 1e-3 * 2048 / 256, 20),
                                               ("vit_giant_hybrid", 6e-4 * 2048 / 256, 30)])
def test_recipes_derive_the_reference_values(recipe, lr, warmup):
    import os
    # 64 GPUs x 32 clips (x num_sample 4): the authors' ViT-g setup; the clip count stands in for the index
    env = dict(os.environ, WORLD_SIZE="64")
    r = _cli("--config", f"configs/pretrain/{recipe}.yaml", "--check", "data.kind=synthetic",
             "data.synthetic.num_videos=1349000", env=env)
    assert r.returncode == 0, r.stderr
    assert "global batch 2048 videos (8192 samples/step after num_sample, micro batch 128/GPU)" in r.stdout
    assert f"-> actual lr {lr:.4g} (= base * 2048 / 256)" in r.stdout
    assert "steps per epoch 658" in r.stdout and f"warmup steps {warmup * 658}" in r.stdout


def _authors_cosine(base, final, epochs, niter, warmup_epochs, start_warmup):
    """The authors' per-iteration schedule array (re-derived from their description)."""
    warmup_iters = warmup_epochs * niter
    warm = np.linspace(start_warmup, base, warmup_iters)
    iters = np.arange(epochs * niter - warmup_iters)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warm, cos))


def test_lr_schedule_matches_reference_array():
    opt = OptimConfig(batch_size=32, base_lr=1.5e-4, min_lr=1e-5, warmup_lr=1e-6, epochs=10, warmup_epochs=2)
    d = derive(opt, world_size=8, num_sample=4, batches_per_epoch=50)
    assert d.global_batch == 256 and d.lr == pytest.approx(1.5e-4) and d.steps_per_epoch == 50
    ref = _authors_cosine(d.lr, d.min_lr, 10, 50, 2, d.warmup_lr)
    ours = np.array([lr_at(i, d) for i in range(d.total_steps)])
    assert len(ref) == d.total_steps and np.allclose(ours, ref, rtol=1e-12, atol=0)
    assert ours[0] == pytest.approx(1e-6) and ours[99] == pytest.approx(1.5e-4) and ours[-1] > d.min_lr


def test_param_groups_no_decay_on_norms_biases_mask_token():
    model = create_pretrain_model("vit_tiny_debug")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    dc = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"mask_token", "encoder.blocks.0.norm1.weight", "encoder.blocks.0.attn.q_bias",
            "encoder.blocks.0.attn.v_bias", "decoder.head.bias", "encoder.patch_embed.proj.bias"} <= nd
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.blocks.0.mlp.fc1.weight", "decoder.head.weight",
            "encoder.patch_embed.proj.weight", "encoder_to_decoder.weight"} <= dc
    assert len(nd) + len(dc) == len(names)


def _loader(rank=0, **kw):
    masks = {"encoder": "tube", "encoder_ratio": 0.75, "decoder": "running_cell", "decoder_ratio": 0.5}
    args = dict(num_videos=8, seed=3, frames=4, size=32, grid=TokenGrid(2, 4, 4), batch_videos=2, num_sample=2,
                rank=rank, world_size=2, masks=masks)
    return SyntheticLoader(**{**args, **kw})


def test_synthetic_loader_is_deterministic_and_resumable():
    a = _loader()
    batches = [next(a) for _ in range(5)]
    b = _loader()
    b.load_state_dict({"index": 3})
    again = next(b)
    for k in ("video", "encoder_mask", "decoder_mask"):
        assert torch.equal(again[k], batches[3][k])
    assert batches[0]["video"].shape == (4, 3, 4, 32, 32) and batches[0]["video"].dtype == torch.uint8
    # each video is repeated num_sample times with different masks
    assert torch.equal(batches[0]["video"][0], batches[0]["video"][1])
    other = next(_loader(rank=1))
    assert not torch.equal(other["video"], batches[0]["video"])
    assert len(a) == 2  # 8 videos / (2 per rank x 2 ranks)
    assert math.isclose(batches[0]["encoder_mask"].float().mean().item(), 0.75)


def test_export_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    from vmae_ds.export import main as export_main

    assert export_main([str(tmp_path), str(tmp_path / "x.safetensors")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_export_to_a_folder_or_an_unwritable_place_is_one_line(tmp_path, capsys):
    from vmae_ds.export import main as export_main

    step = tmp_path / "step_00000001"  # found as a checkpoint; the output problem is seen before it is read
    step.mkdir()
    assert export_main([str(step), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"vmae-export: error: {tmp_path} is a folder: give the output file, e.g. " \
                          f"{tmp_path / 'model.safetensors'}"
    (tmp_path / "a_file").write_text("")
    assert export_main([str(step), str(tmp_path / "a_file" / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vmae-export: error: cannot create the folder of ") and err.count("\n") == 1


def test_fresh_start_refuses_a_folder_with_checkpoints(tmp_path, capsys):
    from vmae_ds.pretrain import main

    cfg = write_config(tmp_path / "c.yaml", name="old", output_dir=str(tmp_path / "runs"))
    ck = tmp_path / "runs" / "old" / "checkpoints"
    (ck / "step_00000002").mkdir(parents=True)
    (ck / "latest_complete").write_text("step_00000002\n")
    assert main(["--config", str(cfg)]) == 2
    assert "already holds checkpoints (newest step_00000002): continue with --resume auto" in capsys.readouterr().err


def test_bad_resume_path_fails_before_distributed_start(tmp_path):
    import os

    cfg = write_config(tmp_path / "c.yaml", name="r", output_dir=str(tmp_path / "runs"))
    run = tmp_path / "runs" / "old"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "latest_complete").write_text("step_00000002\n")
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    for arg, message in ((str(tmp_path / "nope"), "no such checkpoint folder"),
                         (str(run), "a run folder, not one checkpoint: use --resume auto")):
        r = _cli("--config", str(cfg), "--resume", arg, env=env)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip().count("\n") == 0 and f"vmae-pretrain: error: --resume {arg}: {message}" in r.stderr
    assert not (tmp_path / "runs" / "r").exists()  # nothing written for the run that never started


def test_mfu_flops_are_model_flops_of_the_paper_less_the_embedding_not_run():
    from vmae_ds.engine.metrics import PEAK_BF16_FLOPS
    from vmae_ds.objectives.mae import MAEObjective

    cfg = load_run_config(ROOT / "configs" / "pretrain" / "vit_giant_hybrid.yaml", ["data.kind=synthetic"])
    # fwd + bwd = 3 x forward of the paper's 241.61 G multiply-adds per clip for ViT-g with dual masking, less
    # the embedding of the 2048 - 8 x 26 hidden tokens, which the model does not run
    hidden_embed = 2 * (2048 - 8 * 26) * 1408 * 3 * 2 * 14 * 14
    assert MAEObjective(cfg).flops_per_sample() == {"model": pytest.approx(3 * (2 * 241.61e9 - hidden_embed),
                                                                           rel=2e-4)}
    assert PEAK_BF16_FLOPS["H100"] == 989e12 and PEAK_BF16_FLOPS["A100"] == 312e12


def test_plain_vmae_pretrain_without_launcher_runs_one_process(tmp_path):
    """`vmae-pretrain --config ...` typed without the deepspeed launcher: one rank (was an mpi4py traceback)."""
    import os

    cfg = write_config(tmp_path / "c.yaml", output_dir="runs", optim={"max_steps": 1},  # relative: see below
                       logging={"every_steps": 1, "tensorboard": False})
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "vmae_ds.pretrain", "--config", str(cfg)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no launcher environment (RANK, WORLD_SIZE): running 1 process" in r.stdout
    assert "world size 1," in r.stdout and "done: 1 steps" in r.stdout
    assert "non-finite skipped 0" in r.stdout and "corrupt clips" not in r.stdout  # a shards-only count
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "latest_complete").read_text().strip() == "step_00000001"
    # the saved config names the run folder absolutely: `--config runs/tiny/config.yaml --resume auto`
    # continues this run from any folder (a relative output_dir would start a new run elsewhere)
    for saved in (tmp_path / "runs" / "tiny" / "config.yaml",
                  tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000001" / "config.yaml"):
        assert load_run_config(saved).run_dir == tmp_path / "runs" / "tiny"


def test_data_shards_errors_name_the_full_key(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a.tar").write_bytes(b"")
    cfg = write_config(tmp_path / "c.yaml")
    base = ["data.kind=shards", f"data.shards.shards={tmp_path / 's'}"]
    with pytest.raises(ConfigError) as e:
        load_run_config(cfg, [*base, "data.shards.num_workrs=1"])
    assert str(e.value).startswith("unknown config key 'data.shards.num_workrs' (allowed here: shards, ")
    with pytest.raises(ConfigError) as e:
        load_run_config(cfg, [*base, "data.shards.num_workers=-1"])
    assert str(e.value).startswith("config field 'data.shards.num_workers': Input should be greater than")


def test_saved_config_makes_local_paths_absolute(tmp_path, monkeypatch):
    from vmae_ds.engine.launch import portable_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sh").mkdir()
    (tmp_path / "sh" / "a.tar").write_bytes(b"")
    cfg = load_run_config(write_config(tmp_path / "c.yaml", output_dir="runs"),
                          ["data.kind=shards", "data.shards.shards=sh/{a..a}.tar"])
    d = portable_config(cfg)
    assert d["output_dir"] == str(tmp_path / "runs")
    assert d["data"]["shards"]["shards"] == str(tmp_path / "sh" / "{a..a}.tar")
    assert cfg.output_dir == "runs"  # the live config is untouched


@pytest.mark.parametrize("override,message", [
    ("model.num_frames=15", "config field 'model': img_size 32 / num_frames 15 must be multiples of patch_size 8 "
                            "/ tubelet_size 2"),
    ("model.decoder_heads=5", "config field 'model': decoder_dim 32 is not divisible by decoder_heads 5"),
    ("model.drop_path_rate=2", "config field 'model.drop_path_rate': Input should be less than 1 (got 2)"),
    ("model.num_frames=0", "config field 'model.num_frames': Input should be greater than 0 (got 0)")])
def test_model_sizes_that_cannot_build_fail_at_load(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:  # used to pass --check, then fail with a traceback on every rank
        load_run_config(write_config(tmp_path / "c.yaml"), [override])
    assert str(e.value) == f"override {override!r}: {message}"


@pytest.mark.parametrize("override,message", [
    ("optim.base_lr=-1", "config field 'optim.base_lr': Input should be greater than 0 (got -1)"),
    ("optim.warmup_epochs=7", "config field 'optim': warmup_epochs 7.0 exceeds epochs 6"),
    ("optim.betas=[0.9,1.5]", "config field 'optim': betas must be in [0, 1), got [0.9, 1.5]")])
def test_impossible_optimizer_settings_fail_at_load(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:  # all three used to print "config OK"
        load_run_config(write_config(tmp_path / "c.yaml"), [override])
    assert str(e.value) == f"override {override!r}: {message}"


def test_default_warmup_starts_at_zero_like_the_authors():
    # the authors call cosine_scheduler without start_warmup_value: their ramp starts at 0, whatever --warmup_lr
    opt = OptimConfig(batch_size=32, base_lr=1.5e-4, min_lr=1e-5, epochs=10, warmup_epochs=2)
    d = derive(opt, world_size=8, num_sample=4, batches_per_epoch=50)
    ref = _authors_cosine(d.lr, d.min_lr, 10, 50, 2, 0.0)
    ours = np.array([lr_at(i, d) for i in range(d.total_steps)])
    assert ours[0] == 0.0 and np.allclose(ours, ref, rtol=1e-12, atol=0)
    for recipe in ("vit_base_hybrid", "vit_giant_hybrid"):
        cfg = load_run_config(ROOT / "configs" / "pretrain" / f"{recipe}.yaml", ["data.kind=synthetic"])
        assert cfg.optim.warmup_lr == 0.0, recipe


def test_patch_size_override_listed_in_the_readme_is_accepted(tmp_path):
    cfg = load_run_config(write_config(tmp_path / "c.yaml"), ["model.patch_size=16"])
    spec = cfg.model.spec()
    assert spec.patch_size == 16 and spec.img_size // spec.patch_size == 2  # 32 px / 16
    readme = (ROOT / "README.md").read_text()
    listed = readme.split("Overrides: ", 1)[1].split("\n\n", 1)[0]
    values = {"num_frames": 8, "img_size": 64, "tubelet_size": 4, "patch_size": 16, "decoder_depth": 2,
              "decoder_dim": 64, "decoder_heads": 4, "drop_path_rate": 0.1, "attention": "math"}
    for name, value in values.items():  # every override the README lists is a run config field
        assert f"`{name}`" in listed
        cfg = load_run_config(write_config(tmp_path / "c.yaml"), [f"model.{name}={value}"])
        assert getattr(cfg.model, name) == value


@pytest.mark.parametrize("gpu,key,peak", [("NVIDIA H100 80GB HBM3", "H100", 989e12),
                                          ("NVIDIA H100 NVL", "H100_NVL", 835e12),
                                          ("NVIDIA H100 PCIe", "H100_PCIE", 756e12),
                                          ("NVIDIA H200", "H200", 989e12),
                                          ("NVIDIA H200 NVL", "H200_NVL", 835e12),
                                          ("NVIDIA A100-SXM4-80GB", "A100", 312e12),
                                          ("NVIDIA GeForce RTX 4090", None, None)])
def test_mfu_peak_per_card_variant(gpu, key, peak):
    from vmae_ds.engine.metrics import PEAK_BF16_FLOPS, device_key

    assert device_key(gpu) == key
    assert PEAK_BF16_FLOPS.get(key) == peak


def test_progress_line_reports_reserved_memory_next_to_allocated():
    from vmae_ds.engine.metrics import progress_line

    rec = {"step": 3, "epoch": 0, "loss": 0.5, "lr": 1e-3, "grad_norm": 1.0, "clips_per_s": 10.0, "mfu": 0.45,
           "peak_mem_gib": 61.5, "peak_reserved_gib": 70.25, "mem_kind": "cuda", "data_wait": 0.01,
           "nonfinite_total": 0}
    assert "peak mem 61.50 GiB (reserved 70.25)" in progress_line(rec, 10)


@pytest.mark.parametrize("cpus,local,workers,on_cpu,want", [(2, 2, 0, True, 1), (64, 8, 10, True, 8),
                                                             (96, 8, 10, False, 2), (16, 8, 1, False, 1),
                                                             (128, 8, 4, False, 4)])
def test_rank_threads_leave_the_cores_to_decode_workers_on_gpu(cpus, local, workers, on_cpu, want):
    from vmae_ds.engine.launch import rank_threads

    assert rank_threads(cpus, local, workers, on_cpu) == want
