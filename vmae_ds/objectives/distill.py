"""Logit distillation (VideoMAE V2's ViT-g -> ViT-B/S, facts section 6): a frozen teacher classifier scores the
same augmented clips; the student learns its temperature-softened distribution (KL x T^2), optionally mixed
with the hard-label loss. The authors never released their distillation code; this follows the paper's words.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..flops import classifier_flops
from ..models import create_classifier, get_spec, load_pretrained
from .classify import ClassifyObjective


class DistillObjective(ClassifyObjective):
    name = "distill"
    job = "finetune"
    plans_memory = False  # the frozen teacher's weights are not in the estimate

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.dc = cfg.distill
        t = self.dc.teacher
        self.teacher_classes = t.num_classes or self.ft.num_classes
        self.teacher_sizes = {k: v for k, v in (("num_frames", t.num_frames), ("img_size", t.img_size),
                                                ("tubelet_size", t.tubelet_size)) if v is not None}
        student = cfg.model.spec()
        for k in ("num_frames", "img_size"):
            want = getattr(student, k)
            if self.teacher_sizes.get(k, want) != want:
                raise ConfigError(f"distill.teacher.{k} {self.teacher_sizes[k]} differs from the student's {want}: "
                                  f"both score the same clips")
        if self.teacher_classes != self.ft.num_classes:
            raise ConfigError(f"distill.teacher.num_classes {self.teacher_classes} differs from finetune.num_classes "
                              f"{self.ft.num_classes}: logits are compared class by class")

    def setup(self, device: torch.device) -> list[str]:
        lines = super().setup(device)
        t = self.dc.teacher
        teacher = create_classifier(t.model, self.teacher_classes, attention=t.attention, **self.teacher_sizes)
        report = load_pretrained(teacher, t.weights, strict=True)
        # frozen, in the run's dtype, outside ZeRO (never partitioned) and outside the optimizer
        self.teacher: nn.Module = teacher.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        lines.append(f"teacher: {t.model} from {t.weights} [{report.source_format}], frozen, "
                     f"{str(self.dtype).replace('torch.', '')}")
        return lines

    def loss(self, model: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.start_ema(model)
        video, target = self.augment(batch)
        x = video.to(self.dtype)
        with torch.no_grad():
            teacher_logits = self.teacher(x).float()
        logits = model(x).float()
        temp = self.dc.temperature
        kl = F.kl_div(F.log_softmax(logits / temp, dim=-1), F.log_softmax(teacher_logits / temp, dim=-1),
                      log_target=True, reduction="batchmean") * temp * temp
        w = self.dc.hard_label_weight
        loss = (1 - w) * kl + (w * self.criterion(logits, target) if w else 0.0)
        agree = (logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)).float().mean()
        return loss, {"kl": kl.detach(), "agree": agree}

    def flops_per_sample(self) -> dict[str, float]:
        spec = get_spec(self.dc.teacher.model, **self.teacher_sizes)
        return {**super().flops_per_sample(), "teacher": float(classifier_flops(spec, self.teacher_classes).total)}
