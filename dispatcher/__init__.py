"""smtp-dispatcher batch runner."""

from pool import __version__

__all__ = ["__version__"]
