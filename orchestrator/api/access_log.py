"""The API's access log never records query strings: a token pasted into a URL must not reach logs."""

from __future__ import annotations

import copy
import logging
from typing import Any


class RedactQueryStrings(logging.Filter):
    """Rewrites uvicorn access records: ``/v1/x?token=secret`` is logged as ``/v1/x?[redacted]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            path = args[2].split("?", 1)[0] + "?[redacted]"
            record.args = (args[0], args[1], path, args[3], args[4])
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's logging configuration with :class:`RedactQueryStrings` on the access handler."""
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_query"] = {"()": f"{__name__}.RedactQueryStrings"}
    config["handlers"]["access"]["filters"] = ["redact_query"]
    return config
