# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""SliceDataset: 2D training samples from 3D volumes, each volume read and preprocessed once."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.transforms import apply_transform
from torch.utils.data import Dataset
from tqdm import tqdm

from samparser_monai.data.datalists import case_id
from samparser_monai.errors import root_cause

__all__ = ["SliceDataset"]

logger = logging.getLogger(__name__)


class SliceDataset(Dataset):
    """2D samples ``(case, slice, label id)`` from cached 3D volumes.

    At construction each datalist item goes once through ``transform`` (loading, checks, orientation, intensity:
    deterministic work) and the result is kept in memory; every epoch then cuts 2D slices from memory, without
    reading files again. A sample is a slice that holds at least ``min_pixels`` voxels of one label; a multi-label
    map gives one sample per label present on the slice, with a binary target and the label id. Optionally a fraction
    of background slices (no foreground of any label) is added, with an empty target and ``label_id`` 0.

    Each sample is the dict ``{"image": 1 x H x W float32, "label": 1 x H x W float32 (binary target),
    "label_id": int, "case": str, "slice": int}`` passed through ``slice_transform`` (box prompts, resize/pad:
    random work). The cache is plain tensors, so DataLoader workers share it (fork) or receive a copy (spawn); use
    ``monai.data.DataLoader`` so random slice transforms are seeded per worker.

    Args:
        data: datalist items with ``image`` and ``label`` (and ideally ``case``) keys.
        transform: volume-level transform giving channel-first ``1 x X x Y x Z`` image and label.
        slice_transform: transform applied to each 2D sample.
        axis: spatial axis to slice along (0, 1 or 2 of ``X, Y, Z``; 2 is axial after RAS orientation).
        min_pixels: least foreground voxels of a label for its slice to become a sample.
        labels: label ids to sample (default: every non-zero id found).
        background_fraction: background samples to add, as a fraction of the foreground samples.
        seed: seed of the choice of background slices.
        progress: show a progress bar while caching.
        context: add what inference-time prompts are made of to each foreground sample (for
            :class:`~samparser_monai.transforms.UserBoxPromptd`): ``"neighbours"``, ``2 x H x W``, the same label's
            target on the slices before and after (zeros past the volume's ends), and ``"roi_box"``, the label's 3D
            bounding box projected on the slice (``x0, y0, x1, y1``, inclusive).
        end_slices: also sample, per label, the slices just past each end of it (no voxel of the label, a
            neighbour with ``min_pixels`` or more), with an empty target and ``label_id`` the label's: with
            ``context``, where propagation must learn to stop (:class:`~samparser_monai.transforms.MaskPromptd`).

    Raises:
        ValueError: a case that cannot be read or prepared (the message names the case and the cause), or no sample
            at all. A case whose label map has no foreground is skipped with a warning naming it.
    """

    def __init__(
        self,
        data: Sequence[dict],
        transform: Callable | None = None,
        slice_transform: Callable | None = None,
        axis: int = 2,
        min_pixels: int = 1,
        labels: Sequence[int] | None = None,
        background_fraction: float = 0.0,
        seed: int = 0,
        progress: bool = True,
        context: bool = False,
        end_slices: bool = False,
    ) -> None:
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2 (a spatial axis of the volume), got {axis}.")
        if not data:
            raise ValueError("The datalist is empty: check dataset_dir and the datalist section.")
        self.transform, self.slice_transform, self.context = transform, slice_transform, context
        self.end_slices = end_slices
        self._roi: dict[tuple[int, int], list[float]] = {}
        self.axis, self.min_pixels = axis, int(min_pixels)
        self.labels = None if labels is None else [int(v) for v in labels]
        self.cases: list[str] = []
        self.volumes: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.samples: list[tuple[int, int, int]] = []
        background: list[tuple[int, int, int]] = []
        for item in tqdm(data, desc="caching volumes", disable=not progress, unit="case"):
            case = str(item.get("case") or case_id(item["image"]))
            image, label = self._prepare(item, case)
            found = self._index(len(self.volumes), label)
            if found is None:
                logger.warning("Case '%s' has no foreground of labels %s: skipped.", case, self.labels or "any")
                continue
            samples, empty = found
            self.cases.append(case)
            self.volumes.append((image, label))
            self.samples += samples
            background += empty
        if not self.samples:
            raise ValueError(
                f"No slice of the {len(data)} cases holds {self.min_pixels} or more foreground voxels of labels "
                f"{self.labels or 'any'}: lower min_pixels or check the labels."
            )
        n_background = min(len(background), round(background_fraction * len(self.samples)))
        if n_background:
            chosen = np.random.default_rng(seed).choice(len(background), size=n_background, replace=False)
            self.samples += [background[i] for i in sorted(chosen)]

    def _prepare(self, item: dict, case: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            out = self.transform(dict(item)) if self.transform is not None else item
            image, label = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
        except Exception as err:  # one sentence naming the case instead of a stack of transform internals
            cause = root_cause(err)
            raise ValueError(f"Case '{case}' ({item.get('image')}) could not be prepared: {cause}") from err
        if image.ndim != 4 or label.shape != image.shape:
            raise ValueError(
                f"Case '{case}': the transform must give channel-first 1 x X x Y x Z image and label, got "
                f"{tuple(image.shape)} and {tuple(label.shape)}."
            )
        image = image.as_subclass(torch.Tensor).float().contiguous()
        label = label.as_subclass(torch.Tensor).round()
        label = label.to(torch.uint8 if label.min() >= 0 and label.max() <= 255 else torch.int32).contiguous()
        return image, label

    def _index(self, volume: int, label: torch.Tensor) -> tuple[list, list] | None:
        """Samples of one volume, and its background slices; None when it has no foreground at all."""
        ids = self.labels or [int(v) for v in torch.unique(label) if v != 0]
        reduce = [d for d in (1, 2, 3) if d != self.axis + 1]
        per_label = {i: (label == i).sum(dim=reduce).squeeze(0) for i in ids}
        if not any(int(counts.sum()) for counts in per_label.values()):
            return None
        n_slices = label.shape[self.axis + 1]
        samples = [(volume, s, i) for s in range(n_slices) for i in ids if int(per_label[i][s]) >= self.min_pixels]
        if self.end_slices:
            held = {(s, i) for _, s, i in samples}
            samples += [(volume, s, i) for s in range(n_slices) for i in ids
                        if int(per_label[i][s]) == 0 and ({(s - 1, i), (s + 1, i)} & held)]  # fmt: skip
        any_foreground = sum(per_label.values())
        empty = [(volume, s, 0) for s in range(n_slices) if int(any_foreground[s]) == 0]
        return samples, empty

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        volume, s, label_id = self.samples[index]
        image, label = self.volumes[volume]
        label_2d = label.select(self.axis + 1, s)
        target = (label_2d == label_id) if label_id else torch.zeros_like(label_2d, dtype=torch.bool)
        item = {
            "image": image.select(self.axis + 1, s).contiguous(),
            "label": target.float().contiguous(),
            "label_id": label_id,
            "case": self.cases[volume],
            "slice": s,
        }
        if self.context and label_id:
            item.update(self._context(volume, s, label_id))
        return apply_transform(self.slice_transform, item) if self.slice_transform is not None else item

    def _context(self, volume: int, s: int, label_id: int) -> dict[str, torch.Tensor]:
        """The neighbouring slices' targets and the label's 3D box projected on the slice (see ``context``)."""
        label = self.volumes[volume][1]
        n_slices = label.shape[self.axis + 1]
        planes = [
            (label.select(self.axis + 1, t) == label_id).float() if 0 <= t < n_slices else None for t in (s - 1, s + 1)
        ]
        like = label.select(self.axis + 1, s).float()
        neighbours = torch.cat([p if p is not None else torch.zeros_like(like) for p in planes])
        key = (volume, label_id)
        if key not in self._roi:
            plane = (label == label_id).any(dim=self.axis + 1)[0]  # rows x columns of the slice plane
            rows, cols = torch.nonzero(plane.any(dim=1))[:, 0], torch.nonzero(plane.any(dim=0))[:, 0]
            self._roi[key] = [float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())]
        return {"neighbours": neighbours, "roi_box": torch.tensor(self._roi[key], dtype=torch.float32)}

    def label_counts(self) -> dict[int, int]:
        """Number of samples per label id (0 = background)."""
        return dict(sorted(Counter(label_id for _, _, label_id in self.samples).items()))
