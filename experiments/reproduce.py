"""Reproduce the paper's CIFAR-10 experiments at a chosen budget, then render their figures and tables from
the runs' own logs (never from numbers typed in).

    python -m experiments.reproduce degradation --budget 0.01          # Figures 1 and 6, Figure 7
    python -m experiments.reproduce cifar_table --budget 1.0 --seeds 5  # Table 6 (accelerator)
    python -m experiments.reproduce shortcuts --budget 0.01             # Table 3's A/B/C idea, on CIFAR
    python -m experiments.reproduce degradation --render-only           # redraw from finished runs
    python -m experiments.reproduce imagenet --budget 1 --depths 18 34  # Tables 2 and 3 (a pod; docs/results.md)
    python -m experiments.reproduce convergence --budget 0.1 --control   # ResNet-20 beside a PyTorch control
    python -m experiments.reproduce default_job --seeds 5                # the default job's seed spread

`--budget` is the fraction of the paper's schedule (64k iterations of 128 on CIFAR-10, 600k of 256 on
ImageNet); the learning-rate boundaries are
fractions of the run, so a shortened run keeps the schedule's shape. Each experiment writes its runs to
experiments/results/<experiment>/<run>/ (resumable: running again continues unfinished runs) and its figure
(PNG) and table (Markdown and CSV) beside them. `--set KEY=VALUE` overrides any config field of every run
(e.g. `--set batch_size=64 model.dtype=bfloat16`).
"""

import argparse
import csv
import dataclasses
import json
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs" / "cifar10"  # RunSpec.config is relative to it, or "imagenet/..."
EXPERIMENTS = ("degradation", "cifar_table", "shortcuts", "imagenet", "convergence", "default_job")
CIFAR_STEPS = 64_000  # the paper's schedule on CIFAR-10: --budget 1

# Table 6 of the paper, CIFAR-10 test error (%); ResNet-110 is "best (mean +- std)" of 5 runs: 6.43 (6.61+-0.16).
PAPER_TEST_ERROR = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97, "resnet110": 6.43,
                    "resnet1202": 7.93}


# Tables 2 and 3 of the paper, ImageNet validation error (%) with 10-crop testing: (table, top-1, top-5).
# Table 2's residual nets use option A; Table 3 compares A, B and C on ResNet-34 and uses B for 50/101/152.
PAPER_IMAGENET = {"plain18": ("2", 27.94, None), "resnet18_A": ("2", 27.88, None),
                  "plain34": ("2, 3", 28.54, 10.02), "resnet34_A": ("2, 3", 25.03, 7.76),
                  "resnet34_B": ("3", 24.52, 7.46), "resnet34_C": ("3", 24.19, 7.40),
                  "resnet50": ("3", 22.85, 6.71), "resnet101": ("3", 21.75, 6.05), "resnet152": ("3", 21.43, 5.71)}
TEN_CROP = "eval_10crop"  # metrics.jsonl split of the final 10-crop evaluation of an ImageNet run


@dataclasses.dataclass(frozen=True)
class RunSpec:
    label: str  # directory name and legend
    config: str  # config file under experiments/configs/cifar10
    overrides: tuple[tuple[str, Any], ...] = ()
    seed: int = 0


def experiment_runs(name: str, depths: Sequence[int], seeds: int, budget: float = 1.0) -> list[RunSpec]:
    if name == "convergence":  # one run per budget, beside the earlier budgets' runs in the same directory
        return [RunSpec(f"resnet{d}_budget{budget:g}", f"resnet{d}.py") for d in depths]
    if name == "default_job":
        return [RunSpec(f"quick_seed{s}", "quick.py", seed=s) for s in range(seeds)]
    if name == "degradation":
        return [RunSpec(f"{kind}{d}", f"{kind}{d}.py") for kind in ("plain", "resnet") for d in depths]
    if name == "cifar_table":
        return [RunSpec(f"resnet{d}_seed{s}", f"resnet{d}.py", seed=s) for d in depths for s in range(seeds)]
    if name == "shortcuts":
        return [RunSpec(f"resnet{d}_{o}", f"resnet{d}.py", (("model.shortcut", o),)) for d in depths
                for o in ("A", "B", "C")]
    if name == "imagenet":
        files = {"resnet18_A": "resnet18.py", "resnet34_A": "resnet34_a.py", "resnet34_B": "resnet34.py",
                 "resnet34_C": "resnet34_c.py"}
        return [RunSpec(label, "imagenet/" + files.get(label, f"{label}.py"),
                        (("model.shortcut", "A"),) if label == "resnet18_A" else ())
                for label in PAPER_IMAGENET if int(re.search(r"\d+", label).group()) in depths]
    raise ValueError(f"unknown experiment {name!r}; allowed: {', '.join(EXPERIMENTS)}")


DEFAULT_DEPTHS = {"degradation": (20, 56), "cifar_table": (20, 32, 44, 56, 110), "shortcuts": (20,),
                  "convergence": (20,), "default_job": (20,),
                  "imagenet": (18, 34, 50, 101, 152)}


def run_config(spec: RunSpec, budget: float, extra: dict[str, Any]) -> Any:
    from resnet_jax import config as config_lib

    imagenet = spec.config.startswith("imagenet/")
    path, overrides = (CONFIGS.parent if imagenet else CONFIGS) / spec.config, dict(spec.overrides)
    # A CIFAR depth without its own file (e.g. resnet8 for a smoke test) gets the base recipe.
    if not imagenet and not path.exists():
        name = path.stem
        path = CONFIGS / "base.py"
        overrides = {"model.name": name, "model.shortcut": "plain" if name.startswith("plain") else "A", **overrides}
    c = config_lib.load(str(path), overrides)
    # Fractions of the paper's schedule; `extra` applies after, so --set num_train_steps=... wins.
    steps = max(1, round(c.num_train_steps * budget))
    c.num_train_steps = steps
    c.seed = spec.seed
    # About 40 points per curve and a test evaluation at 10 of them, as in Figure 6.
    c.log_every_steps = max(1, steps // 40)
    c.eval_every_steps = max(1, steps // 10)
    c.checkpoint_every_steps = max(1, steps // 10)
    if c.schedule.warmup_steps:
        c.schedule.warmup_steps = max(1, round(c.schedule.warmup_steps * budget))
    for key, value in extra.items():
        parent = c
        *head, last = key.split(".")
        for part in head:
            parent = parent[part]
        parent[last] = value
    return c


def hardware() -> str:
    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{jax.device_count()} x {device.device_kind}"
    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    return f"{os.cpu_count()}-core {cpu} (CPU)"


def train_runs(runs: list[RunSpec], out: pathlib.Path, budget: float, extra: dict[str, Any],
               devices: int | None = None) -> None:
    import jax

    from resnet_jax import trainer
    from resnet_jax.sharding import make_mesh

    mesh = make_mesh(jax.devices()[:devices])
    for spec in runs:
        workdir = out / spec.label
        config = run_config(spec, budget, extra)
        print(f"== {spec.label}: {config.num_train_steps} steps of {config.batch_size} -> {workdir}", flush=True)
        start = time.perf_counter()
        trainer.train_and_evaluate(config, str(workdir), mesh=mesh)
        if spec.config.startswith("imagenet/"):
            ten_crop_evaluation(config, workdir, mesh)
        if jax.process_index() != 0:
            continue
        # A resumed (or already finished) run adds this launch's time to the earlier launches'.
        info = workdir / "run.json"
        earlier = json.loads(info.read_text()).get("seconds", 0.0) if info.exists() else 0.0
        info.write_text(json.dumps({
            "implementation": f"resnet_jax (JAX {jax.__version__})",
            "config": spec.config, "overrides": dict(spec.overrides), "seed": config.seed, "budget": budget,
            "num_train_steps": config.num_train_steps, "batch_size": config.batch_size,
            "extra": extra, "seconds": round(earlier + time.perf_counter() - start, 1),
            "hardware": hardware()}))


def ten_crop_evaluation(config: Any, workdir: pathlib.Path, mesh: Any) -> dict[str, float]:
    """Tables 2 and 3 report 10-crop testing; the run's own evaluations use the centre crop (ten times
    cheaper). Evaluates the final checkpoint once with 10 crops, as split "eval_10crop" in metrics.jsonl."""
    import jax

    from resnet_jax import metrics, trainer

    done = [e for e in metrics.read(workdir) if e["split"] == TEN_CROP and e["step"] == config.num_train_steps]
    if done:
        return done[-1]
    config = config.copy_and_resolve_references()
    config.data.eval_mode = "10crop"
    run = trainer.Run(config, str(workdir), mesh)
    state = run.initial_state()
    if int(jax.device_get(state.step)) < config.num_train_steps:  # stopped early (preempted): not final
        return {}
    split = config.eval_splits[0]
    result = trainer.evaluate_split(state, run.eval_step, trainer.eval_batches(config, run.model, mesh, split))
    writer = metrics.MetricWriter(workdir)
    writer.write(int(jax.device_get(state.step)), TEN_CROP, result)
    writer.close()
    return result


def render_imagenet(runs: list[RunSpec], out: pathlib.Path) -> str:
    """Tables 2 and 3: 10-crop top-1/top-5 validation error beside the paper's; a run that has not finished
    (or not been run) leaves its cells empty. Figure 4's curves for the finished plain/residual 18/34 runs."""
    from resnet_jax import metrics

    rows, finished = [], []
    for spec in runs:
        table, paper_top1, paper_top5 = PAPER_IMAGENET[spec.label]
        events = metrics.read(out / spec.label)
        final = [e for e in events if e["split"] == TEN_CROP]
        centre = [e for e in events if e["split"] in ("eval", "test")]
        info = json.loads((out / spec.label / "run.json").read_text()) if (out / spec.label / "run.json").exists() \
            else {}
        cell = lambda e, key: "" if not e else f"{100 * e[-1][key]:.2f}"  # noqa: E731
        rows.append({"network": spec.label, "paper_table": table, "steps": final[-1]["step"] if final else "",
                     "top1_error_10crop_%": cell(final, "top1_error"), "top5_error_10crop_%": cell(final, "top5_error"),
                     "top1_error_centre_%": cell(centre, "top1_error"),
                     "paper_top1_%": f"{paper_top1:.2f}",
                     "paper_top5_%": "" if paper_top5 is None else f"{paper_top5:.2f}",
                     "hardware": info.get("hardware", "")})
        if final and spec.label.split("_")[0] in ("plain18", "plain34", "resnet18", "resnet34"):
            finished.append(spec)
    table = write_table(rows, out, "imagenet")
    if finished:
        from resnet_jax.plot import plot_runs

        plot_runs([out / r.label for r in finished], out / "imagenet.png", [r.label for r in finished],
                  title="ImageNet, Figure 4 (thin: train, bold: validation, centre crop)")
    return table


def summarize(workdir: pathlib.Path) -> dict[str, Any]:
    """Final figures of one run from its metrics.jsonl: training error (mean over the last 10% of the logged
    training steps, on augmented batches as the paper's curves) and the last test error."""
    from resnet_jax import metrics

    events = metrics.read(workdir)
    train = [e for e in events if e["split"] == "train"]
    tests = [e for e in events if e["split"] == "test"]
    if not train or not tests:
        raise ValueError(f"{workdir} has no finished run (no train or test events in metrics.jsonl)")
    tail = train[-max(1, len(train) // 10):]
    info = json.loads((workdir / "run.json").read_text()) if (workdir / "run.json").exists() else {}
    return {"steps": train[-1]["step"], "train_error": 100 * statistics.mean(e["top1_error"] for e in tail),
            "test_error": 100 * tests[-1]["top1_error"], "test_examples": tests[-1]["num_examples"],
            "seconds": info.get("seconds"), "hardware": info.get("hardware", "")}


def render_table(runs: list[RunSpec], out: pathlib.Path, name: str) -> str:
    """Markdown and CSV tables; runs of one network (several seeds) are reported as mean +- std and best."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for spec in runs:
        network = spec.label.split("_seed")[0]
        groups.setdefault(network, []).append(summarize(out / spec.label))
    rows = []
    for network, results in groups.items():
        tests = [r["test_error"] for r in results]
        trains = [r["train_error"] for r in results]
        spread = f" +- {statistics.stdev(tests):.2f} (min {min(tests):.2f}, max {max(tests):.2f})" \
            if len(tests) > 1 else ""
        paper = PAPER_TEST_ERROR.get(network.split("_")[0]) if name != "degradation" or "resnet" in network else None
        rows.append({"network": network, "runs": len(results), "steps": results[0]["steps"],
                     "train_error_%": f"{statistics.mean(trains):.2f}",
                     "test_error_%": f"{statistics.mean(tests):.2f}{spread}",
                     "paper_test_error_%": "" if paper is None else f"{paper:.2f}",
                     "minutes": "" if results[0]["seconds"] is None else f"{results[0]['seconds'] / 60:.1f}",
                     "hardware": results[0]["hardware"]})
    return write_table(rows, out, name)


def write_table(rows: list[dict[str, Any]], out: pathlib.Path, name: str) -> str:
    """out/<name>.csv and out/<name>.md from rows of equal keys; returns the Markdown."""
    with (out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    table = header + "".join("| " + " | ".join(str(v) for v in r.values()) + " |\n" for r in rows)
    (out / f"{name}.md").write_text(table)
    return table


def train_control(depth: int, budget: float, out: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """The PyTorch control (experiments/torch_cifar.py) at `budget`, logging and evaluating as our runs do, in a
    process of its own; resumes where it stopped."""
    steps = max(1, round(CIFAR_STEPS * budget))
    workdir = out / f"torch_resnet{depth}_budget{budget:g}"
    print(f"== {workdir.name}: {steps} steps of 128 -> {workdir}", flush=True)
    subprocess.run([sys.executable, "-m", "experiments.torch_cifar", "--workdir", str(workdir), "--steps", str(steps),
                    "--depth", str(depth), "--seed", str(seed), "--log-every", str(max(1, steps // 40)),
                    "--eval-every", str(max(1, steps // 10))], check=True, cwd=ROOT)
    return workdir


def render_convergence(out: pathlib.Path) -> str:
    """Every finished run in `out` (ours and the PyTorch controls, any budget): table and curves."""
    workdirs = sorted(p for p in out.iterdir() if (p / "run.json").exists() and (p / "metrics.jsonl").exists())
    if not workdirs:
        raise ValueError(f"no finished run in {out}")
    rows = []
    for workdir in workdirs:
        info, result = json.loads((workdir / "run.json").read_text()), summarize(workdir)
        network = re.match(r"(?:torch_)?(resnet\d+)", workdir.name).group(1)
        rows.append({"network": network, "implementation": info.get("implementation", "resnet_jax (JAX)"),
                     "budget": f"{result['steps'] / CIFAR_STEPS:g}", "steps": result["steps"],
                     "minutes": "" if result["seconds"] is None else f"{result['seconds'] / 60:.1f}",
                     "hardware": result["hardware"], "train_error_%": f"{result['train_error']:.2f}",
                     "test_error_%": f"{result['test_error']:.2f}",
                     "paper_test_error_%": f"{PAPER_TEST_ERROR.get(network, float('nan')):.2f}"})
    from resnet_jax.plot import plot_runs

    plot_runs(workdirs, out / "convergence.png", [w.name for w in workdirs],
              title="CIFAR-10 ResNet-20, ours and PyTorch (thin: train, bold: test)")
    return write_table(rows, out, "convergence")


def load_run(workdir: str | pathlib.Path, mesh: Any = None) -> tuple[Any, Any, Any]:
    """(Run, restored state, config) of a finished run of this driver, rebuilt from its run.json."""
    import jax

    from resnet_jax import trainer
    from resnet_jax.sharding import make_mesh

    workdir = pathlib.Path(workdir)
    info = json.loads((workdir / "run.json").read_text())
    spec = RunSpec(workdir.name, info["config"], tuple(info["overrides"].items()), info["seed"])
    config = run_config(spec, info["budget"], info["extra"])
    run = trainer.Run(config, str(workdir), mesh or make_mesh(jax.devices()[:1]), writable=False)
    return run, run.initial_state(fresh=False), config


def response_stds(workdir: str | pathlib.Path) -> list[float]:
    """Figure 7's std of every 3x3 layer's response on the test set, in network order, for one run."""
    from resnet_jax import analysis, trainer

    run, state, config = load_run(workdir)
    batches = trainer.eval_batches(config, run.model, run.mesh, "test")
    return list(analysis.layer_response_std(run.model, state.variables, batches).values())


def render_responses(runs: list[RunSpec], out: pathlib.Path) -> str:
    """Figure 7: std of every 3x3 layer's response on the test set, original order and sorted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Committed results keep their logs but not their weights: reuse the figures measured when they had them.
    saved = json.loads((out / "responses.json").read_text()) if (out / "responses.json").exists() else {}
    stds = {}
    for spec in runs:
        if (out / spec.label / "checkpoints").is_dir():
            stds[spec.label] = response_stds(out / spec.label)
        elif spec.label in saved:
            stds[spec.label] = saved[spec.label]
        else:
            raise ValueError(f"{out / spec.label} has no checkpoints (and {out / 'responses.json'} no "
                             f"{spec.label}): train it first")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), dpi=120)
    for label, values in stds.items():
        style = "--" if label.startswith("plain") else "-"
        top.plot(range(1, len(values) + 1), values, style, label=label)
        bottom.plot(range(1, len(values) + 1), sorted(values, reverse=True), style, label=label)
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "responses.png")
    plt.close(fig)
    rows = ["| network | 3x3 layers | mean std | median std |", "|---|---:|---:|---:|"]
    rows += [f"| {k} | {len(v)} | {statistics.mean(v):.3f} | {statistics.median(v):.3f} |" for k, v in stds.items()]
    table = "\n".join(rows) + "\n"
    (out / "responses.md").write_text(table)
    (out / "responses.json").write_text(json.dumps(stds))
    return table


def _parse(value: str) -> Any:
    """A --set value as JSON where it parses (numbers, true/false, lists), else as the string."""
    try:
        return json.loads({"True": "true", "False": "false"}.get(value, value))
    except json.JSONDecodeError:
        return value


def main(argv: Sequence[str] | None = None, retain_freed_memory: bool = False) -> None:
    """The command; `retain_freed_memory` sets glibc's malloc as launch.py does (unless --set
    xla_cpu_layer=False), before JAX's first computation, so that CPU steps reuse their buffers' pages."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=EXPERIMENTS)
    parser.add_argument("--budget", type=float, default=1.0,
                        help="fraction of the paper's schedule (CIFAR: 64k iterations, ImageNet: 600k)")
    parser.add_argument("--depths", type=int, nargs="*",
                        help="networks' depths (CIFAR: 6n+2; imagenet: of 18 34 50 101 152)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per network (cifar_table, default_job)")
    parser.add_argument("--out", default=None, help="default: experiments/results/<experiment>")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--devices", type=int, default=None, help="use the first N devices (default: all)")
    parser.add_argument("--only", nargs="*", default=None, metavar="RUN",
                        help="train only these runs (e.g. to split an experiment over machines); render later "
                             "with --render-only once every run has finished")
    parser.add_argument("--control", action="store_true",
                        help="convergence: also train the PyTorch control (experiments/torch_cifar.py; needs torch)")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out or ROOT / "experiments" / "results" / args.experiment)
    out.mkdir(parents=True, exist_ok=True)
    extra = {key: _parse(value) for key, value in (item.split("=", 1) for item in args.set)}
    if retain_freed_memory and extra.get("xla_cpu_layer", True):
        from resnet_jax.xla_cpu import malloc

        try:
            malloc.retain_freed_memory()
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    runs = experiment_runs(args.experiment, args.depths or DEFAULT_DEPTHS[args.experiment], args.seeds, args.budget)
    if args.only is not None:
        unknown = sorted(set(args.only) - {r.label for r in runs})
        if unknown:
            parser.error(f"--only: unknown runs {unknown}; allowed: {[r.label for r in runs]}")
    if not args.render_only:
        from resnet_jax.distributed import initialize

        initialize()  # every host of a pod slice or SLURM job runs this same command
        train_runs([r for r in runs if args.only is None or r.label in args.only], out, args.budget, extra,
                   args.devices)
        if args.control:
            for depth in args.depths or DEFAULT_DEPTHS[args.experiment]:
                train_control(depth, args.budget, out, seed=int(extra.get("seed", 0)))
        if args.only is not None:
            return
    import jax

    if jax.process_index() != 0:
        return
    if args.experiment == "imagenet":
        print(render_imagenet(runs, out))
        return
    if args.experiment == "convergence":
        print(render_convergence(out))
        return
    from resnet_jax.plot import plot_panels

    title = f"CIFAR-10, {args.experiment}, budget {args.budget:g} (thin: train, bold: test)"
    # Figure 6's layout for the degradation experiment: plain nets on the left, ResNets on the right.
    panels = {"plain": [r for r in runs if r.label.startswith("plain")],
              "residual": [r for r in runs if not r.label.startswith("plain")]}
    panels = {name: [out / r.label for r in group] for name, group in panels.items() if group}
    plot_panels(panels, out / f"{args.experiment}.png", title=title)
    print(render_table(runs, out, args.experiment))
    if args.experiment == "degradation":
        print(render_responses(runs, out))


if __name__ == "__main__":
    main(retain_freed_memory=True)
