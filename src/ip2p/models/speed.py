"""Optional speed-ups for sampling with loaded components: the channels-last memory layout and
torch.compile of the UNet and the VAE decoder (the two that run per step and per image). The outputs
equal the eager path's within floating-point tolerance (tests/test_speed.py); which one is faster
depends on the device (bench/edit_speed.py --channels-last --compile inductor)."""

from __future__ import annotations

import torch

from ip2p.errors import Ip2pError
from ip2p.models.loader import DiffusionComponents


def compile_backends() -> list[str]:
    """torch.compile's backends for users, and the two that only trace (for checking equality)."""
    import torch._dynamo

    return sorted(set(torch._dynamo.list_backends()) | {"eager", "aot_eager"})


def accelerate(parts: DiffusionComponents, channels_last: bool = False, compile_backend: str | None = None,
               compile_mode: str | None = None) -> DiffusionComponents:
    """Apply the speed-ups in place and return `parts`. compile_backend: None (eager) or a torch.compile
    backend ("inductor" generates kernels; "aot_eager" traces without code generation); compile_mode:
    None, "reduce-overhead" (CUDA graphs) or "max-autotune". Compilation happens at the first call."""
    if compile_backend is not None and compile_backend not in compile_backends():
        raise Ip2pError(f"unknown torch.compile backend '{compile_backend}': use one of {', '.join(compile_backends())}")
    if channels_last:  # NHWC: the layout tensor cores and oneDNN convolutions prefer
        parts.unet.to(memory_format=torch.channels_last)
        parts.vae.to(memory_format=torch.channels_last)
    if compile_backend is not None:
        parts.unet.compile(backend=compile_backend, mode=compile_mode)
        parts.vae.decoder.compile(backend=compile_backend, mode=compile_mode)
    return parts
