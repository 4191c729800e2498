"""Plain-20, no shortcuts (Figure 6, left)."""

from experiments.configs.cifar10 import base


def get_config():
    return base.get_config("plain20", shortcut="plain")
