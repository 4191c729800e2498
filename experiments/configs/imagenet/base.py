"""ImageNet as in section 3.4: batch 256, lr 0.1 divided by 10 on plateaus, weight decay 1e-4, momentum 0.9,
shortcut B, scale augmentation [256, 480], 224 crops."""

import ml_collections


def get_config(model: str = "resnet50", shortcut: str = "B") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        name=model, shortcut=shortcut, num_classes=1000, stride_on="1x1", zero_init_last_bn=False,
        bn_momentum=0.9, bn_epsilon=1e-5, dtype="float32"))
    c.dataset = "imagenet2012"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.seed = 0
    c.batch_size = 256
    c.num_train_steps = 600_000
    return c
