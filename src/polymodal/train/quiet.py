"""Quiet training logs: what Lightning prints on every run and no user can act on is kept out.

Lightning's start-up banners (``GPU available``, ``TPU available``, ``LOCAL_RANK: 0 -
CUDA_VISIBLE_DEVICES``) are shown only with ``polymodal --verbose``; a few of its warnings are
filtered narrowly — by message, category and the module that raises them — while training runs,
so that any other warning still shows.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("polymodal.train")

# (message regex, category, module regex): warnings Lightning prints on runs that are as meant
QUIET_WARNINGS = [
    # torch 2.10+ deprecates the LeafSpec that Lightning's own _pytree still builds (every run)
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    # frozen towers are kept in eval mode on purpose (batch-norm statistics and dropout stay off)
    (r"Found \d+ module\(s\) in eval mode at the start of training", Warning, r"lightning\.pytorch"),
    # the loggers log every N optimizer steps across epochs, so short epochs lose nothing
    (r"The number of training batches \(\d+\) is smaller than the logging interval", Warning,
     r"lightning\.pytorch"),
    # a step budget ends mid-epoch, so every --resume does; the data is reshuffled, not replayed
    (r"You're resuming from a checkpoint that ended before the epoch ended", Warning, r"lightning\.pytorch"),
]
BANNER_LOGGERS = ("lightning.pytorch", "lightning.fabric")  # GPU/TPU available, LOCAL_RANK, ...


@contextmanager
def quiet_lightning(verbose: bool = False) -> Iterator[None]:
    """Within: the warnings of :data:`QUIET_WARNINGS` are ignored, and Lightning's info banners
    are shown only when ``verbose`` — then through the root logger's handlers where the command
    line had cut them off (``propagate = False``), so that they print once, like our own logs."""
    loggers = [logging.getLogger(name) for name in BANNER_LOGGERS]
    saved = [(logger, logger.level, list(logger.handlers)) for logger in loggers]
    with warnings.catch_warnings():
        for message, category, module in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        for logger in loggers:
            logger.setLevel(logging.INFO if verbose else logging.WARNING)
            if verbose and not logger.propagate and not logger.handlers:
                for handler in logging.getLogger().handlers:
                    logger.addHandler(handler)
        try:
            yield
        finally:
            for logger, level, handlers in saved:
                logger.setLevel(level)
                logger.handlers[:] = handlers


def quiet_training(function):
    """Run ``function`` within :func:`quiet_lightning`, verbose when the ``polymodal`` loggers show
    debug messages (``polymodal --verbose``)."""
    @functools.wraps(function)
    def quiet(*args, **kwargs):
        with quiet_lightning(verbose=log.isEnabledFor(logging.DEBUG)):
            return function(*args, **kwargs)

    return quiet
