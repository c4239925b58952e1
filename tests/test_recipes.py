"""Every shipped recipe against the authors' released recipe it reproduces.

The tables below are facts: each value is from the script named in the recipe's comment (OpenGVLab/VideoMAEv2
at its released scripts/, OpenGVLab/unmasked_teacher's single_modality/exp/) or, where the script leaves it
out, from that script's argparse default (the *_DEFAULTS tables, named after the file that holds them). Each
of our YAMLs is loaded with our config reader and turned into the same quantities, including the lr the
authors' rule gives on their GPU count (UMT counts num_sample in it, VideoMAE V2 does not).
What is ours on purpose (bf16 for fp16, ZeRO stages, activation checkpointing in fine-tuning and wherever a
recipe says `mode: auto` (the memory plan chooses for the card at hand), workers, checkpoint cadence) is not
compared; the YAMLs say so in a comment.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmae_ds.engine.optim import derive
from vmae_ds.engine.run_config import load_run_config
from vmae_ds.objectives.classify import finetune_data

ROOT = Path(__file__).resolve().parents[1]
RANDAUG = "rand-m7-n4-mstd0.5-inc1"

# VideoMAEv2/run_mae_pretraining.py: argparse defaults (its cosine_scheduler is called without a warmup start,
# so the ramp starts at 0 whatever --warmup_lr says)
V2_PRETRAIN = dict(weight_decay=0.05, min_lr=1e-5, eps=1e-8, clip_grad=None, drop_path=0.0, img_size=224,
                   tubelet=2, decoder_depth=4, rule="v2", frames=16, sampling_rate=4, num_sample=4,
                   masks=("tube", 0.9, "running_cell", 0.5), betas=(0.9, 0.95), batch=32, checkpointing=False)
# VideoMAEv2/run_class_finetuning.py: argparse defaults (+ its Kinetics loader: linspace frame indices, RandAugment
# on the full frames before the random resized crop, bicubic; SSV2: no flip)
V2_FINETUNE = dict(weight_decay=0.05, min_lr=1e-6, eps=1e-8, clip_grad=None, drop_path=0.1, head_drop=0.0,
                   layer_decay=0.75, warmup=5, num_sample=2, smoothing=0.1, mixup=0.8, cutmix=1.0, switch=0.5,
                   randaug=RANDAUG, reprob=0.25, img_size=224, tubelet=2, frames=16, rule="v2",
                   betas=(0.9, 0.999), ema=False, flip=True)
# unmasked_teacher/single_modality/run_umt_pretraining.py: argparse defaults
UMT_PRETRAIN = dict(weight_decay=0.05, min_lr=1e-5, eps=1e-8, clip_grad=None, num_sample=1, img_size=224,
                    tubelet=1, frames=8, rule="umt", betas=(0.9, 0.95), batch=64, mask=("attention", 0.8),
                    align_layers=6, flip=True, gpus=32, warmup=40, epochs=201, lr=1.5e-4)
# unmasked_teacher/single_modality/run_class_finetuning.py: argparse defaults
UMT_FINETUNE = dict(weight_decay=0.05, min_lr=1e-6, eps=1e-8, clip_grad=None, drop_path=0.1, head_drop=0.0,
                    layer_decay=0.75, warmup=5, num_sample=2, smoothing=0.1, mixup=0.8, cutmix=1.0, switch=0.5,
                    randaug=RANDAUG, reprob=0.25, img_size=224, tubelet=1, frames=8, rule="umt",
                    betas=(0.9, 0.999), ema=False, flip=True, batch=16, gpus=16)

AUTHORS = {
    # VideoMAEv2/scripts/pretrain/vit_b_hybrid_pt.sh
    "pretrain/vit_base_hybrid": {**V2_PRETRAIN, "model": "vit_base_patch16", "gpus": 32, "lr": 1e-3, "warmup": 20,
                                 "epochs": 200},
    # VideoMAEv2/scripts/pretrain/vit_l_hybrid_pt.sh
    "pretrain/vit_large_hybrid": {**V2_PRETRAIN, "model": "vit_large_patch16", "gpus": 48, "lr": 1e-3,
                                  "warmup": 30, "epochs": 300},
    # VideoMAEv2/scripts/pretrain/vit_h_hybrid_pt.sh (--with_checkpoint)
    "pretrain/vit_huge_hybrid": {**V2_PRETRAIN, "model": "vit_huge_patch16", "gpus": 64, "lr": 1e-3, "warmup": 30,
                                 "epochs": 300, "checkpointing": True},
    # VideoMAEv2/scripts/pretrain/vit_g_hybrid_pt.sh (--with_checkpoint --clip_grad 0.02)
    "pretrain/vit_giant_hybrid": {**V2_PRETRAIN, "model": "vit_giant_patch14", "gpus": 64, "lr": 6e-4,
                                  "warmup": 30, "epochs": 300, "clip_grad": 0.02, "checkpointing": True},
    # VideoMAEv2/scripts/finetune/vit_b_k710_ft.sh
    "finetune/vit_base_k710": {**V2_FINETUNE, "model": "vit_base_patch16", "gpus": 32, "batch": 16, "classes": 710,
                               "lr": 7e-4, "epochs": 90, "sampling": ("stride", 4), "views": (5, 3)},
    # VideoMAEv2/scripts/finetune/vit_g_k710_ft.sh
    "finetune/vit_giant_k710": {**V2_FINETUNE, "model": "vit_giant_patch14", "gpus": 32, "batch": 3,
                                "classes": 710, "lr": 1e-3, "drop_path": 0.3, "clip_grad": 5.0, "layer_decay": 0.9,
                                "weight_decay": 0.1, "epochs": 35, "sampling": ("stride", 4), "views": (5, 3)},
    # VideoMAEv2/scripts/finetune/vit_g_k710_it_k400_ft.sh
    "finetune/vit_giant_k400": {**V2_FINETUNE, "model": "vit_giant_patch14", "gpus": 32, "batch": 3,
                                "classes": 400, "lr": 1e-5, "drop_path": 0.25, "layer_decay": 0.9,
                                "weight_decay": 0.1, "warmup": 1, "epochs": 3, "sampling": ("stride", 4),
                                "views": (5, 3)},
    # VideoMAEv2/scripts/finetune/vit_b_ssv2_ft.sh (SSV2: 16 segments of a TSN sampler, never flipped)
    "finetune/vit_base_ssv2": {**V2_FINETUNE, "model": "vit_base_patch16", "gpus": 16, "batch": 16, "classes": 174,
                               "lr": 2e-3, "layer_decay": 0.65, "epochs": 25, "sampling": ("segments", "tsn"),
                               "views": (2, 3), "flip": False},
    # VideoMAEv2/scripts/finetune/vit_g_ssv2_ft.sh
    "finetune/vit_giant_ssv2": {**V2_FINETUNE, "model": "vit_giant_patch14", "gpus": 32, "batch": 3,
                                "classes": 174, "lr": 3e-4, "drop_path": 0.25, "layer_decay": 0.9, "epochs": 20,
                                "sampling": ("segments", "tsn"), "views": (2, 3), "flip": False},
    # unmasked_teacher/single_modality/exp/pretraining/b16_ptk710_f8_res224.sh
    "pretrain/umt_b16_k710": {**UMT_PRETRAIN, "model": "vit_base_patch16", "teacher": ("clip_b16", 224),
                              "drop_path": 0.1},
    # unmasked_teacher/single_modality/exp/pretraining/l16_ptk710_f8_res224.sh (--clip_input_resolution 196)
    "pretrain/umt_l16_k710": {**UMT_PRETRAIN, "model": "vit_large_patch16", "teacher": ("clip_l14", 196),
                              "drop_path": 0.2},
    # unmasked_teacher/single_modality/exp/finetuning/k710/b16_ptk710_ftk710_f8_res224.sh (Kinetics_sparse)
    "finetune/umt_b16_k710": {**UMT_FINETUNE, "model": "vit_base_patch16", "classes": 710, "lr": 2e-4,
                              "warmup": 2, "epochs": 35, "sampling": ("segments", "sparse"), "views": (4, 3)},
    # unmasked_teacher/single_modality/exp/finetuning/k710/l16_ptk710_ftk710_f8_res224.sh
    "finetune/umt_l16_k710": {**UMT_FINETUNE, "model": "vit_large_patch16", "classes": 710, "lr": 1e-4,
                              "warmup": 2, "epochs": 20, "drop_path": 0.2, "layer_decay": 0.85,
                              "sampling": ("segments", "sparse"), "views": (4, 3)},
    # unmasked_teacher/single_modality/exp/finetuning/k400/b16_ptk710_ftk710_ftk400_f8_res224.sh
    "finetune/umt_b16_k400": {**UMT_FINETUNE, "model": "vit_base_patch16", "classes": 400, "lr": 2e-5,
                              "warmup": 1, "epochs": 5, "sampling": ("segments", "sparse"), "views": (4, 3)},
    # unmasked_teacher/single_modality/exp/finetuning/k400/l16_ptk710_ftk710_ftk400_f8_res224.sh
    "finetune/umt_l16_k400": {**UMT_FINETUNE, "model": "vit_large_patch16", "classes": 400, "lr": 1e-5,
                              "warmup": 1, "epochs": 5, "drop_path": 0.2, "layer_decay": 0.85,
                              "sampling": ("segments", "sparse"), "views": (4, 3)},
    # unmasked_teacher/single_modality/exp/finetuning/ssv2/b16_ptk710_ftssv2_f8_res224.sh (SSV2: TSN, no flip)
    "finetune/umt_b16_ssv2": {**UMT_FINETUNE, "model": "vit_base_patch16", "classes": 174, "lr": 2e-4,
                              "warmup": 5, "epochs": 30, "sampling": ("segments", "tsn"), "views": (2, 3),
                              "flip": False},
    # unmasked_teacher/single_modality/exp/finetuning/ssv2/l16_ptk710_ftssv2_f8_res224.sh
    "finetune/umt_l16_ssv2": {**UMT_FINETUNE, "model": "vit_large_patch16", "classes": 174, "lr": 4e-4,
                              "warmup": 4, "epochs": 14, "drop_path": 0.2, "layer_decay": 0.85,
                              "sampling": ("segments", "tsn"), "views": (2, 3), "flip": False},
}
# shipped configs that reproduce no released script (each says so in its header)
NOT_THE_AUTHORS = {"pretrain/debug_cpu", "pretrain/umt_debug_cpu", "finetune/debug_cpu",
                   "finetune/distill_g_to_b_k710",  # the authors released no distillation code
                   "finetune/vit_base_k400"}  # no ViT-B K710 -> K400 script: the ViT-g one's schedule


def theirs(a: dict) -> dict:
    """The quantities a released recipe fixes, in the authors' terms."""
    scale = a["batch"] * a["gpus"] * (a["num_sample"] if a["rule"] == "umt" else 1) / 256
    out = {"model": a["model"], "frames": a["frames"], "tubelet": a["tubelet"], "img_size": a["img_size"],
           "batch": a["batch"], "num_sample": a["num_sample"], "lr": a["lr"] * scale, "min_lr": a["min_lr"] * scale,
           "warmup_lr": 0.0, "weight_decay": a["weight_decay"], "betas": a["betas"], "eps": a["eps"],
           "clip_grad": a["clip_grad"], "epochs": a["epochs"], "warmup": a["warmup"], "drop_path": a["drop_path"]}
    if "masks" in a:  # VideoMAE V2 pretraining
        out |= {"masks": a["masks"], "decoder_depth": a["decoder_depth"], "sampling": ("stride", a["sampling_rate"]),
                "checkpointing": a["checkpointing"], "spacing": "exact", "antialias": True}
    elif "teacher" in a:  # UMT pretraining: TSN segments, flips, the student's frames as the teacher's input
        out |= {"teacher": a["teacher"], "align_layers": a["align_layers"], "mask": a["mask"], "flip": a["flip"],
                "teacher_input": ("student", "bicubic"), "sampling": ("segments", "tsn"), "antialias": True}
    else:  # fine-tuning
        out |= {"classes": a["classes"], "layer_decay": a["layer_decay"], "head_drop": a["head_drop"],
                "smoothing": a["smoothing"], "mixup": (a["mixup"], a["cutmix"], a["switch"]),
                "randaug": (a["randaug"], "before_crop", "bicubic"), "reprob": a["reprob"], "flip": a["flip"],
                "views": a["views"], "sampling": a["sampling"], "ema": a["ema"], "antialias": False,
                "pos_embed": "interpolate"}
        if a["sampling"][0] == "stride":
            out |= {"spacing": "linspace", "stride_views": "authors"}
    return out


def ours(path: Path, shards_dir: Path, like: dict) -> dict:
    """The same quantities from one of our YAMLs, read with load_run_config (data.shards pointed at a real
    folder: the reader checks that it exists)."""
    cfg = load_run_config(path, [f"data.shards.shards={shards_dir}"])
    spec, o = cfg.model.spec(), cfg.optim
    d = derive(o, world_size=like["gpus"], num_sample=cfg.data.num_sample, batches_per_epoch=100)
    data = cfg.shards_config()
    out = {"model": cfg.model.name, "frames": spec.num_frames, "tubelet": spec.tubelet_size,
           "img_size": spec.img_size, "batch": o.batch_size, "num_sample": cfg.data.num_sample, "lr": d.lr,
           "min_lr": d.min_lr, "warmup_lr": d.warmup_lr, "weight_decay": o.weight_decay, "betas": tuple(o.betas),
           "eps": o.eps, "clip_grad": o.clip_grad, "epochs": o.epochs, "warmup": o.warmup_epochs,
           "drop_path": cfg.model.drop_path_rate}
    sampling = ("stride", data.sampling_rate) if data.sampling == "stride" else ("segments", data.segment_style)
    if cfg.objective == "mae":
        m = cfg.masks
        out |= {"masks": (m.encoder, m.encoder_ratio, m.decoder, m.decoder_ratio), "decoder_depth": spec.decoder_depth,
                "sampling": sampling, "spacing": data.frame_spacing or "exact",
                "antialias": data.antialias is not False}
        if cfg.activation_checkpointing.mode != "auto":
            out["checkpointing"] = cfg.activation_checkpointing.mode == "full"
    elif cfg.objective == "umt":
        from vmae_ds.objectives.umt import UMTObjective

        u = cfg.umt
        out |= {"teacher": (u.teacher.name, UMTObjective(cfg).teacher_size), "align_layers": u.align_layers,
                "mask": (u.mask, u.mask_ratio), "flip": u.flip, "sampling": sampling,
                "teacher_input": (u.teacher_normalize, u.teacher_resize), "antialias": data.antialias is not False}
    else:
        ft, filled = cfg.finetune, finetune_data(data)
        out |= {"classes": ft.num_classes, "layer_decay": ft.layer_decay, "head_drop": ft.head_drop_rate,
                "smoothing": ft.label_smoothing, "mixup": (ft.mixup, ft.cutmix, ft.mixup_switch_prob),
                "randaug": (ft.randaug, ft.randaug_order, ft.randaug_interpolation), "reprob": ft.reprob,
                "flip": ft.flip, "views": (ft.eval.num_clips, ft.eval.num_crops), "sampling": sampling,
                "ema": ft.ema.enabled, "antialias": filled.antialias, "pos_embed": ft.pos_embed}
        if data.sampling == "stride":
            out |= {"spacing": filled.frame_spacing, "stride_views": filled.stride_views}
    return out


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    (d / "train-000000.tar").write_bytes(b"")  # the reader only checks that shards exist
    return d


@pytest.mark.parametrize("recipe", sorted(AUTHORS))
def test_recipe_reproduces_the_authors_script(recipe, shards_dir):
    want = theirs(AUTHORS[recipe])
    got = ours(ROOT / "configs" / f"{recipe}.yaml", shards_dir, AUTHORS[recipe])
    if "checkpointing" in want and "checkpointing" not in got:  # mode: auto, a memory choice made per card
        del want["checkpointing"]
    assert sorted(got) == sorted(want)
    wrong = {k: (got[k], want[k]) for k in want
             if not (got[k] == pytest.approx(want[k], rel=1e-12) if isinstance(want[k], float) else got[k] == want[k])}
    assert not wrong, f"{recipe}: ours vs the authors' {wrong}"


def test_every_shipped_recipe_is_in_the_table_or_says_it_is_not_the_authors():
    shipped = {str(p.relative_to(ROOT / "configs").with_suffix("")) for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped == set(AUTHORS) | NOT_THE_AUTHORS, shipped ^ (set(AUTHORS) | NOT_THE_AUTHORS)
    for name in NOT_THE_AUTHORS - {"pretrain/debug_cpu", "pretrain/umt_debug_cpu", "finetune/debug_cpu"}:
        head = (ROOT / "configs" / f"{name}.yaml").read_text().split("\nname:")[0]
        assert "authors" in head and "no" in head, name  # its header says what it follows instead
