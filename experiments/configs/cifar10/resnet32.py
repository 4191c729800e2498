"""ResNet-32, option A (Table 6)."""

from experiments.configs.cifar10 import base


def get_config():
    return base.get_config("resnet32")
