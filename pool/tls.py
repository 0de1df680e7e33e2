"""TLS settings checked before any connection is tried."""

from __future__ import annotations

import ssl


def check_ca_file(path: str) -> None:
    """Raise ValueError, naming the file and why, unless ``path`` is a PEM file of CA
    certificates OpenSSL can load. A missing or broken CA file is the caller's mistake,
    never a relay that is down: without this check every connect fails and the pool
    waits ``relay_down_timeout`` before saying so."""
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:  # an OSError too: first
        raise ValueError(f"{path}: not a PEM file of CA certificates ({exc.reason or exc})") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it: {exc.strerror or exc}") from None
