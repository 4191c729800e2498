"""ResNet-34, option B (Tables 2-4)."""

from experiments.configs.imagenet import base


def get_config():
    return base.get_config("resnet34")
