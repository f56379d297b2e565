# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""SVD coefficient reparametrization of dense layers (SAM-PARSER, Peng et al., AAAI 2024, arXiv:2308.14604).

A dense weight ``W`` (``out x in``; a conv kernel reshaped to ``out x in*kh*kw``) is decomposed once as
``W = U diag(s) Vh``. The bases ``U`` and ``Vh`` are frozen parameters; only the coefficient vector ``s``
(initialised to the singular values, so the layer starts as the pretrained one) is trained.

Compared with running the layer factored (``x -> Vh -> * s -> U``) at every call, as the original code does:

- in training, each call picks the cheaper of two exact forms from the token count: the factored form, or the
  materialised weight ``(U * s) @ Vh`` used as a plain layer (autograd then gets ``ds`` from the weight gradient,
  which costs one token-sized matmul less than the factored backward for square layers);
- when no gradient is needed (eval mode, ``torch.no_grad``), the merged weight is cached once per coefficient
  version, so the layer runs at the speed of the plain layer with no per-call reconstruction;
- :func:`merge_svd_layers` writes the merged weight back into plain ``nn.Linear`` / ``nn.Conv2d`` modules with the
  original state-dict keys, so a fine-tuned model is a stock model again.

Two parametrizations of the coefficients (``parametrization``): ``"additive"`` trains ``s`` itself (the paper's);
``"relative"`` trains a log-scale ``d`` with ``s = s0 * exp(d)``, ``d = 0`` at the start. Singular values span two
orders of magnitude, and an optimizer step moves a parameter by about the learning rate: additive steps are large
for the small values and negligible for the large ones, relative steps change every value by the same fraction and
keep it positive. Both are exact at initialisation and merge exactly; checkpoints store ``s`` either way.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "COEFFICIENT_GROUPS",
    "COEFFICIENT_PRESETS",
    "PARAMETRIZATIONS",
    "SVDConv2d",
    "SVDLayer",
    "SVDLinear",
    "apply_svd",
    "coefficient_group",
    "coefficient_movement",
    "coefficient_parameters",
    "format_movement",
    "is_decomposable",
    "merge_svd_layers",
    "resolve_targets",
    "svd_layers",
]

#: Named target sets, as module-name patterns relative to the image encoder.
COEFFICIENT_PRESETS: dict[str, tuple[str, ...]] = {
    # the paper's setting: the two convolutions of the encoder neck (256 + 256 coefficients on SAM ViT-B)
    "paper": ("neck",),
    # every dense linear and convolution of the image encoder (38,144 coefficients on SAM ViT-B)
    "encoder": ("*",),
}

_FORMS = ("auto", "factored", "dense", "official")

#: How the trainable coefficient tensor maps to the singular values ``s`` (see the module docstring).
PARAMETRIZATIONS = ("additive", "relative")

#: Groups in which coefficient movement is reported, in report order (see :func:`coefficient_group`).
COEFFICIENT_GROUPS = ("patch_embed", "attention", "mlp", "conv", "neck")


class SVDLayer(nn.Module):
    """Base class of a dense layer stored as ``W = basis_u @ diag(coefficients) @ basis_vh``.

    Args:
        basis_u: left singular vectors, ``out x r``; frozen.
        coefficients: the pretrained singular values ``s0``, ``r``; the trainable tensor starts from them (additive)
            or from zeros (relative).
        basis_vh: right singular vectors, ``r x in_flat``; frozen.
        bias: the layer's bias or ``None``; keeps the ``requires_grad`` flag it arrives with.
        form: ``"auto"`` (default) picks the cheaper exact training form per call; ``"factored"`` or ``"dense"``
            force one in training (benchmarks, tests); ``"official"`` runs factored always, in eval mode too, as the
            original SAM-PARSER code does (the ``parser_official`` baseline).
        parametrization: ``"additive"`` (the parameter ``coefficients`` is ``s``) or ``"relative"`` (the parameter
            ``coefficients`` is a log-scale ``d``, ``s = s0 * exp(d)``, zero at the start). Either way
            :meth:`singular_values` gives ``s`` and the non-persistent buffer ``initial_coefficients`` keeps ``s0``.
    """

    def __init__(
        self,
        basis_u: torch.Tensor,
        coefficients: torch.Tensor,
        basis_vh: torch.Tensor,
        bias: torch.Tensor | None,
        form: str = "auto",
        parametrization: str = "additive",
    ) -> None:
        super().__init__()
        if form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS}, got {form!r}.")
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}.")
        self.parametrization = parametrization
        self.basis_u = nn.Parameter(basis_u, requires_grad=False)
        # s0: the pretrained singular values; rebuilt from the base checkpoint, so never saved
        self.register_buffer("initial_coefficients", coefficients.detach().clone(), persistent=False)
        relative = parametrization == "relative"
        self.coefficients = nn.Parameter(torch.zeros_like(coefficients) if relative else coefficients)
        self.basis_vh = nn.Parameter(basis_vh, requires_grad=False)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.form = form
        self._cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def rank(self) -> int:
        """Number of coefficients."""
        return self.coefficients.shape[0]

    def singular_values(self) -> torch.Tensor:
        """The coefficients ``s`` the layer computes with (differentiable in the trainable tensor)."""
        if self.parametrization == "relative":
            return self.initial_coefficients * torch.exp(self.coefficients)
        return self.coefficients

    @torch.no_grad()
    def set_singular_values(self, values: torch.Tensor) -> None:
        """Set ``s`` (what checkpoints store) in this layer's parametrization.

        Raises:
            ValueError: a relative layer given a value that is not positive where its pretrained value is (a
                log-scale cannot represent it; load such a checkpoint with ``parametrization="additive"``).
        """
        values = values.to(self.coefficients)
        if values.shape != self.coefficients.shape:
            raise ValueError(f"expected {tuple(self.coefficients.shape)} coefficients, got {tuple(values.shape)}.")
        if self.parametrization == "additive":
            self.coefficients.copy_(values)
            return
        s0 = self.initial_coefficients
        if bool(((values <= 0) & (s0 > 0)).any()):
            raise ValueError(
                "these coefficients hold values <= 0, which the relative parametrization (s = s0 * exp(d)) cannot "
                "represent: build the model with coefficient_parametrization='additive' to load them."
            )
        ratio = torch.where(s0 > 0, values / s0.clamp_min(torch.finfo(s0.dtype).tiny), torch.ones_like(values))
        self.coefficients.copy_(torch.log(ratio))

    def relative_change(self) -> torch.Tensor:
        """``|s - s0| / s0`` per coefficient (0 where ``s0`` is 0 and ``s`` too), detached."""
        with torch.no_grad():
            s, s0 = self.singular_values().float(), self.initial_coefficients.float()
            return (s - s0).abs() / s0.abs().clamp_min(1e-12)

    def merged_weight(self) -> torch.Tensor:
        """Return ``U diag(s) Vh`` reshaped to the layer's weight shape (differentiable in ``s``)."""
        return ((self.basis_u * self.singular_values()) @ self.basis_vh).view(self.weight_shape)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the equivalent plain layer's weight."""
        raise NotImplementedError

    def _cached_weight(self) -> torch.Tensor:
        """The merged weight, recomputed only when the coefficients, bases, device or dtype changed."""
        s, u, vh = self.coefficients, self.basis_u, self.basis_vh
        key = (s.data_ptr(), s._version, u.data_ptr(), u._version, vh.data_ptr(), vh._version, s.device, s.dtype)
        if self._cache is None or self._cache[0] != key:
            # a normal tensor even under torch.inference_mode, so later autograd calls may still use it
            with torch.inference_mode(False), torch.no_grad():
                self._cache = (key, self.merged_weight())
        return self._cache[1]

    def _use_dense(self, tokens: int, input_needs_grad: bool) -> bool:
        """Whether the materialised form costs fewer multiply-adds than the factored one for this call."""
        if self.form != "auto":
            return self.form == "dense"  # "factored" and "official" stay factored
        out_f, in_f, r = self.basis_u.shape[0], self.basis_vh.shape[1], self.rank
        # factored: x Vh^T (T r in), * s, @ U^T (T r out); backward: g U (T out r) [+ (gU s) Vh (T r in)]
        factored = tokens * r * (in_f + 2 * out_f) + (tokens * r * in_f if input_needs_grad else 0)
        # dense: build W (out r in), x W^T (T out in); backward: g^T x (T out in), (dW Vh^T) (out in r)
        # [+ g W (T out in)]
        dense = 2 * tokens * out_f * in_f + 2 * out_f * r * in_f + (tokens * out_f * in_f if input_needs_grad else 0)
        return dense < factored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer; exact in every form, the form only changes the cost."""
        if self.form == "official":
            return self._factored_forward(x)
        if not (torch.is_grad_enabled() and self.coefficients.requires_grad):
            return self._dense_forward(x, self._cached_weight())
        if self._use_dense(self._tokens(x), x.requires_grad):
            return self._dense_forward(x, self.merged_weight())
        return self._factored_forward(x)

    def train(self, mode: bool = True) -> SVDLayer:
        """Switch mode; entering training drops the cached merged weight (evaluators call ``eval()`` every
        iteration, so it is kept there: its key already tracks every coefficient update)."""
        if mode:
            self._cache = None
        return super().train(mode)

    def _tokens(self, x: torch.Tensor) -> int:
        raise NotImplementedError

    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _factored_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        """Return the equivalent plain layer, holding the merged weight."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"rank={self.rank}, form={self.form!r}, parametrization={self.parametrization!r}"


def _decompose(weight_2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64 (exact to float32 rounding after the cast back), on the weight's device."""
    w = weight_2d.detach().to(torch.float64)
    transpose = w.shape[0] < w.shape[1]  # LAPACK is faster on tall matrices
    u, s, vh = torch.linalg.svd(w.T if transpose else w, full_matrices=False)
    if transpose:
        u, vh = vh.T, u.T
    dtype = weight_2d.dtype
    return u.to(dtype).contiguous(), s.to(dtype), vh.to(dtype).contiguous()


class SVDLinear(SVDLayer):
    """``nn.Linear`` with an SVD-parametrized weight; see :class:`SVDLayer`."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, form: str = "auto", parametrization: str = "additive") -> SVDLinear:
        """Decompose ``linear.weight``; the bias is shared, not copied."""
        u, s, vh = _decompose(linear.weight)
        return cls(u, s, vh, linear.bias, form=form, parametrization=parametrization)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.basis_u.shape[0], self.basis_vh.shape[1])

    def _tokens(self, x: torch.Tensor) -> int:
        return x.numel() // x.shape[-1]

    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)

    def _factored_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.basis_vh) * self.singular_values(), self.basis_u, self.bias)

    def to_dense(self) -> nn.Linear:
        out_f, in_f = self.weight_shape
        w = self.basis_u
        linear = nn.Linear(in_f, out_f, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(_merge_exact(self))
            if self.bias is not None:
                linear.bias = self.bias
        return linear


class SVDConv2d(SVDLayer):
    """Dense (``groups == 1``) ``nn.Conv2d`` with an SVD-parametrized kernel; see :class:`SVDLayer`.

    The kernel is decomposed as a matrix ``out x (in * kh * kw)``. The factored form runs as a ``kh x kw`` conv with
    ``r`` output channels (the rows of ``Vh``), a per-channel scale and a ``1 x 1`` conv with ``U``.
    """

    def __init__(
        self, conv: nn.Conv2d, basis_u, coefficients, basis_vh, bias, form: str = "auto", parametrization="additive"
    ) -> None:
        super().__init__(basis_u, coefficients, basis_vh, bias, form=form, parametrization=parametrization)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.padding, self.padding_mode = conv.padding, conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, form: str = "auto", parametrization: str = "additive") -> SVDConv2d:
        """Decompose ``conv.weight`` reshaped to ``out x in*kh*kw``; the bias is shared, not copied."""
        if conv.groups != 1:
            raise ValueError(f"Only dense convolutions can be decomposed, this one has groups={conv.groups}.")
        u, s, vh = _decompose(conv.weight.reshape(conv.out_channels, -1))
        return cls(conv, u, s, vh, conv.bias, form=form, parametrization=parametrization)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | str]:
        if self.padding_mode == "zeros":
            return x, self.padding
        return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0

    def _tokens(self, x: torch.Tensor) -> int:
        if self.padding == "same":  # keeps the size (PyTorch allows it at stride 1 only)
            return x.numel() // x.shape[-3]
        padding = (0, 0) if self.padding == "valid" else self.padding
        size = 1
        for dim, (k, s, p, d) in enumerate(zip(self.kernel_size, self.stride, padding, self.dilation)):
            size *= (x.shape[-2 + dim] + 2 * p - d * (k - 1) - 1) // s + 1
        return size * (x.numel() // (x.shape[-1] * x.shape[-2] * x.shape[-3]))

    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x, padding = self._pad(x)
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation)

    def _factored_forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self._pad(x)
        kernel = self.basis_vh.view(self.rank, self.in_channels, *self.kernel_size)
        z = F.conv2d(x, kernel, None, self.stride, padding, self.dilation)
        z = z * self.singular_values().view(-1, 1, 1)
        return F.conv2d(z, self.basis_u.view(self.out_channels, self.rank, 1, 1), self.bias)

    def to_dense(self) -> nn.Conv2d:
        w = self.basis_u
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(_merge_exact(self))
            if self.bias is not None:
                conv.bias = self.bias
        return conv


def _merge_exact(layer: SVDLayer) -> torch.Tensor:
    """``U diag(s) Vh`` accumulated in float64, then cast: the merged weight is as exact as float32 allows."""
    u, vh = (t.detach().to(torch.float64) for t in (layer.basis_u, layer.basis_vh))
    s = layer.coefficients.detach().to(torch.float64)
    if layer.parametrization == "relative":
        s = layer.initial_coefficients.detach().to(torch.float64) * torch.exp(s)
    return ((u * s) @ vh).to(layer.basis_u.dtype).view(layer.weight_shape)


def is_decomposable(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` or a dense (``groups == 1``) 2D ``nn.Conv2d``; grouped/depthwise convs are not."""
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Conv2d and module.groups == 1


def resolve_targets(root: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Names (relative to ``root``) of the decomposable modules selected by a preset or by patterns.

    Args:
        root: the module tree to search, e.g. SAM's ``image_encoder``.
        targets: a preset name from :data:`COEFFICIENT_PRESETS` (``"paper"``, ``"encoder"``) or a sequence of
            ``fnmatch`` patterns over qualified module names (``"blocks.*.attn.qkv"``). A pattern that names a
            container selects every decomposable layer below it.

    Raises:
        ValueError: unknown preset, or patterns that select no decomposable layer.
    """
    if isinstance(targets, str):
        if targets not in COEFFICIENT_PRESETS:
            raise ValueError(
                f"Unknown coefficient preset {targets!r}; use one of {sorted(COEFFICIENT_PRESETS)} "
                "or a list of module-name patterns."
            )
        patterns = COEFFICIENT_PRESETS[targets]
    else:
        patterns = tuple(targets)
    selected = []
    for name, module in root.named_modules():
        if not name or not is_decomposable(module):
            continue
        prefixes = [name] + [name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)]
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns):
            selected.append(name)
    if not selected:
        raise ValueError(f"The coefficient targets {list(patterns)} select no dense nn.Linear or nn.Conv2d layer.")
    return selected


def apply_svd(
    root: nn.Module, targets: str | Sequence[str] = "paper", form: str = "auto", parametrization: str = "additive"
) -> list[str]:
    """Replace the selected layers of ``root`` in place by their SVD parametrization.

    Returns the names of the replaced modules. At return the module computes exactly what it computed before (up to
    float32 rounding), with the coefficients as the only new trainable tensors. ``parametrization``: see
    :class:`SVDLayer`.
    """
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"coefficient_parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}.")
    names = resolve_targets(root, targets)
    for name in names:
        module = root.get_submodule(name)
        build = SVDLinear.from_linear if isinstance(module, nn.Linear) else SVDConv2d.from_conv
        layer = build(module, form, parametrization)
        layer.train(module.training)
        _set_submodule(root, name, layer)
    return names


def merge_svd_layers(root: nn.Module) -> list[str]:
    """Write every :class:`SVDLayer` under ``root`` back as a plain layer, in place.

    The result has the state-dict keys of the original (undecomposed) model. Returns the merged module names.
    """
    names = [name for name, m in root.named_modules() if isinstance(m, SVDLayer)]
    for name in names:
        layer = root.get_submodule(name)
        dense = layer.to_dense()
        dense.train(layer.training)
        _set_submodule(root, name, dense)
    return names


def svd_layers(root: nn.Module) -> dict[str, SVDLayer]:
    """The :class:`SVDLayer` modules under ``root`` by qualified name."""
    return {name: m for name, m in root.named_modules() if isinstance(m, SVDLayer)}


def coefficient_parameters(root: nn.Module) -> list[nn.Parameter]:
    """The coefficient vectors of every :class:`SVDLayer` under ``root``."""
    return [m.coefficients for m in svd_layers(root).values()]


def coefficient_group(name: str) -> str:
    """The report group of a decomposed layer from its name under the image encoder: ``"neck"``, ``"attention"``,
    ``"mlp"``, ``"patch_embed"`` or ``"conv"`` (LiteMedSAM's convolution blocks and downsampling, anything else)."""
    parts = name.split(".")
    if "neck" in parts:
        return "neck"
    if "attn" in parts:
        return "attention"
    if "mlp" in parts:
        return "mlp"
    if parts[0] == "patch_embed":
        return "patch_embed"
    return "conv"


def coefficient_movement(root: nn.Module) -> dict[str, dict[str, float]]:
    """How far the coefficients under ``root`` moved from their pretrained values, by :func:`coefficient_group`.

    Returns:
        group -> ``{"count", "median", "max"}`` of ``|s - s0| / s0`` over the group's coefficients, plus an ``"all"``
        row; empty when ``root`` has no SVD layer. Groups in :data:`COEFFICIENT_GROUPS` order.
    """
    changes: dict[str, list[torch.Tensor]] = {}
    for name, layer in svd_layers(root).items():
        key = coefficient_group(name.removeprefix("image_encoder."))
        changes.setdefault(key, []).append(layer.relative_change().cpu())
    if not changes:
        return {}
    out = {}
    for key in [g for g in COEFFICIENT_GROUPS if g in changes] + ["all"]:
        values = torch.cat([t for v in changes.values() for t in v] if key == "all" else changes[key])
        out[key] = {"count": values.numel(), "median": values.median().item(), "max": values.max().item()}
    return out


def format_movement(movement: dict[str, dict[str, float]]) -> str:
    """One line for logs: ``neck 512: median 4.02%, max 12.1% | ...`` (or a sentence when there is nothing)."""
    if not movement:
        return "no SVD coefficients"
    return " | ".join(
        f"{group} {row['count']:,}: median {row['median']:.2%}, max {row['max']:.2%}" for group, row in movement.items()
    )


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
