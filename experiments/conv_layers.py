"""Every convolution of a network timed alone: forward, input gradient, weight gradient, ours and PyTorch's.

    python -m experiments.conv_layers --model resnet20 --batch 128
    python -m experiments.conv_layers --model resnet50 --batch 32 --json layers.json

The whole-step benchmark (`python -m resnet_jax.benchmark`) says how fast a network trains; this says where
the time goes. For each distinct convolution of the forward pass (`resnet_jax.models.summary.convolutions`) it
compiles alone the float32 forward pass, input gradient and weight gradient as each of `--impls` computes them
in the train step ("xla_cpu": the XLA:CPU layer of `resnet_jax.xla_cpu` with its compiler options; "xla":
XLA's own, with its defaults), and times each: the median of `--steps`
calls, the work finished before the clock stops. With PyTorch importable and the run on a CPU, PyTorch's
kernels for the same shapes (channels-last; `aten.convolution_backward` for each gradient alone) are timed in
the same process right after ours, layer by layer, so that both see the same machine (ratios, not absolute
times, are what to compare on a shared machine). The first convolution reads the images and needs no input
gradient, as in training. Totals weigh each convolution by how many times the network runs it. Both run with
this package's malloc setting (`resnet_jax.xla_cpu.malloc`), which speeds PyTorch up too. BN, ReLU and the rest
of the step are not here: the difference between these totals and a whole step is what they, and XLA's
scheduling, cost.
"""

import argparse
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax import xla_cpu
from resnet_jax.benchmark import build_model, median_seconds, run_and_report, software
from resnet_jax.models import input_shape
from resnet_jax.models.summary import Convolution, convolutions

KERNELS = ("fwd", "dx", "dw")
IMPLS = ("xla_cpu", "xla")
ALIASES = {"auto": "xla_cpu"}  # the XLA:CPU layer's name when it was a model option


def our_kernels(conv: Convolution, impl: str, platform: str) -> dict[str, Callable[[], Any]]:
    """The forward pass and each gradient of `conv` as `impl` computes them in a train step, compiled alone."""
    layer = impl == "xla_cpu" and platform == "cpu"
    conv_fn = xla_cpu.conv.conv_general_dilated if layer else lax.conv_general_dilated
    options = xla_cpu.compiler.compiler_options() if layer else None

    def forward(x, w):
        return conv_fn(x, w, conv.strides, conv.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    # Each gradient alone: XLA drops the other one from the compiled program.
    def input_grad(x, w, dy):
        return jax.vjp(lambda x_: forward(x_, w), x)[1](dy)[0]

    def weight_grad(x, w, dy):
        return jax.vjp(lambda w_: forward(x, w_), w)[1](dy)[0]

    kx, kw, kdy = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, conv.input_shape, jnp.float32)
    w = jax.random.normal(kw, conv.kernel_shape, jnp.float32)
    dy = jax.random.normal(kdy, conv.output_shape, jnp.float32)
    fwd = jax.jit(forward, compiler_options=options).lower(x, w).compile()
    dx = jax.jit(input_grad, compiler_options=options).lower(x, w, dy).compile()
    dw = jax.jit(weight_grad, compiler_options=options).lower(x, w, dy).compile()
    return {"fwd": lambda: fwd(x, w), "dx": lambda: dx(x, w, dy), "dw": lambda: dw(x, w, dy)}


def torch_kernels(conv: Convolution) -> dict[str, Callable[[], Any]]:
    """PyTorch's kernels for `conv` on the CPU, channels-last, as its autograd calls them in training."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # as ../shared/bench/torch_resnet.py
    n, h, w_in, c_in = conv.input_shape
    kh, kw, _, c_out = conv.kernel_shape
    # PyTorch pads symmetrically; the larger side gives the same output size for this package's paddings.
    padding = [max(pad) for pad in conv.padding]
    channels_last = torch.channels_last
    x = torch.randn(n, c_in, h, w_in).to(memory_format=channels_last)
    w = torch.randn(c_out, c_in, kh, kw).to(memory_format=channels_last)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(x, w, stride=list(conv.strides), padding=padding)
    n_, c_, ho, wo = out.shape
    if (n_, ho, wo, c_) != conv.output_shape:
        raise ValueError(f"PyTorch's padding {padding} gives {tuple(out.shape)} for {conv}")
    dy = torch.randn(n, c_out, ho, wo).to(memory_format=channels_last)

    def forward():
        with torch.no_grad():
            return torch.nn.functional.conv2d(x, w, stride=list(conv.strides), padding=padding)

    def backward(mask):
        return torch.ops.aten.convolution_backward(dy, x, w, None, list(conv.strides), padding, [1, 1], False,
                                                   [0, 0], 1, mask)

    return {"fwd": forward, "dx": lambda: backward([True, False, False]),
            "dw": lambda: backward([False, True, False])}


def peer_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def time_kernels(kernels: dict[str, Callable[[], Any]], needs_input_grad: bool, steps: int,
                 warmup: int) -> dict[str, float | None]:
    """Milliseconds per call of each kernel; None for the input gradient that training never computes."""
    return {k: median_seconds(kernels[k], steps, warmup) * 1e3 if k != "dx" or needs_input_grad else None
            for k in KERNELS}


def label(conv: Convolution) -> str:
    _, h, w, c_in = conv.input_shape
    kh, kw, _, c_out = conv.kernel_shape
    return f"{h}x{w} {c_in}->{c_out} {kh}x{kw}/{conv.strides[0]}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = build_model(args.model, "float32", args.stride_on)
    platform = jax.devices()[0].platform
    layers = convolutions(model, args.batch)
    impls = args.impls.split(",")
    sources = [*impls, *(["torch"] if args.peer and platform == "cpu" and peer_available() else [])]
    rows = []
    for conv, count in layers.items():
        needs_input_grad = conv.input_shape[1:] != input_shape(model)
        row: dict[str, Any] = {"layer": label(conv), "count": count, "gflop": 2 * conv.macs / 1e9,
                               "input_shape": conv.input_shape, "kernel_shape": conv.kernel_shape,
                               "strides": conv.strides, "padding": conv.padding}
        for source in sources:
            kernels = torch_kernels(conv) if source == "torch" else our_kernels(conv, source, platform)
            for k, ms in time_kernels(kernels, needs_input_grad, args.steps, args.warmup).items():
                row[f"{source}_{k}_ms"] = ms
        rows.append(row)
        print(f"  {row['layer']}", flush=True)
    totals = {f"{s}_{k}_ms": sum(r["count"] * (r[f"{s}_{k}_ms"] or 0.0) for r in rows)
              for s in sources for k in KERNELS}
    for s in sources:
        totals[f"{s}_ms"] = sum(totals[f"{s}_{k}_ms"] for k in KERNELS)
    result = {"model": args.model, "batch": args.batch, "platform": platform,
              "device_kind": jax.devices()[0].device_kind, "software": software(), "sources": sources, "layers": rows,
              "totals": totals}
    if "torch" in sources:
        # Speed ours/PyTorch, as the whole-step benchmark's ratio: above 1 means ours is faster.
        result["ratio"] = {impl: totals["torch_ms"] / totals[f"{impl}_ms"] for impl in impls}
    return result


def table(result: dict[str, Any]) -> str:
    sources = result["sources"]
    head = f"{'convolution':<22} {'runs':>4} {'GFLOP':>6} " + " ".join(
        f"{s + ' ' + k:>11}" for s in sources for k in KERNELS)
    lines = [f"{result['model']} at batch {result['batch']} on {result['device_kind']}, ms per call", head]
    fmt = lambda ms: f"{ms:>11.2f}" if ms is not None else f"{'-':>11}"  # noqa: E731
    for r in result["layers"]:
        lines.append(f"{r['layer']:<22} {r['count']:>4} {r['gflop']:>6.2f} "
                     + " ".join(fmt(r[f"{s}_{k}_ms"]) for s in sources for k in KERNELS))
    t = result["totals"]
    lines.append(f"{'a step (x runs)':<22} {'':>4} {'':>6} "
                 + " ".join(fmt(t[f"{s}_{k}_ms"]) for s in sources for k in KERNELS))
    lines.append("convolutions of a step: " + ", ".join(f"{s} {t[f'{s}_ms']:.0f} ms" for s in sources)
                 + "".join(f"; ratio {impl}/PyTorch {r:.2f}" for impl, r in result.get("ratio", {}).items()))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed calls per kernel (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--impls", default="xla_cpu,xla", help=f"what to time, comma-separated: {', '.join(IMPLS)}")
    p.add_argument("--stride-on", choices=["1x1", "3x3"], help="bottleneck stride placement (default: the model's)")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="time PyTorch's kernels too (CPU runs, when torch is importable)")
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args(argv)
    impls = [ALIASES.get(impl, impl) for impl in args.impls.split(",")]
    for impl in impls:
        if impl not in IMPLS:
            p.error(f"unknown implementation {impl!r} in --impls; allowed: {', '.join(IMPLS)}")
    args.impls = ",".join(impls)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_report(run, table, parse_args(argv))


if __name__ == "__main__":
    main()
