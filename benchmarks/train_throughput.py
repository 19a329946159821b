"""Training throughput: train_unconditional.py's step against uncond's, on the same machine, in one run.

    python benchmarks/train_throughput.py                      # CPU: fp32, the seed's UNet and the demo preset
    python benchmarks/train_throughput.py --device cuda        # GPU: bf16, the seed's UNet at batch 16 and 64

Each measurement runs in its own process (so peak memory is that variant's alone), baseline and uncond
in turn, `--repeats` times, each going first in turn; the ratio is taken pair by pair. Printed per
configuration: images/s, the ratio, peak memory (GPU: torch's max allocated; CPU: the process's peak
resident set), and model FLOPs utilisation: the FLOPs of one training step counted with
torch.utils.flop_counter (forward and backward) times steps/s, over the device's peak for the precision
(a datasheet figure for NVIDIA GPUs, an estimate from the core count, clock and vector units for CPUs;
both printed, with the rate a large matrix product reaches here to check the estimate by). On a CPU, the
share of the cores that other processes used meanwhile is printed where it is a tenth or more: the
step's threads then wait on each other, and the figures do not compare.

The baseline reproduces train_unconditional.py's training step (diffusers main, 2026-08) without
torchvision, which cannot be installed here: its UNet; its per-image transforms (PIL decode from a
`datasets` imagefolder, Resize(resolution, BILINEAR) on the shorter side, RandomCrop, ToTensor,
Normalize([0.5], [0.5]), applied with set_transform) in a DataLoader with its defaults (shuffle,
num_workers=0); images and noise cast to the autocast dtype as it does; DDPMScheduler.add_noise;
accelerate's autocast for the precision; diffusers' EMAModel.step every step (as with --use_ema);
gradient clipping at 1.0; loss.item() every step for its progress bar. Both sides get the same
process environment (the glibc allocator setting uncond makes is made in the baseline too).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    # name: (model preset, resolution, batch size, timed steps on CPU, timed steps on GPU, data)
    "seed64-b16": ("seed", 64, 16, 4, 60, "photos"),
    "seed64-b64": ("seed", 64, 64, 2, 40, "photos"),
    "demo": ("tiny", 28, 64, 30, 200, "mnist"),
}
# Dense, per second: NVIDIA datasheets. The first key the device's name holds wins: the PCIe and NVL parts are
# slower than the SXM ones, named plainly ("NVIDIA H100 80GB HBM3").
GPU_PEAK_FLOPS = {
    "bf16": {"H100 PCIe": 756e12, "H100 NVL": 835.5e12, "H100": 989.4e12, "H200 NVL": 835.5e12, "H200": 989.4e12,
             "A100": 312e12},
    "no": {"H100 PCIe": 378e12, "H100 NVL": 417.5e12, "H100": 494.7e12, "H200 NVL": 417.5e12, "H200": 494.7e12,
           "A100": 156e12},  # fp32 runs use TF32 tensor cores
}


# ------------------------------------------------------------------------------------------------ data


def prepare_data(kind: str, folder: Path, count: int = 512) -> Path:
    """A folder of images both sides train on: JPEG photos-like pictures at 256x192, or the MNIST digits."""
    if folder.exists() and any(folder.iterdir()):
        return folder
    folder.mkdir(parents=True)
    from PIL import Image

    if kind == "mnist":
        from uncond.config import TrainConfig
        from uncond.sources import open_source

        for i, record in enumerate(open_source(TrainConfig(dataset_name="builtin:mnist")).records):
            record.open().save(folder / f"{i:05d}.png")
        return folder
    rng = np.random.default_rng(0)
    for i in range(count):
        # smooth colour fields with texture: JPEG-compresses and decodes like a photo, not like noise
        low = rng.random((6, 8, 3)) * 255
        image = Image.fromarray(low.astype(np.uint8)).resize((256, 192), Image.BICUBIC)
        texture = rng.normal(0, 12, (192, 256, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float32) + texture, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


# ------------------------------------------------------------------------------------------------ workers


def baseline_worker(config_name: str, device: str, precision: str, data: Path, steps: int, warmup: int) -> dict:
    """train_unconditional.py's step, as described in the module docstring."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from datasets import load_dataset
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from PIL import Image

    from uncond.environment import keep_freed_memory
    from uncond.models import PRESETS

    keep_freed_memory()
    preset, resolution, batch_size = CONFIGS[config_name][:3]
    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    unet_config = {**PRESETS[preset].unet, "sample_size": resolution}
    channels = 1 if CONFIGS[config_name][5] == "mnist" else 3
    model = UNet2DModel(**unet_config, in_channels=channels, out_channels=channels)
    ema_model = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                         model_cls=UNet2DModel, model_config=model.config)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    dataset = load_dataset("imagefolder", data_dir=str(data), split="train",
                           cache_dir=str(data.parent / "hf-cache"))
    rng = np.random.default_rng(0)

    def augment(image: Image.Image) -> torch.Tensor:  # Resize, RandomCrop, ToTensor, Normalize
        width, height = image.size
        size = ((resolution, int(resolution * height / width)) if width <= height
                else (int(resolution * width / height), resolution))
        image = image.resize(size, Image.BILINEAR)
        top = rng.integers(0, size[1] - resolution + 1)
        left = rng.integers(0, size[0] - resolution + 1)
        image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = array[..., None] if array.ndim == 2 else array
        return torch.from_numpy(array.transpose(2, 0, 1).copy()).sub_(0.5).div_(0.5)

    mode = "L" if channels == 1 else "RGB"
    dataset.set_transform(lambda examples: {"input": [augment(im.convert(mode)) for im in examples["image"]]})
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500,
                                 num_training_steps=len(loader) * 100)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema_model.to(accelerator.device)
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def step(batch) -> None:
        clean_images = batch["input"].to(weight_dtype)
        noise = torch.randn(clean_images.shape, dtype=weight_dtype, device=clean_images.device)
        timesteps = torch.randint(0, 1000, (clean_images.shape[0],), device=clean_images.device).long()
        noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        with accelerator.accumulate(model):
            model_output = model(noisy_images, timesteps).sample
            loss = F.mse_loss(model_output.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema_model.step(model.parameters())
        loss.detach().item()  # the seed's progress-bar logs, every step

    return timed(step, batches(loader), steps, warmup, batch_size, device)


def batches(loader):
    while True:
        yield from loader


def uncond_worker(config_name: str, device: str, precision: str, data: Path, steps: int, warmup: int,
                  compile_unet: bool, diagnose: bool = False, cuda_graphs: bool = False) -> dict:
    """uncond's own loop body: train.train_step on a Run built by parts.build_run, as `uncond train` runs it."""
    from uncond import parts, train
    from uncond.config import TrainConfig
    from uncond.plan import plan_run

    preset, resolution, batch_size = CONFIGS[config_name][:3]
    output = Path(tempfile.mkdtemp(prefix="uncond-bench-"))
    config = TrainConfig(train_data_dir=str(data), output_dir=str(output), model_preset=preset, resolution=resolution,
                         train_batch_size=batch_size, mixed_precision=precision, use_ema=True, logger="none",
                         seed=0, max_train_steps=10**6, checkpointing_steps=10**9, compile=compile_unet,
                         cuda_graphs=cuda_graphs,
                         num_channels="1" if CONFIGS[config_name][5] == "mnist" else "3")
    plan = plan_run(config, explicit={"resolution"})
    accelerator = parts.make_accelerator(plan.config, output)
    start = time.perf_counter()
    run = parts.build_run(plan, accelerator)
    run.step_graph = train.step_graph(run)  # as train.run_training sets it
    prepare_seconds = time.perf_counter() - start

    losses = []

    def step(micro_batches) -> None:
        loss = train.train_step(run, micro_batches)
        run.step += 1
        run.running_loss.add(loss)
        if run.step % run.config.logging_steps == 0:  # the loop's one sync, at log intervals
            losses.append(run.running_loss.pop().item())

    def micro_batch_groups():
        while True:
            yield from train.optimizer_steps(run)
            run.epoch += 1

    batches = micro_batch_groups()
    result = timed(step, batches, steps, warmup, batch_size, device)
    result["prepare_seconds"] = round(prepare_seconds, 2)
    # a speed is worth nothing if the step computes garbage (torch 2.13 compiles NaN gradients on CPUs under bf16)
    result["last_logged_loss"] = losses[-1] if losses else None
    if run.step_graph is not None:  # whether the timed steps were replays
        result["cuda_graph"] = ("recording failed" if run.step_graph.failed else
                                "recorded" if run.step_graph.recorded else "not recorded")
    if diagnose:
        diagnose_steps(step, batches, device, batch_size, result["images_per_sec"], steps)
    shutil.rmtree(output, ignore_errors=True)  # the run's folder (its lock, its data report): one per measurement
    return result


def diagnose_steps(step, batches, device: str, batch_size: int, images_per_sec: float, timed_steps: int,
                   steps: int = 5) -> None:
    """Where a step's time goes: the loader's share (the same step on one batch held in memory), the host
    synchronisations it makes (CUDA's sync debug mode) and the operations taking the most host time, against
    the device's time (torch.profiler)."""
    import itertools
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile

    held = timed(step, itertools.repeat(next(batches)), timed_steps, 2, batch_size, device)["images_per_sec"]
    print(f"one batch held in memory (no loader): {held:.1f} images/s, against {images_per_sec:.1f} with the loader")
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                step(next(batches))
        torch.cuda.set_sync_debug_mode("default")
        syncs = collections.Counter(f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:100]}" for w in caught)
        print(f"host synchronisations in {steps} steps: {sum(syncs.values())}")
        for message, count in syncs.most_common(5):
            print(f"  {count} x {message}")
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device == "cuda")
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step(next(batches))
        if device == "cuda":
            torch.cuda.synchronize()
    events = profiler.key_averages()
    host = sum(e.self_cpu_time_total for e in events) / steps / 1000
    gpu = sum(getattr(e, "self_device_time_total", 0) for e in events) / steps / 1000
    print(f"per step: {host:.1f} ms of host time in operations, {gpu:.1f} ms of device time in kernels")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))


def timed(step, source, steps: int, warmup: int, batch_size: int, device: str) -> dict:
    import torch

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step(next(source))
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step(next(source))
    sync()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    # A CUDA graph's activations lie in its own memory pool, reserved for good, and not counted as allocated
    # between its replays: compared with --cuda_graphs, only the memory reserved tells the two apart.
    reserved = torch.cuda.max_memory_reserved() if device == "cuda" else peak
    return {"images_per_sec": steps * batch_size / seconds, "peak_bytes": peak, "reserved_bytes": reserved,
            "seconds": seconds}


# ------------------------------------------------------------------------------------------------ FLOPs


def step_flops_per_image(config_name: str, device: str, precision: str) -> float:
    """Forward + backward FLOPs of one image, counted by torch's FlopCounterMode on a batch of 2."""
    import torch
    from diffusers import UNet2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from uncond.models import PRESETS

    preset, resolution = CONFIGS[config_name][:2]
    channels = 1 if CONFIGS[config_name][5] == "mnist" else 3
    unet = UNet2DModel(**PRESETS[preset].unet, sample_size=resolution, in_channels=channels,
                       out_channels=channels).to(device)
    images = torch.randn(2, channels, resolution, resolution, device=device)
    timesteps = torch.tensor([10, 500], device=device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with FlopCounterMode(display=False) as counter, torch.autocast(device, dtype=dtype, enabled=precision != "no"):
        unet(images, timesteps).sample.float().pow(2).mean().backward()
    return counter.get_total_flops() / 2


def peak_flops(device: str, precision: str) -> tuple[float, str]:
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_FLOPS[precision].items():
            if key in name:
                return value, f"{name}, datasheet {'bf16' if precision == 'bf16' else 'TF32'} dense peak"
        return math.nan, f"{name}: peak unknown"
    cores = len(os.sched_getaffinity(0))
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    mhz = max(float(line.split(":")[1]) for line in cpuinfo if line.startswith("cpu MHz"))
    flags = set(" ".join(line for line in cpuinfo if line.startswith("flags")).split())
    field = {line.split(":")[0].strip(): line.split(":", 1)[1].strip() for line in cpuinfo if ":" in line}
    # AMD's Zen 4 (family 25) runs 512-bit vector instructions as two halves on its 256-bit units: half the
    # 512-bit rate of Intel's server cores and of Zen 5 (family 26)
    halved = field.get("vendor_id") == "AuthenticAMD" and int(field.get("cpu family", "0")) < 26
    if precision == "bf16" and "amx_bf16" in flags:
        # one AMX TDPBF16PS (16 x 32 by 32 x 16 bf16, 16,384 FLOP) every 16 cycles per core
        flops_per_cycle, unit = 1024, "bf16 (AMX)"
    elif precision == "bf16" and "avx512_bf16" in flags:
        flops_per_cycle, unit = 128, "bf16 (AVX512-BF16)"  # VDPBF16PS: 32 bf16 pairs x 2 FLOP x 2 units
    else:
        flops_per_cycle, unit = (64 if "avx512f" in flags else 32), "fp32"  # FMA lanes x 2 units x 2
    if halved and "avx512f" in flags and unit != "bf16 (AMX)":
        flops_per_cycle //= 2
    model = field.get("model name", "CPU")
    return cores * mhz * 1e6 * flops_per_cycle, (f"estimate: {cores} cores x {mhz:.0f} MHz x {flops_per_cycle} "
                                                 f"{unit} FLOP/cycle, {model}")


def measured_matmul_flops(device: str, precision: str) -> float:
    """FLOP/s of a large matrix product in the run's precision: what the device does at best on the step's
    main operation, printed beside the peak estimate, which rests on assumptions (a CPU's clock, its vector
    units) that /proc/cpuinfo does not settle."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    size = 2048 if device == "cpu" else 8192
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the runs' fp32: TF32 tensor cores
    products = 1 if device == "cpu" else 20  # a GPU's product takes a millisecond: timed in twenties
    rates = []
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(products):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(products * 2 * size**3 / (time.perf_counter() - start))
    return max(rates[1:])  # the first warms up


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("no", "bf16"), help="default: bf16 on cuda, no (fp32) on cpu")
    parser.add_argument("--configs", default=None, help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per measurement")
    parser.add_argument("--compile", action="store_true", help="uncond with --compile")
    parser.add_argument("--cuda_graphs", action="store_true", help="uncond with --cuda_graphs")
    parser.add_argument("--diagnose", action="store_true",
                        help="after uncond's timed steps, print its host synchronisations and a profile of 5 steps")
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "uncond-train-bench"))
    parser.add_argument("--worker", choices=("baseline", "uncond"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default: per configuration)")
    args = parser.parse_args()
    precision = args.precision or ("bf16" if args.device == "cuda" else "no")
    warmup = args.warmup if args.warmup is not None else (10 if args.device == "cuda" else 1)
    work = Path(args.work_dir)

    if args.worker:
        data = work / CONFIGS[args.config][5]
        if args.worker == "baseline":
            result = baseline_worker(args.config, args.device, precision, data, args.steps, warmup)
        else:
            result = uncond_worker(args.config, args.device, precision, data, args.steps, warmup, args.compile,
                                   args.diagnose, args.cuda_graphs)
        print("RESULT " + json.dumps(result))
        return

    names = args.configs.split(",") if args.configs else (
        ["seed64-b16", "seed64-b64"] if args.device == "cuda" else ["seed64-b16", "seed64-b64", "demo"])
    peak, peak_note = peak_flops(args.device, precision)
    matmul = measured_matmul_flops(args.device, precision)
    print(f"device {args.device}, precision {precision}, repeats {args.repeats}, peak {peak:.3g} FLOP/s ({peak_note}); "
          f"a large matrix product runs at {matmul:.3g} FLOP/s here ({matmul / peak:.0%} of that peak)")
    rows = []
    for name in names:
        prepare_data(CONFIGS[name][5], work / CONFIGS[name][5])
        steps = args.steps or CONFIGS[name][4 if args.device == "cuda" else 3]
        flops = step_flops_per_image(name, args.device, precision)
        results: dict[str, list[dict]] = {"baseline": [], "uncond": []}
        others = OthersCpu()
        for repeat in range(args.repeats):
            # each goes first in turn (baseline, uncond, then uncond, baseline): a drift in the machine's speed
            # over the measurements (another job, the clock) favours neither
            for variant in ("baseline", "uncond")[::1 if repeat % 2 == 0 else -1]:
                results[variant].append(run_worker(variant, name, args, steps))
        ratios = [u["images_per_sec"] / b["images_per_sec"] for b, u in zip(results["baseline"], results["uncond"])]
        row = {"config": name, "flops_per_image": flops, "ratio": statistics.median(ratios), "ratios": ratios,
               "others_cpu_share": others.share()}
        for variant, runs in results.items():
            speed = statistics.median(r["images_per_sec"] for r in runs)
            row[variant] = {"images_per_sec": speed, "peak_gib": max(r["peak_bytes"] for r in runs) / 2**30,
                            "reserved_gib": max(r.get("reserved_bytes", math.nan) for r in runs) / 2**30,
                            "mfu": speed * flops / peak}
        rows.append(row)
        print(format_row(row, args.device), flush=True)
    print(json.dumps({"device": args.device, "precision": precision, "peak": peak, "peak_note": peak_note,
                      "matmul_flops": matmul, "rows": rows}))


def run_worker(variant: str, name: str, args: argparse.Namespace, steps: int) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--config", name, "--steps", str(steps),
               "--device", args.device, "--work_dir", args.work_dir]
    command += ["--precision", args.precision] if args.precision else []
    command += ["--warmup", str(args.warmup)] if args.warmup is not None else []
    command += ["--compile"] if args.compile else []
    command += ["--cuda_graphs"] if args.cuda_graphs else []
    command += ["--diagnose"] if args.diagnose and variant == "uncond" else []
    start = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in finished.stdout.splitlines() if line.startswith("RESULT ")]
    if finished.returncode or not lines:
        print(f"{variant} {name} failed:\n{finished.stderr[-3000:]}", flush=True)
        return {"images_per_sec": math.nan, "peak_bytes": math.nan, "reserved_bytes": math.nan, "seconds": math.nan}
    if args.diagnose and variant == "uncond":  # what diagnose_steps printed
        print("\n".join(line for line in finished.stdout.splitlines() if not line.startswith("RESULT ")), flush=True)
    result = json.loads(lines[-1][len("RESULT "):])
    # where a lent GPU's minutes go: the process (imports, data, cuDNN autotuning, compiling) against the timing
    print(f"  {variant} {name}: {result['images_per_sec']:.1f} images/s; process {time.perf_counter() - start:.0f} s"
          f", timed steps {result['seconds']:.0f} s" + (f", building the run {result['prepare_seconds']:.0f} s"
                                                       if "prepare_seconds" in result else "")
          + (f", last logged loss {result['last_logged_loss']:.4f}" if result.get("last_logged_loss") is not None
             else "") + (f", CUDA graph {result['cuda_graph']}" if "cuda_graph" in result else ""), flush=True)
    return result


def format_row(row: dict, device: str) -> str:
    def memory(variant: dict) -> str:
        reserved = f" ({variant['reserved_gib']:.2f} reserved)" if device == "cuda" else ""
        return f"{variant['peak_gib']:5.2f} GiB{reserved}"

    b, u = row["baseline"], row["uncond"]
    return (f"{row['config']:<11} {row['flops_per_image'] / 1e9:6.1f} GFLOP/img | baseline {b['images_per_sec']:8.1f} "
            f"img/s, {memory(b)}, MFU {b['mfu']:6.1%} | uncond {u['images_per_sec']:8.1f} img/s, "
            f"{memory(u)}, MFU {u['mfu']:6.1%} | ratio {row['ratio']:.2f}x "
            f"(pairs: {', '.join(f'{r:.2f}' for r in row['ratios'])})" + busy_note(row["others_cpu_share"], device))


def busy_note(share: float, device: str) -> str:
    """Said where other processes used a tenth of the cores or more: the step's threads then wait on each other."""
    if device != "cpu" or not share >= 0.1:
        return ""
    return f" | others used {share:.0%} of the cores meanwhile: figures of a busy machine do not compare"


class OthersCpu:
    """The share of the cores that processes other than this one and its workers kept busy, from the system's
    busy time (/proc/stat) less this process tree's own; NaN where /proc/stat is missing."""

    def __init__(self) -> None:
        self.start = self.sample()

    @staticmethod
    def sample() -> tuple[float, float, float]:
        try:
            fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except OSError:
            return math.nan, math.nan, time.perf_counter()
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        ours = sum(getattr(resource.getrusage(who), kind) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for kind in ("ru_utime", "ru_stime"))
        return busy, ours, time.perf_counter()

    def share(self) -> float:
        (busy0, ours0, t0), (busy1, ours1, t1) = self.start, self.sample()
        cores = len(os.sched_getaffinity(0))
        return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / ((t1 - t0) * cores))


if __name__ == "__main__":
    main()
