"""--cuda_graphs: a training step's forward pass, loss, backward pass and gradient clipping recorded once as a
CUDA graph, then replayed at every step with one launch.

Why: the eager step of diffusers' UNet2DModel is bound by launching its ~3,300 kernels from Python, not by the
GPU (docs/benchmarks.md: on an H100, batch 1 costs 58 ms a step and batch 64 66 ms). torch.compile's
"reduce-overhead" mode (--compile) removes that too, after minutes of compiling; recording the eager kernels
takes a few steps. No library records a whole training step (accelerate and diffusers have nothing for it), so
this follows PyTorch's own recipe for it ("whole-network capture" in the CUDA semantics notes): warm-up steps
on a side stream, gradients set to None before recording so that the backward pass writes them in the graph's
memory (each replay overwrites them in place), inputs copied into the recorded tensors before each replay.

What stays eager, outside the graph: copying the batch in, drawing the step's noise and timesteps (seeded on the
host per step), AdamW (its learning rate changes every step), the EMA and the metrics. A batch of another shape
(an epoch's last, shorter one) takes the eager step; its gradients are then written into the same tensors. A
recording that fails is said in the log, and the run goes on with eager steps.
"""

from __future__ import annotations

import collections
import logging
from typing import Callable, Protocol

import torch

from .config import first_line

logger = logging.getLogger("uncond")

Outputs = tuple[torch.Tensor, torch.Tensor]  # a step's loss and gradient norm
# What a recorded step computes: (clean images, noise, timesteps) -> outputs, filling the parameters' .grad.
StepFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Outputs]
WARMUP_STEPS = 3  # eager steps of the recorded batch size first: cuDNN autotunes, lazy initialisations run


class Recording(Protocol):
    """What StepGraph needs of a recording: CudaRecording, or a stand-in where no GPU is (the tests)."""

    def warm_up(self, step: Callable[[], Outputs]) -> Outputs: ...

    def record(self, step: Callable[[], Outputs]) -> Outputs: ...

    def replay(self) -> None: ...


class CudaRecording:
    """torch.cuda.CUDAGraph, warmed up on a side stream as PyTorch's recipe asks."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.side_stream = torch.cuda.Stream()

    def warm_up(self, step):
        self.side_stream.wait_stream(torch.cuda.current_stream())  # the batch was copied in on the current stream
        with torch.cuda.stream(self.side_stream):
            outputs = step()
        torch.cuda.current_stream().wait_stream(self.side_stream)
        return outputs

    def record(self, step):
        # "thread_local": the loader's thread pins the next batches meanwhile (data.prefetch); allocating page-locked
        # memory there would break a recording that forbids CUDA calls from every thread (the default, "global").
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            outputs = step()
        torch.cuda.empty_cache()  # the warm-up steps' memory, cached outside the graph's own
        return outputs

    def replay(self) -> None:
        self.graph.replay()


class StepGraph:
    """Runs `step_function` eagerly until a batch of the largest size seen has had `warmup_steps` eager steps,
    then records it and replays the recording for each batch of that size. Called as the step function would
    be; returns copies of the loss and the gradient norm (the recorded ones are overwritten by the next replay)."""

    def __init__(self, step_function: StepFunction, parameters: list[torch.nn.Parameter],
                 recording: Recording | None = None, warmup_steps: int = WARMUP_STEPS):
        self.step_function = step_function
        self.parameters = parameters
        self.recording = recording or CudaRecording()
        self.warmup_steps = warmup_steps
        self.warmed_up: collections.Counter[int] = collections.Counter()  # eager steps so far, by batch size
        self.inputs: tuple[torch.Tensor, ...] | None = None  # the tensors the graph reads, once recorded
        self.outputs: Outputs | None = None
        self.gradients: list[torch.Tensor | None] = []  # the .grad tensors the graph writes
        self.failed = False  # recording failed: every step is eager

    @property
    def recorded(self) -> bool:
        return self.inputs is not None

    def __call__(self, clean_images: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor) -> Outputs:
        batch = (clean_images, noise, timesteps)
        if self.failed:
            return self.step_function(*batch)
        if self.recorded and clean_images.shape != self.inputs[0].shape:
            # An epoch's shorter last batch: eager. The gradient tensors are the graph's, so they are zeroed in
            # place (the backward pass adds to them) and keep their memory.
            torch._foreach_zero_([gradient for gradient in self.gradients if gradient is not None])
            return self.step_function(*batch)
        if not self.recorded:
            size = len(clean_images)
            # Not an epoch's shorter last batch (a resume may start on one): the graph would take no other batch.
            if self.warmed_up[size] < self.warmup_steps or size < max(self.warmed_up, default=size):
                self.warmed_up[size] += 1
                return self.recording.warm_up(lambda: self.step_function(*batch))
            try:
                self.record(batch)
            except RuntimeError as error:  # an operation a graph cannot take (a library's new version may add one)
                self.give_up(error)
                return self.step_function(*batch)
        if any(parameter.grad is not gradient for parameter, gradient in zip(self.parameters, self.gradients)):
            # The optimizer would then step without the gradients the replays write: the model would stop learning
            # without a word. 450 identity checks cost microseconds.
            raise RuntimeError("a CUDA graph's replay writes the gradients into the tensors it recorded, but "
                               "something replaced them (optimizer.zero_grad(set_to_none=True)?)")
        for recorded, new in zip(self.inputs, batch):
            recorded.copy_(new, non_blocking=True)
        self.recording.replay()
        loss, grad_norm = self.outputs
        return loss.clone(), grad_norm.clone()

    def record(self, batch: tuple[torch.Tensor, ...]) -> None:
        # Gradients set to None: the recorded backward pass then allocates them in the graph's memory and each
        # replay writes them there, instead of adding to tensors that lie outside it.
        for parameter in self.parameters:
            parameter.grad = None
        inputs = tuple(tensor.clone() for tensor in batch)  # clone keeps channels-last
        self.outputs = self.recording.record(lambda: self.step_function(*inputs))
        self.inputs, self.gradients = inputs, [parameter.grad for parameter in self.parameters]
        logger.info(f"recorded the step as a CUDA graph for batches of {len(batch[0])}: replayed from here on")

    def give_up(self, error: RuntimeError) -> None:
        """Every step eager from now on; the gradients a failed recording left are dropped."""
        self.failed = True
        for parameter in self.parameters:
            parameter.grad = None
        logger.warning(f"--cuda_graphs: recording the step failed ({first_line(error)}); the run goes on with eager "
                       "steps")
