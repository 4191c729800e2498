"""ResNet-20 on CIFAR-10 sized for a 2-core CPU: about 2.6 epochs with the paper's step schedule compressed
(lr 0.1, divided by 10 at 50% and 75% of the steps), a real result in minutes. The README's default job."""

from experiments.configs.cifar10 import base


def get_config():
    c = base.get_config("resnet20")
    c.num_train_steps = 1_000
    c.log_every_steps = 50
    c.eval_every_steps = 250
    c.checkpoint_every_steps = 250
    return c
