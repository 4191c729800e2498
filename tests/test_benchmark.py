"""The benchmark on a tiny size: every figure present and plausible, the peer's ratio computed."""

import json
import textwrap

import jax
import jaxlib.version
import pytest

from resnet_jax import benchmark
from resnet_jax.xla_cpu import compiler, malloc

FAKE_PEER = textwrap.dedent("""
    import argparse, json
    p = argparse.ArgumentParser()
    for flag in ("--model", "--batch", "--steps", "--warmup", "--json", "--stride-on"):
        p.add_argument(flag)
    a = p.parse_args()
    json.dump({"framework": "fake", "model": a.model, "train_img_per_s": 10.0, "eval_img_per_s": 40.0},
              open(a.json, "w"))
""")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    peer = tmp / "peer.py"
    peer.write_text(FAKE_PEER)
    out = tmp / "out.json"
    with pytest.MonkeyPatch.context() as env:  # leave this pytest process' malloc as it is
        env.setenv(malloc.OPT_OUT_ENV, "default")
        printed = benchmark.main(["--model", "resnet20", "--batch", "8", "--steps", "2", "--warmup", "1", "--devices",
                                  "1", "--no-pipelines", "--peer-script", str(peer), "--json", str(out)])
    return printed, json.loads(out.read_text())


def test_json_has_every_figure(result):
    _, r = result
    for key in ("train_img_per_s", "eval_img_per_s", "compile_s", "utilization", "peak_memory_bytes",
                "flops_per_step", "peak_flop_per_s", "peer_train_img_per_s", "ratio", "command"):
        assert key in r, key
    assert r["model"] == "resnet20" and r["batch"] == 8 and r["devices"] == 1 and r["dtype"] == "float32"
    assert r["compiler_options"] == compiler.CPU_OPTIONS and r["xla_cpu_layer"]  # how the measured step compiled
    assert r["host_malloc"] == "default"
    assert r["software"]["jax"] == jax.__version__ and r["software"]["jaxlib"] == jaxlib.version.__version__


def test_figures_are_plausible(result):
    _, r = result
    assert 0 < r["train_img_per_s"] < r["eval_img_per_s"] * 10  # a train step does about 3x an eval's work
    assert 0 < r["compile_s"] < 600 and r["peak_memory_bytes"] > 10 * 2**20
    # ResNet-20 at 32x32: about 0.23 GFLOP per image per train step (3x the forward's 76 MFLOP).
    assert 0.15e9 < r["flops_per_step"] / r["batch"] < 0.35e9
    assert 0 < r["utilization"] < 1.5
    assert r["ratio"] == pytest.approx(r["train_img_per_s"] / 10.0)
    assert r["eval_ratio"] == pytest.approx(r["eval_img_per_s"] / 40.0)


def test_console_table(result, capsys):
    printed, _ = result
    text = benchmark.table(printed)
    for word in (f"jax {jax.__version__}", "XLA options", "train", "eval", "ratio ours/PyTorch", "utilization",
                 "compile", "peak memory", "host malloc"):
        assert word in text


class Measured(Exception):
    pass


def test_peer_script_missing_is_reported_not_fatal(tmp_path, capsys, monkeypatch):
    args = benchmark.parse_args(["--peer-script", str(tmp_path / "missing.py")])

    def stop(*args, **kwargs):
        raise Measured

    monkeypatch.setattr(benchmark, "peak_flops", lambda devices, dtype="float32": 1e9)
    monkeypatch.setattr(benchmark, "measure", stop)
    with pytest.raises(Measured):
        benchmark.run(args)
    assert "missing" in capsys.readouterr().out


def test_without_a_peer_script_there_is_no_peer_and_it_says_so(capsys, monkeypatch):
    monkeypatch.delenv(benchmark.PEER_ENV, raising=False)
    monkeypatch.setattr(benchmark, "peak_flops", lambda devices, dtype="float32": 1e9)
    monkeypatch.setattr(benchmark, "measure", lambda *a, **k: (_ for _ in ()).throw(Measured()))
    with pytest.raises(Measured):
        benchmark.run(benchmark.parse_args([]))
    assert "no peer: give --peer-script or $RESNET_JAX_PEER_SCRIPT" in capsys.readouterr().out


def test_bad_host_malloc_setting_is_one_line(monkeypatch):
    monkeypatch.setenv(malloc.OPT_OUT_ENV, "keep")
    with pytest.raises(SystemExit, match=r"^error: RESNET_JAX_HOST_MALLOC='keep'; allowed: retain, default$"):
        benchmark.main(["--no-peer", "--no-pipelines"])
