"""Runs a config on this machine, or on every host of a TPU pod slice or GPU cluster.

    python launch.py --config experiments/configs/cifar10/quick.py --workdir runs/quick
    python launch.py --config experiments/configs/cifar10/resnet56.py --workdir runs/r56 --config.seed=1
    python launch.py --config ... --workdir runs/r56 --mode eval

Any config field can be overridden with --config.<field>=<value>. Run again with the same workdir to resume.
"""

import os
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import config as config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard events.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "summary"],
                  "train: train and evaluate, resuming from the workdir; eval: evaluate the newest checkpoint; "
                  "summary: build the network and print its parameters.")
flags.DEFINE_integer("max_steps", None, "Stop after this many steps in this launch (a checkpoint is written); "
                     "the next launch with the same workdir continues. For jobs with a time slot.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Call jax.distributed.initialize(): auto does so on a multi-host TPU slice or a SLURM job of "
                  "several tasks.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for clusters without auto-detection.")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process' index, with --coordinator_address.")
flags.mark_flag_as_required("config")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad config file or override answered in one line instead of a traceback."""
    try:
        remaining = FLAGS(argv)
        FLAGS.config.keys()  # ml_collections defers a failed load until the config is first read
        return remaining
    except flags.Error as e:  # an unknown or malformed flag
        sys.exit(f"error: {str(e).splitlines()[0]}")
    except SyntaxError as e:  # the config file's own
        sys.exit(f"error: config file {e.filename}, line {e.lineno}: {e.msg}")
    except Exception as e:  # noqa: BLE001 - ml_collections reports a missing file, a missing get_config or an
        sys.exit(f"error: {config_lib.load_error(e, config_path(argv))}")  # unknown field: assorted types


def config_path(argv: list[str]) -> str:
    return next((a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
                 if a.split("=", 1)[0] == "--config" and ("=" in a or i + 1 < len(argv))), "?")


def _without_orbax_traceback(record: Any) -> bool:
    """A failed background save is answered below in one line; orbax's log of it keeps its message only."""
    if "orbax" in record.pathname:
        record.exc_info = record.exc_text = None
    return True


def _without_closed_loop_traceback(unraisable: Any) -> None:
    """After a failed save, orbax's pending callbacks find their event loop closed; the save's own error says
    what happened, so these say nothing more."""
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(_without_orbax_traceback)
    sys.unraisablehook = _without_closed_loop_traceback
    from resnet_jax import legacy, models
    from resnet_jax.xla_cpu import malloc

    config = legacy.upgrade_config(FLAGS.config)
    try:
        if FLAGS.max_steps is not None and FLAGS.max_steps <= 0:
            raise ValueError(f"--max_steps is {FLAGS.max_steps}; allowed: a positive number of steps")
        if config.get("xla_cpu_layer", True):
            # First, while no JAX or TensorFlow thread has allocated: on XLA:CPU, steps reuse their buffers' pages.
            malloc.retain_freed_memory()
        if FLAGS.mode == "summary":
            print(models.describe(models.from_config(config.model), config.model.name))
            return
        if not FLAGS.workdir:
            raise ValueError("--workdir is required for --mode train and eval")
        from resnet_jax.distributed import initialize

        initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        from resnet_jax import trainer

        run = trainer.Run(config, FLAGS.workdir, writable=FLAGS.mode == "train")
        if FLAGS.mode == "train":
            print(models.describe(run.model, config.model.name), flush=True)
            run.train(stop_after=FLAGS.max_steps)
        else:
            run.evaluate(run.initial_state(fresh=False))
    except (ValueError, FloatingPointError, OSError, RuntimeError) as e:  # OSError: FileNotFoundError, full disk
        print(f"error: {e}", file=sys.stderr, flush=True)
        # After a failed save, orbax's abandoned writes report again while the interpreter shuts down; the line
        # above is the answer.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
