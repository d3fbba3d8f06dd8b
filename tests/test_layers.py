"""Every import points down: a module imports only its own package or packages of a lower layer
(docs/architecture.md). Read from the source with `ast`, so imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ip2p"

# Lowest first. A module's layer is that of its longest matching prefix.
LAYERS = [
    ("ip2p.errors",),                                            # the bottom: the one user-facing exception
    ("ip2p.config",),                                            # composing settings
    ("ip2p.io",),                                                # files: atomic writes, JSONL, images, figures; run logging;
                                                                 # the pair-folder and Parquet formats
    ("ip2p.sampling",),                                          # schedulers, guidance, the denoising loop
    ("ip2p.models",),                                            # loading, presets, the editing pipeline, export, EMA
    ("ip2p.scoring", "ip2p.checks"),                             # CLIP scores, settings checks
    ("ip2p.data",),                                              # 1-2 captions, instructions, LM fine-tuning
    ("ip2p.synthesis",),                                         # 3 Prompt-to-Prompt pairs
    ("ip2p.filtering",),                                         # 4 CLIP filter -> dataset
    ("ip2p.training",),                                          # 5 the editor
    ("ip2p.evaluation",),                                        # 6 guidance grid
    ("ip2p.editing", "ip2p.tracking"),                           # 7 editing, registry, serving
    # the miniature world, one subtree above every stage: nothing below imports it (the CLI, beside its
    # judges, dispatches its commands)
    ("ip2p.world",),                                             # its core: scenes, render, language, oracle
    ("ip2p.world.pretrain",),                                    # its foundation models
    ("ip2p.world.judges", "ip2p.cli"),                           # its judges of the whole chain; the entry point
]


def layer_of(module: str) -> tuple[int, str]:
    """(layer, the prefix that placed it): the longest prefix wins (a module named on its own row over its package)."""
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    if best is None:
        raise AssertionError(f"{module} has no layer in tests/test_layers.py")
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


TOP_PACKAGE = "ip2p"  # src/ip2p/__init__.py: the version only, imports nothing of ours


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ip2p")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ip2p") and node.level == 0:
            found.add(node.module)
            # `from ip2p.world.pretrain import vae` imports the submodule ip2p.world.pretrain.vae
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if (SRC.parent / (node.module + "." + a.name).replace(".", "/")).with_suffix(".py").exists()}
    return found


MODULES = sorted(p for p in SRC.rglob("*.py") if module_name(p) != TOP_PACKAGE)


def test_every_module_has_a_layer():
    for path in MODULES:
        layer_of(module_name(path))
    assert not imports_of(SRC / "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    me = module_name(path)
    my_layer, my_prefix = layer_of(me)
    for target in imports_of(path):
        if target == "ip2p":
            continue
        layer, prefix = layer_of(target)
        same_package = prefix == my_prefix
        assert same_package or layer < my_layer, (
            f"{me} (layer {my_layer}, {my_prefix}) imports {target} (layer {layer}, {prefix}): imports must point down")


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: a stage importing a later stage, and a lower layer importing a higher one."""
    assert layer_of("ip2p.synthesis.run")[0] < layer_of("ip2p.filtering.run")[0]
    assert layer_of("ip2p.io.loggers")[0] < layer_of("ip2p.training.run")[0] < layer_of("ip2p.tracking.registry")[0]
    # the world above every stage: checks or the app importing its vocabulary would point up
    assert layer_of("ip2p.checks")[0] < layer_of("ip2p.editing.app")[0] < layer_of("ip2p.world.vocab")[0]
    assert layer_of("ip2p.world.vocab")[0] < layer_of("ip2p.world.pretrain.t2i")[0] < layer_of("ip2p.world.judges.demo")[0]
    fake = SRC / "synthesis" / "run.py"
    source = ast.parse("from ip2p.evaluation.grid import Cell\nimport ip2p.cli\n")
    names = {n.module for n in ast.walk(source) if isinstance(n, ast.ImportFrom)} | \
            {a.name for n in ast.walk(source) if isinstance(n, ast.Import) for a in n.names}
    me_layer = layer_of(module_name(fake))[0]
    assert all(layer_of(n)[0] > me_layer for n in names)


WORLD_CORE_MAY_IMPORT = ("ip2p.errors", "ip2p.config", "ip2p.io", "ip2p.checks", "ip2p.world")


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_nothing_outside_the_world_imports_it():
    """The world is a data source like LAION: the stages, models and plumbing never import it; only its
    own subtree and the entry point (which dispatches the world's commands) do."""
    offenders = [f"{module_name(p)} imports {t}" for p in MODULES
                 if not _in_package(module_name(p), "ip2p.world") and module_name(p) != "ip2p.cli"
                 for t in imports_of(p) if _in_package(t, "ip2p.world")]
    assert not offenders, offenders


def test_the_worlds_core_knows_no_models():
    """The core (scenes, render, language, oracle, verdict, cases, rules) imports only the plumbing, the
    checks' rule helpers and itself; what trains or judges models sits in world.pretrain and world.judges."""
    core = [p for p in MODULES if _in_package(module_name(p), "ip2p.world")
            and not any(_in_package(module_name(p), f"ip2p.world.{sub}") for sub in ("pretrain", "judges"))]
    assert len(core) >= 8
    offenders = [f"{module_name(p)} imports {t}" for p in core for t in imports_of(p)
                 if not any(_in_package(t, allowed) for allowed in WORLD_CORE_MAY_IMPORT)
                 or any(_in_package(t, f"ip2p.world.{sub}") for sub in ("pretrain", "judges"))]
    assert not offenders, offenders
