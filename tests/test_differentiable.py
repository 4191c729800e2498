"""The network is plain Flax on every platform: forward mode, Jacobians and Hessians work on `models.create`
and agree with reverse mode and with finite differences (curvature and NTK studies need them)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from resnet_jax import models

# (name, create options, image size): a basic, a bottleneck, a plain and a scanned network.
NETWORKS = {
    "basic": ("resnet8", {}, 8),
    "bottleneck": ("resnet50", {"num_classes": 10}, 16),
    "plain": ("plain8", {}, 8),
    "scanned": ("resnet20", {"scan_blocks": True}, 8),
}


def random_like(tree, seed):
    """Gaussian noise shaped as `tree`, drawn as one vector (one random-number kernel, whatever the leaves)."""
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype))


def tree_dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def setup(kind):
    """(model, images, params, running BN statistics, a parameter tangent)."""
    name, options, size = NETWORKS[kind]
    model = models.create(name, **options)
    images = jax.random.normal(jax.random.key(1), (2, size, size, 3))

    @jax.jit
    def init():
        variables = model.init(jax.random.key(0), images)
        # Running statistics unlike init's (0, 1), so that eval mode is not the identity on them.
        stats = jax.tree_util.tree_map(lambda s, r: s + 0.1 * jnp.abs(r), variables["batch_stats"],
                                       random_like(variables["batch_stats"], 2))
        # A tangent of each parameter in proportion to it.
        tangent = jax.tree_util.tree_map(lambda p, r: p * r, variables["params"], random_like(variables["params"], 3))
        return variables["params"], stats, tangent

    return model, images, *init()


@pytest.mark.parametrize("kind", NETWORKS)
def test_forward_mode_and_second_derivatives_agree_with_reverse_mode_and_finite_differences(kind):
    model, images, params, stats, t = setup(kind)

    def logits(p, x=images):
        return model.apply({"params": p, "batch_stats": stats}, x)

    # jvp of the parameters: <u, J t> from forward mode equals <J^T u, t> from reverse mode; jax.linearize gives
    # the same J t, and a central difference along t agrees (the step is small relative to each parameter, so
    # that few ReLUs or window maxima change sides).
    u = jax.random.normal(jax.random.key(4), (images.shape[0], model.num_classes))
    out, jvp = jax.jit(lambda p, t: jax.jvp(logits, (p,), (t,)))(params, t)
    reverse = jax.jit(lambda p, t: tree_dot(jax.vjp(logits, p)[1](u)[0], t))(params, t)
    np.testing.assert_allclose(jnp.vdot(u, jvp), reverse, rtol=1e-4)
    np.testing.assert_allclose(jax.jit(lambda p, t: jax.linearize(logits, p)[1](t))(params, t), jvp, rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(jvp).max()))
    shifted = jax.jit(lambda s: logits(jax.tree_util.tree_map(lambda p, d: p + s * d, params, t)))
    eps = 1e-4
    np.testing.assert_allclose(jvp, (shifted(eps) - shifted(-eps)) / (2 * eps),
                               atol=0.05 * float(jnp.abs(jvp).max()))
    np.testing.assert_allclose(out, shifted(0.0), rtol=1e-5, atol=1e-5 * float(jnp.abs(out).max()))

    # jacfwd with respect to the input (a 2x2 corner of the first image): equal to jacrev.
    def corner(z):
        return logits(params, images.at[0, :2, :2].set(z.reshape(2, 2, 3)))[0]

    z = images[0, :2, :2].reshape(-1)
    np.testing.assert_allclose(jax.jit(jax.jacfwd(corner))(z), jax.jit(jax.jacrev(corner))(z), rtol=1e-4,
                               atol=1e-6)

    # The Hessian of the loss with respect to a few parameters of the first convolution and of a deep BN, forward
    # over reverse (jax.hessian): symmetric, and equal to reverse over reverse. (Central differences of the
    # gradient do not converge to it in a ReLU network: every kink a step crosses adds a jump.)
    flat = traverse_util.flatten_dict(params, sep="/")
    bn = next(k for k in flat if k.endswith("scale") and "stage2" in k)
    picked = {"stem_conv/kernel": (1, 1, 0, slice(0, 3)), bn: slice(0, 2)}
    labels = jnp.arange(images.shape[0]) % 10

    def loss(theta):
        changed, offset = dict(flat), 0
        for path, index in picked.items():
            size = flat[path][index].size
            changed[path] = flat[path].at[index].set(theta[offset:offset + size])
            offset += size
        out = logits(traverse_util.unflatten_dict(changed, sep="/"))
        return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()

    theta = jnp.concatenate([flat[path][index] for path, index in picked.items()])
    hessian = jax.jit(jax.hessian(loss))(theta)
    reverse = jax.jit(jax.jacrev(jax.grad(loss)))(theta)
    scale = float(jnp.abs(reverse).max())
    assert hessian.shape == (5, 5) and scale > 0
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-5 * scale)
    np.testing.assert_allclose(hessian, reverse, rtol=1e-4, atol=1e-5 * scale)
