"""The reproduction driver and both notebooks, end to end on a tiny budget (synthetic images, ResNet-8)."""

import csv
import json
import pathlib
import shutil
import statistics

import nbformat
import pytest
from nbclient import NotebookClient

from experiments import reproduce
from resnet_jax import metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--budget", "0.0001", "--depths", "8", "--devices", "1",
        "--set", "dataset=synthetic", "batch_size=16", "eval_batch_size=16"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Tiny finished runs of both experiments, made by the same command a user runs."""
    out = tmp_path_factory.mktemp("results")
    for experiment in ("degradation", "shortcuts"):
        reproduce.main([experiment, *TINY, "--out", str(out / experiment)])
    return out


def test_driver_renders_figure_and_tables_from_the_runs(finished):
    out = finished / "degradation"
    png = (out / "degradation.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    assert int.from_bytes(png[16:20], "big") == 2 * 6 * 120  # width: two 6-inch panels (plain, residual)
    assert (out / "responses.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "degradation.md").read_text()
    for run in ("plain8", "resnet8"):
        summary = reproduce.summarize(out / run)
        assert summary["steps"] == 6  # 0.0001 of 64k iterations
        assert f"| {run} | 1 | 6 | {summary['train_error']:.2f} | {summary['test_error']:.2f}" in table
        info = json.loads((out / run / "run.json").read_text())
        assert info["budget"] == 0.0001 and info["hardware"]
    stds = json.loads((out / "responses.json").read_text())
    assert len(stds["plain8"]) == len(stds["resnet8"]) == 7  # stem + 3 blocks x 2 3x3 layers
    csv = (finished / "shortcuts" / "shortcuts.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in csv[1:]] == ["resnet8_A", "resnet8_B", "resnet8_C"]


def test_render_only_without_weights_reuses_the_saved_responses(finished, tmp_path):
    # What a clean clone holds of a committed experiment: logs and rendered files, no checkpoints.
    out = tmp_path / "degradation"
    shutil.copytree(finished / "degradation", out, ignore=shutil.ignore_patterns("checkpoints"))
    before = json.loads((out / "responses.json").read_text())
    reproduce.main(["degradation", *TINY, "--out", str(out), "--render-only"])
    assert json.loads((out / "responses.json").read_text()) == before
    (out / "responses.json").unlink()
    with pytest.raises(ValueError, match="has no checkpoints"):
        reproduce.main(["degradation", *TINY, "--out", str(out), "--render-only"])


def test_imagenet_driver_fills_only_the_cells_of_finished_runs(tmp_path):
    # One run of Tables 2/3 on synthetic 224x224 images, then the table of all of Table 2's runs.
    args = ["imagenet", "--budget", "0.00001", "--depths", "18", "--devices", "1", "--out", str(tmp_path),
            "--set", "dataset=synthetic", "batch_size=4", "eval_batch_size=4", "eval_every_steps=3"]
    reproduce.main([*args, "--only", "resnet18_A"])
    reproduce.main([*args, "--render-only"])
    rows = (tmp_path / "imagenet.csv").read_text().splitlines()
    assert rows[0].startswith("network,paper_table,steps,top1_error_10crop_%,top5_error_10crop_%")
    plain, residual = (row.split(",") for row in rows[1:])
    assert plain[:2] == ["plain18", "2"] and plain[2:6] == ["", "", "", ""] and plain[6] == "27.94"
    assert residual[:3] == ["resnet18_A", "2", "6"] and 0 <= float(residual[3]) <= 100 and residual[6] == "27.88"
    info = json.loads((tmp_path / "resnet18_A" / "run.json").read_text())
    assert info["overrides"] == {"model.shortcut": "A"} and info["num_train_steps"] == 6
    # Running a finished run again trains nothing and keeps its measured time.
    reproduce.main([*args, "--only", "resnet18_A"])
    assert json.loads((tmp_path / "resnet18_A" / "run.json").read_text())["seconds"] >= info["seconds"] > 0
    assert sum(e["split"] == "eval_10crop" for e in metrics.read(tmp_path / "resnet18_A")) == 1
    assert (tmp_path / "imagenet.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("notebook, experiment", [("degradation.ipynb", "degradation"),
                                                  ("shortcut_ablation.ipynb", "shortcuts")])
def test_notebook_runs_headless(finished, notebook, experiment, monkeypatch):
    monkeypatch.setenv("RESNET_JAX_RUNS", str(finished / experiment))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    path = ROOT / "experiments" / "notebooks" / notebook
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "runs in" in outputs
    assert not any(o.get("output_type") == "error" for cell in nb.cells for o in cell.get("outputs", []))


@pytest.mark.parametrize("experiment", ["degradation", "degradation_seed1"])
def test_committed_degradation_runs_show_the_papers_claim(experiment):
    # The README's result, read from the committed logs of two seeds: a deeper plain net trains to a higher
    # training error, a deeper residual net to a lower one (depths 8 and 20, budget 0.01, this project's CPU).
    out = ROOT / "experiments" / "results" / experiment
    train = {run: reproduce.summarize(out / run)["train_error"] for run in ("plain8", "plain20", "resnet8", "resnet20")}
    assert train["plain20"] > train["plain8"]
    assert train["resnet20"] < train["resnet8"]
    assert train["resnet20"] < train["plain20"]
    stds = json.loads((out / "responses.json").read_text())
    for depth in (8, 20):  # Figure 7: the residual nets' layer responses are the smaller ones
        assert sum(stds[f"resnet{depth}"]) < sum(stds[f"plain{depth}"])


def test_default_job_reports_the_spread_of_its_seeds(tmp_path):
    reproduce.main(["default_job", "--seeds", "2", "--budget", "0.005", "--devices", "1", "--out", str(tmp_path),
                    "--set", "dataset=synthetic", "batch_size=16", "eval_batch_size=16"])
    errors = [reproduce.summarize(tmp_path / f"quick_seed{s}")["test_error"] for s in (0, 1)]
    with open(tmp_path / "default_job.csv", newline="") as f:
        row = list(csv.reader(f))[1]
    assert row[:3] == ["quick", "2", "5"]  # 5 of quick.py's 1,000 steps
    mean, spread = row[4].split(" +- ")
    assert float(mean) == pytest.approx(sum(errors) / 2, abs=0.006)
    assert f"(min {min(errors):.2f}" in spread and f"max {max(errors):.2f})" in spread


def test_convergence_driver_renders_every_run_in_its_directory(tmp_path):
    args = ["convergence", "--depths", "8", "--devices", "1", "--out", str(tmp_path),
            "--set", "dataset=synthetic", "batch_size=16", "eval_batch_size=16"]
    for budget in ("0.0001", "0.0002"):  # two budgets, two launches, one table
        reproduce.main([*args, "--budget", budget])
    rows = [line.split(",") for line in (tmp_path / "convergence.csv").read_text().splitlines()]
    assert rows[0] == ["network", "implementation", "budget", "steps", "minutes", "hardware", "train_error_%",
                       "test_error_%", "paper_test_error_%"]
    assert [(r[0], r[3]) for r in rows[1:]] == [("resnet8", "6"), ("resnet8", "13")]
    first = reproduce.summarize(tmp_path / "resnet8_budget0.0001")
    assert rows[1][1].startswith("resnet_jax (JAX ") and rows[1][7] == f"{first['test_error']:.2f}"
    assert (tmp_path / "convergence.png").read_bytes()[:4] == b"\x89PNG"


def test_the_pytorch_control_trains_on_the_same_pixels_and_logs_as_ours(tmp_path):
    pytest.importorskip("torch")
    from experiments import torch_cifar

    workdir = tmp_path / "torch_resnet8_budget0.0001"
    result = torch_cifar.main(["--workdir", str(workdir), "--steps", "4", "--depth", "8", "--log-every", "2",
                               "--eval-every", "4"])
    assert result["num_examples"] == 10_000 and 0 <= result["top1_error"] <= 1
    events = metrics.read(workdir)
    assert [(e["step"], e["split"]) for e in events] == [(2, "train"), (4, "train"), (4, "test")]
    assert json.loads((workdir / "run.json").read_text())["implementation"].startswith("PyTorch")
    # Resuming a finished run trains nothing more and keeps its log.
    torch_cifar.main(["--workdir", str(workdir), "--steps", "4", "--depth", "8", "--log-every", "2"])
    assert len(metrics.read(workdir)) == 3
    assert "PyTorch" in reproduce.render_convergence(tmp_path)


CONVERGENCE = ROOT / "experiments" / "results" / "convergence"


def test_committed_convergence_runs_follow_the_recipe_and_render_their_table(tmp_path):
    """The README's ResNet-20 results, read from the committed logs: the step schedule's boundaries at 50% and
    75% of each run, the final test error of every run in the committed table, which renders again the same
    from those logs alone; ours and the PyTorch control at 1/10 of the schedule within one point, and our test
    error falling as the budget grows."""
    runs = {p.name: p for p in CONVERGENCE.iterdir() if (p / "metrics.jsonl").exists()}
    assert {"resnet20_budget0.1", "torch_resnet20_budget0.1"} <= set(runs)
    for name, workdir in runs.items():
        steps = json.loads((workdir / "run.json").read_text())["num_train_steps"]
        train = [e for e in metrics.read(workdir) if e["split"] == "train"]
        assert train[-1]["step"] == steps
        rates = {e["step"]: e["learning_rate"] for e in train}
        for step, rate in rates.items():
            expected = 0.1 * 0.1 ** sum(step > f * steps for f in (0.5, 0.75))
            assert rate == pytest.approx(expected, rel=1e-3), (name, step)
        tests = [e for e in metrics.read(workdir) if e["split"] == "test"]
        assert tests[-1]["step"] == steps and tests[-1]["num_examples"] == 10_000
    shutil.copytree(CONVERGENCE, tmp_path / "convergence", ignore=shutil.ignore_patterns("*.png"))
    rendered = reproduce.render_convergence(tmp_path / "convergence")
    assert rendered == (CONVERGENCE / "convergence.md").read_text()
    error = {name: reproduce.summarize(workdir)["test_error"] for name, workdir in runs.items()}
    assert abs(error["resnet20_budget0.1"] - error["torch_resnet20_budget0.1"]) < 1.0  # percentage points
    ours = sorted((float(name.split("budget")[1]), error[name]) for name in runs if name.startswith("resnet20_"))
    assert [e for _, e in ours] == sorted((e for _, e in ours), reverse=True)


def test_committed_default_job_seeds_give_the_readmes_spread():
    out = ROOT / "experiments" / "results" / "default_job"
    errors = [reproduce.summarize(out / f"quick_seed{s}")["test_error"] for s in range(5)]
    with open(out / "default_job.csv", newline="") as f:
        row = list(csv.reader(f))[1]
    assert row[:3] == ["quick", "5", "1000"]
    assert row[4] == (f"{statistics.mean(errors):.2f} +- {statistics.stdev(errors):.2f} "
                      f"(min {min(errors):.2f}, max {max(errors):.2f})")
    readme = (ROOT / "README.md").read_text()
    assert f"{statistics.mean(errors):.1f}% ± {statistics.stdev(errors):.1f}" in readme
