"""ReceiveMessage in O(queue depth), not O(batch size x queue depth), inside the embedded endpoint.

moto 5.2.5 checks every message it is about to return against the queue's retention period
by calling ``get_queue_attributes(queue, ["MessageRetentionPeriod"])``, which builds *all*
of the queue's attributes first, among them ``ApproximateNumberOfMessages``,
``...NotVisible`` and ``...Delayed``: three scans of the whole queue, each calling moto's
slow ``unix_time()`` per message. A receive of 10 therefore scans the queue 30 times and a
receive of 1 three times, so on this endpoint a batch of 10 cost as much as ~3.5 single
receives and batching consumers gained 3.5x instead of the ~10x it gains on AWS (where a
ReceiveMessage costs about the same for 1 or 10 messages). Measured: a 10-message receive at
a depth of 200 spent 90% of its time in these attribute scans (``bench/fanout.py``).

The wrapper reads the one attribute it needs, the queue's retention period, directly; the
check itself (drop a message older than the retention period) is moto's, unchanged.
"""

from __future__ import annotations

from typing import Any

from moto.core.utils import unix_time

_APPLIED = False


def apply() -> None:
    """Install the wrapper; idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    from moto.sqs.models import SQSBackend

    def is_message_valid_based_on_retention_period(self: Any, queue_name: str,
                                                   message: Any) -> bool:
        retention_s = int(self.get_queue(queue_name).message_retention_period)
        return retention_s + message.sent_timestamp / 1000 > unix_time()

    SQSBackend.is_message_valid_based_on_retention_period = (
        is_message_valid_based_on_retention_period)
    _APPLIED = True
