"""Quieting libraries' loggers around one call whose routine messages are not the user's to act on."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def errors_only(*logger_names: str) -> Iterator[None]:
    """The named loggers ("" is the root logger; "transformers" is transformers' own, what its set_verbosity_error
    sets) log errors only while the block runs; their levels are put back after it, whatever happens."""
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
