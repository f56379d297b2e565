# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Cost of the SVD coefficient layers against the plain layers, on the SAM ViT-B image-encoder shapes at full rank.

For every selected layer shape the script builds a plain ``nn.Linear`` / ``nn.Conv2d`` with random weights
(std 0.02) and frozen parameters, decomposes it at full rank and times, interleaved round-robin in every repeat:

training step (forward, then backward with a fixed random output gradient ``g``, i.e. the gradients of
``sum(output * g)``; only the coefficients are trainable):

- ``plain``: the frozen plain layer (the reference, = 1.00);
- ``official factored``: the decomposed layer run as the original SAM-PARSER code runs it, ``x -> Vh -> * s -> U``
  at every call (a private reimplementation below);
- ``ours (train)``: :class:`~samparser_monai.networks.svd.SVDLinear` / :class:`~samparser_monai.networks.svd.SVDConv2d`
  with ``form="auto"`` in train mode; the column "auto form" says which exact form it picked for the shape.

inference (forward only, under ``torch.no_grad()``):

- ``plain`` (= 1.00);
- ``ours (eval)``: the SVD layer after ``.eval()`` (it runs with its cached merged weight);
- ``merged``: the plain layer returned by ``.to_dense()``.

With ``--all-forms`` our training layer is also timed with each exact form forced (``ours (factored)``,
``ours (dense)``), to judge the form that ``"auto"`` picks.

Linear inputs are ``(1, tokens, in)`` and require grad (they sit mid-network); so do the neck inputs. The patch
embedding reads the image, which does not require grad: with its weight frozen too, the plain patch embedding has
nothing to differentiate, so its training step is its forward pass.

Every ratio is the median over the repeats of ``variant time / plain time`` within the same repeat (the variants of a
repeat run back to back, in an order rotated every repeat, so drifting machine load hits all of them alike); the
``±`` figure is half the interquartile range of those per-repeat ratios. The absolute plain times are medians in
milliseconds. Before timing, each layer is checked once: every variant must give the plain layer's output, the
official and our layer the same coefficient gradient, and all training variants the same input gradient; the
script exits with status 1 otherwise.

Example (the full benchmark, a few minutes on 2 CPU cores)::

    python scripts/benchmark_layers.py --output benchmark_layers.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from samparser_monai.networks.svd import SVDConv2d, SVDLayer, SVDLinear

#: Relative tolerance of the float32 equivalence checks (errors are measured against the largest reference entry).
CHECK_TOLERANCE = 1e-4

#: Training forms of our layer that ``--all-forms`` times too, each forced.
FORCED_FORMS: tuple[str, ...] = ("factored", "dense")


class BenchmarkError(RuntimeError):
    """A failed equivalence check or an unusable setting; its message is one sentence for the user."""


@dataclass(frozen=True)
class LayerSpec:
    """One SAM ViT-B image-encoder layer shape.

    Args:
        name: module name in the image encoder (``blocks.*`` stands for the 12 transformer blocks).
        in_channels: input features / channels.
        out_channels: output features / channels.
        kernel: conv kernel size; ``0`` for a linear layer.
        stride: conv stride.
        padding: conv padding.
        bias: whether the layer has a bias.
        input_requires_grad: whether the layer's input requires grad in the network.
    """

    name: str
    in_channels: int
    out_channels: int
    kernel: int = 0
    stride: int = 1
    padding: int = 0
    bias: bool = True
    input_requires_grad: bool = True

    @property
    def is_conv(self) -> bool:
        """True for a convolution."""
        return self.kernel > 0

    def describe(self) -> str:
        """Short layer description for the table."""
        if not self.is_conv:
            return f"Linear {self.in_channels}->{self.out_channels}"
        text = f"Conv2d {self.in_channels}->{self.out_channels} k{self.kernel}"
        text += f" s{self.stride}" if self.stride != 1 else ""
        text += f" p{self.padding}" if self.padding else ""
        return text + ("" if self.bias else ", no bias")

    def build(self, device: torch.device, generator: torch.Generator) -> nn.Module:
        """The plain layer with random weights of std 0.02 and every parameter frozen."""
        if self.is_conv:
            layer: nn.Module = nn.Conv2d(
                self.in_channels,
                self.out_channels,
                self.kernel,
                stride=self.stride,
                padding=self.padding,
                bias=self.bias,
                device=device,
            )
        else:
            layer = nn.Linear(self.in_channels, self.out_channels, bias=self.bias, device=device)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=generator).mul_(0.02))
        return layer.requires_grad_(False)

    def input_shape(self, tokens: int) -> tuple[int, ...]:
        """Shape of the layer input for ``tokens`` output tokens (convs need a square token grid)."""
        if not self.is_conv:
            return (1, tokens, self.in_channels)
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise BenchmarkError(f"the conv layer {self.name} needs a square token grid, but --tokens {tokens} is not.")
        size = (side - 1) * self.stride + self.kernel - 2 * self.padding
        return (1, self.in_channels, size, size)


#: The SAM ViT-B image-encoder layers (the 12 transformer blocks share their four linear shapes).
VIT_B_LAYERS: tuple[LayerSpec, ...] = (
    LayerSpec("patch_embed.proj", 3, 768, kernel=16, stride=16, input_requires_grad=False),
    LayerSpec("blocks.*.attn.qkv", 768, 2304),
    LayerSpec("blocks.*.attn.proj", 768, 768),
    LayerSpec("blocks.*.mlp.lin1", 768, 3072),
    LayerSpec("blocks.*.mlp.lin2", 3072, 768),
    LayerSpec("neck.0", 768, 256, kernel=1, bias=False),
    LayerSpec("neck.2", 256, 256, kernel=3, padding=1, bias=False),
)


class _OfficialFactored(nn.Module):
    """A decomposed layer run as the original SAM-PARSER code runs it: ``x -> Vh -> * s -> U`` at every call.

    ``U`` and ``Vh`` are frozen, the coefficients ``s`` trainable; a conv runs ``Vh`` as a ``kh x kw`` conv with
    ``r`` output channels (the layer's stride, padding and dilation), scales each channel and applies ``U`` as a
    ``1 x 1`` conv. The bases are copied from ``layer`` so the coefficient gradients can be compared exactly.
    """

    def __init__(self, layer: SVDLayer, conv: nn.Conv2d | None = None) -> None:
        super().__init__()
        self.u = nn.Parameter(layer.basis_u.detach().clone(), requires_grad=False)
        self.s = nn.Parameter(layer.coefficients.detach().clone())
        self.vh = nn.Parameter(layer.basis_vh.detach().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the factored layer."""
        if self.conv is None:
            return F.linear(F.linear(x, self.vh) * self.s, self.u, self.bias)
        c = self.conv
        rank = self.s.shape[0]
        z = F.conv2d(x, self.vh.view(rank, c.in_channels, *c.kernel_size), None, c.stride, c.padding, c.dilation)
        z = z * self.s.view(-1, 1, 1)
        return F.conv2d(z, self.u.view(c.out_channels, rank, 1, 1), self.bias)


@dataclass
class LayerResult:
    """Timings of one layer: plain medians in seconds and per-repeat ratios to plain."""

    spec: LayerSpec
    auto_form: str
    train_plain_s: float
    infer_plain_s: float
    ratios: dict[tuple[str, str], list[float]]


def _train_step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    """Forward, then backward of ``sum(output * grad_out)`` (as ``output.backward(grad_out)``, the same gradients)."""

    def step() -> None:
        out = module(x)
        if out.requires_grad:  # the frozen plain patch embedding has nothing to differentiate
            out.backward(grad_out)

    return step


def _infer_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Forward only, without autograd."""

    def step() -> None:
        with torch.no_grad():
            module(x)

    return step


def _check_close(actual: torch.Tensor | None, expected: torch.Tensor | None, what: str, name: str) -> None:
    """Raise :class:`BenchmarkError` unless ``actual`` matches ``expected`` to float32 accuracy."""
    if actual is None or expected is None:
        raise BenchmarkError(f"{name}: {what} is missing.")
    scale = expected.abs().max().item()
    if not torch.allclose(actual, expected, rtol=CHECK_TOLERANCE, atol=CHECK_TOLERANCE * scale):
        error = (actual - expected).abs().max().item() / max(scale, 1e-30)
        raise BenchmarkError(
            f"{name}: {what} differs by {error:.2e} relative to its largest entry (tolerance {CHECK_TOLERANCE:.0e})."
        )


def _check_layer(
    name: str,
    train_modules: dict[str, nn.Module],
    infer_modules: dict[str, nn.Module],
    x: torch.Tensor,
    grad_out: torch.Tensor,
) -> None:
    """Check once that every variant gives the plain output, and the same coefficient and input gradients."""
    with torch.no_grad():
        reference = train_modules["plain"](x)
        for label, module in infer_modules.items():
            _check_close(module(x), reference, f"the output of {label} (inference)", name)
    input_grads: dict[str, torch.Tensor | None] = {}
    for label, module in train_modules.items():
        x.grad = None
        out = module(x)
        _check_close(out.detach(), reference, f"the output of {label} (training)", name)
        if out.requires_grad:
            out.backward(grad_out)
        input_grads[label] = None if x.grad is None else x.grad.clone()
    official = train_modules["official factored"]
    for label, module in train_modules.items():
        if isinstance(module, SVDLayer):
            what = f"the coefficient gradient of {label} vs official factored"
            _check_close(module.coefficients.grad, official.s.grad, what, name)
    if x.requires_grad:
        for label in train_modules:
            _check_close(input_grads[label], input_grads["plain"], f"the input gradient of {label}", name)
    x.grad = None
    for module in train_modules.values():
        module.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run the untimed set-up (LAPACK SVD) on one thread: multi-threaded LAPACK can stall for seconds on a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _forced_label(form: str) -> str:
    """Variant label of our layer with ``form`` forced."""
    return f"ours ({form})"


def _interquartile_half(values: Sequence[float]) -> float:
    """Half the interquartile range (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / 2


def benchmark_layer(
    spec: LayerSpec,
    tokens: int,
    repeats: int,
    warmup: int,
    device: torch.device,
    generator: torch.Generator,
    progress: tqdm,
    all_forms: bool = False,
) -> LayerResult:
    """Check and time the variants of one layer shape; see the module docstring.

    With ``all_forms``, our layer is also timed with each training form forced (to judge the ``"auto"`` choice).
    """
    plain = spec.build(device, generator)
    with _single_thread():
        if spec.is_conv:
            assert isinstance(plain, nn.Conv2d)
            ours: SVDLayer = SVDConv2d.from_conv(plain, form="auto")
            official = _OfficialFactored(ours, conv=plain)
        else:
            assert isinstance(plain, nn.Linear)
            ours = SVDLinear.from_linear(plain, form="auto")
            official = _OfficialFactored(ours)
        merged = ours.to_dense().requires_grad_(False)
    ours.train()
    ours_eval = copy.deepcopy(ours).eval()
    forced: dict[str, nn.Module] = {}
    for form in FORCED_FORMS if all_forms else ():
        layer = copy.deepcopy(ours)
        layer.form = form
        forced[_forced_label(form)] = layer

    x = torch.randn(spec.input_shape(tokens), generator=generator).to(device)
    x.requires_grad_(spec.input_requires_grad)
    with torch.no_grad():
        out_shape = plain(x).shape
    grad_out = torch.randn(out_shape, generator=generator).to(device)
    auto_form = "dense" if ours._use_dense(ours._tokens(x), x.requires_grad) else "factored"

    train_modules: dict[str, nn.Module] = {"plain": plain, "official factored": official, "ours (train)": ours}
    train_modules.update(forced)
    infer_modules: dict[str, nn.Module] = {"plain": plain, "ours (eval)": ours_eval, "merged": merged}
    _check_layer(spec.name, train_modules, infer_modules, x, grad_out)

    steps: dict[tuple[str, str], Callable[[], None]] = {}
    trainable = [p for m in train_modules.values() for p in m.parameters() if p.requires_grad]
    for label, module in train_modules.items():
        steps[("train", label)] = _train_step(module, x, grad_out)
    for label, module in infer_modules.items():
        steps[("infer", label)] = _infer_step(module, x)
    order = [("train", label) for label in train_modules] + [("infer", label) for label in infer_modules]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[tuple[str, str], list[float]] = {key: [] for key in order}
    progress.set_postfix_str(spec.name)
    gc.collect()
    gc.disable()  # no collector pauses inside a timed step
    try:
        for index in range(warmup + repeats):
            shift = index % len(order)
            for key in order[shift:] + order[:shift]:
                x.grad = None  # a fresh training step: gradients start from None, as after zero_grad()
                for p in trainable:
                    p.grad = None
                sync()
                start = time.perf_counter()
                steps[key]()
                sync()
                elapsed = time.perf_counter() - start
                if index >= warmup:
                    times[key].append(elapsed)
            progress.update(1)
    finally:
        gc.enable()

    ratios = {}
    for phase, label in order:
        reference = times[(phase, "plain")]
        ratios[(phase, label)] = [t / r for t, r in zip(times[(phase, label)], reference)]
    return LayerResult(
        spec=spec,
        auto_form=auto_form,
        train_plain_s=statistics.median(times[("train", "plain")]),
        infer_plain_s=statistics.median(times[("infer", "plain")]),
        ratios=ratios,
    )


def _ratio_cell(values: Sequence[float]) -> str:
    """``median ±half-IQR`` of per-repeat ratios."""
    return f"{statistics.median(values):.2f} ±{_interquartile_half(values):.2f}"


def _layer_count(spec: LayerSpec) -> int:
    """How often the shape occurs in the ViT-B image encoder (12 transformer blocks)."""
    return 12 if spec.name.startswith("blocks.") else 1


def _weighted_ratio(results: Sequence[LayerResult], phase: str, label: str) -> float:
    """Cost of all 51 ViT-B encoder layers under a variant over their plain cost (median times, weighted by count)."""
    plain = [r.train_plain_s if phase == "train" else r.infer_plain_s for r in results]
    counts = [_layer_count(r.spec) for r in results]
    medians = [statistics.median(r.ratios[(phase, label)]) for r in results]
    return sum(c * m * p for c, m, p in zip(counts, medians, plain)) / sum(c * p for c, p in zip(counts, plain))


def _encoder_row(results: Sequence[LayerResult], train_columns: Sequence[str]) -> str:
    """A last row: the 51 decomposable layers of the ViT-B encoder together (``encoder`` preset)."""
    train_ms = sum(_layer_count(r.spec) * r.train_plain_s for r in results) * 1e3
    infer_ms = sum(_layer_count(r.spec) * r.infer_plain_s for r in results) * 1e3
    cells = [
        "**all 51 layers**",
        "ViT-B encoder, weighted by count",
        "",
        "",
        f"{train_ms:.0f}",
        *(f"**{_weighted_ratio(results, 'train', label):.2f}**" for label in train_columns),
        f"{infer_ms:.0f}",
        f"**{_weighted_ratio(results, 'infer', 'ours (eval)'):.3f}**",
        f"**{_weighted_ratio(results, 'infer', 'merged'):.3f}**",
    ]
    return "| " + " | ".join(cells) + " |"


def render_table(results: Sequence[LayerResult], header: str) -> str:
    """The Markdown report: a header line, the table and a legend."""
    forced = [_forced_label(f) for f in FORCED_FORMS if ("train", _forced_label(f)) in results[0].ratios]
    train_columns = ["official factored", "ours (train)", *forced]
    columns = ["layer", "shape", "input grad", "auto form", "train: plain ms", *train_columns]
    columns += ["infer: plain ms", "ours (eval)", "merged"]
    lines = [
        header,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * 4 + "---:|" * (len(columns) - 4),
    ]
    for result in results:
        spec = result.spec
        forward_only = "" if spec.input_requires_grad else " \\*"
        cells = [
            f"`{spec.name}`",
            spec.describe(),
            "yes" if spec.input_requires_grad else "no",
            result.auto_form,
            f"{result.train_plain_s * 1e3:.2f}{forward_only}",
            *(_ratio_cell(result.ratios[("train", label)]) for label in train_columns),
            f"{result.infer_plain_s * 1e3:.2f}",
            _ratio_cell(result.ratios[("infer", "ours (eval)")]),
            _ratio_cell(result.ratios[("infer", "merged")]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if len(results) == len(VIT_B_LAYERS):
        lines.append(_encoder_row(results, train_columns))
    lines += [
        "",
        "Ratios are to the frozen plain layer of the same shape (= 1.00): median over repeats of the per-repeat ratio, "
        "± half its interquartile range. Training step = forward + backward with only the coefficients trainable; "
        "inference = forward under `torch.no_grad()`. Plain times are medians in milliseconds.",
    ]
    if forced:
        lines += ["", "`ours (factored)` / `ours (dense)`: our layer with that training form forced instead of `auto`."]
    if any(not r.spec.input_requires_grad for r in results):
        lines += [
            "",
            "\\* frozen weight and an input without grad: the plain layer has nothing to differentiate, so its "
            "training step is its forward pass.",
        ]
    return "\n".join(lines) + "\n"


def select_layers(selectors: Sequence[str] | None) -> list[LayerSpec]:
    """Layers matching any selector (an ``fnmatch`` pattern or a substring of the name); all when ``None``."""
    if not selectors:
        return list(VIT_B_LAYERS)
    chosen = []
    for selector in selectors:
        matches = [s for s in VIT_B_LAYERS if fnmatch.fnmatchcase(s.name, selector) or selector in s.name]
        if not matches:
            names = ", ".join(s.name for s in VIT_B_LAYERS)
            raise BenchmarkError(f"--shapes {selector!r} matches no layer; the layers are: {names}.")
        chosen += [s for s in matches if s not in chosen]
    return [s for s in VIT_B_LAYERS if s in chosen]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()})"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    names = ", ".join(s.name for s in VIT_B_LAYERS)
    parser = argparse.ArgumentParser(
        description="Time the SVD coefficient layers (official factored form, ours in train and eval mode, merged) "
        "against the frozen plain layers on the SAM ViT-B image-encoder shapes at full rank, and print a Markdown "
        "table of cost ratios.",
        epilog=f"Layers: {names}.",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default) or cuda")
    parser.add_argument(
        "--tokens", type=int, default=4096, help="tokens per image (default 4096: the 64x64 grid of a 1024 px image)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per layer (default 15; 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds per layer (default 2; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a rough look")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument(
        "--shapes",
        nargs="+",
        metavar="NAME",
        default=None,
        help="layers to time (names, fnmatch patterns or substrings)",
    )
    parser.add_argument(
        "--all-forms",
        action="store_true",
        help="also time our layer with each training form forced (factored, dense), to judge the auto choice",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights and inputs (default 0)")
    parser.add_argument("--output", metavar="FILE", default=None, help="also write the Markdown table to FILE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if repeats < 1 or warmup < 0 or args.tokens < 1:
        parser.error("--repeats and --tokens must be at least 1 and --warmup at least 0.")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1.")
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda was asked for but CUDA is not available.", file=sys.stderr)
            return 1
        # exact float32 everywhere, so that the variants compare to float32 accuracy
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif device.type != "cpu":
        parser.error(f"--device must be cpu or cuda, got {args.device!r}.")

    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        print(f"error: the folder of --output {args.output} does not exist.", file=sys.stderr)
        return 1
    try:
        layers = select_layers(args.shapes)
        for spec in layers:
            spec.input_shape(args.tokens)  # fail early on a token count that is no square grid
        header = (
            f"torch {torch.__version__}, device {_device_name(device)}, threads {torch.get_num_threads()}, "
            f"tokens {args.tokens}, repeats {repeats}, warmup {warmup}, float32"
            + (", TF32 off" if device.type == "cuda" else "")
        )
        generator = torch.Generator().manual_seed(args.seed)
        results = []
        with tqdm(total=len(layers) * (warmup + repeats), desc="benchmark", unit="round", file=sys.stderr) as bar:
            for spec in layers:
                result = benchmark_layer(spec, args.tokens, repeats, warmup, device, generator, bar, args.all_forms)
                results.append(result)
                gc.collect()
    except BenchmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    table = render_table(results, header)
    print(table, end="")
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as handle:
                handle.write(table)
        except OSError as error:
            print(f"error: could not write {args.output}: {error.strerror}.", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
