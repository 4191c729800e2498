"""ResNet-20 on CIFAR-10 sized for a CPU: a real result in minutes (the README's default job)."""

from experiments.configs.cifar10 import base


def get_config():
    c = base.get_config("resnet20")
    c.num_train_steps = 2_000
    return c
