"""A pool of long-lived SMTP connections: ``result = await pool.submit(message)``."""

from typing import TYPE_CHECKING, Any

from pool.envelope import Envelope, prepare
from pool.errors import DeliveryError, PoolClosedError, PoolError, RelayError, Withdrawn
from pool.pool import SMTPPool
from pool.results import SendResult
from pool.router import SMTPRouter

if TYPE_CHECKING:
    from pool.dkim import DKIMSigner

    __version__: str

__all__ = ["DKIMSigner", "DeliveryError", "Envelope", "PoolClosedError", "PoolError", "RelayError", "SMTPPool",
           "SMTPRouter", "SendResult", "Withdrawn", "__version__", "prepare"]


def _version() -> str:
    import importlib.metadata  # ~20 ms of CPU: paid by those who ask for the version, not by every sender

    try:  # one source: the version in pyproject.toml, as installed
        return importlib.metadata.version("smtp-dispatcher")
    except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        version = globals()["__version__"] = _version()
        return version
    # DKIM pulls in dkimpy and cryptography: loaded only by those who sign.
    if name == "DKIMSigner":
        from pool.dkim import DKIMSigner

        return DKIMSigner
    raise AttributeError(f"module 'pool' has no attribute {name!r}")
