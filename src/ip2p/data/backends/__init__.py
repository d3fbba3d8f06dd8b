"""Instruction backends, chosen by the config group `instructions` (`ip2p instructions instructions=hf`):

  template       offline, rule-based grounded edits (ip2p.data.backends.template)
  hf             a local transformers causal LM in the paper's completion format (ip2p.data.backends.hf)
  openai         any OpenAI-compatible HTTP endpoint: vLLM, Ollama, OpenAI (ip2p.data.backends.openai_compat)

Each returns raw completions; ip2p.data.validate is the one place that accepts or rejects them.
"""

from __future__ import annotations

from ip2p.data.backends.base import Backend, Request
from ip2p.errors import Ip2pError

BACKENDS = ("template", "hf", "openai")


def make_backend(cfg) -> Backend:
    """Build the backend named by `instructions.backend` from the composed config."""
    name = str(cfg.instructions.backend)
    if name == "template":
        from ip2p.data.backends.template import TemplateBackend

        return TemplateBackend.from_config(cfg)
    if name == "hf":
        from ip2p.data.backends.hf import HFBackend

        return HFBackend.from_config(cfg)
    if name == "openai":
        from ip2p.data.backends.openai_compat import OpenAIBackend

        return OpenAIBackend.from_config(cfg)
    raise Ip2pError(f"unknown instruction backend '{name}': use one of {', '.join(BACKENDS)}")


__all__ = ["Backend", "BACKENDS", "Request", "make_backend"]
