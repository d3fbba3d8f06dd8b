"""Lightning checkpoints written whole or not at all (used by `ip2p train` and `ip2p finetune-llm`)."""

from __future__ import annotations

import os
from pathlib import Path


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
