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
    return logger
