"""The model card of a trained editor (ip2p.models.model_card): what it was trained from, on and how, and
the sampling settings it is meant to be used with (the ones its validation grids and evaluation use)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ip2p.models.model_card import ModelCard, data_hash, read_card

# train.* keys that are where things go, not how the editor was made
NOT_RECIPE = ("resume", "checkpoint_dir", "export_dir", "reports_dir", "output_dir", "export", "log_every_n_steps",
              "validation", "checkpoint")


def editor_card(cfg: DictConfig, steps: int) -> ModelCard:
    t = cfg.train
    recipe = {k: v for k, v in OmegaConf.to_container(t, resolve=True).items() if k not in NOT_RECIPE}
    recipe["data"] = {k: v for k, v in recipe["data"].items() if k in ("format", "draw_by", "resolution",
                                                                        "resize_min", "resize_max", "flip")}
    data = str(t.data.dir)
    sampling = {"steps": int(cfg.edit.steps), "text_guidance": float(cfg.sampling.text_guidance),
                "image_guidance": float(cfg.sampling.image_guidance), "scheduler": str(cfg.sampling.scheduler),
                "resolution": int(cfg.edit.resolution)}
    training = {"steps": int(steps), "data": data,
                "data_hash": data_hash(data, int(float(t.export.hash_data_max_gb) * 2**30)), "seed": int(cfg.seed)}
    base = cfg.model.base
    if str(t.init) == "editor":
        # continuing an editor: its card's steps and base carry over, so the card counts every step it had
        before = read_card(cfg.model.editor)
        earlier = int(before.training.get("steps", 0)) if before else 0
        training.update(steps=earlier + int(steps), continued_from=str(cfg.model.editor), steps_before=earlier)
        base = before.base_model if before and before.base_model else cfg.model.editor
    return ModelCard(base_model=str(base), sampling=sampling, training={**training, "recipe": recipe})
