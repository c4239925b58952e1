"""Pre-emption: a scheduler's SIGTERM becomes a checkpoint at the next step boundary, then a clean exit."""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist


class Preemption:
    """SIGTERM sets a flag; at the top of every step the ranks agree on it (one tiny all-reduce), save, exit.

    The agreement runs over a host-side (gloo) group on a CPU tensor, so it never waits for the GPU.
    A scheduler signals every process of the job: DataLoader workers ignore SIGTERM (the main process
    decides), and the handler also drops torch's SIGCHLD hook so a worker that dies anyway cannot raise
    "worker killed" wherever the main process happens to be.
    """

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def agreed(self, device: torch.device | None = None, group: Any = None) -> bool:
        flag = torch.tensor([float(self.requested)])
        if group is None and device is not None and device.type != "cpu":  # no host group: the default one
            flag = flag.to(device)
        dist.all_reduce(flag, group=group)
        return flag.item() > 0
