"""Exceptions raised to callers of :meth:`Coalescer.encode`.

Each one concerns a single ``encode()`` call: the coalescer itself keeps serving everyone else.
"""


class CoalescerError(Exception):
    """Base class of every error the coalescer raises to a caller."""


class InvalidItemError(CoalescerError, ValueError):
    """An item of this request is malformed or can never fit the budget; nothing was enqueued."""


class QueueFullError(CoalescerError):
    """The queue holds ``max_queue_patches`` already; the request was rejected without waiting."""


class EncodeError(CoalescerError):
    """The tower failed on a unit of this request; the tower's exception is chained as ``__cause__``."""


class CoalescerClosedError(CoalescerError):
    """The coalescer is closed, or was closed with ``cancel_pending=True`` before this unit ran."""


class ForwardTimeoutError(EncodeError):
    """The forward holding this request's unit ran past ``forward_timeout_s``; it was abandoned, not killed."""


class TowerUnhealthyError(CoalescerError):
    """A forward hung and no health probe has succeeded since: the request was refused without queueing.

    Callers should use another path (the SGLang plugin falls back to the model's own method).
    """
