"""The bare training step of a UNet, without data, EMA or logging: what the network and the device allow.

    python benchmarks/bare_step.py --device cuda                 # seed UNet, 64 px, bf16: the variants below
    python benchmarks/bare_step.py --device cpu --batch 16

Times forward (under autocast), loss, backward and a fused AdamW step on random inputs, for the layout,
compilation and recording (--cuda_graphs) variants uncond chooses between, and at batch 1, where the step time is
the fixed cost of launching its kernels (on a GPU: if batch 1 costs nearly what batch 64 does, the step is
launch-bound).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from diffusers import UNet2DModel

from uncond.models import PRESETS

VARIANTS = {  # name: (channels_last, torch.compile mode or None)
    "eager": (False, None),
    "channels-last": (True, None),
    "compile": (False, "default"),
    "compile-cuda-graphs": (False, "reduce-overhead"),
    # --cuda_graphs' split, by PyTorch's recipe: forward, loss and backward recorded once and replayed, AdamW eager
    "cuda-graph": (False, "cuda-graph"),
}
GRAPH_WARMUP = 3  # eager steps on a side stream before recording


def time_step(preset: str, resolution: int, batch: int, device: str, precision: str, channels_last: bool,
              compile_mode: str | None, steps: int, warmup: int) -> tuple[float, float]:
    """Seconds per training step, and minor page faults per step (this process's; meaningful on CPUs)."""
    torch.manual_seed(0)
    unet = UNet2DModel(**PRESETS[preset].unet, sample_size=resolution).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    unet = unet.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(unet.parameters(), fused=True)
    forward = torch.compile(unet, mode=compile_mode) if compile_mode not in (None, "cuda-graph") else unet
    images = torch.randn(batch, 3, resolution, resolution, device=device).contiguous(memory_format=memory_format)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def gradients() -> None:
        with torch.autocast(device, dtype=dtype, enabled=precision != "no"):
            output = forward(images, timesteps).sample
        (output.float() - images).pow(2).mean().backward()

    graph, side_stream = None, torch.cuda.Stream() if compile_mode == "cuda-graph" else None
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            start, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        if compile_mode != "cuda-graph":
            gradients()
        elif i < GRAPH_WARMUP:
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                gradients()
            torch.cuda.current_stream().wait_stream(side_stream)
        else:
            if graph is None:  # the gradients are None: the recorded backward pass writes them in its own memory
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    gradients()
            graph.replay()
        optimizer.step()
        if graph is None:  # a replay overwrites the recorded gradients in place
            optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return (time.perf_counter() - start) / steps, faults / steps


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("no", "bf16"), help="default: bf16 on cuda, no on cpu")
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 on cuda, 3 on cpu)")
    args = parser.parse_args()
    precision = args.precision or ("bf16" if args.device == "cuda" else "no")
    steps = args.steps or (30 if args.device == "cuda" else 3)
    warmup = 10 if args.device == "cuda" else 1
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"{args.preset} UNet, {args.resolution} px, {args.device}, precision {precision}")
    for name in args.variants.split(","):
        channels_last, compile_mode = VARIANTS[name]
        if compile_mode == "cuda-graph" and args.device != "cuda":
            print(f"{name:<20} needs a GPU")
            continue
        for batch in (args.batch, 1):
            seconds, _ = time_step(args.preset, args.resolution, batch, args.device, precision, channels_last,
                                compile_mode, steps, warmup)
            print(f"{name:<20} batch {batch:>4}: {seconds * 1000:8.1f} ms/step {batch / seconds:9.1f} images/s",
                  flush=True)


if __name__ == "__main__":
    main()
