"""Every setting checked before any work starts: one place, one message per bad key.

`ip2p <stage>` calls `check_config` on the whole composed configuration before the stage loads a
model or reads data, so `train.lr=-1` or `filter.batch_size=0` fails in a second with one line
instead of a traceback (or, worse, minutes in). This table is the one home of the settings' ranges:
a stage run without the CLI (a test, a notebook) asks `check_config(cfg, groups=(...))` for its own
groups instead of checking again itself. Stages keep their own checks of what only they can know
(files, data, a loaded model). Keys a configuration does not have are skipped.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

from ip2p.errors import Ip2pError

if TYPE_CHECKING:
    from omegaconf import DictConfig

Rule = Callable[[Any], str | None]  # None: fine; else what is wrong


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def at_least(low: float, integer: bool = False) -> Rule:
    def rule(v):
        if not _number(v) or (integer and int(v) != v):
            return f"must be {'an integer' if integer else 'a number'} >= {low:g}"
        return None if v >= low else f"must be >= {low:g}"
    return rule


def above(low: float) -> Rule:
    def rule(v):
        return None if _number(v) and v > low else f"must be a number > {low:g}"
    return rule


def within(low: float, high: float) -> Rule:
    def rule(v):
        return None if _number(v) and low <= v <= high else f"must be a number in [{low:g}, {high:g}]"
    return rule


def fractions(max_count: int) -> Rule:
    """A list of at most `max_count` numbers in [0, 1] (possibly empty)."""
    def rule(v):
        if not isinstance(v, (list, tuple)) or len(v) > max_count or not all(_number(x) and 0 <= x <= 1 for x in v):
            return f"must be a list of at most {max_count} numbers in [0, 1]"
        return None
    return rule


def optional(rule: Rule) -> Rule:
    return lambda v: None if v is None else rule(v)


def one_of(*choices: str) -> Rule:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def sampler(v: Any) -> str | None:
    from ip2p.sampling.loop import scheduler_class

    try:
        scheduler_class(str(v))
    except Ip2pError as err:
        return str(err)
    return None


def compile_backend(v: Any) -> str | None:
    from ip2p.models.speed import compile_backends

    return None if v is None or v in compile_backends() else f"must be null or one of {', '.join(compile_backends())}"


POSITIVE_INT = at_least(1, integer=True)
COUNT = at_least(0, integer=True)

RULES: dict[str, Rule] = {
    "sampling.scheduler": sampler, "sampling.text_guidance": at_least(0), "sampling.image_guidance": at_least(0),
    "edit.steps": POSITIVE_INT, "edit.num_images": POSITIVE_INT, "edit.scheduler": sampler,
    "edit.text_guidance": at_least(0), "edit.image_guidance": at_least(0), "edit.resolution": POSITIVE_INT,
    "edit.speed.compile": compile_backend,
    "edit.speed.compile_mode": optional(one_of("default", "reduce-overhead", "max-autotune",
                                               "max-autotune-no-cudagraphs")),
    "instructions.batch_size": POSITIVE_INT,
    "synthesis.steps": POSITIVE_INT, "synthesis.samples_per_pair": POSITIVE_INT, "synthesis.batch_size": POSITIVE_INT,
    "synthesis.scheduler": sampler, "synthesis.p_min": within(0, 1), "synthesis.p_max": within(0, 1),
    "synthesis.cfg_min": above(0), "synthesis.cfg_max": above(0),
    "filter.batch_size": POSITIVE_INT, "filter.top_k": POSITIVE_INT, "filter.shard_size": POSITIVE_INT,
    "filter.plot_bins": POSITIVE_INT,
    **{f"{group}.{name}": within(-1, 1) for group in ("filter.thresholds", "synthesis.early_drop.thresholds")
       for name in ("sim_image", "sim_dir", "sim_0", "sim_1")},
    "filter.thresholds.sim_rest": optional(within(-1, 1)),   # null: not applied
    "synthesis.early_drop.batch_size": POSITIVE_INT,
    "train.max_steps": POSITIVE_INT, "train.batch_size": POSITIVE_INT, "train.accumulate_grad_batches": POSITIVE_INT,
    "train.lr": above(0), "train.weight_decay": at_least(0), "train.warmup_steps": COUNT,
    "train.min_lr": at_least(0), "train.lr_schedule": one_of("constant", "cosine"),
    "train.gradient_clip_val": optional(above(0)), "train.conditioning_dropout": within(0, 1 / 3),
    "train.copy_rows": within(0, 1),
    "train.timestep_power": above(0), "train.conv_in_lr_scale": above(0), "train.snr_gamma": optional(above(0)),
    "train.loss": one_of("mse", "huber"), "train.huber_c": within(1e-4, 1),
    "train.huber_schedule": one_of("constant", "snr"),
    "train.ema.decay": within(0, 1), "train.log_every_n_steps": POSITIVE_INT,
    "train.data.num_workers": COUNT, "train.data.resolution": POSITIVE_INT, "train.data.draw_by": one_of("pair", "row"),
    "train.validation.every_n_steps": POSITIVE_INT, "train.validation.max_batches": optional(POSITIVE_INT),
    "train.validation.batch_size": POSITIVE_INT, "train.validation.grid.num_images": COUNT,
    "train.validation.grid.steps": POSITIVE_INT, "train.validation.grid.scheduler": sampler,
    "train.validation.copy_error.fractions": fractions(16), "train.validation.copy_error.tolerance": above(0),
    "train.checkpoint.every_n_steps": POSITIVE_INT, "train.export.scheduler": sampler,
    "evaluate.num_samples": POSITIVE_INT, "evaluate.steps": POSITIVE_INT, "evaluate.scheduler": sampler,
    "evaluate.batch_size": POSITIVE_INT, "evaluate.default_text_guidance": at_least(0),
    "evaluate.default_image_guidance": at_least(0),
    "register.serve.steps": POSITIVE_INT, "register.serve.scheduler": sampler,
    "llm_finetune.batch_size": POSITIVE_INT, "llm_finetune.lr": above(0), "llm_finetune.weight_decay": at_least(0),
    "llm_finetune.warmup_steps": COUNT, "llm_finetune.accumulate_grad_batches": POSITIVE_INT,
    "shard.count": POSITIVE_INT, "shard.index": COUNT,
    "filter.clip_preprocess": one_of("hf", "original"), "evaluate.clip_preprocess": one_of("hf", "original"),
    "evaluate.clip_value_range": one_of("unit", "signed"), "evaluate.draw_by": one_of("row", "pair"),
}


# Settings bounded by others (conf/edit: limits, and what reads it): key -> the [low, high] key. A value
# that breaks its own rule above is named once, by that rule.
BOUNDED: dict[str, str] = {
    **{f"edit.{k}": f"edit.limits.{k}" for k in ("steps", "text_guidance", "image_guidance", "num_images",
                                                 "resolution")},
    "app.steps": "app.limits.steps", "app.resolution": "edit.limits.resolution",
    **{f"register.serve.{k}": f"register.serve.limits.{k}" for k in ("steps", "text_guidance", "image_guidance")},
    "register.serve.resolution": "edit.limits.resolution",
    # the stages' own edits and images: the same bounds, so no setting makes an unbounded one
    "evaluate.steps": "edit.limits.steps", "evaluate.resolution": "edit.limits.resolution",
    "synthesis.steps": "edit.limits.steps", "synthesis.resolution": "edit.limits.resolution",
    "train.validation.grid.steps": "edit.limits.steps", "train.data.resolution": "edit.limits.resolution",
    "train.data.resize_max": "edit.limits.resolution",
}
# Of these, only the upper bound: a training crop below the smallest edit is fine (the model's own factor
# check, models.loader.check_square_resolution, refuses what it cannot work at)
UPPER_ONLY = ("train.data.resolution", "train.data.resize_max")


def proportions(names: tuple[str, ...], what: str) -> Rule:
    """A mix {name: probability} over the given names, probabilities >= 0 that add up to 1. The names come
    from whoever owns them (the world's styles: ip2p.world.rules), so this layer imports none of them."""
    def rule(v):
        if not isinstance(v, dict) or not v:
            return f"must be a mapping {{{what}: probability}}"
        unknown = sorted(set(map(str, v)) - set(names))
        if unknown:
            return f"names {what}s the world lacks: {unknown} ({what}s: {', '.join(names)})"
        if not all(_number(p) and p >= 0 for p in v.values()):
            return f"must give each {what} a probability >= 0"
        return None if abs(sum(v.values()) - 1.0) <= 1e-6 else f"probabilities must add up to 1 (got {sum(v.values()):g})"
    return rule


def _relations(get: Callable[[str], Any]) -> list[str]:
    """Checks that involve several keys."""
    problems = []
    index, count = get("shard.index"), get("shard.count")
    if _number(index) and _number(count) and count >= 1 and not index < count:
        problems.append(f"shard.index must be < shard.count (got {index} of {count}: shards are 0..{count - 1})")
    for low, high in (("synthesis.p_min", "synthesis.p_max"), ("synthesis.cfg_min", "synthesis.cfg_max")):
        a, b = get(low), get(high)
        if _number(a) and _number(b) and a > b:
            problems.append(f"{low} must be <= {high} (got {a} > {b})")
    if get("evaluate.clip_value_range") == "signed" and get("evaluate.clip_preprocess") != "original":
        problems.append("evaluate.clip_value_range=signed (the original metric script's [-1, 1]) needs "
                        "evaluate.clip_preprocess=original")
    lr, min_lr = get("train.lr"), get("train.min_lr")
    if _number(lr) and _number(min_lr) and 0 < lr < min_lr:  # a bad lr alone is named once, by its own rule
        problems.append(f"train.min_lr must be <= train.lr (got {min_lr} > {lr})")
    kinds, grid_kinds = get("world.eval.kinds"), get("world.eval.grid_kinds")
    if kinds is not None and grid_kinds and set(grid_kinds) - set(kinds):
        problems.append(f"world.eval.grid_kinds names kinds that world.eval.kinds lacks: "
                        f"{sorted(set(grid_kinds) - set(kinds))} (kinds: {kinds})")
    for scales in ("evaluate.text_guidances", "evaluate.image_guidances"):
        values = get(scales)
        if values is not None and (not values or not all(_number(v) and v >= 0 for v in values)):
            problems.append(f"{scales} must be a non-empty list of numbers >= 0 (got {values})")
    return problems


def _in(key: str, groups: tuple[str, ...] | None) -> bool:
    return groups is None or any(key == g or key.startswith(g + ".") for g in groups)


def config_problems(cfg: "DictConfig", aliases: dict[str, str] | None = None,
                    groups: tuple[str, ...] | None = None, rules: dict[str, Rule] | None = None) -> list[str]:
    """One line per bad key of the composed configuration; empty when all is well. `aliases` names a
    key the way the user set it (a command-line flag such as --steps for edit.steps); `groups` (e.g.
    ("train",), a stage checking its own settings) keeps the rules of keys under those groups only, and
    leaves out the edit.limits bounds (BOUNDED, the instruction's length): those bound what a user may ask
    for at the command line, not what a direct call may use (tests train at 32 px). `rules` adds the rule
    table of a part above this layer that owns its keys (the world's, ip2p.world.rules.RULES, which the
    CLI passes), so that this layer names no part above it."""
    from omegaconf import OmegaConf

    missing = object()

    def get(key: str) -> Any:
        value = OmegaConf.select(cfg, key, default=missing)
        if value is missing:
            return None
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    def interpolated(key: str) -> bool:  # `${other.key}`: a bad value is reported once, at its source
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return OmegaConf.is_config(node) and OmegaConf.is_interpolation(node, leaf)

    problems, named = [], set()
    for key, rule in {**RULES, **(rules or {})}.items():
        if not _in(key, groups) or OmegaConf.select(cfg, key, default=missing) is missing or interpolated(key):
            continue
        value = get(key)
        why = rule(value)
        if why is not None:
            name = (aliases or {}).get(key, key)
            named.add(key)
            problems.append(f"{name} {why} (got {value!r})" if "got" not in why else f"{name}: {why}")
    for key, bounds_key in BOUNDED.items():
        value, bounds = get(key), get(bounds_key)
        if key in named or groups is not None or not _number(value) or interpolated(key) or not bounds:
            continue
        low, high = bounds
        if key in UPPER_ONLY:
            low = -math.inf
        if not low <= value <= high:
            name = (aliases or {}).get(key, key)
            span = f"<= {high:g}" if low == -math.inf else f"between {low:g} and {high:g}"
            problems.append(f"{name} must be {span} ({bounds_key}) (got {value!r})")
    instruction, most = get("edit.instruction"), get("edit.limits.max_instruction_chars")
    if groups is None and isinstance(instruction, str) and _number(most) and len(instruction) > most:
        problems.append(f"the instruction is {len(instruction)} characters long; the limit is {most} "
                        "(edit.limits.max_instruction_chars)")
    # each relation's line starts with the key it is about
    return problems + [p for p in _relations(get) if _in(p.split(" ", 1)[0].split("=", 1)[0].rstrip(":"), groups)]


def check_config(cfg: "DictConfig", aliases: dict[str, str] | None = None,
                 groups: tuple[str, ...] | None = None, rules: dict[str, Rule] | None = None) -> None:
    """Raise one Ip2pError naming every bad key (joined on one line)."""
    problems = config_problems(cfg, aliases, groups, rules)
    if problems:
        raise Ip2pError(f"{len(problems)} bad setting{'s' if len(problems) > 1 else ''}: " + "; ".join(problems))
