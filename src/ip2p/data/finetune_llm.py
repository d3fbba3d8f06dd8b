"""`ip2p finetune-llm`: fine-tune the instruction LM on human-written edits, as the paper did with
GPT-3 (700 examples, 1 epoch), with a real Lightning Trainer (CPU is fine for the tiny LM).

Each example {"input", "edit", "output"} becomes
    prompt     = input + "\\n##\\n"                                  (no loss)
    completion = edit + "\\n%%\\n" + output + "\\nEND" + end-of-text  (the loss)
A seeded held-out split measures the mean completion-token loss before and after training
(reports/finetune_llm.json). The result is written with save_pretrained to artifacts/llm/, which
`ip2p instructions instructions=hf instructions.model=artifacts/llm` loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ip2p.data.validate import format_completion, format_prompt, load_human_examples
from ip2p.errors import Ip2pError
from ip2p.io import StageSummary, atomic_write_json, stable_seed
from ip2p.io.atomic import atomic_folder
from ip2p.io.checkpoints import atomic_checkpoint_io, fingerprint_matches

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens without loss (prompt, padding)
DONE_MARKER = "ip2p_finetune.json"


class EpochOrder(torch.utils.data.Sampler):
    """Example order of epoch e as a pure function of (seed, e): exactly the order DataLoader(shuffle=True,
    generator=torch.Generator().manual_seed(seed)) gives in its e-th epoch (per epoch that loader draws one
    int64 for its base seed, a permutation, and one more permutation when the sampler runs out), but
    without a generator that lives across epochs, so a run resumed at an epoch boundary (Lightning calls
    set_epoch) sees the orders an uninterrupted run sees."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=g)
            order = torch.randperm(self.n, generator=g)
            torch.randperm(self.n, generator=g)
        return iter(order.tolist())


def split_examples(examples: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): a seeded split that does not depend on the file's order."""
    if not 0 <= heldout_fraction < 1:
        raise Ip2pError(f"llm_finetune.heldout_fraction must be in [0, 1) (got {heldout_fraction})")
    ranked = sorted(examples, key=lambda e: (stable_seed(seed, "heldout", e["input"], e["edit"]), e["input"]))
    n_held = int(round(len(ranked) * heldout_fraction))
    return ranked[n_held:], ranked[:n_held]


def encode_example(tokenizer, example: dict, max_length: int) -> dict:
    """Token ids and labels: prompt tokens carry no loss; the completion is cut at max_length."""
    prompt = tokenizer(format_prompt(example["input"]), add_special_tokens=False)["input_ids"]
    completion = tokenizer(format_completion(example["edit"], example["output"]), add_special_tokens=False)["input_ids"]
    completion = completion + [tokenizer.eos_token_id]
    ids = (prompt + completion)[:max_length]
    labels = ([IGNORE] * len(prompt) + completion)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(pad_id: int):
    def pad(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)       # [B, T], right padded
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)    # [B, T]
        mask = torch.zeros((len(batch), width), dtype=torch.long)             # [B, T]
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return pad


@torch.no_grad()
def completion_loss(model, tokenizer, examples: list[dict], batch_size: int = 16, max_length: int = 256) -> float:
    """Mean cross-entropy per completion token over `examples` (prompt tokens excluded)."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    encoded = [encode_example(tokenizer, e, max_length) for e in examples]
    for start in range(0, len(encoded), batch_size):
        batch = collate(tokenizer.pad_token_id)(encoded[start:start + batch_size])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
        # token t is predicted from positions < t
        pred, target = logits[:, :-1].float(), batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")
        total += loss.item()
        count += int((target != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


LR_SCHEDULES = ("constant", "linear", "cosine")


def checked_lr_schedule(name: str) -> str:
    if name not in LR_SCHEDULES:
        raise Ip2pError(f"unknown lr_schedule '{name}': use one of {', '.join(LR_SCHEDULES)}")
    return name


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The learning rate's multiplier at optimizer step `step` (0-based): a linear warm-up over
    `warmup_steps`, then constant, or decaying to 0 at `total_steps` linearly or along a half cosine."""
    checked_lr_schedule(schedule)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def _lightning_module(model, lr: float, weight_decay: float, warmup_steps: int, schedule: str = "constant"):
    import pytorch_lightning as pl

    class CompletionLM(pl.LightningModule):
        """Causal LM trained on completion tokens only (labels of the prompt are IGNORE)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, _):
            loss = self.model(**batch).loss
            self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
            return loss

        # The global RNG (dropout) travels with the checkpoint, so a resumed run draws what an
        # uninterrupted one would.
        def on_save_checkpoint(self, checkpoint):
            checkpoint["torch_rng_state"] = torch.get_rng_state()

        def on_load_checkpoint(self, checkpoint):
            torch.set_rng_state(checkpoint["torch_rng_state"])

        def validation_step(self, batch, _):
            self.log("val_loss", self.model(**batch).loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])

        def configure_optimizers(self):
            decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
            no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}], lr=lr)
            total = int(self.trainer.estimated_stepping_batches)  # optimizer steps of the whole run
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: lr_factor(step, warmup_steps, total, schedule))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return CompletionLM()


def recipe_fingerprint(f: DictConfig, cfg: DictConfig, train: list[dict]) -> str:
    """What a checkpoint must share with this run to be continued: the recipe, the seed, the base and
    the training examples. The number of epochs only where the learning rate decays (it sets the
    decay); with a constant rate after warm-up a longer run continues a shorter one exactly."""
    keys = ("base", "batch_size", "lr", "weight_decay", "warmup_steps", "accumulate_grad_batches",
            "gradient_clip", "max_length", "precision", "heldout_fraction", "lr_schedule")
    if str(f.get("lr_schedule", "constant")) != "constant":
        keys += ("epochs",)
    text = json.dumps({"recipe": {k: str(f.get(k)) for k in keys}, "seed": int(cfg.seed),
                       "examples": [(e["input"], e["edit"], e["output"]) for e in train]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _last_checkpoint_each_epoch(checkpoints: Path):
    """A callback writing <checkpoints>/last.ckpt at every epoch's end (through the trainer's atomic
    checkpoint IO). Not Lightning's ModelCheckpoint(save_top_k=0, save_last=True): it writes `last`
    only after a top-k save, so with top-k 0 a run killed mid-way had no checkpoint (Lightning 2.6)."""
    import pytorch_lightning as pl

    class LastCheckpointEachEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.save_checkpoint(checkpoints / "last.ckpt")

    return LastCheckpointEachEpoch()


def resume_point(checkpoints: Path, fingerprint: str) -> str | None:
    """<checkpoints>/last.ckpt when the same recipe wrote it; otherwise the folder is emptied and None."""
    record, last = checkpoints / "recipe.json", checkpoints / "last.ckpt"
    if fingerprint_matches(record, fingerprint) and last.exists():
        return str(last)
    shutil.rmtree(checkpoints, ignore_errors=True)
    checkpoints.mkdir(parents=True)
    atomic_write_json(record, {"fingerprint": fingerprint})
    return None


def save_model(model, tokenizer, target: Path, info: dict) -> Path:
    """save_pretrained into a temp folder, then swap it in: a reader never sees half a model."""
    with atomic_folder(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.padding_side = "left"  # what generation wants when the folder is loaded again
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / DONE_MARKER, info)
    return target


def run(cfg: DictConfig) -> Path:
    import pytorch_lightning as pl

    from ip2p.models.tiny_llm import load_llm

    f = cfg.llm_finetune
    output = Path(str(f.output))
    if (output / DONE_MARKER).exists():
        print(f"finetune-llm: {output} is complete; nothing to do (delete it to train again)")
        return output
    schedule = checked_lr_schedule(str(f.get("lr_schedule", "constant")))  # before any data or model loads
    summary = StageSummary("finetune_llm")
    rejected: Counter = Counter()
    examples = load_human_examples(f.data, rejected)
    for reason, n in rejected.items():
        summary.reject(reason, n)
    summary.records_in = len(examples) + sum(rejected.values())
    train, heldout = split_examples(examples, float(f.heldout_fraction), int(cfg.seed))
    if not train:
        raise Ip2pError(f"no usable training examples in '{f.data}'")

    pl.seed_everything(int(cfg.seed), workers=True)
    model, tokenizer = load_llm(f.base, cfg.model, cfg.paths.cache, "cpu", "float32")
    tokenizer.padding_side = "right"
    max_length, batch_size = int(f.max_length), int(f.batch_size)
    before = completion_loss(model, tokenizer, heldout, batch_size, max_length)
    log.info("finetune-llm: held-out completion loss before: %.4f (%d examples)", before, len(heldout))

    pad = collate(tokenizer.pad_token_id)
    # The loader's own generator only feeds its base-seed draw, so the global RNG (dropout) is untouched.
    train_loader = DataLoader([encode_example(tokenizer, e, max_length) for e in train], batch_size=batch_size,
                              sampler=EpochOrder(len(train), int(cfg.seed)), collate_fn=pad,
                              generator=torch.Generator())
    val_loader = DataLoader([encode_example(tokenizer, e, max_length) for e in heldout], batch_size=batch_size,
                            collate_fn=pad) if heldout else None
    model.train()  # load_llm hands out models in eval mode
    module = _lightning_module(model, float(f.lr), float(f.weight_decay), int(f.warmup_steps), schedule)
    # A checkpoint at every epoch's end beside the output; a rerun of the same recipe after a kill
    # continues from it (another recipe or other data starts over).
    checkpoints = output.with_name(output.name + ".checkpoints")
    resume = resume_point(checkpoints, recipe_fingerprint(f, cfg, train))
    trainer = pl.Trainer(max_epochs=int(f.epochs), accelerator=str(f.accelerator), devices=1,
                         precision=f.precision, accumulate_grad_batches=int(f.accumulate_grad_batches),
                         gradient_clip_val=float(f.gradient_clip), logger=False,
                         # tqdm's bar, not Lightning's Rich default: it also shows in redirected logs
                         callbacks=[_last_checkpoint_each_epoch(checkpoints)]
                         + ([pl.callbacks.TQDMProgressBar()] if cfg.progress else []),
                         plugins=[atomic_checkpoint_io()],
                         enable_progress_bar=bool(cfg.progress), enable_model_summary=False,
                         enable_checkpointing=False,  # no default ModelCheckpoint: ours above writes last.ckpt
                         log_every_n_steps=1, num_sanity_val_steps=0, default_root_dir=str(output.parent))
    if resume:
        log.info("finetune-llm: resuming from %s", resume)
    trainer.fit(module, train_loader, val_loader, ckpt_path=resume)

    model = module.model.to("cpu").float()
    after = completion_loss(model, tokenizer, heldout, batch_size, max_length)
    log.info("finetune-llm: held-out completion loss after: %.4f", after)
    info = {"base": str(f.base), "train_examples": len(train), "heldout_examples": len(heldout),
            "epochs": int(f.epochs), "optimizer_steps": int(trainer.global_step),
            "heldout_loss_before": round(before, 6), "heldout_loss_after": round(after, 6)}
    summary.records_out = len(examples)  # every usable example: trained on or held out
    summary.extra.update(info)
    summary.extra["output"] = str(output)
    summary.write(cfg.paths.reports)
    save_model(model, tokenizer, output, info)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the finished model replaces them
    print(f"finetune-llm: held-out loss {before:.4f} -> {after:.4f}; saved {output}")
    return output
