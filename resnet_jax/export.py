"""The weights command: a checkpoint's variables, or a torchvision state dict's, in one portable file.

    python -m resnet_jax.export runs/resnet56 resnet56.npz                  # newest checkpoint of a workdir
    python -m resnet_jax.export runs/resnet56/checkpoints/32000 r56.safetensors
    python -m resnet_jax.export --torchvision resnet50.safetensors resnet50.npz

The file holds the arrays by name and the record of their network (`resnet_jax.weights`), plus, for a
checkpoint, the run's config and step; `resnet_jax.weights.load` and `restore.load` open it.
"""

import argparse
import pathlib

import jax

from resnet_jax import restore, weights


def export_checkpoint(path: str | pathlib.Path, out: str | pathlib.Path, step: int | None = None, *,
                      best: bool = False) -> pathlib.Path:
    """Writes the variables of a checkpoint (a workdir's newest readable one by default) to `out`."""
    state, meta, step = restore.load_state(path, step, best=best)
    config = restore.config_from_meta(meta)
    create_options = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    record = weights.model_record(config.model.name, create_options)
    file_meta = {**record, "config": meta["config"], "step": int(step), "source": str(pathlib.Path(path).absolute())}
    return weights.save(out, (jax.device_get(state.variables), file_meta))


def import_torchvision(path: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path:
    """Converts a torchvision-format ResNet state dict file to our variables in `out`."""
    return weights.save(out, weights.from_torchvision(weights.read_state_dict(path), source=str(path)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="workdir, checkpoint directory, or (with --torchvision) a state dict")
    parser.add_argument("out", help="output file, .npz or .safetensors")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest readable)")
    parser.add_argument("--best", action="store_true", help="the checkpoint of lowest validation error")
    parser.add_argument("--torchvision", action="store_true",
                        help="source is a torchvision ResNet state dict (.safetensors, .npz, or .pt/.pth)")
    args = parser.parse_args(argv)
    try:
        weights.formats.check_suffix(pathlib.Path(args.out))  # before reading any checkpoint
        if args.torchvision:
            written = import_torchvision(args.source, args.out)
        else:
            written = export_checkpoint(args.source, args.out, args.step, best=args.best)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
