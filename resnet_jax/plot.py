"""Training and test error curves of one or several runs, drawn like the paper's Figure 6.

    python -m resnet_jax.plot runs/plain20 runs/resnet20 --out curves.png

Thin lines are training error, bold lines test (or validation) error, against iterations, as in the paper.
"""

import argparse
import pathlib
from collections.abc import Mapping, Sequence

from resnet_jax import metrics


def error_curves(workdir: str | pathlib.Path) -> dict[str, tuple[list[int], list[float]]]:
    """{split: (steps, top-1 errors)} from a run's metrics.jsonl."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for event in metrics.read(workdir):
        if event.get("top1_error") is None:
            continue
        steps, errors = curves.setdefault(event["split"], ([], []))
        steps.append(event["step"])
        errors.append(event["top1_error"])
    return curves


def _draw(ax, workdirs: Sequence[str | pathlib.Path], labels: Sequence[str], colors: Sequence[str]) -> None:
    for i, workdir in enumerate(workdirs):
        label = labels[i] if i < len(labels) else pathlib.Path(workdir).name
        color = colors[i % len(colors)]
        curves = error_curves(workdir)
        if not curves:
            raise ValueError(f"no metrics in {workdir}: expected {pathlib.Path(workdir) / 'metrics.jsonl'}")
        for split, (steps, errors) in curves.items():
            bold = split != "train"
            ax.plot(steps, [100 * e for e in errors], color=color, linewidth=2.0 if bold else 0.7,
                    marker="o" if len(steps) == 1 else None,  # a single evaluation, e.g. a final 10-crop
                    label=f"{label} ({split})" if bold or len(curves) == 1 else None)
    ax.set_xlabel("iterations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, out: str | pathlib.Path) -> pathlib.Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_panels(panels: Mapping[str, Sequence[str | pathlib.Path]], out: str | pathlib.Path,
                title: str = "") -> pathlib.Path:
    """Writes a PNG with one panel per group of runs, side by side on a shared error axis (Figure 6 puts the
    plain nets left and the ResNets right); thin: training error, bold: test/eval error, in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), dpi=120, sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, workdirs) in zip(axes[0], panels.items()):
        _draw(ax, workdirs, [pathlib.Path(w).name for w in workdirs], colors)
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("error (%)")
    fig.suptitle(title or "thin: training error, bold: test error", fontsize=10)
    return _save(fig, out)


def plot_runs(workdirs: Sequence[str | pathlib.Path], out: str | pathlib.Path, labels: Sequence[str] = (),
              title: str = "") -> pathlib.Path:
    """Writes a PNG with every run's training error (thin) and test/eval error (bold), in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    _draw(ax, workdirs, labels, plt.rcParams["axes.prop_cycle"].by_key()["color"])
    ax.set_ylabel("error (%)")
    ax.set_title(title or "thin: training error, bold: test error")
    return _save(fig, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--out", default="curves.png")
    parser.add_argument("--labels", nargs="*", default=())
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        print(plot_runs(args.workdirs, args.out, args.labels, args.title))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
