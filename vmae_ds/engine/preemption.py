"""Pre-emption: a scheduler's SIGTERM becomes a checkpoint at the next step boundary, then a clean exit."""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist


class Preemption:
    """SIGTERM sets a flag; at the top of every step the ranks agree on it (one tiny all-reduce), save, exit.

    A scheduler signals every process of the job, DataLoader workers included, and those die at once:
    so the handler also drops torch's SIGCHLD hook (it would raise "worker killed" wherever the main
    process happens to be), and no batch is drawn once the flag is seen. The loader's position lives
    in the main process, so the checkpoint does not need the workers.
    """

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag)
        return flag.item() > 0
