"""Gap fills for moto 5.2.5, applied inside the embedded endpoint's server process only.

Each submodule patches what moto lacks and defers everything else to moto, so the clients
still speak plain AWS HTTP. They depend on moto alone, never on the rest of clusterflow:
``apply()`` here is the one place that installs them all (``infra.aws.moto_server`` calls it).
"""

from __future__ import annotations


def apply() -> None:
    """Install every gap fill; idempotent."""
    from infra.aws.moto_gaps import (
        apigateway_invoke,
        fanout,
        kinesis_firehose,
        placement_groups,
        sqs_receive,
    )

    fanout.apply()
    placement_groups.apply()  # the Batch backend's cluster placement groups
    sqs_receive.apply()  # ReceiveMessage no longer scans the queue once per message
    kinesis_firehose.apply()  # run telemetry: Kinesis -> Firehose -> S3
    apigateway_invoke.apply()  # run telemetry: API Gateway stage -> Kinesis
