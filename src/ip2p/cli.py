"""The `ip2p` command: `edit` and `export` take flags; pipeline stages take Hydra overrides.

    ip2p edit INPUT "INSTRUCTION" -o OUT.png [--model PRESET|PATH] [--steps N] ...
    ip2p export OUTDIR [--model PRESET|PATH]
    ip2p <stage> [key=value ...] [-m]        stages: see STAGES below

Every stage is one `run(cfg)` function; this file only parses arguments and reports errors as one line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from ip2p.checks import check_config as check_settings
from ip2p.errors import Ip2pError, one_line
from ip2p.world.rules import RULES as WORLD_RULES



def check_config(cfg, aliases: dict[str, str] | None = None) -> None:
    """Every setting's range, the world's own settings included (the checks' layer does not know the world)."""
    check_settings(cfg, aliases, rules=WORLD_RULES)


# stage name -> "module:function" taking the composed DictConfig. Later stages register here.
STAGES: dict[str, str] = {
    "captions": "ip2p.data.captions:run",
    "instructions": "ip2p.data.instructions:run",
    "finetune-llm": "ip2p.data.finetune_llm:run",
    "synthesize": "ip2p.synthesis.run:run",
    "filter": "ip2p.filtering.run:run",
    "train": "ip2p.training.run:run",
    "evaluate": "ip2p.evaluation.run:run",
    "register": "ip2p.tracking.registry:run_register",
    "merge": "ip2p.io.merge:run",
    "world-captions": "ip2p.world.source:run",
    "pretrain-vae": "ip2p.world.pretrain.vae:run",
    "refine-vae": "ip2p.world.pretrain.vae_refine:run",
    "pretrain-clip": "ip2p.world.pretrain.clip:run",
    "pretrain-t2i": "ip2p.world.pretrain.t2i:run",
    "pretrain-llm": "ip2p.world.pretrain.llm:run",
    "pretrain-report": "ip2p.world.pretrain.report:run",
    "world-calibrate": "ip2p.world.judges.calibrate:run",
    "world-judge": "ip2p.world.judges.world_judge:run",
    "world-eval": "ip2p.world.judges.world_eval:run",
    "world-attention": "ip2p.world.judges.world_attention:run",
    "world-demo": "ip2p.world.judges.demo:run",
    "world-pairs": "ip2p.world.judges.world_pairs:run",
    "world-yield": "ip2p.world.judges.world_yield:run",
}



def _quiet_libraries() -> None:
    # No telemetry (MLflow, W&B, Hugging Face, DVC), no progress bars from loaders.
    from ip2p.io.loggers import quiet_telemetry

    quiet_telemetry()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _model_overrides(model: str | None) -> tuple[list[str], str | None]:
    """--model is a preset name from conf/model/ or a checkpoint (path, hub id, models:/ URI)."""
    from ip2p.config import available_presets

    if model is None:
        return [], None
    if model in available_presets("model"):
        return [f"model={model}"], None
    return [], model


def _configured():
    """The composed default configuration: the help texts name its values, so that each default is
    written once, in conf/."""
    from ip2p.config import compose

    return compose([])


def _edit_parser() -> argparse.ArgumentParser:
    d = _configured()
    e = d.edit
    p = argparse.ArgumentParser(
        prog="ip2p edit",
        description="Edit an image with a written instruction (InstructPix2Pix).",
        epilog="Example: ip2p edit photo.jpg \"make it snowy\" -o snowy.png --model ip2p",
    )
    p.add_argument("input", help="input image (any format Pillow reads; EXIF orientation is applied)")
    p.add_argument("instruction", help="the edit, e.g. \"make it a watercolor\"; empty returns the resized input")
    p.add_argument("-o", "--output", default=None,
                   help=f"output image; with --num-images K>1, OUT_0.png ... OUT_{{K-1}}.png (default: {e.output})")
    p.add_argument("--model", default=None,
                   help="preset name (tiny, ip2p, sd15) or a checkpoint: diffusers folder, .ckpt/.safetensors "
                        f"file, hub id, or models:/NAME@ALIAS (default: {d.model.name})")
    p.add_argument("--model-config", default=None,
                   help="for a .ckpt/.safetensors --model: diffusers folder or hub id with its component configs "
                        "(default: the ip2p preset's, timbrooks/instruct-pix2pix; `tiny` for the tiny preset's)")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {e.steps})")
    p.add_argument("--text-guidance", type=float, default=None,
                   help=f"text guidance scale s_T: how strongly to follow the instruction (default {e.text_guidance})")
    p.add_argument("--image-guidance", type=float, default=None,
                   help=f"image guidance scale s_I: how closely to stay with the input image (default {e.image_guidance})")
    p.add_argument("--seed", type=int, default=None,
                   help=f"random seed; the same seed gives the same image (default {e.seed})")
    p.add_argument("--resolution", type=int, default=None,
                   help=f"long side in pixels; both sides are rounded to multiples of 64 (default {e.resolution})")
    p.add_argument("--scheduler", default=None,
                   help=f"sampler (default {e.scheduler}): euler_ancestral, euler, ddim, dpmpp_2m, heun, lms, pndm, "
                        "unipc, ... or any diffusers scheduler class name")
    p.add_argument("--num-images", type=int, default=None, help=f"variants to make in one batch (default {e.num_images})")
    p.add_argument("--device", default=None, help=f"auto, cpu, cuda, cuda:N (default {d.device})")
    p.add_argument("--dtype", default=None, help=f"float32, float16, bfloat16 (default {d.dtype})")
    p.add_argument("--autocast", default=None,
                   help="bfloat16 or float16: the UNet under torch.autocast, weights stay in --dtype "
                        "(bfloat16 is faster on CPUs with AMX); none: off (default)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


# An original single-file checkpoint carries no configs; without --model-config its components are
# configured like the released editor (the `ip2p` preset's single_file_config), the only model of
# that layout in the wild.
SINGLE_FILE_DEFAULT_PRESET = "ip2p"


def _compose_for(model: str | None, extra: list[str], model_config: str | None = None):
    from omegaconf import open_dict

    from ip2p.config import compose
    from ip2p.models.loader import SINGLE_FILE_SUFFIXES

    overrides, checkpoint = _model_overrides(model)
    single_file = checkpoint is not None and checkpoint.lower().endswith(SINGLE_FILE_SUFFIXES)
    if single_file and model_config is None:
        overrides = [f"model={SINGLE_FILE_DEFAULT_PRESET}"]
    cfg = compose(overrides + extra)
    with open_dict(cfg):
        if checkpoint is not None:
            cfg.model.editor = checkpoint
        if model_config is not None:
            cfg.model.single_file_config.editor = model_config
    return cfg


def cmd_edit(argv: list[str]) -> int:
    args = _edit_parser().parse_args(argv)
    from omegaconf import open_dict

    from ip2p.editing.run import run

    cfg = _compose_for(args.model, [], args.model_config)
    flags = {"steps": args.steps, "text_guidance": args.text_guidance, "image_guidance": args.image_guidance,
             "seed": args.seed, "resolution": args.resolution, "scheduler": args.scheduler,
             "num_images": args.num_images}
    # A trained editor's card names the settings it was tuned at: they replace the config's defaults, and
    # a flag given here replaces them
    from ip2p.models.model_card import sampling_defaults

    tuned = sampling_defaults(cfg.model.editor) if cfg.model.get("editor") else {}
    with open_dict(cfg):
        cfg.edit.input = args.input
        cfg.edit.instruction = args.instruction
        if args.output:
            cfg.edit.output = args.output
        for key, value in flags.items():
            if value is not None:
                cfg.edit[key] = value
            elif key in tuned:
                cfg.edit[key] = tuned[key]
        if args.device:
            cfg.device = args.device
        if args.dtype:
            cfg.dtype = args.dtype
        if args.autocast:
            cfg.autocast = args.autocast
        cfg.progress = not args.no_progress
    check_config(cfg, {f"edit.{key}": "--" + key.replace("_", "-") for key in flags})
    for path in run(cfg):
        print(path)
    return 0


def cmd_export(argv: list[str]) -> int:
    d = _configured()
    p = argparse.ArgumentParser(prog="ip2p export",
                                description="Write the editor as a diffusers StableDiffusionInstructPix2PixPipeline folder.")
    p.add_argument("outdir", help="folder to write (replaced if it exists)")
    p.add_argument("--model", default=None,
                   help=f"preset name or checkpoint, as for `ip2p edit` (default: {d.model.name})")
    p.add_argument("--model-config", default=None, help="for a .ckpt/.safetensors --model: as for `ip2p edit`")
    p.add_argument("--scheduler", default=d.train.export.scheduler,
                   help="scheduler class stored in the folder (default: %(default)s, as train.export.scheduler)")
    p.add_argument("--metrics", nargs="*", default=[],
                   help="JSON reports (e.g. reports/world_eval.json) whose numbers the model card lists as measured")
    p.add_argument("--unet", default=None,
                   help="a checkpoint `ip2p train` saved (step-N.ckpt): its EMA UNet replaces --model's, the card "
                        "(--model's, if any) counts its steps and drops numbers measured on another step")
    args = p.parse_args(argv)
    from ip2p.models.export import export_pipeline
    from ip2p.models.loader import load_diffusion
    from ip2p.models.model_card import card_for_export

    cfg = _compose_for(args.model, [], args.model_config)
    components = load_diffusion(cfg.model.editor, "editor", cfg.model, cfg.paths.cache, "cpu", "float32")
    unet, steps = None, None
    if args.unet:
        from ip2p.training.module import unet_from_checkpoint

        unet, steps = unet_from_checkpoint(args.unet, components.unet.config)
    card = card_for_export(cfg.model.editor, args.metrics, steps)  # the source's card (if any) with these numbers
    print(export_pipeline(components, args.outdir, scheduler=args.scheduler, card=card, unet=unet))
    return 0


def cmd_promote(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ip2p promote",
                                description="Move a registry alias (e.g. candidate -> champion) in MLflow.")
    p.add_argument("--alias", default="champion", help="alias to set (default: champion)")
    p.add_argument("--version", default=None, help="model version to point it at (default: the --from alias')")
    p.add_argument("--from", dest="from_alias", default="candidate", help="alias whose version is promoted")
    p.add_argument("--name", default=None, help="registered model name (default: register.name)")
    args = p.parse_args(argv)
    from ip2p.config import compose
    from ip2p.io.loggers import mlflow_tracking_uri
    from ip2p.tracking.registry import promote

    cfg = compose([])
    name = args.name or cfg.register.name
    version = promote(mlflow_tracking_uri(cfg), name, args.alias, args.version, args.from_alias)
    print(f"models:/{name}@{args.alias} -> version {version}")
    return 0


def cmd_params(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ip2p params",
                                description="Write the composed, resolved configuration (DVC's params.yaml).")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=small filter.top_k=2")
    p.add_argument("-o", "--output", default="params.yaml", help="file to write (default: params.yaml)")
    args = p.parse_args(argv)
    from ip2p.config import compose, composed_params
    from ip2p.io.atomic import atomic_write_text

    atomic_write_text(args.output, composed_params(compose(args.overrides)))
    print(args.output)
    return 0


def sweep_objective(result, key: str | None):
    """What Hydra gets back from a job: the stage's result, or one number of it for an optimising sweeper."""
    if key is None:
        return result
    if not isinstance(result, dict) or result.get(key) is None:
        raise Ip2pError(f"sweep_objective={key}: the stage's result has no value for it "
                        f"(available: {sorted(result) if isinstance(result, dict) else 'none'})")
    return float(result[key])


def cmd_stage(name: str, argv: list[str]) -> int:
    """Run a stage under Hydra's own entry point, so -m (multirun), launchers and sweepers all work.

    With `--params FILE` (what dvc.yaml uses) the stage reads that composed file instead, so that
    `dvc exp run -S key=value` (which rewrites params.yaml through DVC's Hydra composition) reaches it.
    """
    import hydra

    from ip2p.config import config_dir

    module_name, func_name = STAGES[name].split(":")
    stage_run = getattr(importlib.import_module(module_name), func_name)

    if argv[:1] == ["--params"]:
        from omegaconf import OmegaConf

        if len(argv) < 2 or not Path(argv[1]).is_file():
            raise Ip2pError("--params needs an existing YAML file (e.g. params.yaml from `ip2p params`)")
        cfg = OmegaConf.merge(OmegaConf.load(argv[1]), OmegaConf.from_dotlist(argv[2:]))
        # Machine-local locations follow the environment, as conf/ does with ${oc.env:...}: params.yaml
        # is shared through git, the cache folder and tracking server are not.
        for variable, key in PARAMS_ENV_OVERRIDES.items():
            if os.environ.get(variable):
                OmegaConf.update(cfg, key, os.environ[variable], force_add=True)
        check_config(cfg)
        stage_run(cfg)
        return 0

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    def _main(cfg):
        try:
            check_config(cfg)
            result = stage_run(cfg)
            return sweep_objective(result, cfg.get("sweep_objective"))
        except (Ip2pError, OSError) as err:
            line = one_line(err)
            if line is None:
                raise
            print(f"ip2p {name}: error: {line}", file=sys.stderr)
            sys.exit(1)

    sys.argv = [f"ip2p-{name}", *argv, f"hydra.job.name={name}"]
    _main()
    return 0


def cmd_app(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ip2p app", description="The web editor: upload, instruct, edit, edit again.",
                                epilog="Example: ip2p app experiment=mini --model artifacts/model")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=mini app.steps=20")
    p.add_argument("--model", default=None,
                   help="the editor shown first: preset (tiny, mini, ip2p), diffusers folder, checkpoint file, "
                        "hub id or models:/NAME@ALIAS (default: the composed model preset)")
    p.add_argument("--model-config", default=None, help="for a .ckpt/.safetensors --model: as for `ip2p edit`")
    d = _configured().app
    p.add_argument("--host", default=None, help=f"address to bind (default {d.host}; 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help=f"port (default {d.port})")
    args = p.parse_args(argv)
    from omegaconf import open_dict

    from ip2p.editing.app import cleanup, launch

    cfg = _compose_for(args.model, args.overrides, args.model_config)
    with open_dict(cfg):
        if args.host:
            cfg.app.host = args.host
        if args.port is not None:
            cfg.app.port = args.port
    check_config(cfg, {"app.host": "--host", "app.port": "--port"})
    default = args.model if args.model and args.model_config is None else str(cfg.model.name if args.model is None
                                                                                else cfg.model.editor)
    from ip2p.world.cases import app_examples

    page, app, _ = launch(cfg, default, examples=app_examples)
    cleanup(app)
    return 0


# Environment variables that win over params.yaml (the same ones conf/ reads with ${oc.env:...}).
PARAMS_ENV_OVERRIDES = {"IP2P_CACHE": "paths.cache", "MLFLOW_TRACKING_URI": "logger.mlflow.tracking_uri"}

COMMANDS = {"edit": cmd_edit, "app": cmd_app, "export": cmd_export, "promote": cmd_promote, "params": cmd_params}


def _usage() -> str:
    lines = ["usage: ip2p COMMAND [ARGS]", "", "commands:",
             "  edit       edit an image with an instruction (ip2p edit --help)",
             "  app        the web editor in a browser (ip2p app --help)",
             "  export     write the editor as a diffusers pipeline folder (ip2p export --help)",
             "  promote    move a model-registry alias, e.g. candidate -> champion (ip2p promote --help)",
             "  params     write the composed configuration to params.yaml (for DVC; ip2p params --help)"]
    for stage in STAGES:
        lines.append(f"  {stage:<10} pipeline stage; Hydra overrides, -m for multirun (ip2p {stage} --help)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        if command in COMMANDS:
            return COMMANDS[command](rest)
        if command in STAGES:
            return cmd_stage(command, rest)
        print(f"ip2p: error: unknown command '{command}'\n{_usage()}", file=sys.stderr)
        return 2
    except (Ip2pError, OSError) as err:
        line = one_line(err)
        if line is None:
            raise
        print(f"ip2p {command}: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ip2p {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
