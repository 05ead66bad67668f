"""Putting PixelLLM into a FiftyOne setup: ``install_plugin`` and the command line
``python -m pixelllm_plugins.integrations.fiftyone install-plugin|install-zoo``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import fiftyone as fo

from ...errors import PixelLLMError
from .zoo import install_zoo_source


def plugin_source_dir() -> Path:
    """The folder of the installed ``fiftyone_plugin`` package (holds ``fiftyone.yml``)."""
    import importlib.util

    spec = importlib.util.find_spec("fiftyone_plugin")
    if spec is None or not spec.submodule_search_locations:
        raise PixelLLMError("the fiftyone_plugin package is not installed; pip install 'pixelllm-plugins[fiftyone]'")
    return Path(next(iter(spec.submodule_search_locations)))


def install_plugin(plugins_dir: str | os.PathLike | None = None, *, copy: bool = False) -> Path:
    """Link (or copy) the plugin into ``plugins_dir`` (default ``fo.config.plugins_dir``) as ``pixelllm``."""
    root = Path(plugins_dir or fo.config.plugins_dir or Path.home() / "fiftyone" / "__plugins__")
    root.mkdir(parents=True, exist_ok=True)
    target = root / "pixelllm"
    source = plugin_source_dir()
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    if copy:
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        target.symlink_to(source, target_is_directory=True)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pixelllm_plugins.integrations.fiftyone install-plugin|install-zoo [--dir D] [--copy]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pixelllm_plugins.integrations.fiftyone",
                                     description="Install the PixelLLM FiftyOne plugin and model-zoo source")
    parser.add_argument("command", choices=["install-plugin", "install-zoo"])
    parser.add_argument("--dir", default=None, help="plugins dir / model zoo dir (default: FiftyOne config)")
    parser.add_argument("--copy", action="store_true", help="copy the plugin instead of linking it")
    args = parser.parse_args(argv)
    if args.command == "install-plugin":
        print(install_plugin(args.dir, copy=args.copy))
    else:
        print(install_zoo_source(args.dir))
    return 0
