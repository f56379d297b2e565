# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Inference runtimes for the merged model's image encoder, the part that costs nearly all of a CPU forward.

A merged SamParser is a stock SAM, so its image encoder can be prepared for inference like any stock network.
:func:`use_runtime` offers three runtimes for it and leaves the prompt encoder and mask decoder in PyTorch, where they
are cheap:

- ``torch`` (default): PyTorch, prepared for inference (:class:`TorchImageEncoder`): each convolution's batch norm
  folded into its weights, channels-last memory (oneDNN's native layout: no reorder around every convolution) and,
  on the CPU, one image at a time (LiteMedSAM's activations at batch 8 outgrow the CPU caches: 2.5 s an image against
  1.0 s). The same embeddings as ``eager`` up to float rounding (relative difference ~1e-6).
- ``torch-bf16``: the same in bfloat16 autocast, and the mask decoder's two-way transformer too (a fifth of a
  label-prompted case once the encoder is fast), for CPUs with native bfloat16 (``avx512_bf16`` or AMX: recent AMD
  and Intel server and some laptop parts); embeddings differ by a few percent, so check the masks on your data
  (docs/benchmarks.md has the Dice against fp32). Elsewhere it is emulated and slower: a warning says so.
- ``eager``: the network exactly as built (PyTorch eager fp32 in the caller's batches), the reference.
- ``onnxruntime``: the encoder exported to ONNX and run by an onnxruntime session.

For ``onnxruntime``, the exported file is cached once per encoder: its name holds a hash of the encoder's weights, so a
new checkpoint gets a new file and an old one is never used for it. onnxruntime is an optional extra
(``pip install 'samparser-monai[cpu]'``).

Measured on a 2-core CPU with LiteMedSAM, see ``scripts/benchmark_runtimes.py`` and docs/benchmarks.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import optional_import
from torch import nn

from samparser_monai.files import staged_file

__all__ = [
    "RUNTIMES",
    "OnnxImageEncoder",
    "TorchImageEncoder",
    "autocast_forward",
    "default_cache_dir",
    "encoder_fingerprint",
    "fuse_conv_batchnorm",
    "native_bfloat16",
    "runtime_cache_dir",
    "set_threads",
    "use_runtime",
]

logger = logging.getLogger(__name__)

#: ``--runtime`` choices: PyTorch prepared for inference (default), PyTorch as built, or onnxruntime (``cpu`` extra)
RUNTIMES = ("torch", "torch-bf16", "eager", "onnxruntime")

_MISSING = (
    "--runtime onnxruntime needs the onnxruntime and onnx packages, which are not installed: pip install "
    "'samparser-monai[cpu]' (or use --runtime torch)."
)


def encoder_fingerprint(encoder: nn.Module) -> str:
    """Hash of every tensor of ``encoder`` (names, shapes, dtypes and values): equal only for equal weights."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in encoder.state_dict().items():
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Where exported encoders go when no folder is given: ``$SAMPARSER_CACHE`` or ``~/.cache/samparser_monai``."""
    return Path(os.environ.get("SAMPARSER_CACHE") or Path.home() / ".cache" / "samparser_monai")


def runtime_cache_dir(checkpoint: str | os.PathLike | None = None) -> Path:
    """Where to keep the exported encoder of a model: next to its coefficient ``checkpoint`` (``.runtime_cache/``
    in its folder, when that folder is writable), else :func:`default_cache_dir`."""
    if checkpoint:
        folder = Path(checkpoint).resolve().parent
        if os.access(folder, os.W_OK):
            return folder / ".runtime_cache"
    return default_cache_dir()


def set_threads(threads: int | None = None) -> int:
    """Let PyTorch use ``threads`` intra-op threads (default: every core this process may run on); returns it."""
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def fuse_conv_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` in an ``nn.Sequential`` (TinyViT's
    ``Conv2d_BN``) into the convolution's weights, in place; the norm becomes ``Identity``. Returns how many.

    Inference only: the folded convolution computes what conv + norm computed with the norm's running statistics.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = 0
    for parent in list(module.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and not norm.training:
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(parent, norm_name, nn.Identity())
                fused += 1
    return fused


class TorchImageEncoder(nn.Module):
    """A merged image encoder prepared for inference in PyTorch, called like the encoder it wraps.

    Batch norms are folded into their convolutions (:func:`fuse_conv_batchnorm`) and the weights use channels-last
    memory. On the CPU a batch runs image by image (``cpu_batch``): LiteMedSAM's activations at batch 8 outgrow the
    CPU caches, and one image at a time took 1.0 s an image against 2.5 s on 2 cores (docs/benchmarks.md). On a GPU
    the batch runs whole. The embeddings equal the wrapped encoder's up to float rounding.

    Args:
        encoder: the image encoder of a merged model, in eval mode (changed in place).
        cpu_batch: images per forward on the CPU.
        autocast_dtype: run under ``torch.autocast`` in this dtype (``torch.bfloat16``), except the patch embedding,
            which sees the image itself and stays in fp32 at no cost in speed (the masks agree more closely with fp32's:
            docs/benchmarks.md, "Inference runtimes"); the embeddings come back in the input's dtype. None: fp32.
    """

    def __init__(self, encoder: nn.Module, cpu_batch: int = 1, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.fused = fuse_conv_batchnorm(encoder.eval())
        self.encoder = encoder.to(memory_format=torch.channels_last)
        self.cpu_batch = cpu_batch
        self.autocast_dtype = autocast_dtype
        if autocast_dtype is not None and hasattr(encoder, "patch_embed"):
            autocast_forward(encoder.patch_embed, None)  # the image itself in bfloat16 loses most: keep it in fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``x`` (``B x 3 x S x S``, preprocessed), contiguous as the wrapped encoder returns them."""
        step = self.cpu_batch if x.device.type == "cpu" else x.shape[0]
        out = []
        with torch.autocast(x.device.type, self.autocast_dtype or torch.bfloat16, self.autocast_dtype is not None):
            for i in range(0, x.shape[0], step):
                out.append(self.encoder(x[i : i + step].contiguous(memory_format=torch.channels_last)).contiguous())
        out = out[0] if len(out) == 1 else torch.cat(out)
        return out.to(x.dtype)


def _autocast_call(forward: Callable, dtype: torch.dtype | None, *args: Any, **kwargs: Any) -> Any:
    """``forward(*args, **kwargs)`` under ``torch.autocast`` in ``dtype`` (None: autocast off, float inputs in
    float32); floating outputs back in float32."""
    device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    if dtype is None:
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    with torch.autocast(device, dtype or torch.bfloat16, enabled=dtype is not None):
        out = forward(*args, **kwargs)
    if isinstance(out, tuple):
        return tuple(o.float() if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out)
    return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def autocast_forward(module: nn.Module, dtype: torch.dtype | None = torch.bfloat16) -> nn.Module:
    """Run ``module``'s forward under ``torch.autocast`` in ``dtype`` (None: in float32, even inside an autocast
    region), its float outputs in float32, in place; its submodules, names and state-dict keys stay as they are.
    Returns ``module``."""
    module.forward = partial(_autocast_call, module.forward, dtype)
    return module


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo; Linux x86)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class OnnxImageEncoder(nn.Module):
    """An exported image encoder run by onnxruntime, called like the PyTorch one (``B x 3 x S x S`` in, embeddings
    out, on the input's device). The graph is exported for one image, so a batch runs image by image.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads of the session (default: every core).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        ort, found = optional_import("onnxruntime")
        if not found:
            raise ImportError(_MISSING)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or set_threads(None)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = os.fspath(path)
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``x`` (``B x 3 x S x S``, preprocessed as for the PyTorch encoder)."""
        images = x.detach().float().cpu().numpy()
        out = [self.session.run(None, {self.input_name: images[i : i + 1]})[0] for i in range(images.shape[0])]
        return torch.from_numpy(np.concatenate(out)).to(x.device)


def _runtime_of(encoder: nn.Module) -> str | None:
    """The runtime an encoder was prepared for by :func:`use_runtime`, None for one as built."""
    if isinstance(encoder, OnnxImageEncoder):
        return "onnxruntime"
    if isinstance(encoder, TorchImageEncoder):
        return "torch" if encoder.autocast_dtype is None else "torch-bf16"
    return None


def export_image_encoder(encoder: nn.Module, path: str | os.PathLike, image_size: int) -> Path:
    """Export ``encoder`` (in eval mode) to ONNX at ``path`` for one ``3 x image_size x image_size`` image.

    Written under a temporary name and renamed into place, so a cut-off export never leaves a broken cache file.
    """
    if not optional_import("onnx")[1]:
        raise ImportError(_MISSING)
    path = Path(path)
    example = torch.zeros(1, 3, image_size, image_size)
    with staged_file(path) as partial, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes it freezes (the batch of one is intended)
        torch.onnx.export(
            encoder.eval(), (example,), partial, input_names=["image"], output_names=["embedding"],
            opset_version=17, dynamo=False,
        )  # fmt: skip
    return path


def use_runtime(
    model: nn.Module, runtime: str = "torch", threads: int | None = None, cache_dir: str | os.PathLike | None = None
) -> nn.Module:
    """Run ``model``'s image encoder in ``runtime`` (one of :data:`RUNTIMES`); returns the model, changed in place.

    ``onnxruntime`` exports the encoder once to ``<cache_dir>/<backbone>-encoder-<weights hash>.onnx`` (default
    :func:`default_cache_dir`) and reuses the file on later calls with the same weights. Call it on a merged model in
    eval mode; the model is then for inference only (its encoder has no parameters left to train).

    Raises:
        ValueError: an unknown runtime.
        ImportError: onnxruntime or onnx is missing (one sentence with the install command).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"Unknown runtime {runtime!r}; use one of {list(RUNTIMES)}.")
    threads = set_threads(threads)
    current = _runtime_of(model.image_encoder)
    if current == runtime or (current is None and runtime == "eager"):
        return model
    if current is not None:
        raise ValueError(
            f"This model's image encoder already runs in runtime {current!r}; build the model again for {runtime!r}."
        )
    if runtime == "torch":
        model.image_encoder = TorchImageEncoder(model.image_encoder)
        return model
    if runtime == "torch-bf16":
        if not native_bfloat16() and next(model.parameters()).device.type == "cpu":
            logger.warning("this CPU has no native bfloat16 (avx512_bf16 or AMX): --runtime torch-bf16 will be slower "
                           "than --runtime torch here")  # fmt: skip
        model.image_encoder = TorchImageEncoder(model.image_encoder, autocast_dtype=torch.bfloat16)
        autocast_forward(model.mask_decoder.transformer, torch.bfloat16)
        return model
    if not optional_import("onnxruntime")[1]:
        raise ImportError(_MISSING)
    encoder = model.image_encoder
    name = f"{getattr(model, 'backbone', 'sam')}-encoder-{encoder_fingerprint(encoder)[:20]}-{model.image_size}.onnx"
    path = Path(cache_dir or default_cache_dir()) / name
    if not path.is_file():
        logger.info("exporting the image encoder to %s (once per checkpoint)", path)
        export_image_encoder(encoder, path, model.image_size)
    model.image_encoder = OnnxImageEncoder(path, threads)
    return model
