"""The `hf` backend: a local transformers causal LM in the paper's completion format.

    prompt     = [few-shot examples] + caption + "\\n##\\n"
    completion = edit + "\\n%%\\n" + edited caption + "\\nEND"

Decoding (`instructions.decoding`) follows the paper's GPT-3 settings: temperature 0.7, top_p 1.0,
at most 256 new tokens, stop at "\\nEND", frequency penalty 0.1. transformers has no frequency penalty of its own (its
`repetition_penalty` divides logits, CTRL-style, and is not the same thing), so OpenAI's additive
penalty is implemented exactly as a logits processor: logit[t] -= 0.1 * (times t was generated so
far). generate() applies user processors before temperature and top-p, which is OpenAI's order.
Top-k and the model's own generation defaults are switched off.

Batched generation pads on the left. Each batch is sampled from one seed derived from its requests'
per-record seeds, so the same batch always gives the same completions (resume relies on this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ip2p.data.backends.base import Request
from ip2p.data.validate import few_shot_prefix, format_prompt, load_human_examples, pick_examples
from ip2p.io import stable_seed


@dataclass(frozen=True)
class Decoding:
    """The LM's decoding settings; their defaults live in the YAML (instructions.decoding, world.llm.decoding)."""

    temperature: float
    top_p: float
    max_new_tokens: int
    frequency_penalty: float
    stop: str

    @classmethod
    def from_config(cls, s) -> "Decoding":
        return cls(float(s["temperature"]), float(s["top_p"]), int(s["max_new_tokens"]),
                   float(s["frequency_penalty"]), str(s["stop"]))


class FrequencyPenalty:
    """OpenAI's frequency penalty: subtract `penalty` x count of each token among the generated ones."""

    def __init__(self, penalty: float, prompt_length: int):
        self.penalty = penalty
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]  # [B, steps so far]
        if self.penalty == 0 or generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.penalty * counts


class HFBackend:
    def __init__(self, model, tokenizer, name: str, decoding: Decoding, batch_size: int = 8, prefix: str = ""):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.decoding, self.batch_size, self.prefix = decoding, batch_size, prefix

    @classmethod
    def from_config(cls, cfg) -> "HFBackend":
        from ip2p.models.tiny_llm import load_llm

        h = cfg.instructions
        model, tokenizer = load_llm(h.model, cfg.model, cfg.paths.cache, cfg.device, cfg.dtype)
        prefix = ""
        if int(h.few_shot) > 0:
            prefix = few_shot_prefix(pick_examples(load_human_examples(h.examples), int(h.few_shot), int(cfg.seed)))
        return cls(model, tokenizer, f"hf:{h.model}", Decoding.from_config(h.decoding), int(h.batch_size), prefix)

    def _generation_config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        tok = self.tokenizer
        return GenerationConfig(do_sample=True, temperature=self.decoding.temperature, top_p=self.decoding.top_p,
                                top_k=0, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                                stop_strings=[self.decoding.stop], pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id)

    @torch.no_grad()
    def complete(self, requests: Sequence[Request]) -> list[str | None]:
        if not requests:
            return []
        from transformers import LogitsProcessorList

        prompts = [self.prefix + format_prompt(r.caption) for r in requests]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        prompt_length = enc["input_ids"].shape[1]
        # A model with a fixed context (GPT-2: n_positions) cannot go past it.
        limit = getattr(self.model.config, "n_positions", None) or getattr(self.model.config, "max_position_embeddings", None)
        max_new = self.decoding.max_new_tokens if limit is None else min(self.decoding.max_new_tokens, limit - prompt_length)
        if max_new <= 0:
            return [None] * len(requests)
        torch.manual_seed(stable_seed(*(r.seed for r in requests)))
        out = self.model.generate(**enc, generation_config=self._generation_config(max_new),
                                  logits_processor=LogitsProcessorList([FrequencyPenalty(self.decoding.frequency_penalty,
                                                                                         prompt_length)]),
                                  tokenizer=self.tokenizer)
        texts = self.tokenizer.batch_decode(out[:, prompt_length:], skip_special_tokens=True)
        return [t.split(self.decoding.stop)[0] for t in texts]

    def close(self) -> None:
        self.model = None
