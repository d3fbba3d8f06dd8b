"""What the instruction stage hands a backend, and what it expects back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Request:
    """One completion to make: caption -> "edit\\n%%\\nedited caption".

    `seed` is stable_seed(cfg.seed, id, attempt): the same record and attempt always draw the same,
    whatever else is in the batch, so resumed and sharded runs equal uninterrupted ones.
    """

    id: str
    caption: str
    seed: int
    attempt: int = 0


class Backend(Protocol):
    name: str         # written to each record's "backend" field, e.g. "template", "hf:artifacts/llm"
    batch_size: int   # requests per complete() call

    def complete(self, requests: Sequence[Request]) -> list[str | None]:
        """One raw completion per request, in order (None when there is none); validation is the stage's."""

    def close(self) -> None: ...
