"""The `uncond` command: the only module that reads argv."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import difflib
import errno
import logging
import os
import shlex
import signal
import sys
import warnings
from typing import Any, Callable, Iterator, Sequence

from . import accelerate_configs, signals
from .config import (CacheConfig, EvaluateConfig, ExportConfig, RunFailed, RunStopped, SampleConfig, UsageError,
                     add_arguments, add_train_arguments, build_command_config, build_config, first_line,
                     public_argv)

DESCRIPTION = "Train unconditional diffusion models on your own images, sample from them, and measure them."


INTERRUPTED = 128 + signal.SIGINT  # the shell's status for Ctrl-C
TERMINATED = 128 + signal.SIGTERM


def main(argv: Sequence[Any] | str | None = None) -> int:
    """A command run from Python: `uncond.main(["train", "--max_train_steps", 300])`, or the same words as one
    string. Returns the status the `uncond` command would exit with (0 done, 1 stopped, 2 bad input, 75 folder in
    use). Stopped by a signal, it raises what that signal raises in Python, once the command has stopped as it
    does (a run saves its checkpoint first): an interrupt (Ctrl-C, a notebook's Interrupt) KeyboardInterrupt,
    SIGTERM SystemExit(143), so that a cell or a loop of runs stops with it. One that came once the command had
    said its outcome goes to the caller's own handlers as the command ends."""
    if argv is None and os.path.basename(sys.argv[0]) == "uncond":  # the `uncond` script of an install made when
        return console()  # main() was its entry point (an editable install not reinstalled since: `pip install -e .`
        # again gives it script's, which keeps the outcome's status through the exit)
    words = shlex.split(argv) if isinstance(argv, str) else [str(word) for word in argv or ()]
    with signals.outcome_kept() as held:
        status = run_command(words)
    for number in held:  # came once the command had said its outcome: the caller's handlers take them now
        signal.raise_signal(number)
    if status == INTERRUPTED:
        raise KeyboardInterrupt(f"uncond {' '.join(words[:1])}: interrupted")
    if status == TERMINATED:
        raise SystemExit(status)
    return status


def console(argv: list[str] | None = None) -> int:
    """The `uncond` command and `python -m uncond`: the status to exit with."""
    return run_command(sys.argv[1:] if argv is None else argv)


def script() -> int:
    """The process of the `uncond` command and of `python -m uncond`, which ends with the status (console's, kept
    through the exit; not set up for a caller of console, whose process goes on)."""
    with signals.outcome_kept() as held:
        status = console()
        keep_through_the_exit(status)
    for number in held:  # came once the command had said its outcome: exits at once, with its status
        signal.raise_signal(number)
    return status


def keep_through_the_exit(status: int) -> None:
    """The outcome is decided and said; the interpreter's exit takes seconds more (threads, exit functions, then
    freeing torch's modules), during which a SIGTERM or Ctrl-C ended a finished run with 143 or 130 and no word,
    and a scheduler requeued it (trial 55 F5). From here a signal ends the process at once with `status` (files
    are closed, checkpoints and exports synced); once Python's handlers are gone, after the exit functions
    (ignore_signals_at_the_end), it is ignored for the last moment."""
    def exit_now(number: int, frame: Any) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)

    exit_now.keeps_the_status = True
    for number in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(number) is not signal.SIG_IGN:  # (an ignored one stays so, as in signals.handled)
            signal.signal(number, exit_now)


@atexit.register  # when cli is imported, before the libraries a command imports: theirs run first, this last
def ignore_signals_at_the_end() -> None:
    """After script's outcome, for the interpreter's last moment: Python then puts its handlers back to the
    default, which ends a process by the signal, but leaves an ignored signal ignored."""
    for number in (signal.SIGTERM, signal.SIGINT):
        if getattr(signal.getsignal(number), "keeps_the_status", False):
            signal.signal(number, signal.SIG_IGN)


def run_command(argv: list[str]) -> int:
    try:
        return parse_and_run(argv)
    except KeyboardInterrupt:  # anywhere, building the parser included: one line, not a traceback
        if is_local_main_process():  # (every process of a launch gets the Ctrl-C)
            print("uncond: interrupted", file=sys.stderr)
        return INTERRUPTED


def parse_and_run(argv: list[str]) -> int:
    parser = make_parser()
    if not argv:
        parser.print_help()
        return 0
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command's parser, which knows its flags
            refuse_unknown(getattr(args, "parser", parser), unknown)
    except SystemExit as exit:  # --help, or a refused flag (said): a status, as for every other outcome, also
        return exit.code if isinstance(exit.code, int) else 0  # for a caller in Python (uncond.main)
    with callers_settings_kept():
        return run_parsed(args, argv)


def run_parsed(args: argparse.Namespace, argv: list[str]) -> int:
    setup_logging()
    try:
        with sigterm_stops(args.command), another_process_lost_said(args.command):
            status = args.command(args, argv)
            signals.outcome_said()  # (the commands that say an outcome before their end say it there)
            return status
    except UsageError as error:  # said on every machine, whose log may be the only one its user reads
        if is_local_main_process():
            print(f"uncond: error: {error}", file=sys.stderr)
        return getattr(error, "exit_status", 2)
    except RunFailed as error:
        if is_local_main_process() and not error.said:
            print(f"uncond: stopped: {error}", file=sys.stderr)
        return 1
    except RunStopped as stop:  # a run's is said in the log, with the command that resumes
        if not stop.said and is_local_main_process():
            print(f"uncond: stopped by {signal.Signals(stop.signal_number).name}", file=sys.stderr)
        # An agreed stop's status on the main process only, which finishes last (uploads): a launcher ends the
        # other processes as soon as one exits with an error status. A process's own stop (SIGTERM to it alone,
        # while setting up) must tell the launcher: the others would otherwise wait for it, in their next exchange.
        return 128 + stop.signal_number if is_main_process() or not stop.agreed else 0
    except BrokenPipeError:  # `uncond presets | head -1`: the reader has all it wanted
        # Python's own advice: point stdout at /dev/null, or the flush at exit raises the same error again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        kept = KEPT_AFTER_A_FAILURE.get(args.command.__name__, "")
        print(f"uncond: stopped: no space left on the device writing {error.filename or 'a file'}{kept}; free some "
              "space and re-run the same command", file=sys.stderr)
        return 1


@contextlib.contextmanager
def another_process_lost_said(command: Callable[..., int]) -> Iterator[None]:
    """A launch's process killed (the out-of-memory killer, kill -9) or cut off: the others' next exchange with it
    fails, in a 50-line traceback of gloo's or NCCL's that says nothing of what was kept. Said in one line instead,
    by every process left (the machine's first may be the one that ended), before the launcher ends them (inside
    sigterm_stops: its SIGTERM then stops this one as any other)."""
    try:
        yield
    except Exception as error:
        if not lost_another_process(error):
            raise
        kept = KEPT_AFTER_A_FAILURE.get(command.__name__, "")
        reason = first_line(error).split(". ")[0]  # gloo's goes on: "This is typically caused by ... GLHF!"
        print(f"uncond: stopped: another process of the launch ended or lost its connection (the launcher's report "
              f"names it): this one's exchange with it failed ({type(error).__name__}: {reason}){kept}; re-run the "
              "same command", file=sys.stderr)
        failure = RunFailed("another process of the launch was lost")
        failure.said = True
        raise failure from None


def lost_another_process(error: Exception) -> bool:
    """Whether `error` is an exchange between a launch's processes that failed, as one does when another process
    ended or lost its connection: NCCL raises a DistBackendError, gloo a plain RuntimeError ("[.../gloo/transport/
    tcp/pair.cc:537] Read error ...: Connection reset by peer"), also from DDP's gradient all-reduce in backward."""
    from .environment import launched_processes  # torch is imported by then (an exchange failed)

    if launched_processes() == 1 or "timed out" in str(error).lower():
        return False  # a timeout: the other process may be alive, stuck
    if any(kind.__name__ == "DistError" for kind in type(error).__mro__):
        return True
    return isinstance(error, RuntimeError) and "/gloo/transport/" in str(error)


@contextlib.contextmanager
def sigterm_stops(command: Callable[[argparse.Namespace, list[str]], int]) -> Iterator[None]:
    """For the commands that work for minutes, SIGTERM (a job's end, `kill`) as Ctrl-C is: an exception where the
    work is (sampling images, each written whole or not at all; decoding a dataset into the cache, which keeps what
    it decoded; a run setting up, which leaves its output folder as it found it), which the command ends with,
    status 143. Python's default ended the process with no word, and undid nothing. Set before the command imports
    torch, which takes a job's first 1.5 s. A run's stopping.StopSignal takes over for its steps. The instant
    commands keep Python's default."""
    if command in (run_presets, run_launch_config, run_cache):
        yield
        return

    def stop(number: int, frame: Any) -> None:
        raise RunStopped(number, said=False)

    with signals.handled({signal.SIGTERM: stop}):
        yield


# What a command that had to stop (a full disk, another process of its launch gone) kept, and a re-run goes on from
KEPT_AFTER_A_FAILURE = {"run_train": "; the checkpoints written before are intact (a re-run resumes from the newest, "
                                     "if any)",
                        "run_sample": "; the images already written are whole (a re-run samples the others)"}


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage dump) and a pointer to --help. They begin as every other
    refusal does, `uncond: error:`, which scripts can look for."""

    def error(self, message: str):
        self.exit(2, f"uncond: error: {message} (see {self.prog} --help)\n")

    def _get_option_tuples(self, option_string: str) -> list[tuple[Any, ...]]:
        """The flags an abbreviation matches (argparse has no public hook for it). train_unconditional.py takes
        any prefix unique among its own flags (--eval 4, --num 2); flags uncond adds made some ambiguous (trial
        63 F2). A prefix of one flag's two spellings (--local: --local_rank, --local-rank), or of one seed flag
        among added ones, means that flag, as it does to the seed script."""
        matches = super()._get_option_tuples(option_string)
        actions = list({id(match[0]): match for match in matches}.values())  # (action, flag, ...) each
        seed_flags = [match for match in actions if getattr(match[0], "seed_flag", False)]
        if len(actions) == 1:
            return actions
        if len(seed_flags) == 1:
            return seed_flags
        return matches


def refuse_unknown(parser: argparse.ArgumentParser, words: list[str]) -> None:
    """argparse's refusal of unknown words, with the nearest flag for each mistyped one (--use-ema: --use_ema)."""
    flags = [flag for action in parser._actions for flag in action.option_strings]  # argparse keeps no public list
    hints = []
    for word in words:
        typed = word.split("=", 1)[0]
        if typed.startswith("--"):
            close = difflib.get_close_matches("--" + typed[2:].replace("-", "_"), flags, n=1, cutoff=0.75)
            hints += [f"{typed}: did you mean {close[0]}?"] if close else []
    parser.error(f"unrecognized arguments: {' '.join(without_secrets(words))}"
                 + (f" ({'; '.join(hints)})" if hints else ""))


def without_secrets(words: list[str]) -> list[str]:
    """`words` as they may be shown: the value of a mistyped token flag (--hub-token hf_...) and anything shaped
    like a Hub token replaced by <token>, since error messages end up in job logs."""
    shown, after_token_flag = [], False
    for word in words:
        flag, equals, value = word.partition("=")
        token_flag = flag.startswith("-") and "tok" in flag.lower()  # --hub-token, --hub-tok, --hubtoken
        if after_token_flag or word.startswith("hf_"):
            word = "<token>"
        elif equals and (token_flag or value.startswith("hf_")):
            word = f"{flag}=<token>"
        shown.append(word)
        after_token_flag = token_flag and not equals
    return shown


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="uncond", description=DESCRIPTION)
    parser.add_argument("-V", "--version", action=PrintVersion)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)

    train_parser = commands.add_parser(
        "train", help="train a model (no arguments: the demo)",
        description="Train a diffusers UNet2DModel. Takes every flag of diffusers' train_unconditional.py. "
                    "With no arguments, runs the demo: a tiny model on the built-in MNIST digits.")
    add_train_arguments(train_parser)
    train_parser.set_defaults(command=run_train, parser=train_parser)

    add_command(commands, "sample", run_sample, SampleConfig, "generate images from a trained model",
                "Generate numbered PNGs from a diffusers pipeline folder (uncond's, or any DDPMPipeline or "
                "DDIMPipeline), a Hub model or a training checkpoint, with any of diffusers' samplers. Image i "
                "starts from noise seeded seed + i, so it is the same whatever the batch size (up to float "
                "rounding).")
    add_command(commands, "evaluate", run_evaluate, EvaluateConfig,
                "FID, KID, precision and recall against real images",
                "Measure generated images (a folder, or a MODEL to sample from) against real ones with FID and KID "
                "in the standard InceptionV3 feature space, and precision/recall. Reference statistics are cached "
                "in pytorch-fid's .npz format.")
    add_command(commands, "export", run_export, ExportConfig, "write a training checkpoint as a pipeline folder",
                "Write a run's checkpoint-N as a diffusers pipeline folder, as the run's own exports are (its EMA "
                "weights where the run kept them, model card, loss plot, the grid of its step): for a run whose "
                "best model is not its last one.")
    add_command(commands, "cache", run_cache, CacheConfig, "list the decoded-image cache, and remove entries",
                "List the entries of the decoded-image cache (one per dataset and resolution, made by the first "
                "run that reads them), with their size and last use; remove unused ones or all.")

    presets_parser = commands.add_parser("presets", help="list the UNet presets with their sizes")
    presets_parser.set_defaults(command=run_presets, parser=presets_parser)

    launch_parser = commands.add_parser(
        "launch-config", help="print the path of an accelerate launch config uncond ships",
        description="The accelerate configs for several GPUs and machines that come with uncond: with no NAME, "
                    "list them; with NAME, print its path alone, for `accelerate launch --config_file \"$(uncond "
                    "launch-config NAME)\" -m uncond train ...`, or to copy and edit.")
    launch_parser.add_argument("name", nargs="?", metavar="NAME", choices=accelerate_configs.NAMES,
                               help=f"one of {', '.join(accelerate_configs.NAMES)}")
    launch_parser.set_defaults(command=run_launch_config, parser=launch_parser)
    return parser


class PrintVersion(argparse.Action):
    """-V/--version, looked up only when asked for (it may ask git for the checkout's commit)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print uncond's version (with its commit, run from a git checkout) and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        from .version import uncond_version

        print(f"uncond {uncond_version()}")
        parser.exit()


def add_command(commands: Any, name: str, handler: Callable[[argparse.Namespace, list[str]], int],
                config_class: type, help: str, description: str) -> None:
    """A subcommand whose flags come from `config_class`'s settings."""
    parser = commands.add_parser(name, help=help, description=description)
    add_arguments(parser, config_class)
    parser.set_defaults(command=handler, parser=parser)


def run_train(args: argparse.Namespace, argv: list[str]) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from . import progress
    from .train import train

    config, explicit = build_config(command_values(args), use_demo=argv == ["train"])
    command = public_argv(argv, config)
    # Trackers (W&B, Comet, ClearML...) record the process's command line: never with the token in it.
    sys.argv[1:] = public_argv(sys.argv[1:], config)
    # On a terminal, log lines are written above the progress bar; a log file gets both as lines (progress.py).
    with logging_redirect_tqdm([logging.getLogger("uncond")]) if progress.on_terminal() else contextlib.nullcontext():
        train(config, explicit, command=command)
    return 0


def run_sample(args: argparse.Namespace, argv: list[str]) -> int:
    from .sample_folder import sample_to_folder

    sample_to_folder(build_command_config(SampleConfig, command_values(args)))
    return 0


def run_evaluate(args: argparse.Namespace, argv: list[str]) -> int:
    import json

    from .evaluation import evaluate

    config = build_command_config(EvaluateConfig, command_values(args))
    report = evaluate(config)
    signals.outcome_said()
    print(json.dumps(report.as_dict()) if config.json else report)
    return 0


def run_export(args: argparse.Namespace, argv: list[str]) -> int:
    from .checkpoint_export import export_checkpoint

    export_checkpoint(build_command_config(ExportConfig, command_values(args)))
    return 0


def run_cache(args: argparse.Namespace, argv: list[str]) -> int:
    from .cache_upkeep import list_and_remove

    list_and_remove(build_command_config(CacheConfig, command_values(args)))
    return 0


def command_values(args: argparse.Namespace) -> dict:
    return {name: value for name, value in vars(args).items() if name not in ("command", "parser")}


def run_presets(args: argparse.Namespace, argv: list[str]) -> int:
    from .models import PRESETS, count_parameters, describe_unet, with_channels

    print(f"{'preset':<10} {'px':>4} {'parameters':>12}  description")
    for preset in PRESETS.values():
        unet_config = with_channels({**preset.unet, "sample_size": preset.resolution}, 3)
        print(f"{preset.name:<10} {preset.resolution:>4} {count_parameters(unet_config) / 1e6:>11.1f}M  "
              f"{preset.description}; {describe_unet(unet_config)}")
    print("\nParameters are for 3 channels. Use with: uncond train --model_preset NAME ...")
    return 0


def run_launch_config(args: argparse.Namespace, argv: list[str]) -> int:
    if args.name:
        print(accelerate_configs.config_path(args.name))
        return 0
    width = max(map(len, accelerate_configs.NAMES))
    for name in accelerate_configs.NAMES:
        print(f"{name:<{width}}  {accelerate_configs.summary(name)}")
        print(f"{'':<{width}}  {accelerate_configs.config_path(name)}")
    print("\nUse with: accelerate launch --config_file \"$(uncond launch-config NAME)\" -m uncond train ... "
          "(copy one to edit it)")
    return 0


def is_main_process() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("0", "-1")


def is_local_main_process() -> bool:
    """The first process of this machine (the main one with a single machine)."""
    return os.environ.get("LOCAL_RANK", "0") in ("0", "-1")


def shown_here(record: logging.LogRecord) -> bool:
    """uncond's records are shown by the main process only (each process runs the same code); those logged
    with extra=EVERY_MACHINE by each machine's first process."""
    return is_main_process() or (getattr(record, "every_machine", False) and is_local_main_process())


QUIETED_LIBRARIES = ("diffusers", "datasets", "accelerate", "huggingface_hub", "torch", "matplotlib", "PIL",
                     "urllib3", "fsspec", "filelock", "httpx", "httpx2")
BAR_VARIABLES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


@contextlib.contextmanager
def callers_settings_kept():
    """For a caller in Python (uncond.main in a notebook): the logger settings, the environment variables (those
    setup_logging sets, and those the libraries set as they load: torch's TORCHINDUCTOR_CACHE_DIR was left to the
    caller's subprocesses, trial 59 F3), the warnings filters (decoding hides Pillow's DecompressionBombWarning) and
    sys.argv (run_train masks a token in it), as they were before, once the command ends."""
    levels = {name: logging.getLogger(name).level for name in ("uncond", *QUIETED_LIBRARIES)}
    uncond_logger = logging.getLogger("uncond")
    propagate, handlers, filters = uncond_logger.propagate, list(uncond_logger.handlers), list(uncond_logger.filters)
    variables = dict(os.environ)
    argv = list(sys.argv)
    try:
        with warnings.catch_warnings():
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        uncond_logger.propagate, uncond_logger.handlers[:], uncond_logger.filters[:] = propagate, handlers, filters
        for name in set(os.environ) - set(variables):
            del os.environ[name]
        os.environ.update(variables)
        sys.argv[:] = argv


def setup_logging() -> None:
    """uncond's messages, plain, on stderr. Set on uncond's own logger, not the root's: called from Python (a
    notebook, a script of the caller's), the caller's logging stays as it was."""
    from . import progress

    uncond_logger = logging.getLogger("uncond")
    for handler in [handler for handler in uncond_logger.handlers if handler.get_name() == "uncond"]:
        uncond_logger.removeHandler(handler)  # an earlier command's in this process, on the stderr of then
    handler = logging.StreamHandler()  # on sys.stderr as it is now
    handler.set_name("uncond")
    handler.setFormatter(logging.Formatter("%(message)s"))
    uncond_logger.addHandler(handler)
    uncond_logger.addFilter(shown_here)  # once: a filter already there is not added again
    if uncond_logger.level == logging.NOTSET:  # a level the caller chose (WARNING: quieter) stays
        uncond_logger.setLevel(logging.INFO)
    uncond_logger.propagate = False  # shown once, whatever handlers the root logger has
    for noisy in QUIETED_LIBRARIES:
        library_logger = logging.getLogger(noisy)
        if library_logger.level == logging.NOTSET:  # a level the caller chose stays
            library_logger.setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not progress.draws_bars():  # in a log file the libraries' download bars are carriage returns
        for bars in BAR_VARIABLES:
            os.environ.setdefault(bars, "1")


if __name__ == "__main__":
    sys.exit(script())
