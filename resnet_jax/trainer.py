"""The training loop: restore or initialise, step, log, evaluate, checkpoint. Plain values in, no globals."""

import math
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from resnet_jax import checkpoint, models, synthetic
from resnet_jax.config import SYNTHETIC, make_optimizer, make_schedule, validate
from resnet_jax.metrics import MetricWriter, mean_of
from resnet_jax.sharding import make_mesh, replicated
from resnet_jax.train_state import TrainState, init_train_state
from resnet_jax.train_step import compile_eval_step, compile_train_step


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


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


class Run:
    """What a config describes, built once: model, optimizer, mesh, compiled steps, checkpoint manager."""

    def __init__(self, config: Any, workdir: str, mesh: Mesh | None = None):
        self.config, self.workdir = config, workdir
        self.mesh = mesh or make_mesh()
        validate(config, self.mesh)
        self.model = models.from_config(config.model)
        self.schedule = make_schedule(config)
        self.tx = make_optimizer(config, self.schedule)
        self._init = jax.jit(lambda: init_train_state(self.model, self.tx, config.seed),
                             out_shardings=replicated(self.mesh))
        self.train_step = compile_train_step(self.mesh, model=self.model, tx=self.tx, schedule=self.schedule,
                                             ghost_batch_size=config.ghost_batch_size)
        self.eval_step = compile_eval_step(self.mesh, self.model)
        self.checkpoints = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints)

    def meta(self) -> dict[str, Any]:
        return {"config": self.config.to_json(), "model": self.config.model.name}

    def initial_state(self) -> TrainState:
        """The newest checkpoint in the workdir, or a fresh state."""
        latest = self.checkpoints.latest_step()
        if latest is None:
            return self._init()
        target = checkpoint.abstract_state(jax.eval_shape(self._init), self.mesh)
        state, _ = checkpoint.restore(self.checkpoints, latest, target)
        _log(f"resumed from {self.workdir} at step {latest}")
        return state

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
        pending: list[dict] = []
        results: dict[str, Any] = {}
        window_start, window_steps, t_start = time.perf_counter(), 0, time.perf_counter()
        for step in range(start, end):
            state, metrics = self.train_step(state, next(batches))
            pending.append(metrics)  # stays on the device until the next log line
            done, window_steps = step + 1, window_steps + 1
            if step == start:  # keep compilation out of the throughput figure
                jax.block_until_ready(metrics)
                window_start, window_steps = time.perf_counter(), 0
            if done % c.log_every_steps == 0 or done == end:
                summary = mean_of(pending)
                pending = []
                elapsed = time.perf_counter() - window_start
                summary["img_per_s"] = window_steps * c.batch_size / elapsed if window_steps else float("nan")
                if not math.isfinite(summary["loss"]):
                    raise FloatingPointError(f"loss is {summary['loss']} at step {done}; stopping without "
                                             f"saving, the last good checkpoint is kept")
                writer.write(done, "train", summary)
                eta = (c.num_train_steps - done) * c.batch_size / summary["img_per_s"] if window_steps else 0.0
                speed = f", {summary['img_per_s']:.1f} img/s, ETA {_duration(eta)}" if window_steps else ""
                _log(f"step {done}/{c.num_train_steps}: loss {summary['loss']:.4f}, top-1 error "
                     f"{summary['top1_error']:.4f}, lr {summary['learning_rate']:.4g}{speed}")
                window_start, window_steps = time.perf_counter(), 0
            if done % c.eval_every_steps == 0 or done == c.num_train_steps:
                results = self.evaluate(state, writer)
            if done % c.checkpoint_every_steps == 0 or done == end:
                checkpoint.save(self.checkpoints, done, state, self.meta())
        self.checkpoints.wait_until_finished()
        writer.close()
        _log(f"trained steps {start}..{end} in {_duration(time.perf_counter() - t_start)}")
        return {"step": end, "eval": results, "state": state}


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
