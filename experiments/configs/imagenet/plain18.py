"""Plain-18, no shortcuts (Table 2, Figure 4 left)."""

from experiments.configs.imagenet import base


def get_config():
    return base.get_config("plain18", shortcut="plain")
