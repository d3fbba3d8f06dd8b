"""The instruction LM: the `tiny` stand-in, and one loader for it and for real causal LMs.

`tiny` is a GPT-2-style causal LM with random weights from a fixed seed and a byte-level BPE
tokenizer trained offline (with the `tokenizers` library) on the packaged text: this project's
captions and human-written edits, plus the completion format's markers. It is built once into
${paths.cache}/tiny-llm-<hash>/ with save_pretrained and loaded with from_pretrained, exactly like a
real checkpoint (e.g. Qwen/Qwen2.5-0.5B-Instruct from the hub cache, or artifacts/llm after
`ip2p finetune-llm`). With random weights it proves the plumbing, not the quality of the edits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ip2p.errors import Ip2pError
from ip2p.io.atomic import build_once

TINY_LLM_VERSION = 1  # bump when the builder changes what it writes
END_OF_TEXT = "<|endoftext|>"
# Mirrors `llm_build` in conf/model/tiny.yaml (used when a preset names `llm: tiny` without a spec).
TINY_LLM_DEFAULTS = {"seed": 0, "vocab_size": 2048, "n_positions": 512, "n_embd": 64, "n_layer": 2, "n_head": 4}


def _spec(build: Mapping[str, Any] | None) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(build, DictConfig):
        build = OmegaConf.to_container(build, resolve=True)
    return {**TINY_LLM_DEFAULTS, **dict(build or {})}


def tiny_llm_dir(cache_dir: str | Path, build: Mapping[str, Any] | None = None) -> Path:
    spec = json.dumps({"v": TINY_LLM_VERSION, **_spec(build)}, sort_keys=True)
    return Path(cache_dir).expanduser() / f"tiny-llm-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


def ensure_tiny_llm(cache_dir: str | Path, build: Mapping[str, Any] | None = None) -> Path:
    """The tiny LM's folder, built first if needed (atomically: temp folder + rename)."""
    return build_once(tiny_llm_dir(cache_dir, build), lambda folder: _build(folder, _spec(build)))


def tokenizer_texts() -> list[str]:
    """The packaged captions and edits, plus the completion format's markers in context."""
    from ip2p.models.llm_format import END, PROMPT_SUFFIX, SEPARATOR
    from ip2p.models.tiny import tokenizer_corpus

    lines = tokenizer_corpus()
    # The corpus lists each human example as three lines (input, edit, output): join them in the
    # fine-tuning format too, so that the markers get their own merges.
    formatted = [a + PROMPT_SUFFIX + b + SEPARATOR + c + END for a, b, c in zip(lines[0::3], lines[1::3], lines[2::3])]
    return lines + formatted


def _build(root: Path, b: Mapping[str, Any]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(b["vocab_size"]), min_frequency=2, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(tokenizer_texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                        unk_token=END_OF_TEXT, pad_token=END_OF_TEXT,
                                        model_max_length=int(b["n_positions"]))
    tokenizer.save_pretrained(root)
    eos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=int(b["n_positions"]), n_embd=int(b["n_embd"]),
                        n_layer=int(b["n_layer"]), n_head=int(b["n_head"]), bos_token_id=eos, eos_token_id=eos,
                        pad_token_id=eos)
    torch.manual_seed(int(b["seed"]))
    GPT2LMHeadModel(config).eval().save_pretrained(root, safe_serialization=True)


def resolve_llm(source: str, model_cfg: Mapping[str, Any], cache_dir: str | Path) -> str:
    """"tiny" -> its built folder; folders and hub ids unchanged."""
    if source == "tiny":
        return str(ensure_tiny_llm(cache_dir, model_cfg.get("llm_build")))
    return str(source)


def load_llm(source: str | None, model_cfg: Mapping[str, Any], cache_dir: str | Path,
             device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "float32"):
    """(causal LM, tokenizer) from "tiny", a save_pretrained folder or a hub id (offline: hub cache only).

    The tokenizer pads on the left (batched generation) and always has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ip2p.config import first_line
    from ip2p.models.loader import resolve_device, resolve_dtype

    if not source:
        raise Ip2pError(f"model preset '{model_cfg.get('name')}' names no instruction LM (set model.llm or "
                        f"instructions.model)")
    resolved = resolve_llm(str(source), model_cfg, cache_dir)
    local = Path(resolved).expanduser()
    if resolved.startswith((".", "/", "~")) or local.exists():
        if not (local / "config.json").is_file():
            raise Ip2pError(f"'{source}' is not a causal LM folder (expected config.json, weights and tokenizer "
                            f"files written by save_pretrained)")
        resolved = str(local)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=resolve_dtype(dtype))
    except (OSError, ValueError) as err:
        raise Ip2pError(f"cannot load the instruction LM '{source}': {first_line(err)}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    dev = resolve_device(str(device)) if isinstance(device, str) else device
    return model.to(dev).eval(), tokenizer
