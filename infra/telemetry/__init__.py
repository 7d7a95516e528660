"""Run telemetry: ranks -> (API Gateway ->) Kinesis -> Firehose -> S3, and reading it back."""
