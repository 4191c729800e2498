"""The training loop: restore or initialise, step, log, evaluate, checkpoint. Plain values in, no globals."""

import functools
import json
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from resnet_jax import checkpoint, legacy, models, synthetic, weights, workdir_lock, xla_cpu
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


def check_finite(step_metrics: list[dict], last_step: int, max_loss: float = math.inf) -> None:
    """Raises FloatingPointError naming the first step (of those ending at `last_step`) whose loss or gradient
    norm is NaN or infinite, or whose loss passes `max_loss` (a diverged run); a finite gradient with a finite
    loss means the update was finite too."""
    fetched = jax.device_get([(m["loss"], m["grad_norm"]) for m in step_metrics])
    for i, (loss, grad_norm) in enumerate(fetched):
        step = last_step - len(fetched) + i + 1
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            raise FloatingPointError(f"non-finite loss or gradient at step {step} (loss {float(loss)}, gradient "
                                     f"norm {float(grad_norm)})")
        if loss > max_loss:
            raise FloatingPointError(f"diverged: loss {float(loss):.4g} at step {step} is above max_loss "
                                     f"{max_loss:g}")


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


def check_resume(config: Any, meta: dict[str, Any], step: int) -> None:
    """Refuses (one line) a resume that cannot continue the saved run, and says in one warning line what a changed
    batch size, learning rate or schedule means for it."""
    if step > config.num_train_steps:
        raise ValueError(f"the checkpoint is at step {step}, beyond num_train_steps {config.num_train_steps}; "
                         "raise num_train_steps to continue it, or use another workdir")
    saved = json.loads(meta.get("config", "{}"))
    fields = {"batch_size": "the data order from here on is not the saved run's",
              "num_train_steps": "the schedule's boundaries, fractions of it, move",
              "optimizer": "the updates from here on differ from the saved run's",
              "schedule": "the learning rate from here on differs from the saved run's"}
    for field, meaning in fields.items():
        now = config[field].to_dict() if hasattr(config[field], "to_dict") else config[field]
        before = saved.get(field, now)
        if json.loads(json.dumps(now, default=list)) != before:
            _warn(f"{field} changed since the checkpoint at step {step} ({before} -> {now}): {meaning}")


class Run:
    """What a config describes, built once: model, optimizer, mesh, compiled steps, checkpoint manager.

    `model` is the network (what checkpoints record); the steps compute `compiled_model(config, model, mesh)`.
    A writable Run holds the workdir's lock (resnet_jax.workdir_lock) until `close()` or the process ends; a
    read-only one (`writable=False`, for evaluation) changes nothing in the workdir."""

    def __init__(self, config: Any, workdir: str, mesh: Mesh | None = None, *, writable: bool = True):
        config = legacy.upgrade_config(config)
        self.config, self.workdir, self.writable = config, workdir, writable
        self.mesh = mesh or make_mesh()
        validate(config, self.mesh)
        self._lock = workdir_lock.acquire(workdir, _warn) if writable and jax.process_index() == 0 else None
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
        self._param_norm = jax.jit(optax.tree.norm)
        self.best_split = best_checkpoint_split(config)
        if not writable and not checkpoint.checkpoints_dir(workdir).is_dir():
            raise FileNotFoundError(f"no checkpoint in {workdir} to evaluate; train first, or check the workdir's "
                                    "path")
        # Opened after the lock: a new manager deletes unfinished saves, which would be another run's.
        self.checkpoints = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints,
                                              keep_best=self.best_split is not None, read_only=not writable,
                                              async_save=writable)

    def close(self) -> None:
        """Waits for saves in flight and gives the workdir's lock back."""
        if self.writable:
            self.checkpoints.wait_until_finished()
        if self._lock is not None:
            workdir_lock.release(self._lock)
            self._lock = None

    @functools.cached_property
    def state_shapes(self) -> TrainState:
        return jax.eval_shape(self._init)

    @functools.cached_property
    def _meta(self) -> dict[str, Any]:
        shapes = self.state_shapes
        create_options = {k: v for k, v in self.config.model.items() if k != "name"}
        return checkpoint.make_meta(self.config, weights.model_record(self.config.model.name, create_options),
                                    models.count_params(shapes.params), checkpoint.state_shapes(shapes),
                                    self.best_split)

    def meta(self) -> dict[str, Any]:
        return self._meta

    def initial_state(self, fresh: bool = True) -> TrainState:
        """The newest readable checkpoint in the workdir (after checking it holds this config's network), or,
        with `fresh`, a new state where there is none (else FileNotFoundError)."""
        target = checkpoint.abstract_state(self.state_shapes, self.mesh)
        found = checkpoint.read_newest(self.checkpoints, target, self.meta(), quarantine=self.writable, warn=_warn)
        if found is None:
            if not fresh:
                raise FileNotFoundError(f"no checkpoint in {self.workdir} to evaluate; train first, or check the "
                                        "workdir's path")
            return self._init()
        state, meta, step = found
        if self.writable:  # evaluating a checkpoint continues nothing
            check_resume(self.config, meta, step)
        _log(f"resumed from {self.workdir} at step {step}")
        return state

    def _stop(self, error: Exception) -> FloatingPointError:
        """The one-line error of a run that must not save: which good checkpoint is kept."""
        self.checkpoints.wait_until_finished()  # a save in flight is of an earlier, good step
        last = self.checkpoints.latest_step()
        kept = f"the last good checkpoint (step {last}) is kept" if last is not None else "no checkpoint was saved"
        return FloatingPointError(f"{error}; stopping without saving, {kept}")

    def _save(self, step: int, state: TrainState, unchecked: list[dict], metrics: dict | None) -> None:
        """Saves `state` unless it is unhealthy: a non-finite or diverged loss in the steps not yet checked, or
        parameters that are non-finite or whose global norm passes max_param_norm."""
        c = self.config
        try:
            check_finite(unchecked, step, c.get("max_loss", math.inf))
            # A finite loss and gradient can still give a non-finite update (a huge or NaN learning rate).
            if not bool(self._all_finite((state.params, state.batch_stats))):
                raise FloatingPointError(f"parameters are NaN or infinite after step {step}")
            norm = float(self._param_norm(state.params))
            if norm > c.get("max_param_norm", math.inf):
                raise FloatingPointError(f"diverged: parameter norm {norm:.4g} after step {step} is above "
                                         f"max_param_norm {c.max_param_norm:g}")
        except FloatingPointError as e:
            raise self._stop(e) from None
        try:
            checkpoint.save(self.checkpoints, step, state, self.meta(), metrics)
        except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise assorted types for a failed write
            raise OSError(checkpoint.save_failed(e, step, self.checkpoints)) from None

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
        if not self.writable:
            raise ValueError("this Run was opened read-only (writable=False); it evaluates but does not train")
        state = self.initial_state()
        start = int(jax.device_get(state.step))
        end = c.num_train_steps if stop_after is None else min(c.num_train_steps, start + stop_after)
        if start >= end:
            _log(f"nothing to train: {self.workdir} holds step {start} of {c.num_train_steps}")
            return {"step": start, "eval": {}, "state": state, "preempted": False}
        # The log continues from the restored step: records of steps after it (a crash's) are dropped.
        writer = MetricWriter(self.workdir, start_step=start)
        batches = train_batches(c, self.model, self.mesh, start)
        t_start = time.perf_counter()
        # SIGTERM or Ctrl-C from here on finishes the step, saves and returns with "preempted": True.
        with PreemptionWatcher() as preemption:
            outcome = self._loop(state, start, end, batches, writer, preemption)
        try:
            self.checkpoints.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - as in _save: an asynchronous write's failure surfaces here
            raise OSError(checkpoint.save_failed(e, outcome["step"], self.checkpoints)) from None
        finally:
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
                    check_finite(pending, done, c.get("max_loss", math.inf))
                except FloatingPointError as e:
                    raise self._stop(e) from None
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
                try:
                    results = self.evaluate(state, writer)
                except Exception:
                    # The state is good whatever the evaluation met (damaged test data, say): keep it.
                    self._save(done, state, pending, None)
                    self.checkpoints.wait_until_finished()
                    raise
            # Every process reaches the same answer at the same step (see preemption.py).
            preempted = preemption.reached(done)
            ranked = evaluated and self.best_split in results
            if done % c.checkpoint_every_steps == 0 or done == end or preempted or ranked:
                best_metric = {checkpoint.BEST_METRIC: results[self.best_split][checkpoint.BEST_METRIC]} \
                    if ranked else None
                self._save(done, state, pending, best_metric)
            if preempted:
                why = "interrupted" if preemption.interrupted else "preempted"
                _log(f"{why}: saved step {done} and stopping; run again with the same workdir to resume")
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
