"""Logging for the service's own lines (BentoML configures only its own loggers)."""

from __future__ import annotations

import logging
import sys

from .config import Settings

LOGGER_NAME = "embedding_worker"


def configure_logging(settings: Settings) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(settings.log_level)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [embedding_worker] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    # Per-request access lines cost CPU that the model needs on small machines (each goes through
    # the Rich handler infinity installs); the access log is off unless LOG_LEVEL=DEBUG.
    if settings.log_level != "DEBUG":
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    return logger
