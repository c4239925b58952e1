"""The in-run probe: every `probe.every_steps` steps, how good are the current weights' frozen features?

At a step boundary every rank encodes its share of a small labelled train / val set (probe.max_samples each,
EvalLoader: the same number of forwards on every rank, so ZeRO-3's gathers line up) with the weights gathered
whole (ZeRO-3) and the model in eval mode, without gradients; the pooled features are gathered over the
host-side group and rank 0 scores a kNN or linear probe. What training sees afterwards is unchanged: the RNG
states (torch, CUDA, numpy, Python) are restored, the model goes back to train mode, the training loader is
not touched (the probe reads its own shards), so every loss is the one a run without the probe has.
An unreadable probe clip or shard is named and left out; a probe set that cannot be opened at all skips that
probe (reported), never the run. The objective says how its model gives features (`Objective.probe_features`);
the loop only calls this at step boundaries.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .metrics import say
from .run_config import RunConfig


class InRunProbe:
    def __init__(self, cfg: RunConfig, rank: int, world: int, host_group: Any):
        from ..objectives.classify import class_names_of, eval_data_config

        self.cfg, self.pc, self.rank, self.world, self.group = cfg, cfg.probe, rank, world, host_group
        base = cfg.shards_config().model_dump() if cfg.data.kind == "shards" else {}
        spec = cfg.model.spec()
        pc = self.pc
        self.data = {split: eval_data_config(base, shards, pc.num_workers, spec.num_frames, spec.img_size)
                     for split, shards in (("train", pc.train_shards), ("val", pc.val_shards))}
        self.class_names = class_names_of(pc.train_shards)
        self.out = cfg.run_dir / "probe_in_run"  # vmae-probe writes <run>/probe

    def due(self, step: int) -> bool:
        return step % self.pc.every_steps == 0

    def run(self, engine: Any, objective: Any, step: int) -> dict | None:
        """Probe the engine's current weights (collective: every rank calls it at the same step). The result
        on rank 0 (None elsewhere, and on rank 0 when the probe set could not be read)."""
        import deepspeed

        started = time.perf_counter()
        rng = ckpt.rng_state()
        was_training = engine.module.training
        engine.eval()
        try:
            loaders = self._loaders()
            if loaders is None:
                return None
            params = list(engine.module.parameters())
            stage3 = engine.zero_optimization_stage() == 3
            with torch.no_grad(), deepspeed.zero.GatheredParameters(params, enabled=stage3):
                sets = {split: self._features(loader, engine, objective) for split, loader in loaders.items()}
            result = self._score(sets, step) if self.rank == 0 else None
        finally:
            if was_training:
                engine.train()
            ckpt.set_rng_state(rng)
        if result is not None:
            result["seconds"] = round(time.perf_counter() - started, 3)
            self._say(result, step)
        return result

    def _loaders(self) -> dict | None:
        """Both splits' loaders, or None on every rank when any rank cannot open its probe set."""
        from ..data import EvalLoader

        loaders, error = {}, ""
        try:
            for split, data in self.data.items():
                loaders[split] = EvalLoader(data, batch_size=self.pc.batch_size, rank=self.rank,
                                            world_size=self.world, num_clips=1, num_crops=1,
                                            max_samples=self.pc.max_samples)
        except Exception as e:  # a probe set gone missing mid-run: report it, keep training
            error = f"{type(e).__name__}: {e}"
        bad = torch.tensor([1.0 if error else 0.0])
        if self.world > 1:
            dist.all_reduce(bad, group=self.group)
        if float(bad) > 0:
            if error:
                say(f"probe skipped (rank {self.rank}): cannot open the probe shards: {error[:300]}")
            return None
        return loaders

    def _features(self, loader: Any, engine: Any, objective: Any) -> Any:
        from ..probe.features import extract, gather

        mine = extract(lambda x: objective.probe_features(engine.module, x), loader, engine.device, objective.dtype)
        return gather(mine, self.world, self.group)

    def _score(self, sets: dict, step: int) -> dict:
        from ..eval.report import write_report
        from ..probe.report import score
        from ..probe.scoring import ProbeError, knn_scores, linear_scores

        train, val = sets["train"], sets["val"]
        pc = self.pc
        labels = torch.cat([train.labels, val.labels])
        c = len(self.class_names) if self.class_names else (int(labels.max()) + 1 if labels.numel() else 1)
        out = {"kind": pc.kind, "train": len(train), "val": len(val),
               "skipped": len(train.skipped) + len(val.skipped),
               "damaged_shards": sorted(set(train.damaged_shards()) | set(val.damaged_shards()))}
        try:
            if pc.kind == "knn":
                scores = knn_scores(train.pooled, train.labels, val.pooled, c, k=pc.k, temperature=pc.temperature)
            else:
                scores = linear_scores(train.pooled, train.labels, val.pooled, c, weight_decay=pc.weight_decay)
        except ProbeError as e:  # e.g. every training clip unreadable: on record, not fatal
            return {**out, "top1": None, "top5": None, "error": str(e)}
        r = score(scores, val, c, self.class_names)
        out.update(top1=r.top1, top5=r.top5, top5_k=r.top5_k, mean_class_accuracy=r.mean_class_accuracy)
        title = f"{self.cfg.name}: in-run {pc.kind} probe at step {step}"
        write_report(r, self.out, title, {"step": step, "train videos": len(train), "val shards": pc.val_shards,
                                          "train shards": pc.train_shards})
        return out

    def _say(self, r: dict, step: int) -> None:
        if r.get("top1") is None:
            say(f"probe at step {step}: not scored ({r.get('error', 'no result')})")
        else:
            say(f"probe at step {step}: {r['kind']} top-1 {r['top1']:.4f}, top-{r['top5_k']} {r['top5']:.4f} over "
                f"{r['val']} val videos ({r['train']} train) in {r['seconds']:.1f} s -> {self.out}/eval.md")
        if r["skipped"]:
            say(f"probe at step {step}: {r['skipped']} unreadable probe clips skipped (shards "
                f"{', '.join(r['damaged_shards'])})")


def plot_probe(run_dir: Path, name: str) -> None:
    from ..probe.report import plot_history

    plot_history(run_dir / "metrics.jsonl", run_dir / "probe.png", f"{name}: in-run probe and training loss")
