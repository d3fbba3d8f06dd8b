"""Checkpoints of Lightning runs (`ip2p train`, `ip2p finetune-llm`): written whole or not at all, and
continued only by the run that wrote them (a fingerprint record beside them)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def fingerprint_matches(record: Path, fingerprint: str) -> bool:
    """Whether the JSON record beside a run's checkpoints names this fingerprint (False when the record is
    missing or unreadable: the checkpoints are then another run's)."""
    try:
        return json.loads(Path(record).read_text())["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError, TypeError):
        return False


def atomic_checkpoint_io():
    """Lightning's torch checkpoint writer, but each file is written to a temp name beside its target and
    renamed into place: a full disk or a kill mid-save leaves the previous step-N.ckpt / last.ckpt (or
    nothing), never a truncated file that a resume would then choke on."""
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            path = Path(path)
            tmp = path.with_name(f".{path.name}.partial")
            try:
                super().save_checkpoint(checkpoint, tmp, storage_options)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    return AtomicCheckpointIO()
