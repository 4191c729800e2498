"""ResNet-110, option A (Table 6), with the 400-step warm-up at 0.01 of section 4.2."""

from experiments.configs.cifar10 import base


def get_config():
    return base.get_config("resnet110", warmup_steps=400)
