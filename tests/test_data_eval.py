"""Every evaluation example is scored exactly once, whatever the batch size, device count or process count."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import data, sharding
from resnet_jax.data import eval as eval_lib


@pytest.mark.parametrize("n", [1, 7, 1_001, 10_000])
@pytest.mark.parametrize("processes", [1, 2, 3, 5])
@pytest.mark.parametrize("local_batch", [1, 4, 24])
def test_shards_padding_and_masks_count_each_example_once_across_processes(n, processes, local_batch):
    """Simulates the processes of a multi-host run: same number of batches each, masks summing to n."""
    seen, counts = [], set()
    for p in range(processes):
        start, stop = eval_lib.shard_range(n, p, processes)
        real = ({"index": np.arange(lo, min(lo + local_batch, stop), dtype=np.int32)}
                for lo in range(start, stop, local_batch))
        batches = list(eval_lib.padded_batches(real, local_batch, eval_lib.num_batches(n, processes, local_batch),
                                               {"index": np.zeros(1, np.int32)}))
        counts.add(len(batches))
        assert all(len(b["index"]) == local_batch for b in batches)
        seen += [b["index"][b["mask"] == 1] for b in batches]
        assert all((b["index"][b["mask"] == 0] == -1).all() for b in batches)
    assert len(counts) == 1  # every process takes part in every eval step
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(n))


def test_average_view_scores_averages_softmax_over_views_and_scales():
    b, classes = 2, 5
    rng = np.random.default_rng(0)
    batch = {"image_8": jnp.asarray(rng.normal(size=(b, 2, 8, 8, classes)), jnp.float32),
             "image_4": jnp.asarray(rng.normal(size=(b, 2, 4, 4, classes)), jnp.float32),
             "label": jnp.zeros(b, jnp.int32)}
    logits_fn = lambda x: x.mean(axis=(1, 2))  # noqa: E731 - a fully convolutional "network"
    got = data.average_view_scores(logits_fn, batch)
    views = [jax.nn.softmax(np.asarray(batch[k]).mean(axis=(2, 3)))[:, v] for k in ("image_4", "image_8")
             for v in (0, 1)]
    np.testing.assert_allclose(got, np.mean(views, axis=0), rtol=1e-6)
    single = {"image": batch["image_8"][:, 0]}
    np.testing.assert_allclose(data.average_view_scores(logits_fn, single), views[2], rtol=1e-6)


@pytest.mark.skipif(not os.environ.get("TFDS_DATA_DIR"), reason="real CIFAR-10 not found")
@pytest.mark.parametrize("devices, batch", [(1, 64), (3, 96), (8, 384)])  # 10,000 divides by none of the batches
def test_cifar_test_split_scored_exactly_once_on_1_3_and_8_devices(devices, batch):
    from resnet_jax.data import cifar

    mesh = sharding.make_mesh(jax.devices()[:devices])
    options = data.DEFAULT_OPTIONS["cifar10"]
    _, labels = cifar.load(None, "test", options)
    mask, index, label = [], [], []
    for b in data.eval_batches("cifar10", data_dir=None, split="test", global_batch_size=batch, mesh=mesh,
                               options=options):
        assert b["image"].shape == (batch, 32, 32, 3) and b["image"].sharding == sharding.batch_sharding(mesh)
        mask.append(np.asarray(b["mask"]))
        index.append(np.asarray(b["index"]))
        label.append(np.asarray(b["label"]))
    mask, index, label = map(np.concatenate, (mask, index, label))
    assert mask.sum() == 10_000 and len(mask) == -(-10_000 // batch) * batch
    np.testing.assert_array_equal(index[mask == 1], np.arange(10_000))
    np.testing.assert_array_equal(label[mask == 1], labels)
