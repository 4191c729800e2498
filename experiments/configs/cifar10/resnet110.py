"""ResNet-110, option A (Table 6). Section 4.2: "0.1 is slightly too large to start converging", so 0.01 warms
up training until the error is below 80% (about 400 iterations; fixed here), then 0.1 as for the others."""

from experiments.configs.cifar10 import base


def get_config():
    c = base.get_config("resnet110")
    c.schedule.warmup_steps = 400
    c.schedule.warmup = "constant"
    c.schedule.warmup_learning_rate = 0.01
    return c
