"""The run's quarantine: clips that crashed or hung a decoder, kept in the run folder (quarantine.json).

The loader carries its quarantine in its checkpointed state too, but a resume from a checkpoint written before
the crash would decode the clip again (and crash again); the run folder's list is read at every start.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError
from .checkpoint import write_atomic

FILE = "quarantine.json"


def read_quarantine(run_dir: Path) -> list[str]:
    try:
        data = json.loads((Path(run_dir) / FILE).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise ConfigError(f"{Path(run_dir) / FILE}: unreadable quarantine list ({e}); fix or delete it") from None
    return sorted({str(k) for k in data.get("keys", [])})


def write_quarantine(run_dir: Path, keys: list[str]) -> None:
    """Atomically (readers see the old or the new list)."""
    write_atomic(Path(run_dir) / FILE, json.dumps({"keys": sorted(set(keys)), "why": "a decoder crashed or hung on "
                                                   "these clips; every start of this run skips them"}, indent=1) + "\n")
