"""Does torch.compile change the math of uncond's UNet? The gradients of one batch's loss, compiled and not.

    python benchmarks/compile_parity.py                    # CPU: inductor's C++ code
    python benchmarks/compile_parity.py --device cuda      # GPU: inductor's Triton code, as --compile runs it

The reference is the eager step in float64. Each parameter's gradient is compared with it as a relative error
(the norm of the difference over the norm of the reference); printed are the median and the worst over the
UNet's parameters, for the eager step in fp32 and for the compiled step in fp32 (TF32 off on GPUs, so that
both do fp32 arithmetic). Compiling reorders sums, so its errors may be some times the eager fp32 step's,
not orders of magnitude more. The loss is the DDPM objective's (noise prediction, mean squared error) on
random images, noise and timesteps; the UNet is a preset's, at its initial weights. Exits 1 when the compiled
gradients are off (a median above 1e-3).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch

from uncond import models
from uncond.config import TrainConfig


def gradients(unet: torch.nn.Module, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              dtype: torch.dtype) -> list[torch.Tensor]:
    unet.zero_grad(set_to_none=True)
    prediction = unet(images.to(dtype), timesteps).sample
    torch.nn.functional.mse_loss(prediction, noise.to(dtype)).backward()
    return [parameter.grad.double() for parameter in unet.parameters()]


def relative_errors(grads: list[torch.Tensor], reference: list[torch.Tensor], names: list[str]) -> dict[str, float]:
    """Each parameter's relative error, but for attention's key bias: its gradient is zero (the bias shifts every
    logit of a row alike, which softmax ignores), so that any rounding is an infinite relative error."""
    return {name: ((grad - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            for name, grad, ref in zip(names, grads, reference) if not name.endswith("to_k.bias")}


def describe(errors: dict[str, float]) -> str:
    worst = max(errors, key=errors.__getitem__)
    return f"median {statistics.median(errors.values()):.2g}, worst {errors[worst]:.2g} ({worst})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny", help="a --model_preset of uncond's (default: tiny)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend (aot_eager: a check of this "
                        "script, which must agree)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`-wrapped")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)

    config = TrainConfig(model_preset=args.preset, resolution=args.resolution)
    torch.manual_seed(0)
    unet = models.build_unet(models.with_channels(models.unet_config_for(config, args.resolution), 3)).to(device)
    names = [name for name, _ in unet.named_parameters()]
    images = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
    noise = torch.randn_like(images)
    timesteps = torch.randint(0, 1000, (args.batch,), device=device)

    reference = gradients(copy.deepcopy(unet).double(), images, noise, timesteps, torch.float64)
    eager = relative_errors(gradients(unet, images, noise, timesteps, torch.float32), reference, names)
    # uncond's --compile: inductor, with CUDA graphs on GPUs (parts.make_accelerator)
    graphs = device.type == "cuda" and args.backend == "inductor"
    compiled_unet = torch.compile(unet, backend=args.backend, mode="reduce-overhead" if graphs else None)
    start = time.perf_counter()
    for _ in range(3):  # CUDA graphs: the first calls record, the last replays
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        grads = gradients(compiled_unet, images, noise, timesteps, torch.float32)
    compiled = relative_errors(grads, reference, names)
    print(f"torch {torch.__version__}, {device.type}, preset {args.preset} at {args.resolution} px, "
          f"batch {args.batch}, {len(eager)} parameter tensors compared; {args.backend}: compiled and 3 steps in "
          f"{time.perf_counter() - start:.0f} s")
    print(f"gradients against eager float64: eager fp32 {describe(eager)}")
    print(f"                                 compiled fp32 {describe(compiled)}")
    off = statistics.median(compiled.values()) > 1e-3
    print("compiled gradients are OFF: --compile would train another model" if off else
          "compiled gradients agree with eager")
    sys.exit(1 if off else 0)


if __name__ == "__main__":
    main()
