"""A pool of long-lived SMTP connections: ``result = await pool.submit(message)``."""

import importlib.metadata
from typing import TYPE_CHECKING, Any

from pool.envelope import Envelope, prepare
from pool.errors import DeliveryError, PoolClosedError, PoolError, RelayError, Withdrawn
from pool.pool import SMTPPool
from pool.results import SendResult
from pool.router import SMTPRouter

try:  # one source: the version in pyproject.toml, as installed
    __version__ = importlib.metadata.version("smtp-dispatcher")
except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from pool.dkim import DKIMSigner

__all__ = ["DKIMSigner", "DeliveryError", "Envelope", "PoolClosedError", "PoolError", "RelayError", "SMTPPool",
           "SMTPRouter", "SendResult", "Withdrawn", "__version__", "prepare"]


def __getattr__(name: str) -> Any:
    # DKIM pulls in dkimpy and cryptography: loaded only by those who sign.
    if name == "DKIMSigner":
        from pool.dkim import DKIMSigner

        return DKIMSigner
    raise AttributeError(f"module 'pool' has no attribute {name!r}")
