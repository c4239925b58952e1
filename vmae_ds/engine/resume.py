"""What a resume may change: settings that shape the run must match the checkpoint's."""

from __future__ import annotations

# what may change on resume: when to stop, how often to log or save, recompute vs store activations, speed
# options, the data's location and loader settings (the loader checks its own state), the in-run probe (it
# changes no step)
RESUME_FREE = {"name", "output_dir", "deepspeed_config", "optim.max_steps", "activation_checkpointing",
               "checkpoint", "logging", "debug", "max_consecutive_nonfinite", "data.shards", "speed",
               "optim.fused", "optim.grad_accum", "finetune.eval", "finetune.init", "finetune.init_head_map",
               "finetune.init_fresh_head", "finetune.ema.eval", "probe"}


def resume_conflicts(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between the checkpoint's config and this run's, where a change
    would silently break the schedule or exactness (model, masks, optimiser, seed, data kind/repetition)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        dotted = prefix + key
        if dotted in RESUME_FREE:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += resume_conflicts(a, b, dotted + ".")
        elif a != b and not (isinstance(a, list | tuple) and isinstance(b, list | tuple) and list(a) == list(b)):
            out.append(f"{dotted} {a!r} -> {b!r}")
    return out
