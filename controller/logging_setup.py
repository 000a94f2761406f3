"""Logging for the controller process: one handler on stderr, and cheap records.

The access log writes one line per RPC (:func:`controller.api.interceptors._log_call`),
so the cost of one :class:`logging.LogRecord` is paid on every call. By default the
standard library fills in, for every record, the caller's file and line (walking the
stack), the thread, the process id and the ``multiprocessing`` process name; together
about two thirds of a record's cost, and the controller's format uses none of them.
:func:`configure_logging` turns them off (``%(pathname)s``, ``%(lineno)d``,
``%(threadName)s``, ``%(process)d`` and ``%(processName)s`` then say nothing useful),
keeps the format ``time level logger: message`` and lazy ``%``-formatting: a line
below the level is never formatted.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def cheap_records() -> None:
    """Stop filling in caller, thread and process fields of every log record."""
    logging._srcfile = None  # no stack walk per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def configure_logging(level: str) -> None:
    """Log at ``level`` (a level name; unknown names mean INFO) to stderr, with cheap records."""
    cheap_records()
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=FORMAT,
        stream=sys.stderr,
    )


__all__ = ["FORMAT", "cheap_records", "configure_logging"]
