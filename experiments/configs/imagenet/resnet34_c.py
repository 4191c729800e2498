"""ResNet-34 with option C shortcuts (Table 3)."""

from experiments.configs.imagenet import base


def get_config():
    return base.get_config("resnet34", shortcut="C")
