"""ImageNet as in section 3.4: batch 256, lr 0.1 divided by 10 when the error plateaus (fixed here at every
30 epochs of 120, about 60x10^4 iterations), weight decay 1e-4, momentum 0.9, no dropout, shortcut B,
scale augmentation [256, 480] with 224 crops, flips and PCA colour augmentation, centre-crop evaluation.
For pods: `--config.batch_size=4096 --config.optimizer.reference_batch_size=256 --config.schedule.name=cosine
--config.schedule.warmup=linear --config.schedule.warmup_steps=...` (Goyal et al. 2017)."""

import ml_collections

TRAIN_IMAGES = 1_281_167


def get_config(model: str = "resnet50", shortcut: str = "B") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        name=model, shortcut=shortcut, num_classes=1000, stride_on="1x1", zero_init_last_bn=False,
        bn_momentum=0.9, bn_epsilon=1e-5, dtype="float32",
        scan_blocks=False))  # True: one nn.scan per stage; compiles deep nets in seconds (other param names)

    c.dataset = "imagenet2012"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data = ml_collections.ConfigDict(dict(
        train_crop="scale", scale_range=(256, 480), crop_size=224, pca_lighting=0.1, normalization="mean",
        eval_mode="center", eval_resize=256, multiscale_sizes=(224, 256, 384, 480, 640)))
    c.train_split = "train"
    c.eval_splits = ("validation",)

    c.seed = 0
    c.batch_size = 256
    c.eval_batch_size = 256
    c.num_train_steps = 600_000
    c.ghost_batch_size = 0
    # On a CPU mesh, compile steps with resnet_jax.xla_cpu's faster gradients and options (same function);
    # no effect on GPU or TPU.
    c.xla_cpu_layer = True

    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=0.1, reference_batch_size=0, momentum=0.9, nesterov=False, weight_decay=1e-4,
        weight_decay_on="all"))
    c.schedule = ml_collections.ConfigDict(dict(
        name="step", boundaries=(0.25, 0.5, 0.75), decay_factor=0.1,
        warmup_steps=0, warmup="linear", warmup_learning_rate=0.0))

    c.log_every_steps = 100
    c.eval_every_steps = 10_000
    c.checkpoint_every_steps = 5_000
    c.keep_checkpoints = 3
    # Also keep the checkpoint of lowest top-1 error on the first eval split that is not a test split, if any.
    c.keep_best_checkpoint = True
    # A run whose loss or global parameter norm passes these has diverged: it stops, and saves nothing
    # after its last good checkpoint; both lie orders of magnitude above a healthy run (docs/training.md).
    c.max_loss = 1e3
    c.max_param_norm = 1e6
    return c
