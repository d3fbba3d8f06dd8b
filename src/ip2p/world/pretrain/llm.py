"""`ip2p pretrain-llm`: the world's instruction LM (stand-in for the paper's fine-tuned GPT-3).

A GPT-2 of the `model.llm_build` size, random weights (there is no pretrained LM in the world),
fine-tuned by the project's own `ip2p finetune-llm` stage on world examples in the paper's format
(caption + "\\n##\\n" -> edit + "\\n%%\\n" + edited caption + "\\nEND"), then judged: for captions of
held-out scenes it samples completions with the paper's settings (temperature 0.7, top_p 1, frequency
penalty 0.1) through the `hf` instruction backend, and the world checks each one: well formed, and the
edited caption describes a valid scene that differs from the input exactly as instructed.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ip2p.data import finetune_llm
from ip2p.data.backends.base import Request
from ip2p.data.backends.hf import Decoding, HFBackend
from ip2p.data.validate import parse_completion
from ip2p.io.atomic import atomic_write_json
from ip2p.io.loggers import log_metrics, start_mlflow_run
from ip2p.io.stage import stable_seed
from ip2p.models.tiny_llm import load_llm
from ip2p.world.language.captions import caption
from ip2p.world.language.parsing import consistent, parse_instruction
from ip2p.world.scene import sample_scenes

log = logging.getLogger(__name__)


def judge(model_dir: str, cfg: DictConfig, c: DictConfig) -> dict:
    model, tokenizer = load_llm(model_dir, cfg.model, cfg.paths.cache, "cpu", "float32")
    backend = HFBackend(model, tokenizer, f"hf:{model_dir}", Decoding.from_config(c.decoding), c.eval.batch_size)
    rng = np.random.default_rng(c.eval.seed)
    captions = [caption(sc, rng) for sc in sample_scenes(c.eval.seed, c.eval.captions)]
    requests = [Request(f"e{k}", cap, stable_seed(c.eval.seed, k)) for k, cap in enumerate(captions)]
    completions = []
    for i in range(0, len(requests), backend.batch_size):
        completions += backend.complete(requests[i:i + backend.batch_size])
    well_formed, good, kinds = 0, 0, Counter()
    examples = []
    for cap, text in zip(captions, completions):
        v = parse_completion(text)
        ok = v.ok and consistent(cap, v.edit, v.output)
        well_formed += v.ok
        good += ok
        if ok:
            kinds[parse_instruction(v.edit).kind] += 1
        if len(examples) < 20:
            examples.append({"input": cap, "completion": text, "consistent": ok})
    n = len(captions)
    return {"well_formed": well_formed / n, "valid_and_consistent": good / n, "judged": n,
            "consistent_by_kind": dict(sorted(kinds.items())), "examples": examples}


def run(cfg: DictConfig) -> dict:
    c = cfg.world.llm
    # 1. fine-tune through the project's stage, with the world's data and sizes
    ft = OmegaConf.merge(cfg, {"llm_finetune": OmegaConf.to_container(c.finetune, resolve=True),
                               "model": {"llm_build": OmegaConf.to_container(c.build, resolve=True)}})
    with start_mlflow_run(cfg, "pretrain-llm"):
        output = finetune_llm.run(ft)
        # 2. judge completions for held-out captions against the world
        result = judge(str(output), ft, c)
        log_metrics({k: v for k, v in result.items() if isinstance(v, float)})
    atomic_write_json(Path(cfg.paths.reports) / "pretrain_llm.json", result)
    log.info("pretrain-llm: well formed %.3f, valid and consistent %.3f", result["well_formed"],
             result["valid_and_consistent"])
    return result
