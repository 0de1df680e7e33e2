"""A pool of long-lived SMTP connections: ``result = await pool.submit(message)``."""

from pool.errors import DeliveryError, PoolClosedError, PoolError, RelayError
from pool.pool import SMTPPool
from pool.results import SendResult

__all__ = ["DeliveryError", "PoolClosedError", "PoolError", "RelayError", "SMTPPool", "SendResult"]
