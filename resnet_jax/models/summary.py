"""Sizes of a network: parameter counts per stage, forward multiply-adds, and its convolutions' shapes."""

import dataclasses
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from resnet_jax.models.registry import input_shape
from resnet_jax.models.resnet import ResNet


def abstract_variables(model: ResNet, image_shape: tuple[int, int, int] | None = None) -> Any:
    """The shapes and dtypes of `model.init`'s variables, without computing (or allocating) them."""
    x = jax.ShapeDtypeStruct((1, *(image_shape or input_shape(model))), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))


def count_params(params: Any) -> int:
    """Number of scalars in a pytree of (abstract or concrete) arrays."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


def params_by_module(params: Any) -> dict[str, int]:
    """Parameter counts per top-level module (stem_conv, stage1_block1, ..., head), in network order."""
    counts: dict[str, int] = defaultdict(int)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        counts[path[0].key] += int(np.prod(leaf.shape))
    return dict(counts)


def xla_flops(cost: Any) -> float:
    """FLOPs from a compiled program's `cost_analysis()`: a dict on current JAX, a one-element list of dicts on
    older releases, None or empty on backends without one (0)."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost.get("flops", 0.0)) if cost else 0.0


def forward_macs(model: ResNet, image_shape: tuple[int, int, int] | None = None) -> float:
    """Multiply-adds of one inference forward pass on one image, as XLA counts them in the compiled program.

    XLA counts two FLOPs per multiply-add and skips taps that fall on padding, so this reads a few per cent
    under an analytic count such as Table 1's. XLA counts a loop's body once, so a `scan_blocks` network is
    counted in its unrolled form (same function).
    """
    model = model.clone(scan_blocks=False)
    variables = abstract_variables(model, image_shape)
    x = jax.ShapeDtypeStruct((1, *(image_shape or input_shape(model))), jnp.float32)
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    return xla_flops(compiled.cost_analysis()) / 2


def _subjaxprs(params: dict) -> list:
    found = []
    for value in params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jax.extend.core.Jaxpr):
                found.append(item)
    return found


def _valid_taps(size: int, kernel: int, stride: int, pad: tuple[int, int], dilation: int) -> int:
    """Number of (output position, kernel tap) pairs of one spatial axis that read a real input pixel."""
    out = (size + pad[0] + pad[1] - dilation * (kernel - 1) - 1) // stride + 1
    return sum(0 <= o * stride - pad[0] + k * dilation < size for o in range(out) for k in range(kernel))


def _equations(jaxpr: Any, repeats: int = 1) -> Iterator[tuple[Any, int]]:
    """Every equation of a traced program, nested ones included, with how many times it runs (a scan's body,
    as in `scan_blocks`, runs `length` times)."""
    for eqn in jaxpr.eqns:
        yield eqn, repeats
        inner = repeats * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for sub in _subjaxprs(eqn.params):
            yield from _equations(sub, inner)


def _equation_macs(eqn: Any, skip_padding: bool) -> float:
    if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        out = eqn.outvars[0].aval.shape
        dn, p = eqn.params["dimension_numbers"], eqn.params
        per_tap = lhs[dn.lhs_spec[0]] * rhs[dn.rhs_spec[0]] * rhs[dn.rhs_spec[1]]  # batch * c_out * c_in/groups
        taps = 1
        for axis, (size, kernel) in enumerate(zip((lhs[i] for i in dn.lhs_spec[2:]),
                                                    (rhs[i] for i in dn.rhs_spec[2:]))):
            if skip_padding:
                taps *= _valid_taps(size, kernel, p["window_strides"][axis], p["padding"][axis],
                                    p["rhs_dilation"][axis])
            else:
                taps *= out[dn.out_spec[2 + axis]] * kernel
        return float(per_tap * taps)
    if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return float(np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contract]))
    return 0.0


def _forward_jaxpr(model: ResNet, batch: int, image_shape: tuple[int, int, int] | None) -> Any:
    variables = abstract_variables(model, image_shape)
    x = jax.ShapeDtypeStruct((batch, *(image_shape or input_shape(model))), jnp.float32)
    return jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x).jaxpr


def analytic_macs(model: ResNet, image_shape: tuple[int, int, int] | None = None,
                  skip_padding: bool = False) -> float:
    """Multiply-adds of the convolutions and the dense layer of one forward pass on one image, counted from the
    traced program's shapes: every kernel tap (as Table 1 counts), or with `skip_padding` only the taps that
    read real pixels (as XLA's cost analysis counts)."""
    jaxpr = _forward_jaxpr(model, 1, image_shape)
    return sum(repeats * _equation_macs(eqn, skip_padding) for eqn, repeats in _equations(jaxpr))


@dataclasses.dataclass(frozen=True)
class Convolution:
    """One convolution of a forward pass: NHWC input and HWIO kernel shapes, strides and explicit padding."""

    input_shape: tuple[int, int, int, int]
    kernel_shape: tuple[int, int, int, int]
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        n, h, w, _ = self.input_shape
        kh, kw, _, c_out = self.kernel_shape
        (sh, sw), (pad_h, pad_w) = self.strides, self.padding
        return n, (h + sum(pad_h) - kh) // sh + 1, (w + sum(pad_w) - kw) // sw + 1, c_out

    @property
    def macs(self) -> int:
        """Multiply-adds of the forward pass, every kernel tap counted (as Table 1 counts)."""
        kh, kw, c_in, _ = self.kernel_shape
        return int(np.prod(self.output_shape)) * kh * kw * c_in


def convolutions(model: ResNet, batch: int = 1, image_shape: tuple[int, int, int] | None = None
                 ) -> dict[Convolution, int]:
    """The distinct convolutions of the network's forward pass on `batch` images, in the order they first run,
    each with how many times it runs in one pass."""
    found: dict[Convolution, int] = {}
    for eqn, repeats in _equations(_forward_jaxpr(model, batch, image_shape)):
        if eqn.primitive.name != "conv_general_dilated":
            continue
        p, dn = eqn.params, eqn.params["dimension_numbers"]
        if any(d != 1 for d in (*p["lhs_dilation"], *p["rhs_dilation"])) or p["feature_group_count"] != 1:
            raise ValueError(f"not a plain convolution: {eqn}")
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        conv = Convolution(
            input_shape=tuple(lhs[i] for i in (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])),
            kernel_shape=tuple(rhs[i] for i in (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])),
            strides=tuple(p["window_strides"]), padding=tuple(tuple(pad) for pad in p["padding"]))
        found[conv] = found.get(conv, 0) + repeats
    return found


def describe(model: ResNet, name: str = "") -> str:
    """A short table of parameters per stage, for launch.py and notebooks."""
    params = abstract_variables(model)["params"]
    stages: dict[str, int] = defaultdict(int)
    for module, n in params_by_module(params).items():
        stages[module.split("_")[0]] += n
    order = lambda s: (s != "stem", s == "head", s)  # noqa: E731  # stem, stage1.., head
    stages = {s: stages[s] for s in sorted(stages, key=order)}
    width = max(len(s) for s in stages)
    lines = [f"{name or 'model'}: shortcut={model.shortcut}, {'bottleneck' if model.bottleneck else 'basic'} "
             f"blocks {tuple(model.stage_sizes)}, input {input_shape(model)}, dtype {model.dtype}"]
    lines += [f"  {stage:<{width}}  {n:>12,}" for stage, n in stages.items()]
    lines.append(f"  {'total':<{width}}  {count_params(params):>12,} parameters")
    return "\n".join(lines)
