"""Structured logging for evoprune: library code logs, never prints."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

_LOGGER_NAME = "evoprune"


def get_logger(name: str | None = None) -> logging.Logger:
    """The evoprune logger (``evoprune`` or ``evoprune.<name>``)."""
    return logging.getLogger(_LOGGER_NAME if not name else f"{_LOGGER_NAME}.{name}")


class _KeyValueFormatter(logging.Formatter):
    """``time level logger message key=value ...`` with extras given as ``extra={"fields": {...}}``."""

    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {}) or {}
        if self.as_json:
            payload = {
                "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
                **fields,
            }
            if record.exc_info:
                payload["exc"] = self.formatException(record.exc_info)
            return json.dumps(payload, default=str)
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (it may have been swapped since
    configuration, e.g. by pytest's capture or a caller's redirect), never to a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # logging.StreamHandler assigns it; the live stderr wins
        pass


def configure_logging(level: str | int | None = None, *, as_json: bool | None = None) -> None:
    """Send evoprune's logs to stderr (used by the CLI; libraries embedding evoprune configure their own).

    ``EVOPRUNE_LOG_LEVEL`` and ``EVOPRUNE_LOG_JSON=1`` override the defaults.
    """
    level = level or os.environ.get("EVOPRUNE_LOG_LEVEL", "INFO")
    if as_json is None:
        as_json = os.environ.get("EVOPRUNE_LOG_JSON", "") not in ("", "0")
    logger = logging.getLogger(_LOGGER_NAME)
    logger.setLevel(level)
    for handler in list(logger.handlers):
        if getattr(handler, "_evoprune", False):
            logger.removeHandler(handler)
    handler = _StderrHandler()
    handler._evoprune = True  # type: ignore[attr-defined]
    handler.setFormatter(_KeyValueFormatter(as_json))
    logger.addHandler(handler)
    logger.propagate = False
