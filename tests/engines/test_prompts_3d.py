# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""3D prompts: voxel and world boxes agree under a non-identity affine; propagation covers the object and stops."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from samparser_monai.engines import label_box_prompts
from samparser_monai.engines.prompts_3d import json_box_prompts, load_box_json, propagate_box
from samparser_monai.transforms import volume_transforms

# a permuted, flipped, anisotropic, shifted grid: stored axes (i, j, k) run along (-y, x, z) in RAS
AFFINE = np.array([[0.0, 0.8, 0.0, -20.0], [-1.2, 0.0, 0.0, 35.0], [0.0, 0.0, 2.5, -7.0], [0.0, 0.0, 0.0, 1.0]])


def _volume(tmp_path) -> tuple[str, str, np.ndarray]:
    label = np.zeros((30, 24, 12), np.uint8)
    label[8:15, 4:11, 3:9] = 1
    image = (label * 0.8 + 0.1).astype(np.float32)
    for name, array in (("vol", image), ("vol_label", label)):
        nib.save(nib.Nifti1Image(array, AFFINE), str(tmp_path / f"{name}.nii.gz"))
    return str(tmp_path / "vol.nii.gz"), str(tmp_path / "vol_label.nii.gz"), label


def test_voxel_and_world_boxes_give_the_same_prompts_as_the_label(tmp_path):
    image_path, label_path, label = _volume(tmp_path)
    data = volume_transforms("mr")({"image": image_path, "label": label_path})
    image = data["image"]
    voxel_box = [8, 4, 3, 14, 10, 8]  # inclusive stored indices of the labelled block
    corners = np.array([[8, 4, 3, 1], [14, 10, 8, 1]], np.float64) @ AFFINE.T
    world_box = [*corners[:, :3].min(0), *corners[:, :3].max(0)]
    original, oriented = np.asarray(image.meta["original_affine"]), np.asarray(image.affine)
    assert not np.allclose(original, oriented), "the test volume must be reoriented"
    from_voxels = json_box_prompts(
        [{"label": 1, "box": voxel_box, "space": "voxel"}], original, oriented, image.shape[1:]
    )
    from_world = json_box_prompts(
        [{"label": 1, "box": world_box, "space": "world"}], original, oriented, image.shape[1:]
    )
    from_label = label_box_prompts(data["label"][0].long(), axis=2)
    assert sorted(from_voxels) == sorted(from_world) == sorted(from_label)
    for s in from_label:
        assert torch.allclose(from_voxels[s][0][1], from_label[s][0][1])
        assert torch.allclose(from_world[s][0][1], from_label[s][0][1], atol=1e-4)


class BrightInsideBox(nn.Module):
    """Stand-in for SamParser: segments the bright voxels inside the box, so propagation can be checked exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def decode(self, embeddings: torch.Tensor, box: torch.Tensor, image_size) -> torch.Tensor:
        h, w = image_size
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        x0, y0, x1, y1 = (box[..., i, None, None] for i in range(4))
        inside = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
        return torch.where(inside & (embeddings[:, :1] > 0.5), 1.0, -1.0)


def test_propagation_from_a_key_slice_covers_the_object_and_stops():
    shape = (40, 40, 20)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ellipsoid = ((zz - 20) / 8.0) ** 2 + ((yy - 18) / 10.0) ** 2 + ((xx - 10) / 6.0) ** 2 <= 1  # spans axis-2 4..16
    image = torch.as_tensor(ellipsoid, dtype=torch.float32)[None]
    image[0, 2:6, 2:6, :] = 1.0  # a second bright object that must not be picked up
    key_box = torch.tensor([8.0, 12.0, 28.0, 28.0])  # the section on slice 10: x along axis 1, y along axis 0
    mask = propagate_box(BrightInsideBox(), image, key_slice=10, box=key_box, axis=2)
    assert torch.equal(mask, torch.as_tensor(ellipsoid)), "the whole object, nothing else"


def test_box_json_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"case": [{"label": 1, "box": [1, 2, 3], "space": "voxel"}]}))
    with pytest.raises(ValueError, match=r"case 'case': each prompt needs an integer 'label', a 6-number 'box'"):
        load_box_json(bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="could not be read as JSON"):
        load_box_json(tmp_path / "broken.json")
