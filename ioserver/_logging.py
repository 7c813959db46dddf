"""Logging for the ``ioserver`` command: ``--log-level``, ``--log-format``, ``--log-config``.

ioserver logs to the ``ioserver`` logger (and its children); the command configures the
root logger once at start and again on SIGHUP (:func:`reopen_log_files`,
:func:`configure`).  A ``--log-config`` file is a :func:`logging.config.dictConfig`
dictionary written as JSON (``.json``) or TOML (``.toml``, read with :mod:`tomllib`).
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.config
import tomllib
from typing import Any

from ._exceptions import OptionError

__all__ = ["FORMATS", "JsonFormatter", "configure", "load_log_config", "reopen_log_files"]

#: The choices of ``--log-format``.
FORMATS = ("text", "json")

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

# The attributes every LogRecord has: the others were passed with ``extra=`` and go into
# the JSON object as they are.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC, microseconds), ``level``,
    ``logger``, ``message``, ``pid``, then the fields given with ``extra=`` and, for an
    exception, ``exception`` (the formatted traceback).  What log shippers (journald's
    ``JSON`` field parsers, Loki, Elasticsearch, Vector) read without a pattern."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def load_log_config(path: str) -> dict[str, Any]:
    """The :func:`logging.config.dictConfig` dictionary in the JSON or TOML file ``path``
    (TOML when the name ends in ``.toml``).

    Raises:
        OptionError: the file cannot be read or parsed, or is not a table/object with a
            ``version`` key (dictConfig's schema version, 1).
    """
    try:
        with open(path, "rb") as file:
            if path.endswith(".toml"):
                document: Any = tomllib.load(file)
            else:
                document = json.load(file)
    except (OSError, ValueError) as exc:  # JSONDecodeError and TOMLDecodeError too
        raise OptionError(f"--log-config {path}: {exc}") from None
    if not isinstance(document, dict) or "version" not in document:
        raise OptionError(
            f"--log-config {path}: not a logging.config.dictConfig dictionary "
            "(it needs at least `version = 1`)"
        )
    return document


def configure(level: str = "INFO", log_format: str = "text", log_config: str | None = None) -> None:
    """Configure the root logger (again: any earlier handlers are removed).

    With ``log_config``, the file decides everything (``level`` and ``log_format`` are
    ignored; ``disable_existing_loggers`` defaults to false, so that ioserver's loggers,
    which exist from import, keep logging); otherwise one handler on standard error at
    ``level``, in ``log_format`` (``"text"`` or ``"json"``: :class:`JsonFormatter`).

    Raises:
        OptionError: an unknown level or format, or a bad ``log_config`` file (the
            file's name and dictConfig's complaint, which names the key).
    """
    if log_config:
        document = load_log_config(log_config)
        # dictConfig's default (True) would silence the loggers that exist already -
        # ioserver's own, made at import: the file must say so to get that.
        document.setdefault("disable_existing_loggers", False)
        try:
            logging.config.dictConfig(document)
        except (ValueError, TypeError, AttributeError, ImportError) as exc:
            # dictConfig says which part ("Unable to configure handler 'file'"); its
            # cause says what is wrong with it.
            why = f"{exc}: {exc.__cause__}" if exc.__cause__ is not None else str(exc)
            raise OptionError(f"--log-config {log_config}: {why}") from None
        return
    number = logging.getLevelName(str(level).upper())
    if not isinstance(number, int):
        raise OptionError(f"--log-level must be DEBUG, INFO, WARNING, ERROR or CRITICAL: {level!r}")
    if log_format not in FORMATS:
        raise OptionError(f"--log-format must be one of {', '.join(FORMATS)}: {log_format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=number, handlers=[handler], force=True)


def reopen_log_files() -> int:
    """Close the stream of every :class:`logging.FileHandler` in use, so that its next
    record opens the file again by name: after logrotate moved it away, the log goes on
    in a new file (what SIGHUP means to a daemon).  Returns how many were closed."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    seen: set[int] = set()
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler) and id(handler) not in seen:
                seen.add(id(handler))
                with handler.lock or _NoLock():
                    stream = handler.stream
                    if stream is not None:
                        handler.stream = None
                        try:
                            stream.flush()
                        finally:
                            stream.close()
    return len(seen)


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
