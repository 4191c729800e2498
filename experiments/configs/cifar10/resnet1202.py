"""ResNet-1202, option A (Table 6), with the 400-step warm-up at 0.01 of section 4.2.

Its 600 blocks run as one nn.scan per stage (model.scan_blocks): unrolled, XLA would compile 600 blocks."""

from experiments.configs.cifar10 import base


def get_config():
    return base.get_config("resnet1202", warmup_steps=400, scan_blocks=True)
