"""CIFAR-10 as in section 4.2: batch 128, lr 0.1 divided by 10 at 32k and 48k iterations, stop at 64k,
weight decay 1e-4, momentum 0.9, option A shortcuts, 4-pixel pad + random 32x32 crop + flip, per-pixel mean
subtraction. Each experiment file is a thin call of get_config."""

import ml_collections


def get_config(model: str = "resnet20", shortcut: str = "A", warmup_steps: int = 0,
               scan_blocks: bool = False) -> ml_collections.ConfigDict:
    """warmup_steps > 0: section 4.2's recipe for ResNet-110, "0.1 is slightly too large to start converging":
    0.01 until the training error is below 80% (about 400 iterations; fixed here), then back to 0.1."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        name=model, shortcut=shortcut, num_classes=10, stride_on="1x1", zero_init_last_bn=False,
        bn_momentum=0.9, bn_epsilon=1e-5, dtype="float32",
        scan_blocks=scan_blocks))  # True: one nn.scan per stage; compiles deep nets in seconds (other param names)

    c.dataset = "cifar10"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: $TFDS_DATA_DIR, then TFDS' default
    c.data = ml_collections.ConfigDict(dict(
        validation_split=False,  # True: the paper's 45k/5k train/validation split of the training set
        normalization="per_pixel_mean",  # the paper's; or "per_channel" mean/std
        augment=True, pad=4,
        on_device=True,  # the 180 MB dataset lives in accelerator memory; crops and flips run there
        download=True))  # let TFDS download CIFAR-10 when it is not under data_dir
    c.train_split = "train"
    c.eval_splits = ("test",)  # add "validation" with data.validation_split=True

    c.seed = 0
    c.batch_size = 128  # global, over every device of every host
    c.eval_batch_size = 1000
    c.num_train_steps = 64_000
    c.ghost_batch_size = 0  # 0: BN statistics over the global batch; k: over fixed groups of k examples
    # On a CPU mesh, compile steps with resnet_jax.xla_cpu's faster gradients and options (same function);
    # no effect on GPU or TPU.
    c.xla_cpu_layer = True

    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=0.1, reference_batch_size=0,  # >0: linear scaling, lr * batch_size / reference
        momentum=0.9, nesterov=False, weight_decay=1e-4, weight_decay_on="all"))
    c.schedule = ml_collections.ConfigDict(dict(
        name="step", boundaries=(0.5, 0.75), decay_factor=0.1,  # 32k and 48k of 64k
        warmup_steps=warmup_steps, warmup="constant", warmup_learning_rate=0.01))

    c.log_every_steps = 100
    c.eval_every_steps = 2000
    c.checkpoint_every_steps = 2000
    c.keep_checkpoints = 3
    # Also keep the checkpoint of lowest top-1 error on the first eval split that is not a test split, if any.
    c.keep_best_checkpoint = True
    # A run whose loss or global parameter norm passes these has diverged: it stops, and saves nothing
    # after its last good checkpoint; both lie orders of magnitude above a healthy run (docs/training.md).
    c.max_loss = 1e3
    c.max_param_norm = 1e6
    return c
