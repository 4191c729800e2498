"""CIFAR-10 as in section 4.2: batch 128, lr 0.1 divided by 10 at 32k and 48k, stop at 64k, weight decay 1e-4,
momentum 0.9, option A shortcuts, 4-pixel pad + random crop + flip. Each experiment file calls get_config."""

import ml_collections


def get_config(model: str = "resnet20", shortcut: str = "A") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        name=model, shortcut=shortcut, num_classes=10, stride_on="1x1", zero_init_last_bn=False,
        bn_momentum=0.9, bn_epsilon=1e-5, dtype="float32"))
    c.dataset = "cifar10"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: $TFDS_DATA_DIR, then TFDS' default
    c.seed = 0
    c.batch_size = 128  # global, over every device of every host
    c.num_train_steps = 64_000
    return c
