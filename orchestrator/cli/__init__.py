"""The ``fleet`` command line."""

from __future__ import annotations

from orchestrator.cli.main import app

__all__ = ["app"]
