"""Plain-110, no shortcuts (Figure 6, left: "we are unable to train it"), with ResNet-110's warm-up."""

from experiments.configs.cifar10 import base


def get_config():
    c = base.get_config("plain110", shortcut="plain")
    c.schedule.warmup_steps = 400
    c.schedule.warmup = "constant"
    c.schedule.warmup_learning_rate = 0.01
    return c
