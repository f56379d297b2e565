# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The 3D prompt engine: one ROI, one key-slice box or a few clicks per object become a 3D mask.

Each object starts on one slice from the user's prompt and is carried slice by slice in both directions, every next
slice prompted with the box of the previous slice's mask grown by a margin (the CVPR 2024 "MedSAM on laptop" 3D
protocol). A direction stops by the :class:`StopRule` (mask area against the start slice's, SAM's predicted IoU,
overlap with the previous mask, distance), and never leaves an ROI's z-range or in-plane extent. Slices that hold an
object's own clicks are prompted with the propagated box plus those clicks. A slice with a positive click is always
kept, so later clicks refine their slice and the propagation continues from the corrected mask; a slice with negative
clicks only (a leak the user removed) still faces the stop rule, so the direction can end there. A positive click on
a slice that no propagation reached (past where the object's masks stopped) starts the object again there, from its
clicks, once propagation has stopped everywhere; that start propagates both ways until it meets the object's other
masks.

Several objects in one volume share every encoded slice (each slice goes through the encoder once per call).
Where two objects claim a voxel, the higher logit wins (an exact tie: the lower label id), whatever the order of the
objects, except on a slice where an object was prompted by the user (its start slice or a slice with its positive
click): there the user's object keeps every voxel it claims, so propagating one label never erases another label's
key slice.

    engine = PromptEngine(model, axis=2)
    result = engine.segment(image, [ObjectPrompt(label=1, slice=17, box=torch.tensor([20., 30., 41., 52.]))])
    result.labels      # X x Y x Z label map;  result.encoded: slices that went through the encoder
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from samparser_monai.engines.embedding_cache import encode_slices
from samparser_monai.engines.stop_rule import (
    FINE_TUNED_PAD,
    FINE_TUNED_ROI_OVERLAP,
    StopRule,
    add_stop_rule_arguments,
    stop_rule_from_args,
)
from samparser_monai.networks.param_groups import unwrap_model
from samparser_monai.networks.sam import plain_tensor
from samparser_monai.transforms.box_prompts import grow_box, mask_to_box
from samparser_monai.transforms.mask_prompts import NO_MASK, morph_mask

__all__ = [  # the stop rule's names too: they were defined here first
    "FINE_TUNED_PAD",
    "FINE_TUNED_ROI_OVERLAP",
    "ObjectPrompt",
    "PromptEngine",
    "PromptResult",
    "StopRule",
    "add_stop_rule_arguments",
    "stop_rule_from_args",
]


@dataclass
class ObjectPrompt:
    """One object's prompt, in voxel coordinates of the oriented volume the network sees.

    Attributes:
        label: label id written for the object.
        slice: index of the start slice along the engine's axis.
        box: ``(x0, y0, x1, y1)`` on the start slice (x along the last axis of a slice), or ``None``.
        points: clicks as ``P x 3`` ``(x, y, slice)``, or ``None``; clicks on the start slice prompt it, clicks on
            other slices refine those slices when propagation reaches them.
        point_labels: ``P`` values, 1 a positive click, 0 a negative one (default all positive).
        z_range: ``(first, last)`` slices the object may occupy (an ROI), or ``None`` for the whole volume.
        clip: ``(x0, y0, x1, y1)`` every propagated box is clipped to (an ROI's in-plane extent), or ``None``.
    """

    label: int
    slice: int
    box: torch.Tensor | None = None
    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    z_range: tuple[int, int] | None = None
    clip: torch.Tensor | None = None

    def clicks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P x 3 (x, y, slice), P labels)`` of all the object's clicks (``P`` = 0 without any)."""
        if self.points is None:
            return torch.zeros(0, 3), torch.zeros(0)
        points = torch.as_tensor(self.points, dtype=torch.float32).reshape(-1, 3)
        labels = torch.ones(len(points)) if self.point_labels is None else torch.as_tensor(self.point_labels).float()
        return points, labels.reshape(-1)

    def positive_click_on(self, index: int) -> bool:
        """Whether slice ``index`` holds a positive click of this object (the user says the object is there)."""
        clicks = self.clicks_on(index)
        return clicks is not None and bool((clicks[1] > 0).any())

    def clicks_on(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(P x 2 (x, y), P labels)`` of the clicks on slice ``index``, or ``None``."""
        points, labels = self.clicks()
        on = points[:, 2].round().long() == index
        return (points[on, :2], labels[on]) if bool(on.any()) else None


@dataclass
class PromptResult:
    """What :meth:`PromptEngine.segment` produced.

    Attributes:
        labels: ``X x Y x Z`` int64 label map.
        encoded: slice indices that went through the image encoder in this call (each once).
        slices: per object (in the order given), the slices where its mask was kept.
        stops: per object, why each direction stopped (``"area"``, ``"growth"``, ``"iou"``, ``"overlap"``,
            ``"claimed"``, ``"distance"``, ``"roi"``, ``"empty"``, ``"volume"``, ``"met"``: reached the object's
            masks from another start); ``"click-roi"`` / ``"click-volume"``...: a click no propagation reached, outside
            the object's ROI or the volume, so it started nothing.
        trace: per object, one row per decoded slice: ``slice``, ``direction``, ``area`` (pixels), ``area_fraction``
            (of the start slice's), ``iou`` (SAM's prediction), ``overlap`` (share of the mask on the previous
            slice's), ``claimed`` (share of the mask on other objects' masks kept nearer their starts) and ``stop``
            (the reason, or "" when kept): what a stop rule is chosen from.
    """

    labels: torch.Tensor
    encoded: list[int] = field(default_factory=list)
    slices: list[list[int]] = field(default_factory=list)
    stops: list[list[str]] = field(default_factory=list)
    trace: list[list[dict]] = field(default_factory=list)


@dataclass
class _Front:
    index: int  # which object
    slice: int
    box: torch.Tensor | None
    direction: int  # 0 at the start slice, -1 / +1 when propagating
    previous: torch.Tensor | None = None  # the previous slice's mask
    start_area: int = 0  # pixels of the mask on the slice this front started from
    distance: int = 0  # slices from that start


class PromptEngine:
    """Segments objects from :class:`ObjectPrompt` prompts in a ``C x X x Y x Z`` volume, slice by slice.

    Args:
        network: a :class:`~samparser_monai.networks.SamParser` (or a DDP wrapper of one) in eval mode; merge it first
            for stock speed.
        axis: spatial axis of the slices.
        batch_size: slices per encoder pass.
        rule: the :class:`StopRule` of propagation.
    """

    def __init__(self, network: nn.Module, axis: int = 2, batch_size: int = 8, rule: StopRule | None = None) -> None:
        self.network, self.axis, self.batch_size = network, axis, batch_size
        self.rule = rule or StopRule()

    @torch.no_grad()
    def segment(
        self, image: torch.Tensor, objects: Sequence[ObjectPrompt], embeddings: dict[int, torch.Tensor] | None = None
    ) -> PromptResult:
        """Segment every object; see the module docstring for propagation and for voxels two objects claim.

        Args:
            image: ``C x X x Y x Z`` volume, intensities in [0, 1].
            objects: one prompt per object.
            embeddings: slice index -> image embedding of *this* image, kept by the caller across calls (a second
                prompt on the same image then encodes only slices it has not seen); ``None``: a fresh one per call.

        Raises:
            ValueError: an object whose start slice lies outside the volume, or with neither a box nor a click there.
        """
        model = unwrap_model(self.network)
        image = plain_tensor(torch.as_tensor(image))
        n_slices = image.shape[self.axis + 1]
        for obj in objects:
            if not 0 <= obj.slice < n_slices:
                raise ValueError(
                    f"Object {obj.label} starts on slice {obj.slice}, outside the volume (0-{n_slices - 1})."
                )
            if obj.box is None and obj.clicks_on(obj.slice) is None:
                raise ValueError(f"Object {obj.label} has neither a box nor a click on its start slice {obj.slice}.")
        embeddings = {} if embeddings is None else embeddings
        before = set(embeddings)
        logits: list[dict[int, torch.Tensor]] = [{} for _ in objects]
        prompted: list[set[int]] = [set() for _ in objects]  # slices the user prompted, per object
        stops: list[list[str]] = [[] for _ in objects]
        trace: list[list[dict]] = [[] for _ in objects]
        started = [{obj.slice} for obj in objects]
        fronts = [_Front(i, obj.slice, obj.box, 0) for i, obj in enumerate(objects)]
        while fronts:  # one wave: every front is as far from its start as every other
            encode_slices(model, image, {f.slice for f in fronts}, self.axis, embeddings, self.batch_size)
            kept_earlier = [set(per_object) for per_object in logits]  # nearer their starts than this wave
            next_fronts = []
            for front, (slice_logits, iou) in zip(fronts, self._decode(model, image, objects, fronts, embeddings)):
                obj = objects[front.index]
                mask = slice_logits > 0
                clicked = obj.positive_click_on(front.slice)  # negative clicks alone do not exempt a slice
                in_roi = obj.z_range is not None
                claimed = self._claimed(front, mask, logits, kept_earlier)
                reason = self._stop_reason(front, mask, float(iou), front.start_area, clicked, in_roi, claimed)
                trace[front.index].append(self._trace_row(front, mask, float(iou), front.start_area, reason, claimed))
                if reason:
                    stops[front.index].append(reason)
                    continue
                logits[front.index][front.slice] = slice_logits
                if front.direction == 0 or clicked:
                    prompted[front.index].add(front.slice)
                start_area = int(mask.sum()) if front.direction == 0 else front.start_area
                box = self._next_box(mask, obj.clip)
                for step in (-1, 1) if front.direction == 0 else (front.direction,):
                    target = front.slice + step
                    reason = self._out_of_bounds(obj, target, n_slices)
                    if not reason and target in logits[front.index]:
                        reason = "met"  # reached a slice of this object segmented from another start
                    if reason:
                        stops[front.index].append(reason)
                    else:
                        next_fronts.append(_Front(front.index, target, box, step, mask, start_area, front.distance + 1))
            fronts = next_fronts or self._restarts(objects, logits, started, n_slices, stops)
        labels = self._fuse(image.shape[1:], objects, logits, prompted)
        slices = [sorted(per_object) for per_object in logits]
        return PromptResult(labels, sorted(set(embeddings) - before), slices, stops, trace)

    # ------------------------------------------------------------------------------------------------------ steps
    def _restarts(
        self,
        objects: Sequence[ObjectPrompt],
        logits: list[dict[int, torch.Tensor]],
        started: list[set[int]],
        n_slices: int,
        stops: list[list[str]],
    ) -> list[_Front]:
        """Once propagation has stopped everywhere: per object, a new start on its first slice with a positive click
        that no propagation reached (a click past where the object's masks ended), from the clicks alone."""
        fronts = []
        for i, obj in enumerate(objects):
            points, labels = obj.clicks()
            clicked = sorted({int(s) for s in points[labels > 0, 2].round().long().tolist()})
            for s in (s for s in clicked if s not in logits[i] and s not in started[i]):
                started[i].add(s)
                reason = self._out_of_bounds(obj, s, n_slices)
                if reason:  # outside the volume or the ROI: in ``stops`` (prompt files and MONAI Label refuse it first)
                    stops[i].append(f"click-{reason}")
                    continue
                fronts.append(_Front(i, s, None, 0))
                break
        return fronts

    def _decode(self, model, image, objects, fronts, embeddings) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Logits (on the CPU) and predicted IoU per front: box-only fronts in one batch, clicked slices one by one."""
        size = [d for i, d in enumerate(image.shape[1:]) if i != self.axis]
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(fronts)
        use_masks = self.rule.uses_mask_prompt(model)
        boxed = [i for i, f in enumerate(fronts) if objects[f.index].clicks_on(f.slice) is None]
        if boxed:
            emb = torch.stack([embeddings[fronts[i].slice] for i in boxed])
            boxes = torch.stack([fronts[i].box.float() for i in boxed]).to(emb.device)
            extra = (
                {"mask_prompt": torch.stack([self._mask_prompt(fronts[i], size) for i in boxed])} if use_masks else {}
            )
            masks, iou = model.decode_prompts(emb, size, box=boxes, **extra)
            for row, i in enumerate(boxed):
                out[i] = (masks[row].float().cpu(), iou[row].float().cpu())
        for i, front in enumerate(fronts):
            if out[i] is not None:
                continue
            points, point_labels = objects[front.index].clicks_on(front.slice)
            emb = embeddings[front.slice][None]
            box = None if front.box is None else front.box.float()[None].to(emb.device)
            # a single click is ambiguous: the stock SAM's three masks, the most confident kept
            multimask = box is None and len(points) == 1 and self.rule.click_multimask
            masks, iou = model.decode_prompts(
                emb,
                size,
                box=box,
                points=points[None].to(emb.device),
                point_labels=point_labels[None],
                multimask=multimask,
                **({"mask_prompt": self._mask_prompt(front, size)[None]} if use_masks else {}),
            )
            out[i] = (masks[0].float().cpu(), iou[0].float().cpu())
        return out  # type: ignore[return-value]

    def _mask_prompt(self, front: _Front, size: Sequence[int]) -> torch.Tensor:
        """The previous slice's mask, eroded by ``mask_shrink`` (unless that empties it), for a propagated front;
        "no mask" (-1) on a start slice."""
        if front.direction == 0 or front.previous is None:
            return torch.full(tuple(size), NO_MASK)
        return morph_mask(front.previous, -self.rule.mask_shrink).float()

    @staticmethod
    def _claimed(
        front: _Front, mask: torch.Tensor, logits: list[dict[int, torch.Tensor]], kept_earlier: list[set[int]]
    ) -> float:
        """Share of ``mask`` on other objects' masks of the same slice kept in earlier waves (nearer their starts)."""
        area = int(mask.sum())
        others = [
            logits[j][front.slice] > 0
            for j, kept in enumerate(kept_earlier)
            if j != front.index and front.slice in kept
        ]
        if not area or not others:
            return 0.0
        return int((mask & torch.stack(others).any(dim=0)).sum()) / area

    def _stop_reason(
        self,
        front: _Front,
        mask: torch.Tensor,
        iou: float,
        start_area: int,
        clicked: bool,
        in_roi: bool = False,
        claimed: float = 0.0,
    ) -> str:
        """Why this front's mask ends its direction ("" to keep it; :meth:`StopRule.stops`). The start slice and
        slices with the object's positive click are always kept (unless empty)."""
        area = int(mask.sum())
        if area == 0:
            return "empty"
        if front.direction == 0 or clicked:
            return ""
        overlap = 1.0 if front.previous is None else int((mask & front.previous).sum()) / area
        fraction = area / start_area if start_area else 1.0
        return self.rule.stops(fraction, iou, overlap, front.distance, claimed, in_roi)

    @staticmethod
    def _trace_row(
        front: _Front, mask: torch.Tensor, iou: float, start_area: int, reason: str, claimed: float = 0.0
    ) -> dict:
        area = int(mask.sum())
        overlap = 1.0 if front.previous is None or not area else int((mask & front.previous).sum()) / area
        return {"slice": front.slice, "direction": front.direction, "area": area,
                "area_fraction": area / start_area if start_area else 1.0, "iou": round(iou, 4),
                "overlap": round(overlap, 4), "claimed": round(claimed, 4), "stop": reason}  # fmt: skip

    def _out_of_bounds(self, obj: ObjectPrompt, target: int, n_slices: int) -> str:
        if not 0 <= target < n_slices:
            return "volume"
        if obj.z_range is not None and not obj.z_range[0] <= target <= obj.z_range[1]:
            return "roi"
        if self.rule.max_distance and abs(target - obj.slice) > self.rule.max_distance:
            return "distance"
        return ""

    def _next_box(self, mask: torch.Tensor, clip: torch.Tensor | None) -> torch.Tensor:
        """The mask's tight box grown by the margin and pad (shrunk when negative), inside the slice and the ROI."""
        return grow_box(mask_to_box(mask), mask.shape, self.rule.margin, self.rule.pad, clip)

    def _fuse(self, shape, objects, logits, prompted) -> torch.Tensor:
        """Label map: per voxel the object with the highest positive logit; user-prompted slices keep their object."""
        out = torch.zeros(tuple(shape), dtype=torch.int64)
        for s in sorted({s for per_object in logits for s in per_object}):
            # by label id, so that exact ties go to the lower id, whatever the order the objects came in
            present = sorted((i for i in range(len(objects)) if s in logits[i]), key=lambda i: objects[i].label)
            stacked = torch.stack([logits[i][s] for i in present])
            owners = [row for row, i in enumerate(present) if s in prompted[i]]
            if owners:  # the user's object on its own slice: others' logits count only where it claims nothing
                mine = stacked[owners].max(dim=0).values > 0
                others = [row for row in range(len(present)) if row not in owners]
                stacked[others] = torch.where(mine, torch.full_like(stacked[others], -torch.inf), stacked[others])
            best, index = stacked.max(dim=0)
            ids = torch.tensor([objects[i].label for i in present])
            out.select(self.axis, s).copy_(torch.where(best > 0, ids[index], 0))
        return out
