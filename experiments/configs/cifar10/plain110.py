"""Plain-110, no shortcuts (Figure 6, left: "we are unable to train it"), with ResNet-110's warm-up."""

from experiments.configs.cifar10 import base


def get_config():
    return base.get_config("plain110", shortcut="plain", warmup_steps=400)
