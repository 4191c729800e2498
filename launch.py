"""Run a config: `python launch.py --config experiments/configs/cifar10/quick.py --workdir runs/quick`.

Any field can be overridden, e.g. `--config.model.shortcut=B`.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from resnet_jax import models

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.DEFINE_enum("mode", "summary", ["summary"], "summary: build the network and print its parameters.")
flags.mark_flag_as_required("config")


def main(argv: list[str]) -> None:
    del argv
    config = FLAGS.config
    try:
        model = models.from_config(config.model)
        print(models.describe(model, config.model.name))
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
