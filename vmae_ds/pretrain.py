"""`vmae-pretrain`: self-supervised pretraining with DeepSpeed: VideoMAE V2 (objective: mae, the default) or
Unmasked Teacher (objective: umt). Start it with the deepspeed launcher for several ranks; typed alone it runs
one process."""

from __future__ import annotations

from .engine.entry import leave, run_job

EPILOG = """\
examples:
  # 2 CPU ranks, tiny model, synthetic data (the CPU demo):
  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module vmae_ds.pretrain --config configs/pretrain/debug_cpu.yaml
  # ViT-B hybrid recipe on 8 GPUs, overriding two fields:
  deepspeed --num_gpus 8 --module vmae_ds.pretrain --config configs/pretrain/vit_base_hybrid.yaml \\
      name=vitb_try1 optim.batch_size=32
  # continue a pre-empted or killed run from its newest complete checkpoint:
  deepspeed --num_gpus 8 --module vmae_ds.pretrain --config runs/vitb_try1/config.yaml --resume auto
  # UMT-B with a CLIP ViT-B/16 teacher from a local file:
  deepspeed --num_gpus 8 --module vmae_ds.pretrain --config configs/pretrain/umt_b16_k710.yaml \\
      umt.teacher.path=weights/clip_vit_b16_visual.pt

overrides are dotted keys into the run config, value parsed as YAML (optim.clip_grad=null).
The run folder is <output_dir>/<name>/: config.yaml (resolved), run_info.json (derived lr/batch, final
DeepSpeed config), metrics.jsonl, tb/, checkpoints/. Export weights with `vmae-export RUN_DIR OUT.safetensors`.
"""


def main(argv: list[str] | None = None) -> int:
    return run_job("pretrain", "vmae-pretrain", __doc__, EPILOG, argv)


def cli() -> None:
    leave(main())


if __name__ == "__main__":
    cli()
