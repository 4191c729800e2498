"""The training loop: restore or initialise, step, log, evaluate, checkpoint. Plain values in, no globals."""

import functools
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from resnet_jax import checkpoint, legacy, models, synthetic, xla_cpu
from resnet_jax.config import SYNTHETIC, make_optimizer, make_schedule, validate
from resnet_jax.metrics import MetricWriter, mean_of
from resnet_jax.preemption import PreemptionWatcher
from resnet_jax.sharding import make_mesh, mesh_platform, replicated
from resnet_jax.train_state import TrainState, init_train_state
from resnet_jax.train_step import compile_eval_step, compile_train_step


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def split_label(split: str) -> str:
    """metrics.jsonl's `split` for an evaluation split: "test" for test splits, else "eval"."""
    return "test" if split.startswith("test") else "eval"


def train_batches(config: Any, model: models.ResNet, mesh: Mesh, start_step: int) -> Iterator[dict]:
    if config.dataset == SYNTHETIC:
        return synthetic.batches(config.batch_size, models.input_shape(model), model.num_classes, mesh, config.seed)
    from resnet_jax import data

    return data.train_batches(config.dataset, data_dir=config.data_dir, split=config.train_split,
                              global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
                              mesh=mesh, options=config.data.to_dict())


def eval_batches(config: Any, model: models.ResNet, mesh: Mesh, split: str) -> Iterator[dict]:
    if config.dataset == SYNTHETIC:
        return synthetic.batches(config.eval_batch_size, models.input_shape(model), model.num_classes, mesh,
                                 config.seed, num_batches=2)
    from resnet_jax import data

    return data.eval_batches(config.dataset, data_dir=config.data_dir, split=split,
                             global_batch_size=config.eval_batch_size, mesh=mesh, options=config.data.to_dict())


def best_checkpoint_split(config: Any) -> str | None:
    """The split that ranks checkpoints for keep_best_checkpoint: the first evaluation split that is not a
    test split (choosing a checkpoint by test error would be fitting the test set), or None."""
    if not config.get("keep_best_checkpoint", False):
        return None
    return next((s for s in config.eval_splits if split_label(s) == "eval"), None)


def check_finite(step_metrics: list[dict], last_step: int) -> None:
    """Raises FloatingPointError naming the first step (of those ending at `last_step`) whose loss or gradient
    norm is NaN or infinite; a finite gradient with a finite loss means the update was finite too."""
    fetched = jax.device_get([(m["loss"], m["grad_norm"]) for m in step_metrics])
    for i, (loss, grad_norm) in enumerate(fetched):
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            step = last_step - len(fetched) + i + 1
            raise FloatingPointError(f"non-finite loss or gradient at step {step} (loss {float(loss)}, gradient "
                                     f"norm {float(grad_norm)})")


def evaluate_split(state: TrainState, eval_step: Any, batches: Iterator[dict]) -> dict[str, float]:
    """Loss and top-1/top-5 error over every example of a split (the pipeline masks the padding)."""
    totals = None
    for batch in batches:
        sums = eval_step(state, batch)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    n = float(totals["num_examples"])
    return {"loss": float(totals["loss_sum"]) / n, "top1_error": 1.0 - float(totals["top1_correct"]) / n,
            "top5_error": 1.0 - float(totals["top5_correct"]) / n, "num_examples": int(round(n))}


def compiled_model(config: Any, model: models.ResNet, mesh: Mesh) -> tuple[models.ResNet, dict[str, str] | None]:
    """(model, compiler options) that `config`'s steps compile on `mesh`: `model` itself, or on a CPU mesh with
    `config.xla_cpu_layer` (the default) the XLA:CPU layer's form of it (resnet_jax.xla_cpu)."""
    return xla_cpu.specialize(model, mesh_platform(mesh), enabled=config.get("xla_cpu_layer", True))


class Run:
    """What a config describes, built once: model, optimizer, mesh, compiled steps, checkpoint manager.

    `model` is the network (what checkpoints record); the steps compute `compiled_model(config, model, mesh)`."""

    def __init__(self, config: Any, workdir: str, mesh: Mesh | None = None):
        config = legacy.upgrade_config(config)
        self.config, self.workdir = config, workdir
        self.mesh = mesh or make_mesh()
        validate(config, self.mesh)
        self.model = models.from_config(config.model)
        self.schedule = make_schedule(config)
        self.tx = make_optimizer(config, self.schedule)
        self._init = jax.jit(lambda: init_train_state(self.model, self.tx, config.seed),
                             out_shardings=replicated(self.mesh))
        compute_model, options = compiled_model(config, self.model, self.mesh)
        self.train_step = compile_train_step(self.mesh, model=compute_model, compiler_options=options, tx=self.tx,
                                             schedule=self.schedule, ghost_batch_size=config.ghost_batch_size)
        self.eval_step = compile_eval_step(self.mesh, compute_model, options)
        self._all_finite = jax.jit(lambda tree: jnp.all(jnp.asarray(
            [jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)])))
        self.best_split = best_checkpoint_split(config)
        self.checkpoints = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints,
                                              keep_best=self.best_split is not None)

    @functools.cached_property
    def state_shapes(self) -> TrainState:
        return jax.eval_shape(self._init)

    @functools.cached_property
    def _meta(self) -> dict[str, Any]:
        shapes = self.state_shapes
        return checkpoint.make_meta(self.config, self.config.model.name, models.model_options(self.model),
                                    models.count_params(shapes.params), checkpoint.state_shapes(shapes),
                                    self.best_split)

    def meta(self) -> dict[str, Any]:
        return self._meta

    def initial_state(self) -> TrainState:
        """The newest readable checkpoint in the workdir (after checking it holds this config's network), or a
        fresh state."""
        target = checkpoint.abstract_state(self.state_shapes, self.mesh)
        found = checkpoint.restore_newest(self.checkpoints, target, self.meta(), quarantine=True, warn=_warn)
        if found is None:
            return self._init()
        state, _, step = found
        _log(f"resumed from {self.workdir} at step {step}")
        return state

    def _save(self, step: int, state: TrainState, unchecked: list[dict], metrics: dict | None) -> None:
        try:
            check_finite(unchecked, step)
            # A finite loss and gradient can still give a non-finite update (a huge or NaN learning rate).
            if not bool(self._all_finite((state.params, state.batch_stats))):
                raise FloatingPointError(f"parameters are NaN or infinite after step {step}")
        except FloatingPointError as e:
            self.checkpoints.wait_until_finished()  # a save in flight is of an earlier, good step
            last = self.checkpoints.latest_step()
            kept = f"the last good checkpoint (step {last}) is kept" if last is not None else "no checkpoint"
            raise FloatingPointError(f"{e}; stopping without saving, {kept}") from None
        checkpoint.save(self.checkpoints, step, state, self.meta(), metrics)

    def evaluate(self, state: TrainState, writer: MetricWriter | None = None) -> dict[str, dict[str, float]]:
        results = {}
        step = int(jax.device_get(state.step))
        for split in self.config.eval_splits:
            results[split] = evaluate_split(state, self.eval_step, eval_batches(self.config, self.model,
                                                                                 self.mesh, split))
            if writer:
                writer.write(step, split_label(split), results[split])
            r = results[split]
            _log(f"step {step}: {split} top-1 error {r['top1_error']:.4f}, top-5 error {r['top5_error']:.4f}, "
                 f"loss {r['loss']:.4f} ({r['num_examples']} examples)")
        return results

    def train(self, stop_after: int | None = None) -> dict[str, Any]:
        """Trains to config.num_train_steps (or `stop_after` more steps), evaluating and checkpointing."""
        c = self.config
        state = self.initial_state()
        start = int(jax.device_get(state.step))
        end = c.num_train_steps if stop_after is None else min(c.num_train_steps, start + stop_after)
        writer = MetricWriter(self.workdir)
        batches = train_batches(c, self.model, self.mesh, start)
        t_start = time.perf_counter()
        # SIGTERM from here on finishes the step, saves and returns with "preempted": True.
        with PreemptionWatcher() as preemption:
            outcome = self._loop(state, start, end, batches, writer, preemption)
        self.checkpoints.wait_until_finished()
        writer.close()
        _log(f"trained steps {start}..{outcome['step']} in {_duration(time.perf_counter() - t_start)}")
        return outcome

    def _loop(self, state: TrainState, start: int, end: int, batches: Iterator[dict], writer: MetricWriter,
              preemption: PreemptionWatcher) -> dict[str, Any]:
        c = self.config
        pending: list[dict] = []
        results: dict[str, Any] = {}
        window_start, window_steps = time.perf_counter(), 0
        for step in range(start, end):
            state, metrics = self.train_step(state, next(batches))
            pending.append(metrics)  # stays on the device until the next log line
            done, window_steps = step + 1, window_steps + 1
            if step == start:  # keep compilation out of the throughput figure
                jax.block_until_ready(metrics)
                window_start, window_steps = time.perf_counter(), 0
            if done % c.log_every_steps == 0 or done == end:
                try:
                    check_finite(pending, done)
                except FloatingPointError as e:
                    raise FloatingPointError(f"{e}; stopping without saving, the last good checkpoint is "
                                             "kept") from None
                summary = mean_of(pending)
                pending = []
                elapsed = time.perf_counter() - window_start
                summary["img_per_s"] = window_steps * c.batch_size / elapsed if window_steps else float("nan")
                writer.write(done, "train", summary)
                eta = (c.num_train_steps - done) * c.batch_size / summary["img_per_s"] if window_steps else 0.0
                speed = f", {summary['img_per_s']:.1f} img/s, ETA {_duration(eta)}" if window_steps else ""
                _log(f"step {done}/{c.num_train_steps}: loss {summary['loss']:.4f}, top-1 error "
                     f"{summary['top1_error']:.4f}, lr {summary['learning_rate']:.4g}{speed}")
                window_start, window_steps = time.perf_counter(), 0
            evaluated = done % c.eval_every_steps == 0 or done == c.num_train_steps
            if evaluated:
                results = self.evaluate(state, writer)
            # Every process reaches the same answer at the same step (see preemption.py).
            preempted = preemption.reached(done)
            ranked = evaluated and self.best_split in results
            if done % c.checkpoint_every_steps == 0 or done == end or preempted or ranked:
                best_metric = {checkpoint.BEST_METRIC: results[self.best_split][checkpoint.BEST_METRIC]} \
                    if ranked else None
                self._save(done, state, pending, best_metric)
            if preempted:
                _log(f"preempted: saved step {done} and stopping; run again with the same workdir to resume")
                return {"step": done, "eval": results, "state": state, "preempted": True}
        return {"step": end, "eval": results, "state": state, "preempted": False}


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def train_and_evaluate(config: Any, workdir: str, mesh: Mesh | None = None,
                       stop_after: int | None = None) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its newest checkpoint) and evaluates it."""
    return Run(config, workdir, mesh).train(stop_after)


def flat_params(state: TrainState) -> np.ndarray:
    """All parameters as one float64 vector (for comparing runs)."""
    leaves = jax.tree_util.tree_leaves(jax.device_get(state.params))
    return np.concatenate([np.ravel(x).astype(np.float64) for x in leaves])
