"""Locating and composing the Hydra configuration outside of a Hydra-decorated entry point."""

from __future__ import annotations

import os
from pathlib import Path

from typing import TYPE_CHECKING

from ip2p.errors import Ip2pError

if TYPE_CHECKING:  # omegaconf is imported lazily: light tools (bench/) run without it
    from omegaconf import DictConfig


def config_dir() -> Path:
    """`conf/` of the project: $IP2P_CONF, else the checkout this package was installed from, else ./conf."""
    candidates = [os.environ.get("IP2P_CONF"), Path(__file__).resolve().parents[2] / "conf", Path.cwd() / "conf"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.yaml").is_file():
            return Path(candidate).resolve()
    raise Ip2pError("cannot find the configuration folder conf/ (set IP2P_CONF to its path)")


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides, as the stage commands do (no run folder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    except HydraException as err:
        raise Ip2pError(f"cannot compose the configuration: {first_line(err)}") from err


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception (or of its causes), for one-line error messages."""
    while err is not None:
        for line in str(err).splitlines():
            if line.strip():
                return line.strip()
        err = err.__cause__ or err.__context__
    return "unknown error"


def available_presets(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
