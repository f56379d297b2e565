# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Training the coefficients: their own optimizer group, the relative parametrization, movement reports and
checkpoints that stay compatible across parametrizations and with files written before it existed."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from torch import nn

from samparser_monai.engines import CoefficientMovementReport
from samparser_monai.networks import (
    SamParser,
    coefficient_group,
    coefficient_movement,
    coefficient_state,
    format_movement,
    load_coefficient_state,
    parameter_groups,
    svd_layers,
)

IMAGE = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
BOX = torch.tensor([[[10.0, 12.0, 50.0, 52.0]]])


def _train(model: SamParser, steps: int = 3, coefficient_lr: float = 1e-2) -> SamParser:
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-4, 1e-4, coefficient_lr))
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(IMAGE, BOX).sigmoid().mean().backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("policy", ["parser", "coefficients", "full"])
def test_groups_hold_exactly_the_coefficients_with_their_rate_and_decay(tiny_checkpoint, policy):
    model = SamParser("tiny", tiny_checkpoint, coefficients="encoder", trainable=policy)
    groups = parameter_groups(model, 1e-4, 0.05, coefficient_learning_rate=3e-3, coefficient_weight_decay=0.0)
    by_name = {g["name"]: g for g in groups}
    coefficients = {id(layer.coefficients) for layer in svd_layers(model).values()}
    assert {id(p) for p in by_name["coefficients"]["params"]} == coefficients
    assert (by_name["coefficients"]["lr"], by_name["coefficients"]["weight_decay"]) == (3e-3, 0.0)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if policy == "coefficients":
        assert list(by_name) == ["coefficients"]
    else:
        assert {id(p) for p in by_name["other"]["params"]} == trainable - coefficients
        assert (by_name["other"]["lr"], by_name["other"]["weight_decay"]) == (1e-4, 0.05)
    # every trainable parameter in exactly one group, and the optimizer accepts them as they are
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(trainable)
    torch.optim.AdamW(groups)


def test_groups_without_coefficients_and_through_a_wrapper(tiny_checkpoint):
    decoder_only = SamParser("tiny", tiny_checkpoint, coefficients=None, trainable="decoder")
    groups = parameter_groups(nn.DataParallel(decoder_only), 1e-4, coefficient_learning_rate=1e-2)
    assert [g["name"] for g in groups] == ["other"]
    parser = SamParser("tiny", tiny_checkpoint)
    assert {g["name"]: g["lr"] for g in parameter_groups(parser, 2e-4)} == {"coefficients": 2e-4, "other": 2e-4}
    with pytest.raises(ValueError, match="coefficient_learning_rate must be a positive number"):
        parameter_groups(parser, 1e-4, coefficient_learning_rate=0)


@pytest.mark.parametrize("preset", ["paper", "encoder"])
def test_relative_parametrization_is_exact_at_init_and_merges_exactly(tiny_checkpoint, preset):
    stock = SamParser("tiny", tiny_checkpoint, coefficients=None, trainable="decoder").eval()
    relative = SamParser("tiny", tiny_checkpoint, coefficients=preset, coefficient_parametrization="relative").eval()
    with torch.no_grad():
        reference = stock(IMAGE, BOX)
        assert (relative(IMAGE, BOX) - reference).abs().max() < 1e-5
    assert all(bool((layer.coefficients == 0).all()) for layer in svd_layers(relative).values())
    _train(relative)
    with torch.no_grad():
        tuned = relative(IMAGE, BOX)
        assert (tuned - reference).abs().max() > 1e-4, "training must change the model"
        assert (relative.merge()(IMAGE, BOX) - tuned).abs().max() < 1e-5


def test_relative_trains_the_same_parameter_count_and_saves_the_same_keys(tiny_checkpoint):
    models = {
        p: SamParser("tiny", tiny_checkpoint, coefficients="encoder", coefficient_parametrization=p)
        for p in ("additive", "relative")
    }
    counts = {p: sum(t.numel() for t in m.parameters() if t.requires_grad) for p, m in models.items()}
    assert counts["additive"] == counts["relative"]
    states = {p: coefficient_state(m) for p, m in models.items()}
    assert states["additive"]["state_dict"].keys() == states["relative"]["state_dict"].keys()
    for key, value in states["additive"]["state_dict"].items():  # at init both store the singular values s0
        assert torch.allclose(value, states["relative"]["state_dict"][key], rtol=1e-6, atol=0)


@pytest.mark.parametrize("source", ["additive", "relative"])
@pytest.mark.parametrize("target", ["additive", "relative"])
def test_checkpoints_load_across_parametrizations(tiny_checkpoint, source, target):
    trained = _train(SamParser("tiny", tiny_checkpoint, coefficient_parametrization=source), coefficient_lr=1e-3)
    state = coefficient_state(trained)
    assert state["coefficient_parametrization"] == source
    loaded = load_coefficient_state(SamParser("tiny", tiny_checkpoint, coefficient_parametrization=target), state)
    with torch.no_grad():
        assert (loaded.eval()(IMAGE, BOX) - trained(IMAGE, BOX)).abs().max() < 1e-5


def test_an_old_checkpoint_still_loads(tiny_checkpoint):
    """A state as written before parametrizations existed: the singular values, no new fields."""
    trained = _train(SamParser("tiny", tiny_checkpoint), coefficient_lr=1e-3)
    old = coefficient_state(trained)
    del old["coefficient_parametrization"], old["coefficient_movement"]
    for target in ("additive", "relative"):
        model = load_coefficient_state(SamParser("tiny", tiny_checkpoint, coefficient_parametrization=target), old)
        with torch.no_grad():
            assert (model.eval()(IMAGE, BOX) - trained(IMAGE, BOX)).abs().max() < 1e-5


def test_relative_refuses_values_it_cannot_represent(tiny_checkpoint):
    state = coefficient_state(SamParser("tiny", tiny_checkpoint))
    key = next(k for k in state["state_dict"] if k.endswith(".coefficients"))
    state["state_dict"][key] = -state["state_dict"][key]
    with pytest.raises(ValueError, match=r"^This coefficient state cannot be loaded: .*coefficient_parametrization="):
        load_coefficient_state(SamParser("tiny", tiny_checkpoint, coefficient_parametrization="relative"), state)


def test_movement_by_group_is_measured_and_stored_in_the_checkpoint(tiny_checkpoint):
    model = SamParser("tiny", tiny_checkpoint, coefficients="encoder", coefficient_parametrization="relative")
    at_init = coefficient_movement(model)
    assert at_init["all"]["max"] == 0.0
    assert [g for g in at_init if g != "all"] == ["patch_embed", "attention", "mlp", "neck"]
    assert sum(row["count"] for g, row in at_init.items() if g != "all") == at_init["all"]["count"]
    _train(model, steps=2, coefficient_lr=1e-2)
    moved = coefficient_movement(model)
    # Adam's first steps move every log-scale by about the learning rate: about 1% per step
    assert 0.01 < moved["all"]["median"] < 0.03 and moved["all"]["max"] < 0.03
    assert coefficient_state(model)["coefficient_movement"] == moved
    assert "neck 64: median" in format_movement(moved)


def test_group_names_of_vit_and_tinyvit_layers():
    assert coefficient_group("blocks.3.attn.qkv") == "attention"
    assert coefficient_group("layers.1.blocks.0.mlp.fc1") == "mlp"
    assert coefficient_group("neck.2") == "neck"
    assert coefficient_group("patch_embed.seq.0.c") == "patch_embed"
    assert coefficient_group("layers.0.blocks.0.conv1.c") == "conv"


def test_movement_report_prints_and_writes_tensorboard(tiny_checkpoint, tmp_path, capsys):
    model = _train(SamParser("tiny", tiny_checkpoint, coefficient_parametrization="relative"), steps=1)
    engine = Engine(lambda engine, batch: None)
    CoefficientMovementReport(nn.DataParallel(model), log_dir=tmp_path / "tb").attach(engine)
    engine.run([0, 1], max_epochs=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("coefficients moved")]
    assert [line.split(")")[0] for line in lines] == ["coefficients moved (epoch 1", "coefficients moved (epoch 2"]
    assert "neck 64: median" in lines[-1]
    assert engine.state.coefficient_movement == coefficient_movement(model)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"coefficients/neck/median", "coefficients/neck/max", "coefficients/all/median"} <= set(tags)
    assert len(events.Scalars("coefficients/neck/median")) == 2


@pytest.mark.slow
def test_relative_is_exact_at_init_on_lite_medsam_and_merges_exactly():
    """Within 1e-5 of the logits' scale (float32 rounding of 54 decomposed layers), as the additive form is."""
    stock = SamParser("lite_medsam", coefficients=None, trainable="decoder").eval()
    additive = SamParser("lite_medsam", coefficients="encoder").eval()
    model = SamParser("lite_medsam", coefficients="encoder", coefficient_parametrization="relative").eval()
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    box = torch.tensor([[[60.0, 70.0, 190.0, 200.0]]])
    with torch.no_grad():
        reference = stock(image, box)
        tolerance = 1e-5 * max(1.0, reference.abs().max().item())
        at_init = model(image, box)
        assert (at_init - reference).abs().max() < tolerance
        assert torch.equal(at_init, additive(image, box)), "s0 * exp(0) is s0 to the bit"
        for layer in svd_layers(model).values():  # a trained state: every value scaled by its own factor
            layer.coefficients.copy_(torch.randn_like(layer.coefficients) * 0.02)
        tuned = model(image, box)
        assert (tuned - reference).abs().max() > 1e-3
        assert (model.merge()(image, box) - tuned).abs().max() < tolerance
