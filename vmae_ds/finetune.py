"""`vmae-finetune`: supervised post-pretraining / fine-tuning of a video classifier (objective: classify, the
default) or logit distillation from a frozen teacher (objective: distill), with DeepSpeed. Start it with the
deepspeed launcher for several ranks; typed alone it runs one process."""

from __future__ import annotations

from .engine.entry import leave, run_job

EPILOG = """\
examples:
  # K710 post-pretraining of a pretrained ViT-B (our export, an official checkpoint or an HF folder):
  deepspeed --num_gpus 8 --module vmae_ds.finetune --config configs/finetune/vit_base_k710.yaml \\
      finetune.init=weights/vitb_pretrain.safetensors
  # K400 fine-tuning from the K710 model, its head sliced by class name:
  deepspeed --num_gpus 8 --module vmae_ds.finetune --config configs/finetune/vit_base_k400.yaml
  # distil a K710 ViT-g teacher into a ViT-B student:
  deepspeed --num_gpus 8 --module vmae_ds.finetune --config configs/finetune/distill_g_to_b_k710.yaml
  # continue after a pre-emption or a kill:
  deepspeed --num_gpus 8 --module vmae_ds.finetune --config runs/<name>/config.yaml --resume auto

The run ends with the multi-view evaluation of finetune.eval.shards (runs/<name>/eval/eval.md);
`vmae-eval` evaluates any weights later. overrides are dotted keys into the run config (YAML values).
"""


def main(argv: list[str] | None = None) -> int:
    return run_job("finetune", "vmae-finetune", __doc__, EPILOG, argv, default_objective="classify")


def cli() -> None:
    leave(main())


if __name__ == "__main__":
    cli()
