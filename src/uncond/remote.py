"""Loading from the Hugging Face Hub through huggingface_hub, datasets and diffusers, as the user sees it:
their log lines quietened while uncond waits for them, and their failures put in one line that says whether
the Hub could not be reached at all or answered with an error."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import sys
import warnings
from typing import Iterator

from .config import first_line

# Without a network huggingface_hub logs every failed request and retry ("'[Errno -2] Name or service not
# known' thrown while requesting HEAD https://huggingface.co/...", twice: its logger has a handler of its own
# and also passes records on to the root logger's),
# and diffusers a line per file it could not fetch, before raising; the caller's one-line error says it once.
# datasets' logger is left alone: its "using the latest cached version" is worth seeing offline.
CHATTY_LOGGERS = ("huggingface_hub", "diffusers")
# Logs an error for a model folder with .bin weights and no safetensors before it loads the .bin (with
# weights_only) as it should: uncond says what it loaded instead (sampling.load_model).
FALLBACK_LOGGER = "diffusers.models.modeling_utils"

# The HTTP clients' connection errors, by name: huggingface_hub moved from requests to httpx (packaged here as
# httpx2), and neither needs importing to be recognised. A refused connection, an unknown host or a timeout.
CONNECTION_ERROR_NAMES = {"ConnectError", "ConnectTimeout", "ConnectionError", "ProxyError", "ConnectTimeoutError",
                          "NewConnectionError", "NameResolutionError"}

# diffusers ends a failed Hub load with this, but uncond shows no stack trace: the cause is added instead.
STACKTRACE_ABOVE = re.compile(r"\s*Please check out the root cause in the stacktrace above\.?")


# huggingface_hub's retrying requests log here: "'...' thrown while requesting ..." and "Retrying in 1s [Retry 1/5]."
RETRY_LOGGER = "huggingface_hub.utils._http"


@contextlib.contextmanager
def quiet_hub_clients() -> Iterator[None]:
    """While loading: huggingface_hub's and diffusers' loggers at ERROR, diffusers' "Loading pipeline
    components" bar (a flash for a UNet and a scheduler) hidden, and huggingface_hub's deprecation warnings
    about how diffusers calls it (nothing a user can act on) not shown. Its first retry becomes one line of
    uncond's: without a network its retries wait about half a minute before the load fails."""
    diffusers_logging = sys.modules.get("diffusers.utils.logging")  # loaded by whoever loads with diffusers
    bars_shown = diffusers_logging is not None and diffusers_logging.is_progress_bar_enabled()
    if bars_shown:
        diffusers_logging.disable_progress_bar()
    loggers = [logging.getLogger(name) for name in (*CHATTY_LOGGERS, FALLBACK_LOGGER)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL if logger.name == FALLBACK_LOGGER else logging.ERROR)
    retry_logger, retry_notice = logging.getLogger(RETRY_LOGGER), RetryNotice()
    retry_level = retry_logger.level
    retry_logger.setLevel(logging.WARNING)
    retry_logger.addFilter(retry_notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"huggingface_hub(\.|$)")
            yield
    finally:
        retry_logger.removeFilter(retry_notice)
        retry_logger.setLevel(retry_level)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars_shown:
            diffusers_logging.enable_progress_bar()


class RetryNotice(logging.Filter):
    """Drops huggingface_hub's request-retry log records, saying the first one's meaning once instead."""

    def __init__(self) -> None:
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.said and record.getMessage().startswith("Retrying in"):
            self.said = True
            logging.getLogger("uncond").warning(
                "the Hub does not answer; huggingface_hub retries for about half a minute before giving up (with "
                "no network, HF_HUB_OFFLINE=1 uses what is in the local cache at once)")
        return False


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def connection_failure(error: BaseException) -> str | None:
    """Why the Hub could not be reached, if that is what `error` comes from (offline mode, no network, a refused
    connection, a timeout); None when the Hub answered (an HTTP error such as 401 or 404) or for other errors."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    innermost = None
    for link in causes(error):
        if isinstance(link, OfflineModeIsEnabled):
            return "offline mode: HF_HUB_OFFLINE is set"
        if (isinstance(link, (ConnectionError, socket.gaierror, TimeoutError))
                or type(link).__name__ in CONNECTION_ERROR_NAMES):
            innermost = link
    return None if innermost is None else first_line(innermost)


def load_failure(error: BaseException) -> str:
    """Why a load from the Hub (or its local cache) failed, in one line. When the Hub could not be reached that is
    the reason, whatever the library blamed (diffusers says a file is missing when it is only not cached)."""
    unreachable = connection_failure(error)
    if unreachable:
        return f"not in the local cache, and the Hub cannot be reached: {unreachable}"
    text = first_line(error)
    if STACKTRACE_ABOVE.search(text):
        cause = error.__cause__
        text = STACKTRACE_ABOVE.sub("", text) + (f" Cause: {first_line(cause)}" if cause is not None else "")
    return text
