"""A pool of long-lived SMTP connections: ``result = await pool.submit(message)``."""

from pool.pool import SMTPPool
from pool.results import DeliveryError, PoolClosedError, PoolError, SendResult

__all__ = ["SMTPPool", "SendResult", "DeliveryError", "PoolClosedError", "PoolError"]
