"""The per-convolution benchmark (experiments/conv_layers.py) and the network's convolution list it times."""

import json

import jax
import pytest

from experiments import conv_layers
from resnet_jax.models import create
from resnet_jax.models.summary import Convolution, convolutions
from resnet_jax.xla_cpu import malloc


def test_resnet20_runs_19_convolutions_of_six_shapes():
    layers = convolutions(create("resnet20"), batch=128)
    assert sum(layers.values()) == 19  # 6n + 1 convolutions with option A shortcuts (n = 3)
    stem = Convolution((128, 32, 32, 3), (3, 3, 3, 16), (1, 1), ((1, 1), (1, 1)))
    assert list(layers.items())[:2] == [(stem, 1), (Convolution((128, 32, 32, 16), (3, 3, 16, 16), (1, 1),
                                                                ((1, 1), (1, 1))), 6)]
    assert stem.output_shape == (128, 32, 32, 16)
    downsample = Convolution((128, 32, 32, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1)))
    assert layers[downsample] == 1 and downsample.output_shape == (128, 16, 16, 32)


def test_resnet50_runs_53_convolutions_and_table_1s_multiply_adds():
    model = create("resnet50")
    layers = convolutions(model)
    assert sum(layers.values()) == 53  # the stem, 16 blocks of 3, and 4 projection shortcuts (option B)
    conv_macs = sum(c.macs * n for c, n in layers.items())
    assert conv_macs + 2048 * 1000 == pytest.approx(3.86e9, rel=0.01)  # Table 1: 3.8 x 10^9 FLOPs


def test_scanned_blocks_count_every_run():
    assert convolutions(create("resnet110", scan_blocks=True)) == convolutions(create("resnet110"))


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    out = tmp_path_factory.mktemp("layers") / "layers.json"
    with pytest.MonkeyPatch.context() as env:  # leave this pytest process' malloc as it is
        env.setenv(malloc.OPT_OUT_ENV, "default")
        printed = conv_layers.main(["--model", "resnet8", "--batch", "2", "--steps", "1", "--warmup", "1",
                                    "--no-peer", "--json", str(out)])
    return printed, json.loads(out.read_text())


def test_every_kernel_of_every_convolution_is_timed(timed):
    _, r = timed
    assert r["sources"] == ["xla_cpu", "xla"] and r["host_malloc"] == "default"
    assert r["software"]["jax"] == jax.__version__  # per-kernel times move with the compiler
    assert [row["count"] for row in r["layers"]] == [1, 2, 1, 1, 1, 1]  # ResNet-8: 6n + 1 with n = 1
    stem, *rest = r["layers"]
    assert stem["xla_cpu_dx_ms"] is None and stem["xla_dx_ms"] is None  # the images need no gradient
    for row in r["layers"]:
        for source in ("xla_cpu", "xla"):
            for kernel in ("fwd", "dw", *(("dx",) if row is not stem else ())):
                assert 0 < row[f"{source}_{kernel}_ms"] < 10_000, (row["layer"], source, kernel)
    total = sum(row["count"] * row["xla_cpu_dw_ms"] for row in r["layers"])
    assert r["totals"]["xla_cpu_dw_ms"] == pytest.approx(total)
    assert "ratio" not in r


def test_console_table_lists_every_convolution(timed):
    printed, _ = timed
    text = conv_layers.table(printed)
    for label in ("32x32 3->16 3x3/1", "32x32 16->16 3x3/1", "16x16 32->64 3x3/2", "8x8 64->64 3x3/1",
                  "xla_cpu dw", "xla fwd", "convolutions of a step"):
        assert label in text


def test_unknown_implementation_is_one_line_and_the_old_name_still_works(capsys):
    with pytest.raises(SystemExit):
        conv_layers.parse_args(["--impls", "auto,cudnn"])
    assert "unknown implementation 'cudnn' in --impls; allowed: xla_cpu, xla" in capsys.readouterr().err
    assert conv_layers.parse_args(["--impls", "auto,xla"]).impls == "xla_cpu,xla"


def test_ratio_is_pytorchs_time_over_ours(monkeypatch, capsys):
    """The peer's bookkeeping, with a stand-in for PyTorch's kernels (torch is not a dependency)."""
    monkeypatch.setattr(conv_layers, "peer_available", lambda: True)
    monkeypatch.setattr(conv_layers, "torch_kernels", lambda conv: {k: (lambda: None) for k in conv_layers.KERNELS})
    times = {"xla_cpu": 2.0, "torch": 1.0}
    monkeypatch.setattr(conv_layers, "our_kernels", lambda conv, impl, platform: {"source": "xla_cpu"})
    monkeypatch.setattr(conv_layers, "time_kernels", lambda kernels, needs_input_grad, steps, warmup: {
        k: times["xla_cpu" if "source" in kernels else "torch"] if k != "dx" or needs_input_grad else None
        for k in conv_layers.KERNELS})
    r = conv_layers.run(conv_layers.parse_args(["--model", "resnet8", "--batch", "2", "--impls", "xla_cpu"]))
    assert r["sources"] == ["xla_cpu", "torch"]
    assert r["totals"]["xla_cpu_ms"] == 2.0 * (3 * 7 - 1) and r["totals"]["torch_ms"] == 1.0 * (3 * 7 - 1)
    assert r["ratio"] == {"xla_cpu": 0.5}
    assert "ratio xla_cpu/PyTorch 0.50" in conv_layers.table(r)


def test_pytorchs_kernels_compute_the_same_convolution():
    """Where PyTorch is installed: its kernels are given the same shapes, padding and strides as ours."""
    torch = pytest.importorskip("torch")
    conv = Convolution((2, 32, 32, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1)))
    kernels = conv_layers.torch_kernels(conv)
    assert tuple(kernels["fwd"]().shape) == (2, 32, 16, 16)
    dx, _, _ = kernels["dx"]()
    assert dx.shape == torch.Size([2, 16, 32, 32])
    _, dw, _ = kernels["dw"]()
    assert dw.shape == torch.Size([32, 16, 3, 3])
