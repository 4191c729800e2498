"""The one train step and eval step: pure functions of (state, batch), compiled once over the device mesh."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from resnet_jax.data.eval import average_view_scores, image_keys
from resnet_jax.models import ResNet
from resnet_jax.sharding import batch_sharding, replicated
from resnet_jax.train_state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def forward_train(model: ResNet, variables: dict[str, Any], images: jax.Array,
                  ghost_batch_size: int = 0) -> tuple[jax.Array, Any]:
    """Training-mode forward: logits and updated BN statistics.

    ghost_batch_size 0: BN statistics over the whole global batch (synchronised across devices: XLA inserts
    the all-reduce). k > 0: over fixed groups of k consecutive examples (the paper used 32 per GPU), each
    group normalised on its own and the groups' running-statistic updates averaged. Either way the arithmetic
    does not depend on how many devices the batch is spread over.
    """
    apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    if not ghost_batch_size:
        logits, updates = apply(variables, images)
        return logits, updates["batch_stats"]
    groups = images.reshape(-1, ghost_batch_size, *images.shape[1:])
    logits, updates = jax.vmap(lambda x: apply(variables, x))(groups)
    stats = jax.tree_util.tree_map(lambda s: s.mean(axis=0), updates["batch_stats"])
    return logits.reshape(-1, logits.shape[-1]), stats


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest scores (ties counted against us)."""
    label_score = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    return (jnp.sum(logits > label_score, axis=-1) < k).astype(jnp.float32)


def train_step(state: TrainState, batch: Batch, *, model: ResNet, tx: optax.GradientTransformation,
               schedule: optax.Schedule, ghost_batch_size: int = 0) -> tuple[TrainState, Metrics]:
    """Forward in training mode, softmax cross-entropy, SGD update (weight decay lives in `tx`), BN update.

    Metrics: loss (cross-entropy, without the weight-decay term), top-1 and top-5 error of this batch, the
    learning rate the update used, and the global norm of the loss gradient.
    """
    labels = batch["label"]

    def loss_fn(params):
        logits, stats = forward_train(model, {"params": params, "batch_stats": state.batch_stats},
                                      batch["image"], ghost_batch_size)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    metrics = {
        "loss": loss,
        "top1_error": jnp.mean(1.0 - top_k_correct(logits, labels, 1)),
        "top5_error": jnp.mean(1.0 - top_k_correct(logits, labels, 5)),
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        "grad_norm": optax.tree.norm(grads),
    }
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, model: ResNet) -> Metrics:
    """Sums over the real (mask 1) examples of a batch: loss, top-1 and top-5 correct, and their count.

    An image with several views (10-crop: "image" [N, 10, H, W, 3]; multi-scale: "image_224", "image_256",
    ...) is scored by the mean of its views' softmax scores, as the paper averages scores.
    """
    labels = batch["label"]
    mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)
    logits_fn = functools.partial(model.apply, state.variables, train=False)
    if image_keys(batch) == ["image"] and batch["image"].ndim == 4:
        log_probs = jax.nn.log_softmax(logits_fn(batch["image"]))
    else:
        log_probs = jnp.log(jnp.maximum(average_view_scores(logits_fn, batch), jnp.finfo(jnp.float32).tiny))
    loss = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    return {
        "loss_sum": jnp.sum(loss * mask),
        "top1_correct": jnp.sum(top_k_correct(log_probs, labels, 1) * mask),
        "top5_correct": jnp.sum(top_k_correct(log_probs, labels, 5) * mask),
        "num_examples": jnp.sum(mask),
    }


def compile_train_step(mesh: Mesh, *, model: ResNet, compiler_options: dict[str, str] | None = None, **static: Any
                       ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`train_step` jitted over `mesh`: batch split along the data axis, state replicated and donated.

    `model` and `compiler_options` are what the step computes and how XLA compiles it: for a CPU mesh, what
    `resnet_jax.xla_cpu.specialize` returns."""
    return jax.jit(functools.partial(train_step, model=model, **static),
                   in_shardings=(replicated(mesh), batch_sharding(mesh)),
                   out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0,
                   compiler_options=compiler_options)


def compile_eval_step(mesh: Mesh, model: ResNet, compiler_options: dict[str, str] | None = None
                      ) -> Callable[[TrainState, Batch], Metrics]:
    """`eval_step` jitted over `mesh`, as `compile_train_step`."""
    return jax.jit(functools.partial(eval_step, model=model), in_shardings=(replicated(mesh), batch_sharding(mesh)),
                   out_shardings=replicated(mesh), compiler_options=compiler_options)
