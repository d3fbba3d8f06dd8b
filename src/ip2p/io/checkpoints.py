"""Checkpoints of Lightning runs (`ip2p train`, `ip2p finetune-llm`): written whole or not at all, and
continued only by the run that wrote them (a fingerprint record beside them)."""

from __future__ import annotations

import json
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

    import io

    import torch
    from lightning_fabric.utilities.cloud_io import get_filesystem

    from ip2p.io.atomic import atomic_write_bytes

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            if storage_options is not None or get_filesystem(path).protocol not in ("file", ("file", "local")):
                return super().save_checkpoint(checkpoint, path, storage_options)  # remote: Lightning's way
            # Local: serialized in memory as Lightning does, then written beside the target ourselves.
            # Lightning's fsspec transaction writes through a temp file in the system temp folder, so a
            # full disk named that deleted file, not the checkpoint (and the bytes crossed disks).
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            atomic_write_bytes(path, buffer.getvalue())

    return AtomicCheckpointIO()
