"""Training and evaluation throughput of a network on this machine, against a PyTorch peer.

    python -m resnet_jax.benchmark --model resnet20 --batch 128 --steps 20 --json out.json
    python -m resnet_jax.benchmark --model resnet50 --batch 32 --steps 5 --rounds 3

Random data already on the device; SGD with momentum 0.9 and weight decay 1e-4 as in the paper. Each figure is
the median of `--steps` steps timed one by one after compilation and `--warmup` steps, the device's work
finished before the clock stops (the peer times its steps the same way). A peer script (`--peer-script`, or
$RESNET_JAX_PEER_SCRIPT: a PyTorch script taking the same command line and writing the same JSON) runs in a
subprocess right after ours, `--rounds` times alternating, and `ratio` is the median of ours/PyTorch over the
rounds: ratios, not absolute times, are what to compare across runs on a shared machine.

Utilisation is the model's FLOPs per step (XLA's cost analysis of the straightforward train step, so it does not
depend on how a formulation spends them) over the time, over the peak of a large matrix product in the run's
dtype on the same devices. Peak memory is the device's own count where the backend keeps one (GPU, TPU), else
the process' peak RSS (CPU), as the output says.
"""

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models, optim, synthetic, xla_cpu
from resnet_jax.models.summary import xla_flops
from resnet_jax.sharding import make_mesh, mesh_platform, replicated
from resnet_jax.train_state import init_train_state
from resnet_jax.train_step import compile_eval_step, compile_train_step
from resnet_jax.xla_cpu import malloc

PEER_ENV = "RESNET_JAX_PEER_SCRIPT"  # where --peer-script is not given


def median_seconds(fn: Callable[[], Any], steps: int, warmup: int) -> float:
    """Median wall time of `fn()` with its device work finished, after `warmup` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_flops(devices: list[jax.Device], dtype: str = "float32", size: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of a large matrix product in `dtype` on one device, times the devices: the practical peak."""
    x = jax.device_put(jnp.ones((size, size), dtype), devices[0])
    matmul = jax.jit(jnp.matmul)
    return 2 * size**3 / median_seconds(lambda: matmul(x, x), repeats, warmup=1) * len(devices)


def peak_memory(devices: list[jax.Device]) -> tuple[int, str]:
    """Peak bytes in use on the first device where the backend reports it, else the process' peak RSS."""
    stats = devices[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (no device statistics)"


def build_model(name: str, dtype: str, stride_on: str | None, scan_blocks: bool = False) -> models.ResNet:
    options: dict[str, Any] = {"dtype": dtype, "scan_blocks": scan_blocks}
    if stride_on:
        options["stride_on"] = stride_on
    return models.create(name, **options)


def measure(name: str, batch: int, steps: int, *, warmup: int = 2, dtype: str = "float32", devices: int = 0,
            stride_on: str | None = None, xla_cpu_layer: bool = True, scan_blocks: bool = False
            ) -> dict[str, Any]:
    """Compile times, train and eval images/s, peak memory and FLOPs of one network on `devices` devices, its
    steps compiled as training compiles them (with the XLA:CPU layer on a CPU unless `xla_cpu_layer=False`)."""
    devs = jax.devices()[:devices] if devices else jax.devices()
    mesh = make_mesh(devs)
    model = build_model(name, dtype, stride_on, scan_blocks)
    compute_model, options = xla_cpu.specialize(model, mesh_platform(mesh), enabled=xla_cpu_layer)
    schedule = optim.learning_rate_schedule(name="constant", base_learning_rate=0.01, num_train_steps=1)
    tx = optim.sgd(schedule, momentum=0.9, weight_decay=1e-4)

    start = time.perf_counter()
    init = jax.jit(lambda: init_train_state(model, tx, seed=0), out_shardings=replicated(mesh))
    state = jax.block_until_ready(init())
    init_s = time.perf_counter() - start
    batches = synthetic.batches(batch, models.input_shape(model), model.num_classes, mesh)
    data = next(batches)

    train_jit = compile_train_step(mesh, model=compute_model, compiler_options=options, tx=tx, schedule=schedule)
    start = time.perf_counter()
    lowered = train_jit.lower(state, data)
    lower_s = time.perf_counter() - start
    train = lowered.compile()
    compile_s = time.perf_counter() - start
    eval_jit = compile_eval_step(mesh, compute_model, options)
    start = time.perf_counter()
    evaluate = eval_jit.lower(state, data).compile()
    eval_compile_s = time.perf_counter() - start

    # The model's work, counted on the straightforward formulation (XLA counts a loop's body once, so the
    # chunked CPU weight gradient would read low).
    if scan_blocks:
        # XLA would count the scanned blocks once: count the forward's multiply-adds over every block as XLA
        # does (taps on padding skipped), x2 FLOPs, x3 for the forward and the two gradients.
        flops = 6 * batch * models.analytic_macs(model, skip_padding=True)
    elif compute_model is model:
        flops = xla_flops(train.cost_analysis())
    else:
        flops = xla_flops(compile_train_step(mesh, model=model, tx=tx, schedule=schedule).lower(state, data)
                       .compile().cost_analysis())

    box = [state]

    def train_once():
        box[0], metrics = train(box[0], data)
        return box[0], metrics

    train_s = median_seconds(train_once, steps, warmup)
    eval_s = median_seconds(lambda: evaluate(box[0], data), steps, warmup)
    memory, memory_source = peak_memory(devs)
    return {
        "model": name, "batch": batch, "dtype": dtype, "devices": len(devs), "platform": devs[0].platform,
        "device_kind": devs[0].device_kind, "xla_cpu_layer": compute_model is not model, "stride_on": model.stride_on,
        "compiler_options": options or {},
        "train_img_per_s": batch / train_s, "eval_img_per_s": batch / eval_s,
        "compile_s": compile_s, "lower_s": lower_s, "eval_compile_s": eval_compile_s, "init_s": init_s,
        "peak_memory_bytes": memory, "memory_source": memory_source, "flops_per_step": flops,
        "train_flop_per_s": flops / train_s, "software": software(),
    }


def run_peer(script: pathlib.Path, name: str, batch: int, steps: int, warmup: int, stride_on: str | None,
             extra: list[str] | None = None) -> dict[str, Any]:
    """The PyTorch peer's figures, run in a subprocess (its own threads, nothing of ours resident but us)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "peer.json"
        cmd = [sys.executable, str(script), "--model", name, "--batch", str(batch), "--steps", str(steps),
               "--warmup", str(warmup), "--json", str(out), *(extra or [])]
        if stride_on:
            cmd += ["--stride-on", stride_on]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def pipelines(batch: int, steps: int) -> dict[str, float]:
    """Input pipelines' images/s (resnet_jax.data.benchmark); CIFAR only where the dataset is available."""
    from resnet_jax.data import benchmark as data_benchmark

    results: dict[str, float] = {}
    try:
        results.update(data_benchmark.cifar(batch, steps))
    except Exception as e:  # noqa: BLE001 - no dataset here is a fact to report, not a failure
        print(f"cifar10 pipelines skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    results.update(data_benchmark.imagenet_per_core(32, 2))
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    peak = peak_flops(jax.devices()[:args.devices] if args.devices else jax.devices(), args.dtype)
    script = args.peer_script or os.environ.get(PEER_ENV)
    use_peer = args.peer and script is not None and pathlib.Path(script).is_file()
    if args.peer and not use_peer:
        print(f"no peer: {script} not found" if script else f"no peer: give --peer-script or ${PEER_ENV}")
    rounds = []
    for _ in range(max(args.rounds, 1)):
        ours = measure(args.model, args.batch, args.steps, warmup=args.warmup, dtype=args.dtype,
                       devices=args.devices, stride_on=args.stride_on, xla_cpu_layer=args.xla_cpu_layer,
                       scan_blocks=args.scan_blocks)
        if use_peer:
            malloc.release_freed_memory()
            peer = run_peer(pathlib.Path(script), args.model, args.batch, args.steps, args.warmup, args.stride_on)
            ours["peer_train_img_per_s"], ours["peer_eval_img_per_s"] = peer["train_img_per_s"], peer["eval_img_per_s"]
            ours["peer"] = {k: v for k, v in peer.items() if not k.endswith("img_per_s")}
        rounds.append(ours)
    result = dict(rounds[0])
    for key in ("train_img_per_s", "eval_img_per_s", "train_flop_per_s", "peer_train_img_per_s",
                "peer_eval_img_per_s", "compile_s", "lower_s", "eval_compile_s", "init_s"):
        if key in result:
            result[key] = statistics.median(r[key] for r in rounds)
    result["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in rounds)
    result["peak_flop_per_s"] = peak
    result["utilization"] = result["train_flop_per_s"] / peak
    if use_peer:
        result["ratio"] = statistics.median(r["train_img_per_s"] / r["peer_train_img_per_s"] for r in rounds)
        result["eval_ratio"] = statistics.median(r["eval_img_per_s"] / r["peer_eval_img_per_s"] for r in rounds)
    result["rounds"] = [{k: r[k] for k in ("train_img_per_s", "eval_img_per_s", "peer_train_img_per_s",
                                           "peer_eval_img_per_s") if k in r} for r in rounds]
    if args.pipelines:
        result["pipelines_img_per_s"] = pipelines(args.batch, max(args.steps, 10))
    result["command"] = " ".join(["python -m resnet_jax.benchmark", *sys.argv[1:]])
    return result


def software() -> dict[str, str]:
    """Versions behind the figures: a ratio moves with the compiler."""
    return {"python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": importlib.metadata.version("jaxlib")}


def table(r: dict[str, Any]) -> str:
    """The console summary."""
    layer = "with the XLA:CPU layer" if r["xla_cpu_layer"] else "plain"
    rows = [("network", f"{r['model']} ({layer}), batch {r['batch']}, {r['dtype']}, "
                        f"{r['devices']} {r['platform']} device(s): {r['device_kind']}"),
            ("software", ", ".join(f"{k} {v}" for k, v in r["software"].items())),
            ("XLA options", ", ".join(f"{k}={v}" for k, v in r["compiler_options"].items()) or "defaults"),
            ("train", f"{r['train_img_per_s']:,.1f} img/s"), ("eval", f"{r['eval_img_per_s']:,.1f} img/s")]
    if "ratio" in r:
        rows += [("PyTorch train", f"{r['peer_train_img_per_s']:,.1f} img/s  -> ratio ours/PyTorch {r['ratio']:.2f}"),
                 ("PyTorch eval", f"{r['peer_eval_img_per_s']:,.1f} img/s  -> ratio {r['eval_ratio']:.2f}")]
    rows += [("utilization", f"{r['utilization']:.1%} ({r['train_flop_per_s'] / 1e9:,.1f} of "
                             f"{r['peak_flop_per_s'] / 1e9:,.1f} GFLOP/s; {r['flops_per_step'] / 1e9:,.2f} "
                             "GFLOP per step)"),
             ("compile", f"train step {r['compile_s']:.1f} s (lowering {r['lower_s']:.1f} s), eval step "
                         f"{r['eval_compile_s']:.1f} s, init {r['init_s']:.1f} s"),
             ("peak memory", f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB ({r['memory_source']})")]
    if "host_malloc" in r:
        rows.append(("host malloc", {"retain": "freed memory kept in the process (resnet_jax.xla_cpu.malloc)",
                                     "default": "glibc's default"}[r["host_malloc"]]))
    for name, rate in r.get("pipelines_img_per_s", {}).items():
        rows.append(("pipeline", f"{name}: {rate:,.0f} img/s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128, help="global batch, split over the devices")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="ours-then-peer rounds; medians reported")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--devices", type=int, default=0, help="number of devices (0: all)")
    p.add_argument("--stride-on", choices=["1x1", "3x3"], help="bottleneck stride placement (default: the model's)")
    p.add_argument("--xla-cpu-layer", action=argparse.BooleanOptionalAction, default=True,
                   help="on a CPU, compile the steps with resnet_jax.xla_cpu (as training does by default)")
    # The old name of that switch: "auto" is the layer, "xla" XLA's defaults.
    p.add_argument("--conv-impl", choices=["xla", "auto"], help=argparse.SUPPRESS)
    p.add_argument("--scan-blocks", action="store_true", help="scan each stage's repeated blocks (fast compile)")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="run the peer script, where one is given")
    p.add_argument("--peer-script", help=f"peer to time against ours (default: ${PEER_ENV})")
    p.add_argument("--pipelines", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the input pipelines")
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args(argv)
    if args.conv_impl:
        args.xla_cpu_layer = args.conv_impl == "auto"
    return args


def run_and_report(run_fn: Callable[[argparse.Namespace], dict[str, Any]],
                   table_fn: Callable[[dict[str, Any]], str], args: argparse.Namespace) -> dict[str, Any]:
    """A benchmark's command: glibc's malloc set first, as `launch.py` sets it, so that the figures are those of
    a training run (before JAX's first computation; a bad RESNET_JAX_HOST_MALLOC exits with its error), then
    the run, its table printed and every figure written to `args.json`."""
    try:
        retained = malloc.retain_freed_memory() if getattr(args, "xla_cpu_layer", True) else False
    except ValueError as e:
        sys.exit(f"error: {e}")
    result = run_fn(args)
    result["host_malloc"] = "retain" if retained else "default"
    print(table_fn(result))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1, default=_jsonable))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_report(run, table, parse_args(argv))


def _jsonable(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    main()
