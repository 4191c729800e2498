"""A control written independently of resnet_jax: the CIFAR-10 recipe of section 4.2 in PyTorch.

    python -m experiments.torch_cifar --steps 6400 --workdir /tmp/runs/torch_resnet20

ResNet-20 (option A, He-normal convolutions, BN momentum 0.9 in our convention, epsilon 1e-5), SGD with
momentum 0.9 and weight decay 1e-4 on every parameter, batch 128, lr 0.1 divided by 10 at 50% and 75% of the
steps; per-pixel mean subtracted, 4 zero pixels padded after it, a random 32x32 crop and a random horizontal
flip; each epoch a fresh permutation, batches running across epoch boundaries; evaluation of all 10,000 test
images with the running statistics. The pixels are the same decoded CIFAR-10 that resnet_jax trains on
(`resnet_jax.data.cifar.load`); everything after decoding (statistics, augmentation, model, optimizer,
evaluation) is written here with torch alone, so a wrong detail of our recipe would show as a gap.

It writes `metrics.jsonl` (the trainer's format: step, split, loss, top1_error) and `run.json` (steps, wall
time, hardware) in `--workdir`, and resumes from `checkpoint.pt` there. torch is imported only here.
"""

import argparse
import json
import math
import os
import pathlib
import platform
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PAD = 4


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the option A shortcut (subsample, zero channels split on both sides), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, momentum=0.1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=0.1)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x[:, :, ::self.stride, ::self.stride]
        if self.extra:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(y + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16, momentum=0.1), nn.ReLU())
        blocks, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(Block(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He et al. 2015b: N(0, 2 / fan_in)
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        # The head as the paper leaves it open; LeCun-normal (truncated at 2 std), zero bias.
        std = math.sqrt(1.0 / 64) / 0.87962566103423978
        nn.init.trunc_normal_(self.head.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def decoded_cifar10(data_dir: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 NHWC train and test images and int labels, as resnet_jax decodes them."""
    from resnet_jax.data import cifar

    options = {"validation_split": False, "train_examples": 0, "download": False}
    train_x, train_y = cifar.load(data_dir, "train", options)
    test_x, test_y = cifar.load(data_dir, "test", options)
    return train_x, train_y, test_x, test_y


class Batches:
    """Batch k of an endless stream of per-epoch permutations, augmented with torch's own generator."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int, seed: int):
        self.images, self.labels, self.batch = images, labels, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.queue = torch.empty(0, dtype=torch.long)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.queue) < self.batch:
            self.queue = torch.cat([self.queue, torch.randperm(len(self.images), generator=self.generator)])
        idx, self.queue = self.queue[:self.batch], self.queue[self.batch:]
        x = F.pad(self.images[idx], (PAD, PAD, PAD, PAD))  # zeros after the mean is subtracted
        b, _, h, w = self.images[idx].shape
        dy = torch.randint(0, 2 * PAD + 1, (b,), generator=self.generator)
        dx = torch.randint(0, 2 * PAD + 1, (b,), generator=self.generator)
        flip = torch.rand(b, generator=self.generator) < 0.5
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))
        cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
        x = x[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        return x.contiguous(memory_format=torch.channels_last), self.labels[idx]

    def state(self) -> dict:
        return {"generator": self.generator.get_state(), "queue": self.queue}

    def restore(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.queue = state["queue"]


def learning_rate(step: int, steps: int, base: float = 0.1) -> float:
    return base * 0.1 ** sum(step >= round(f * steps) for f in (0.5, 0.75))


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> dict[str, float]:
    model.eval()
    loss, wrong = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            logits = model(images[i:i + batch].contiguous(memory_format=torch.channels_last))
            loss += float(F.cross_entropy(logits, labels[i:i + batch], reduction="sum"))
            wrong += int((logits.argmax(1) != labels[i:i + batch]).sum())
    model.train()
    return {"loss": loss / len(images), "top1_error": wrong / len(images), "num_examples": len(images)}


def hardware() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.machine()
    return f"{os.cpu_count()}-core {cpu} (CPU)"


def log(workdir: pathlib.Path, record: dict) -> None:
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def train(args: argparse.Namespace) -> dict[str, float]:
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = decoded_cifar10(args.data_dir)
    mean = torch.from_numpy(train_x.astype(np.float64).mean(axis=0).astype(np.float32)).permute(2, 0, 1)
    to_tensor = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).float() - mean  # noqa: E731
    train_images, test_images = to_tensor(train_x), to_tensor(test_x)
    train_labels, test_labels = torch.from_numpy(train_y).long(), torch.from_numpy(test_y).long()

    model = CifarResNet(args.depth).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    batches = Batches(train_images, train_labels, args.batch, args.seed)
    step, seconds = 0, 0.0
    ckpt = workdir / "checkpoint.pt"
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        batches.restore(saved["batches"])
        step, seconds = saved["step"], saved["seconds"]
        # Records after the checkpoint belong to steps that will run again.
        lines = (workdir / "metrics.jsonl").read_text().splitlines() if (workdir / "metrics.jsonl").exists() else []
        (workdir / "metrics.jsonl").write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= step))
        print(f"resumed at step {step}", flush=True)
    model.train()
    start, window = time.perf_counter() - seconds, []
    result: dict[str, float] = {}
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps)
        x, y = batches.next()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        window.append((float(loss), float((logits.argmax(1) != y).float().mean())))
        if step % args.log_every == 0 or step == args.steps:
            losses, errors = zip(*window)
            log(workdir, {"step": step, "split": "train", "loss": float(np.mean(losses)),
                          "top1_error": float(np.mean(errors)), "learning_rate": learning_rate(step - 1, args.steps)})
            print(f"step {step}/{args.steps}: loss {np.mean(losses):.4f}, top-1 error {np.mean(errors):.4f}",
                  flush=True)
            window = []
        if step % args.eval_every == 0 or step == args.steps:
            result = evaluate(model, test_images, test_labels)
            log(workdir, {"step": step, "split": "test", **result})
            print(f"step {step}: test top-1 error {result['top1_error']:.4f}", flush=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "batches": batches.state(),
                        "step": step, "seconds": time.perf_counter() - start}, ckpt)
    (workdir / "run.json").write_text(json.dumps({
        "implementation": f"PyTorch {torch.__version__} (experiments/torch_cifar.py)", "depth": args.depth,
        "seed": args.seed, "num_train_steps": args.steps, "batch_size": args.batch,
        "seconds": round(time.perf_counter() - start, 1), "hardware": hardware()}))
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=6400)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=160)
    p.add_argument("--eval-every", type=int, default=640)
    p.add_argument("--data-dir", default=None, help="TFDS data dir holding cifar10 (default: $TFDS_DATA_DIR)")
    args = p.parse_args(argv)
    if args.depth < 8 or (args.depth - 2) % 6:
        p.error(f"--depth {args.depth}: a CIFAR depth is 6n+2 with n >= 1, e.g. 20, 32, 56")
    return train(args)


if __name__ == "__main__":
    main()
