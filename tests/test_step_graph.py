"""--cuda_graphs (step_graph.py): a run whose step is recorded and replayed trains exactly as the eager one, and
the flag is refused, in one line, where it cannot record the step. There is no GPU here: a stand-in recording
replays by calling the step again, reading and writing the same tensors a CUDA graph would
(benchmarks/gpu_checks.sh's part "graphs" checks the real one on a GPU)."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file

from conftest import fast_train_args, write_images
from uncond import plan, step_graph, tracking, train
from uncond.config import TrainConfig, UsageError


class ReplayingCall:
    """What a CUDA graph does, on a CPU: each replay computes the recorded step from the recorded inputs into
    the recorded outputs, and overwrites the recorded gradient tensors (a backward pass adds to them: zeroed
    first)."""

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters = parameters
        self.replays = 0

    def warm_up(self, step):
        return step()

    def record(self, step):
        self.step = step
        self.outputs = step()  # a graph computes nothing while recording; the replay that follows does
        return self.outputs

    def replay(self) -> None:
        torch._foreach_zero_([p.grad for p in self.parameters if p.grad is not None])
        for recorded, new in zip(self.outputs, self.step()):
            recorded.copy_(new)
        self.replays += 1


@pytest.fixture
def replayed(monkeypatch) -> list[ReplayingCall]:
    """Runs in this process record their step with ReplayingCall; the list gets each run's recording."""
    recordings = []

    def stand_in(run):
        recordings.append(ReplayingCall(run.parameters))
        # One warm-up step (3 on a GPU), so that a short run records, and a resumed one records again.
        return step_graph.StepGraph(functools.partial(train.batch_gradients, run), run.parameters,
                                    recording=recordings[-1], warmup_steps=1)

    monkeypatch.setattr(train, "step_graph", stand_in)
    return recordings


def exported_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")


def test_replayed_steps_train_exactly_as_eager_ones(tmp_path, tiny_unet, run_cli, replayed, monkeypatch):
    # 10 images in batches of 4: each epoch ends with a batch of 2, which a recording of 4 cannot take (eager).
    data = write_images(tmp_path / "images", 10)
    args = ("--max_train_steps", "8", "--use_ema", "--save_images_epochs", "100", "--checkpointing_steps", "5",
            "--logging_steps", "1", "--lr_scheduler", "constant")
    eager_dir, graph_dir, resumed_dir = tmp_path / "eager", tmp_path / "graph", tmp_path / "resumed"
    with monkeypatch.context() as eager:
        eager.setattr(train, "step_graph", lambda run: None)
        assert run_cli(*fast_train_args(data, tiny_unet, eager_dir, *args))[0] == 0
    assert run_cli(*fast_train_args(data, tiny_unet, graph_dir, *args))[0] == 0
    # step 1 warms up; steps 2 to 8 replayed, but for 3 and 6 (batches of 2, eager)
    assert replayed[0].replays == 5
    # Stopped at step 5, then resumed to 8: the resumed process warms up and records again. (A constant learning
    # rate: the run of 5 steps has the schedule of the run of 8.)
    assert run_cli(*fast_train_args(data, tiny_unet, resumed_dir, *args[2:], "--max_train_steps", "5"))[0] == 0
    assert run_cli(*fast_train_args(data, tiny_unet, resumed_dir, *args, "--resume_from_checkpoint", "latest"))[0] == 0
    # step 6 (2 images) and 7 eager, step 8 replayed: the first batch of 2 was not recorded
    assert replayed[-1].replays == 1
    eager_weights = exported_weights(eager_dir)
    for folder in (graph_dir, resumed_dir):
        weights = exported_weights(folder)
        assert all(torch.equal(weights[name], eager_weights[name]) for name in eager_weights), folder.name
    # the logged losses are the replays' (copies of what the graph wrote)
    assert logged_losses(graph_dir) == logged_losses(eager_dir) and len(logged_losses(eager_dir)) == 8


def logged_losses(output_dir) -> list[tuple[int, float]]:
    records = tracking.read_metrics(output_dir / tracking.METRICS_FILE)
    return [(record["step"], record["loss"]) for record in records if "loss" in record]


def test_the_recorded_batch_is_a_full_one_and_its_gradients_stay_in_place():
    parameter = torch.nn.Parameter(torch.ones(3))

    def step(images, noise, timesteps):
        loss = (parameter * images).sum(dim=1).mean()
        loss.backward()
        return loss.detach(), parameter.grad.norm()

    recording = ReplayingCall([parameter])
    graph = step_graph.StepGraph(step, [parameter], recording=recording, warmup_steps=1)

    def batch(size, value):
        return torch.full((size, 3), float(value)), torch.zeros(size, 3), torch.zeros(size, dtype=torch.long)

    def train_step(size, value):
        loss, _ = graph(*batch(size, value))
        parameter.grad = None if not graph.recorded else parameter.grad  # what train.clear_gradients does
        return loss.item()

    # A resume that starts on an epoch's short last batch: the batch of 4 is recorded, not the batch of 2.
    assert [train_step(2, 1), train_step(4, 2), train_step(2, 3)] == [3.0, 6.0, 9.0]
    assert not graph.recorded
    assert train_step(4, 4) == 12.0 and graph.recorded and recording.replays == 1
    assert train_step(4, 5) == 15.0 and torch.equal(parameter.grad, torch.full((3,), 5.0))  # overwritten, not added
    assert train_step(2, 6) == 18.0 and torch.equal(parameter.grad, torch.full((3,), 6.0))  # eager, in place
    assert recording.replays == 2
    parameter.grad = None  # what optimizer.zero_grad(set_to_none=True) would do
    with pytest.raises(RuntimeError, match="replaced them"):
        graph(*batch(4, 1))


def test_a_failed_recording_is_said_and_the_run_goes_on_eagerly(caplog):
    parameter = torch.nn.Parameter(torch.ones(3))

    def step(images, noise, timesteps):
        loss = (parameter * images).sum()
        loss.backward()
        return loss.detach(), parameter.grad.norm()

    class FailingRecording(ReplayingCall):
        def record(self, step):
            step()  # leaves gradients behind, as a capture stopped halfway may
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    graph = step_graph.StepGraph(step, [parameter], recording=FailingRecording([parameter]), warmup_steps=1)
    losses = []
    for value in (1.0, 2.0, 3.0):
        loss, _ = graph(torch.full((3,), value), torch.zeros(3), torch.zeros(3, dtype=torch.long))
        losses.append(loss.item())
        assert torch.equal(parameter.grad, torch.full((3,), value))  # this step's own gradients, nothing left over
        parameter.grad = None  # what train.clear_gradients does without a recording
    assert losses == [3.0, 6.0, 9.0] and graph.failed and not graph.recorded
    assert ("--cuda_graphs: recording the step failed (CUDA error: operation not permitted when stream is "
            "capturing); the run goes on with eager steps") in caplog.text


@pytest.mark.parametrize("settings, device, processes, message", [
    ({}, "cpu", 1, "needs a CUDA GPU"),
    ({}, "cuda", 2, "records one process's step"),
    ({"compile": True}, "cuda", 1, "--compile both record"),
    ({"gradient_accumulation_steps": 2}, "cuda", 1, "--gradient_accumulation_steps"),
    ({"gradient_checkpointing": True}, "cuda", 1, "--gradient_checkpointing"),
    ({"mixed_precision": "fp16"}, "cuda", 1, "--mixed_precision bf16"),
    ({"enable_xformers_memory_efficient_attention": True}, "cuda", 1, "drop --enable_xformers"),
])
def test_cuda_graphs_refused_where_the_step_cannot_be_recorded(settings, device, processes, message):
    with pytest.raises(UsageError, match=message):
        plan.check_cuda_graphs(TrainConfig(output_dir="out", cuda_graphs=True, **settings), device, processes)


def test_cuda_graphs_taken_on_one_gpu_process_in_bf16():
    plan.check_cuda_graphs(TrainConfig(output_dir="out", cuda_graphs=True, mixed_precision="bf16"), "cuda", 1)


def test_cuda_graphs_on_a_cpu_is_refused_before_any_work(tmp_path, tiny_unet, run_cli):
    data = write_images(tmp_path / "images", 4)
    code, _, err = run_cli(*fast_train_args(data, tiny_unet, tmp_path / "out", "--cuda_graphs", "--dry_run"))
    assert code == 2 and "--cuda_graphs needs a CUDA GPU (this run trains on cpu); drop it" in err
    assert not (tmp_path / "out").exists()


# Operations a CUDA graph cannot record, or would record wrongly: reading a value back to the host (.item(), a
# data-dependent shape), a tensor made from Python data (a host-to-device copy, frozen into the graph), and random
# numbers (drawn outside it, from the step's seed).
UNRECORDABLE = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2",
                "lift_fresh", "lift_fresh_copy", "scalar_tensor", "normal_", "uniform_", "bernoulli_", "random_",
                "randint", "randn", "rand", "multinomial", "native_dropout"}


@pytest.mark.parametrize("prediction_type, snr_gamma", [("epsilon", None), ("v_prediction", 5.0), ("sample", None)])
def test_the_recorded_step_never_reads_back_nor_draws(tmp_path, tiny_unet, prediction_type, snr_gamma):
    from torch.utils._python_dispatch import TorchDispatchMode

    from conftest import reset_accelerate
    from uncond import parts

    class Operations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    reset_accelerate()
    (tmp_path / "out").mkdir()
    config = TrainConfig(train_data_dir=str(write_images(tmp_path / "images", 4)), output_dir=str(tmp_path / "out"),
                         model_config_name_or_path=str(tiny_unet), resolution=16, train_batch_size=4, logger="none",
                         prediction_type=prediction_type, snr_gamma=snr_gamma, noise_offset=0.1, use_ema=True, seed=0)
    run = parts.build_run(plan.plan_run(config), parts.make_accelerator(config, tmp_path / "out"))
    inputs = train.batch_inputs(run, next(train.optimizer_steps(run))[0], 0)
    with Operations() as operations:
        loss, grad_norm = train.batch_gradients(run, *inputs)
    assert {"convolution", "convolution_backward"} <= operations.names  # the whole step was seen
    assert operations.names & UNRECORDABLE == set()
    assert all(parameter.grad is not None for parameter in run.parameters)
