"""Exceptions that the CLI turns into one clear line instead of a traceback."""

from __future__ import annotations


class MmpipeError(Exception):
    """Base for errors a user can fix; the message names what to fix."""


class ConfigError(MmpipeError):
    """Missing or wrong configuration."""


class StoreError(MmpipeError):
    """The image store is unreachable or refuses a request."""


class CatalogError(MmpipeError):
    """The catalog database is unreachable or not migrated."""
