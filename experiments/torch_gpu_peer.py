"""PyTorch peer for the GPU benchmark: torchvision ResNet-50 ("v1.5", stride on the 3x3), automatic mixed
precision, channels-last, SGD with momentum, random data already on the GPU.

    python experiments/torch_gpu_peer.py --model resnet50 --batch 256 --steps 50 --json torch_gpu.json

Same command line and JSON fields as ../shared/bench/torch_resnet.py (the CPU peer), so that
`python -m resnet_jax.benchmark --peer-script experiments/torch_gpu_peer.py` runs it back to back with ours.
Needs a CUDA build of torch and torchvision; not a dependency of resnet_jax.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision


def median_img_per_s(step, batch: int, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50", choices=["resnet50"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--stride-on", default="3x3", choices=["3x3"], help="torchvision's ResNet-50 is v1.5")
    ap.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = getattr(torch, a.amp_dtype)
    model = torchvision.models.resnet50().cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    net = torch.compile(model) if a.compile else model
    x = torch.randn(a.batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (a.batch,), device="cuda")

    def train_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def eval_step():
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
            net(x)

    model.train()
    train = median_img_per_s(train_step, a.batch, a.steps, a.warmup)
    model.eval()
    evaluation = median_img_per_s(eval_step, a.batch, a.steps, a.warmup)
    out = dict(framework="torch", torch=torch.__version__, device=torch.cuda.get_device_name(), model=a.model,
               batch=a.batch, amp_dtype=a.amp_dtype, memory_format="channels_last", compiled=a.compile,
               train_img_per_s=train, eval_img_per_s=evaluation,
               peak_memory_bytes=torch.cuda.max_memory_allocated())
    print(f"torch {a.model} batch {a.batch} AMP {a.amp_dtype}: train {train:.0f} img/s, eval {evaluation:.0f} img/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
