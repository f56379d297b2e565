# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""SVD layers: exact at init in every form, correct coefficient gradients, cached eval weight, exact merge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from samparser_monai.networks.svd import (
    SVDConv2d,
    SVDLayer,
    SVDLinear,
    apply_svd,
    coefficient_parameters,
    merge_svd_layers,
    resolve_targets,
)

ATOL = 1e-5


def _layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(24, 40), torch.randn(2, 50, 24, requires_grad=True)
    if kind == "linear_wide":
        return nn.Linear(40, 16, bias=False), torch.randn(3, 7, 40, requires_grad=True)
    if kind == "conv":
        return nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=1), torch.randn(2, 6, 17, 15, requires_grad=True)
    if kind == "conv_dilated_reflect":
        conv = nn.Conv2d(4, 8, 3, padding=2, dilation=2, padding_mode="reflect", bias=False)
        return conv, torch.randn(1, 4, 12, 12, requires_grad=True)
    if kind == "conv_patch":
        return nn.Conv2d(3, 12, 4, stride=4), torch.randn(1, 3, 16, 16)
    raise KeyError(kind)


KINDS = ["linear", "linear_wide", "conv", "conv_dilated_reflect", "conv_patch"]


def _decompose(module: nn.Module, form: str) -> SVDLayer:
    if isinstance(module, nn.Linear):
        return SVDLinear.from_linear(module, form)
    return SVDConv2d.from_conv(module, form)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["auto", "factored", "dense"])
def test_decomposed_layer_equals_original(kind, form):
    module, x = _layer(kind)
    layer = _decompose(module, form)
    expected = module(x)
    assert torch.allclose(layer(x), expected, atol=ATOL), "train-mode output differs"
    layer.eval()
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=ATOL), "eval-mode output differs"
    rank = min(module.weight.shape[0], module.weight[0].numel())
    assert layer.coefficients.shape == (rank,)
    s = torch.linalg.svdvals(module.weight.detach().reshape(module.weight.shape[0], -1).double()).float()
    assert torch.allclose(layer.coefficients.detach(), s, atol=1e-6), "coefficients must start at the singular values"


@pytest.mark.parametrize("kind", KINDS)
def test_factored_and_dense_forms_give_the_same_gradients(kind):
    module, x = _layer(kind)
    grads = {}
    for form in ("factored", "dense"):
        layer = _decompose(module, form)
        xi = x.detach().clone().requires_grad_(x.requires_grad)
        out = layer(xi)
        torch.manual_seed(1)
        (out * torch.randn_like(out)).sum().backward()
        grads[form] = (layer.coefficients.grad, xi.grad)
        assert layer.basis_u.grad is None and layer.basis_vh.grad is None, "bases must stay frozen"
    assert torch.allclose(grads["factored"][0], grads["dense"][0], atol=1e-4)
    if x.requires_grad:
        assert torch.allclose(grads["factored"][1], grads["dense"][1], atol=1e-5)


def test_coefficient_gradient_is_the_projected_weight_gradient():
    """ds_k = u_k^T (dL/dW) v_k: the defining property of training only the coefficients."""
    module, x = _layer("linear")
    layer = SVDLinear.from_linear(module)
    module.weight.requires_grad_(True)
    (module(x) ** 2).sum().backward()
    (layer(x) ** 2).sum().backward()
    projected = torch.einsum("ok,oi,ki->k", layer.basis_u, module.weight.grad, layer.basis_vh)
    assert torch.allclose(layer.coefficients.grad, projected, atol=1e-3)


def test_auto_form_follows_the_cost_model():
    square = SVDLinear.from_linear(nn.Linear(64, 64))
    assert square._use_dense(tokens=4096, input_needs_grad=True), "square layer with many tokens: dense is cheaper"
    assert not square._use_dense(tokens=8, input_needs_grad=True), "few tokens: the factored form is cheaper"
    tall = SVDLinear.from_linear(nn.Linear(64, 256))
    assert not tall._use_dense(tokens=4096, input_needs_grad=True), "4:1 layer: factored is cheaper"


def test_eval_weight_is_cached_and_refreshed_after_an_update():
    module, x = _layer("linear")
    layer = SVDLinear.from_linear(module).eval()
    with torch.no_grad():
        layer(x)
        first = layer._cache[1]
        layer(x)
        assert layer._cache[1] is first, "eval forward must not rebuild the weight"
        layer.coefficients.mul_(2.0)  # as an optimizer step would
        out = layer(x)
    assert layer._cache[1] is not first
    assert torch.allclose(out - module.bias, 2 * (module(x) - module.bias), atol=1e-4)


def test_grouped_and_depthwise_convs_are_not_targets():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Linear(3, 3))
    assert resolve_targets(net, "encoder") == ["1", "3"]
    with pytest.raises(ValueError, match="groups=4"):
        SVDConv2d.from_conv(net[0])


def test_targets_by_preset_and_pattern():
    net = nn.Module()
    net.neck = nn.Sequential(nn.Conv2d(8, 4, 1), nn.LayerNorm(4), nn.Conv2d(4, 4, 3, padding=1))
    net.blocks = nn.ModuleList(nn.ModuleDict({"qkv": nn.Linear(4, 12), "proj": nn.Linear(4, 4)}) for _ in range(2))
    assert resolve_targets(net, "paper") == ["neck.0", "neck.2"]
    assert resolve_targets(net, ["blocks.*.qkv"]) == ["blocks.0.qkv", "blocks.1.qkv"]
    assert resolve_targets(net, ["blocks.1"]) == ["blocks.1.qkv", "blocks.1.proj"]
    with pytest.raises(ValueError, match="Unknown coefficient preset 'neckk'"):
        resolve_targets(net, "neckk")
    with pytest.raises(ValueError, match="select no dense"):
        resolve_targets(net, ["head.*"])


def test_apply_and_merge_round_trip_keeps_keys_and_outputs():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 5)
    )
    x = torch.randn(2, 3, 6, 6)
    keys, expected = list(net.state_dict()), net(x)
    assert apply_svd(net, "encoder") == ["0", "2", "4"]
    assert sum(p.numel() for p in coefficient_parameters(net)) == 8 + 4 + 5  # min(out, in*kh*kw) per layer
    assert torch.allclose(net(x), expected, atol=ATOL)
    with torch.no_grad():
        for s in coefficient_parameters(net):
            s.mul_(1.1)
    tuned = net(x)
    assert merge_svd_layers(net) == ["0", "2", "4"]
    assert list(net.state_dict()) == keys, "merged model must have the original state-dict keys"
    assert all(type(m) in (nn.Conv2d, nn.Linear, nn.ReLU, nn.Flatten) for m in net)
    assert torch.allclose(net(x), tuned, atol=ATOL)


def test_invalid_form_is_one_sentence():
    with pytest.raises(ValueError, match="form must be one of"):
        SVDLinear.from_linear(nn.Linear(2, 2), form="lowrank")


def test_weight_cached_under_inference_mode_serves_later_autograd():
    module, x = _layer("linear")
    layer = SVDLinear.from_linear(module).eval()
    layer.coefficients.requires_grad_(False)
    with torch.inference_mode():
        layer(x.detach())
    out = layer(x)  # grad enabled, frozen coefficients, input needs grad: uses the cached weight
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("padding, tokens", [("valid", 36), ("same", 100), (1, 64)])
def test_conv_token_count_follows_padding(padding, tokens):
    layer = SVDConv2d.from_conv(nn.Conv2d(2, 3, 5 if padding != 1 else 3, padding=padding))
    x = torch.randn(1, 2, 10, 10) if padding != 1 else torch.randn(1, 2, 8, 8)
    assert layer._tokens(x) == tokens
    assert layer(x).shape[-2:].numel() == tokens


def test_official_form_stays_factored_in_eval_mode():
    module, x = _layer("linear")
    layer = SVDLinear.from_linear(module, form="official").eval()
    with torch.no_grad():
        out = layer(x)
    assert layer._cache is None, "the official form never builds the merged weight"
    assert torch.allclose(out, module(x), atol=ATOL)
