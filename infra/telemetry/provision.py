"""Provision the telemetry path: Kinesis stream, Firehose -> S3, API Gateway -> Kinesis.

Idempotent get-or-create by name, so every run can call ``ensure_telemetry`` and the first
one builds it. The same calls build it on AWS and on the embedded endpoint, where the
Kinesis -> Firehose delivery and the API stage invocation are gap fills
(``infra.aws.moto_gaps.kinesis_firehose`` / ``apigateway_invoke``).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from infra.aws.clients import AwsTarget

TEMPLATE_MARKER = "## clusterflow-telemetry/v1"  # the embedded endpoint keys on this line
RECORDS_MODEL = {
    "$schema": "http://json-schema.org/draft-04/schema#",
    "title": "TelemetryRecords",
    "type": "object",
    "required": ["records"],
    "properties": {"records": {
        "type": "array", "minItems": 1, "maxItems": 500,
        "items": {"type": "object", "required": ["run_id", "rank"], "properties": {
            "run_id": {"type": "string", "minLength": 1, "maxLength": 128},
            "rank": {"type": "integer", "minimum": 0}}}}},
}


class TelemetrySetupError(RuntimeError):
    """What exists under the telemetry names does not fit this configuration."""


class TelemetryConfig(BaseModel):
    """Names and limits of the telemetry path (defaults fit one team's account)."""

    model_config = ConfigDict(extra="forbid")
    stream: str = "clusterflow-telemetry"
    shards: int = Field(1, ge=1)
    delivery_stream: str = "clusterflow-telemetry-to-s3"
    bucket: str = "clusterflow-demo-results"  # the default spec's results bucket
    prefix: str = "telemetry/"
    buffer_seconds: int = Field(60, ge=0, le=900)
    buffer_mb: int = Field(64, ge=1, le=128)  # AWS needs >= 64 with dynamic partitioning
    api_name: str = "clusterflow-telemetry"
    stage: str = "v1"
    rate_limit: float = Field(50.0, gt=0)  # requests per second per API key
    burst_limit: int = Field(100, ge=1)


    @classmethod
    def for_bucket(cls, bucket: str, **overrides: Any) -> TelemetryConfig:
        """One path per results bucket: a delivery stream delivers to one bucket only, so the
        names carry a short hash of the bucket and two specs never share (or steal) a stream."""
        tag = hashlib.sha256(bucket.encode()).hexdigest()[:8]
        names = {"stream": f"clusterflow-telemetry-{tag}",
                 "delivery_stream": f"clusterflow-telemetry-{tag}-to-s3",
                 "api_name": f"clusterflow-telemetry-{tag}", "bucket": bucket}
        return cls(**{**names, **overrides})


class TelemetryEndpoints(BaseModel):
    stream: str
    stream_arn: str
    delivery_stream: str
    bucket: str
    prefix: str
    api_id: str
    stage: str
    stage_url: str
    api_key: str


def _mapping_template(stream: str) -> str:
    """VTL for Kinesis PutRecords: one record per element, partition key = run id + rank."""
    return (
        f"{TEMPLATE_MARKER}: POST /runs/{{run}}/records -> Kinesis PutRecords\n"
        "#set($records = $input.path('$.records'))\n"
        "{\n"
        f'  "StreamName": "{stream}",\n'
        '  "Records": [\n'
        "#foreach($r in $records)\n"
        '    {"Data": "$util.base64Encode($input.json(\"$.records[$foreach.index]\"))",\n'
        '     "PartitionKey": "$util.escapeJavaScript($input.params(\'run\'))-$r.rank"}'
        "#if($foreach.hasNext),#end\n"
        "#end\n"
        "  ]\n"
        "}\n"
    )


def stage_url(aws: AwsTarget, api_id: str, stage: str) -> str:
    """The invoke URL: AWS's own, or the embedded endpoint's documented path form."""
    if aws.endpoint_url:
        return f"{aws.endpoint_url.rstrip('/')}/restapis/{api_id}/{stage}/_user_request_"
    return f"https://{api_id}.execute-api.{aws.region}.amazonaws.com/{stage}"


def _role(aws: AwsTarget, name: str, service: str, actions: list[str], resources: list[str],
          ) -> str:
    iam = aws.client("iam")
    try:
        return iam.get_role(RoleName=name)["Role"]["Arn"]
    except iam.exceptions.NoSuchEntityException:
        pass
    trust = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}]}
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": actions, "Resource": resources}]}
    iam.put_role_policy(RoleName=name, PolicyName=f"{name}-policy",
                        PolicyDocument=json.dumps(policy))
    return arn


def _stream(aws: AwsTarget, cfg: TelemetryConfig) -> str:
    kinesis = aws.client("kinesis")
    try:
        desc = kinesis.describe_stream_summary(StreamName=cfg.stream)["StreamDescriptionSummary"]
    except kinesis.exceptions.ResourceNotFoundException:
        kinesis.create_stream(StreamName=cfg.stream, ShardCount=cfg.shards)
        kinesis.get_waiter("stream_exists").wait(
            StreamName=cfg.stream, WaiterConfig={"Delay": 1, "MaxAttempts": 120})
        desc = kinesis.describe_stream_summary(StreamName=cfg.stream)["StreamDescriptionSummary"]
    return str(desc["StreamARN"])


def _firehose(aws: AwsTarget, cfg: TelemetryConfig, stream_arn: str) -> None:
    firehose = aws.client("firehose")
    if cfg.delivery_stream in firehose.list_delivery_streams(Limit=10000)["DeliveryStreamNames"]:
        desc = firehose.describe_delivery_stream(DeliveryStreamName=cfg.delivery_stream)
        dest = desc["DeliveryStreamDescription"]["Destinations"][0]
        got = (dest.get("ExtendedS3DestinationDescription") or dest.get(
            "S3DestinationDescription") or {}).get("BucketARN", "").split(":")[-1]
        if got != cfg.bucket:
            raise TelemetrySetupError(
                f"delivery stream {cfg.delivery_stream} delivers to bucket {got!r}, not "
                f"{cfg.bucket!r}: give this bucket its own delivery stream name")
        return
    bucket_arn = f"arn:aws:s3:::{cfg.bucket}"
    role = _role(aws, f"{cfg.delivery_stream}-role", "firehose.amazonaws.com", [
        "kinesis:DescribeStream", "kinesis:GetShardIterator", "kinesis:GetRecords",
        "kinesis:ListShards", "s3:AbortMultipartUpload", "s3:GetBucketLocation",
        "s3:GetObject", "s3:ListBucket", "s3:ListBucketMultipartUploads", "s3:PutObject",
    ], [stream_arn, bucket_arn, f"{bucket_arn}/{cfg.prefix}*", f"{bucket_arn}/telemetry-errors/*"])
    firehose.create_delivery_stream(
        DeliveryStreamName=cfg.delivery_stream,
        DeliveryStreamType="KinesisStreamAsSource",
        KinesisStreamSourceConfiguration={"KinesisStreamARN": stream_arn, "RoleARN": role},
        ExtendedS3DestinationConfiguration={
            "RoleARN": role, "BucketARN": bucket_arn,
            "Prefix": f"{cfg.prefix}run_id=!{{partitionKeyFromQuery:run_id}}/",
            "ErrorOutputPrefix": "telemetry-errors/!{firehose:error-output-type}/"
                                 "!{timestamp:yyyy/MM/dd}/",
            "CompressionFormat": "GZIP",
            "BufferingHints": {"IntervalInSeconds": cfg.buffer_seconds,
                               "SizeInMBs": cfg.buffer_mb},
            "DynamicPartitioningConfiguration": {"Enabled": True},
            "ProcessingConfiguration": {"Enabled": True, "Processors": [
                {"Type": "MetadataExtraction", "Parameters": [
                    {"ParameterName": "MetadataExtractionQuery",
                     "ParameterValue": "{run_id:.run_id}"},
                    {"ParameterName": "JsonParsingEngine", "ParameterValue": "JQ-1.6"}]},
                {"Type": "AppendDelimiterToRecord", "Parameters": []},
            ]},
        },
    )


def _api(aws: AwsTarget, cfg: TelemetryConfig, stream_arn: str) -> tuple[str, str]:
    """The REST API (id) and an API key (value) on a throttled usage plan."""
    apigw = aws.client("apigateway")
    existing = [a for a in apigw.get_rest_apis(limit=500)["items"] if a["name"] == cfg.api_name]
    if existing:
        api_id = existing[0]["id"]
    else:
        api_id = _build_api(aws, cfg, stream_arn)
    keys = apigw.get_api_keys(nameQuery=cfg.api_name, includeValues=True)["items"]
    if keys:
        return api_id, keys[0]["value"]
    key = apigw.create_api_key(name=cfg.api_name, enabled=True)
    plan = apigw.create_usage_plan(
        name=cfg.api_name, apiStages=[{"apiId": api_id, "stage": cfg.stage}],
        throttle={"rateLimit": cfg.rate_limit, "burstLimit": cfg.burst_limit})
    apigw.create_usage_plan_key(usagePlanId=plan["id"], keyId=key["id"], keyType="API_KEY")
    return api_id, key["value"]


def _build_api(aws: AwsTarget, cfg: TelemetryConfig, stream_arn: str) -> str:
    apigw = aws.client("apigateway")
    api_id = apigw.create_rest_api(name=cfg.api_name, apiKeySource="HEADER",
                                   endpointConfiguration={"types": ["REGIONAL"]})["id"]
    root = next(r["id"] for r in apigw.get_resources(restApiId=api_id)["items"]
                if r["path"] == "/")
    runs = apigw.create_resource(restApiId=api_id, parentId=root, pathPart="runs")["id"]
    run = apigw.create_resource(restApiId=api_id, parentId=runs, pathPart="{run}")["id"]
    records = apigw.create_resource(restApiId=api_id, parentId=run, pathPart="records")["id"]
    apigw.create_model(restApiId=api_id, name="TelemetryRecords", contentType="application/json",
                       schema=json.dumps(RECORDS_MODEL))
    validator = apigw.create_request_validator(restApiId=api_id, name="body",
                                               validateRequestBody=True)["id"]
    apigw.put_method(restApiId=api_id, resourceId=records, httpMethod="POST",
                     authorizationType="NONE", apiKeyRequired=True,
                     requestParameters={"method.request.path.run": True},
                     requestValidatorId=validator,
                     requestModels={"application/json": "TelemetryRecords"})
    role = _role(aws, f"{cfg.api_name}-apigw-role", "apigateway.amazonaws.com",
                 ["kinesis:PutRecords"], [stream_arn])
    apigw.put_integration(
        restApiId=api_id, resourceId=records, httpMethod="POST", type="AWS",
        integrationHttpMethod="POST", credentials=role, passthroughBehavior="NEVER",
        uri=f"arn:aws:apigateway:{aws.region}:kinesis:action/PutRecords",
        requestTemplates={"application/json": _mapping_template(cfg.stream)})
    for status, pattern in (("200", None), ("400", "4\\d{2}"), ("500", "5\\d{2}")):
        apigw.put_method_response(restApiId=api_id, resourceId=records, httpMethod="POST",
                                  statusCode=status)
        extra: dict[str, Any] = {"selectionPattern": pattern} if pattern else {}
        apigw.put_integration_response(restApiId=api_id, resourceId=records, httpMethod="POST",
                                       statusCode=status, **extra)
    apigw.create_deployment(restApiId=api_id, stageName=cfg.stage)
    return str(api_id)


def ensure_telemetry(aws: AwsTarget, cfg: TelemetryConfig | None = None) -> TelemetryEndpoints:
    """Get or create the whole path; returns what a job needs to report into it."""
    cfg = cfg or TelemetryConfig()
    s3 = aws.client("s3")
    try:
        s3.head_bucket(Bucket=cfg.bucket)
    except s3.exceptions.ClientError:
        extra = ({} if aws.region == "us-east-1"
                 else {"CreateBucketConfiguration": {"LocationConstraint": aws.region}})
        s3.create_bucket(Bucket=cfg.bucket, **extra)
    stream_arn = _stream(aws, cfg)
    _firehose(aws, cfg, stream_arn)
    api_id, key = _api(aws, cfg, stream_arn)
    return TelemetryEndpoints(
        stream=cfg.stream, stream_arn=stream_arn, delivery_stream=cfg.delivery_stream,
        bucket=cfg.bucket, prefix=cfg.prefix, api_id=api_id, stage=cfg.stage,
        stage_url=stage_url(aws, api_id, cfg.stage), api_key=key)


def register_run(aws: AwsTarget, endpoints: TelemetryEndpoints, run_id: str, **info: Any) -> None:
    """Mark ``run_id`` as a run clusterflow started, so its records are not flagged unknown."""
    body = json.dumps({"run_id": run_id, "registered_at": time.time(), **info}).encode()
    aws.client("s3").put_object(Bucket=endpoints.bucket,
                                Key=f"{endpoints.prefix}_runs/{run_id}.json", Body=body)
