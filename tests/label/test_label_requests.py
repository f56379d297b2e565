# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""From a MONAI Label request (ROI, clicks) to box prompts, and the result refinement; no server, no monailabel."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from samparser_monai.engines.prompt_files import box_to_oriented_voxels
from samparser_monai.label.geometry import ImageGeometry, read_geometry
from samparser_monai.label.refine import refine_file, refine_mask
from samparser_monai.label.requests import PromptPlan, RequestError, parse_roi, plan_prompts

RAS = ImageGeometry((30, 40, 20), np.diag([1.0, 1.0, 2.0, 1.0]))
# stored as (S, A, R) with flips: the stored I axis is the oriented slicing axis (superior-inferior)
PERMUTED = ImageGeometry((20, 40, 30), np.array([[0, 0, -1.0, 10], [0, 1.0, 0, 0], [-2.0, 0, 0, 5], [0, 0, 0, 1]]))


@pytest.mark.parametrize(
    "roi",
    [
        [2, 9, 3, 12, 4, 8],
        [[2, 9], [3, 12], [4, 8]],
        [9, 2, 12, 3, 8, 4],
        "[2, 9, 3, 12, 4, 8]",
        [2.2, 8.6, 3, 12, 4, 8],
    ],
)
def test_roi_layouts_and_swapped_bounds_give_the_same_box(roi):
    assert parse_roi(roi).tolist() == [[2, 9], [3, 12], [4, 8]]
    plan = plan_prompts({"roi": roi}, RAS)
    assert plan.source == "roi" and plan.keep.tolist() == [[2, 9], [3, 12], [4, 8]] and not plan.clicks_as_boxes
    assert plan.boxes == [{"box": [2.0, 3.0, 4.0, 9.0, 12.0, 8.0], "space": "voxel", "label": 1}]


def test_absent_roi_is_none_and_a_thin_roi_propagates_as_deep_as_it_is_wide():
    assert parse_roi(None) is None and parse_roi([]) is None
    plan = plan_prompts({"roi": [2, 9, 3, 12, 6, 6]}, RAS)  # a rectangle drawn on one slice
    assert plan.source == "propagate" and plan.boxes[0]["box"] == [2.0, 3.0, 6.0, 9.0, 12.0, 6.0]
    # 10 voxels = 10 mm wide in-plane: +-5 mm = +-2.5 slices of 2 mm along K, rounded outwards
    assert plan.keep.tolist() == [[2, 9], [3, 12], [3, 9]]


def test_roi_past_the_border_is_clipped():
    plan = plan_prompts({"roi": [-5, 9, 3, 60, 4, 8]}, RAS)
    assert plan.keep.tolist() == [[0, 9], [3, 39], [4, 8]]


@pytest.mark.parametrize(
    ("request_", "sentence"),
    [
        ({"roi": [1, 2, 3]}, "roi must be [i0, i1, j0, j1, k0, k1]"),
        ({"roi": [1, 2, 3, 4, "x", 6]}, "roi must be"),
        ({"roi": [[1, 2], [3, 4], [5]]}, "roi must be"),
        (
            {"roi": [40, 50, 3, 12, 4, 8]},
            "lies outside the image, whose voxel indices run from [0, 0, 0] to [29, 39, 19]",
        ),
        ({"roi": [5, 5, 3, 12, 4, 8]}, "is empty: it must span at least 2 voxels along I"),
        ({}, "The request has no prompt"),
        ({"background": [[1, 2, 3]]}, "Background clicks alone mark no object"),
        ({"foreground": [[1, 2, 30]]}, "foreground click [1, 2, 30] lies outside the image"),
        ({"foreground": [1, 2, 3]}, "foreground must be a list of [i, j, k]"),
        ({"foreground": [[5, 5, 5]], "roi": [10, 20, 10, 20, 4, 8]}, "lies outside the roi"),
        ({"foreground": [[5, 5, 5]], "click_box_mm": -1}, "click_box_mm must be a positive number"),
    ],
)
def test_bad_requests_are_one_sentence(request_, sentence):
    with pytest.raises(RequestError) as err:
        plan_prompts(request_, RAS)
    assert sentence in str(err.value) and err.value.status == 400
    assert str(err.value).endswith(".") and str(err.value).count(". ") == 0


def test_two_dimensional_images_are_refused():
    with pytest.raises(RequestError, match="segments 3D volumes") as err:
        plan_prompts({"roi": [1, 5, 1, 5, 0, 0]}, ImageGeometry((30, 40), np.eye(4)))
    assert err.value.status == 422


def test_clicks_make_a_grown_box_per_clicked_slice_in_millimetres():
    plan = plan_prompts({"foreground": [[10, 20, 5], [12, 22, 5], [15, 15, 9]], "click_box_mm": 8}, RAS)
    assert plan.source == "propagate" and plan.clicks_as_boxes, "the app then keeps the stock rule for these boxes"
    assert [e["box"] for e in plan.boxes] == [[6.0, 16.0, 5.0, 16.0, 26.0, 5.0], [11.0, 11.0, 9.0, 19.0, 19.0, 9.0]]
    # kept within the click boxes in-plane, and +-4 mm (2 slices of 2 mm) past the clicked slices
    assert plan.keep.tolist() == [[6, 19], [11, 26], [3, 11]]
    # spacing 2 mm along K does not matter in-plane; the box is clipped to the image at the border
    corner = plan_prompts({"foreground": [[0, 39, 3]], "click_box_mm": 8}, RAS).boxes[0]["box"]
    assert corner == [0.0, 35.0, 3.0, 4.0, 39.0, 3.0]


def test_clicks_with_an_roi_take_the_roi_box_and_stay_inside_it():
    plan = plan_prompts({"foreground": [[12, 15, 6]], "background": [[3, 4, 5]], "roi": [10, 20, 10, 20, 4, 8]}, RAS)
    assert plan.source == "propagate" and plan.keep.tolist() == [[10, 20], [10, 20], [4, 8]] and plan.clicks_as_boxes
    assert plan.boxes[0]["box"] == [10.0, 10.0, 6.0, 20.0, 20.0, 6.0]
    assert plan.background == [(3, 4, 5)]


def test_clicks_to_a_click_trained_model_are_sent_as_clicks():
    request = {"foreground": [[12, 15, 6], [13, 16, 6]], "background": [[3, 4, 5]]}
    plan = plan_prompts(request, RAS, click_points=True)
    assert plan.source == "points" and plan.keep is None and plan.background == [(3, 4, 5)]
    assert not plan.clicks_as_boxes
    assert plan.boxes == [{"points": [[12.0, 15.0, 6.0], [13.0, 16.0, 6.0], [3.0, 4.0, 5.0]],
                           "point_labels": [1, 1, 0], "space": "voxel", "label": 1}]  # fmt: skip
    within = plan_prompts({**request, "roi": [10, 20, 10, 20, 4, 8]}, RAS, click_points=True)
    assert within.boxes[0]["box"] == [10.0, 10.0, 4.0, 20.0, 20.0, 8.0] and within.keep.tolist() == [
        [10, 20],
        [10, 20],
        [4, 8],
    ]
    thin = plan_prompts({**request, "roi": [10, 20, 10, 20, 6, 6]}, RAS, click_points=True)
    assert "box" not in thin.boxes[0] and thin.keep.tolist()[:2] == [[10, 20], [10, 20]], "a one-slice ROI: in-plane"
    assert thin.keep[2].tolist() == [0, RAS.shape[2] - 1]
    with pytest.raises(RequestError, match="lies outside the roi"):
        plan_prompts({"foreground": [[2, 2, 6]], "roi": [10, 20, 10, 20, 4, 8]}, RAS, click_points=True)


def test_the_key_slice_is_taken_along_the_stored_axis_that_becomes_axial():
    assert PERMUTED.stored_axis(2) == 0 and RAS.stored_axis(2) == 2
    plan = plan_prompts({"foreground": [[7, 20, 15]], "click_box_mm": 10}, PERMUTED)
    box = plan.boxes[0]["box"]
    assert box[0] == box[3] == 7.0  # one stored I index: one axial slice
    oriented = box_to_oriented_voxels(box, "voxel", PERMUTED.affine, np.diag([1.0, 1.0, 2.0, 1.0]))
    assert oriented[0, 2] == oriented[1, 2]  # a single slice of the RAS-oriented volume


def test_nrrd_and_nifti_headers_agree(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.Image([30, 40, 20], sitk.sitkFloat32)
    image.SetSpacing((0.8, 1.2, 2.5))
    image.SetOrigin((-20.0, 35.0, -7.0))
    image.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    for name in ("a.nrrd", "a.nii.gz"):
        sitk.WriteImage(image, str(tmp_path / name))
    nrrd, nifti = read_geometry(tmp_path / "a.nrrd"), read_geometry(tmp_path / "a.nii.gz")
    assert nrrd.shape == nifti.shape == (30, 40, 20)
    np.testing.assert_allclose(nrrd.affine, nifti.affine, atol=1e-5)
    with pytest.raises(ValueError, match="could not be read"):
        read_geometry(tmp_path / "missing.nrrd")


def test_refine_clips_to_the_roi_and_drops_what_background_clicks_hit(tmp_path):
    mask = np.zeros((10, 10, 6), np.int16)
    mask[1:4, 1:4, 1:3] = 1
    mask[6:9, 6:9, 1:5] = 1
    plan = PromptPlan("propagate", [], keep=np.array([[0, 9], [0, 9], [0, 3]]), background=[(7, 7, 2), (0, 0, 0)])
    refined = refine_mask(mask, plan)
    assert refined[1:4, 1:4, 1:3].all() and refined.sum() == 18, "the hit piece is gone, the other kept"
    assert mask.sum() == 18 + 36, "the input is not changed"
    path = tmp_path / "seg.nii.gz"
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(mask, affine), str(path))
    assert refine_file(path, plan) == 18
    written = nib.load(path)
    assert written.get_data_dtype() == np.int16 and np.allclose(written.affine, affine)
    assert np.array_equal(np.asarray(written.dataobj), refined)


def test_the_app_propagates_a_fine_tuned_model_with_the_engines_rule():
    pytest.importorskip("monailabel", reason="the MONAI Label app needs the label extra")
    from samparser_monai.engines import StopRule
    from samparser_monai.label.infer import APP_RULE, app_rule

    assert app_rule(fine_tuned=False, clicks_as_boxes=False) == APP_RULE, "the stock model: the rule tuned for it"
    assert app_rule(fine_tuned=True, clicks_as_boxes=True) == APP_RULE, "loose boxes around clicks keep it"
    assert app_rule(fine_tuned=True, clicks_as_boxes=False) == StopRule.for_model(fine_tuned=True)
