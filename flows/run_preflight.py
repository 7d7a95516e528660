"""What ``clusterflow run`` checks after the spec is valid and before Prefect starts.

Each of these used to surface inside the flow, after the temporary Prefect server had
started, as a task failure whose traceback Prefect printed: a region botocore rejects, an
``AWS_ENDPOINT_URL`` nothing listens on, ``aws: real`` without credentials, and a
``kernel.input_key`` that is not there (whose 404 did not even name the key). Each is a user
error with one fix, so it is refused the way a bad spec is: one line naming the field or
setting, exit 2, nothing created.
"""

from __future__ import annotations

import os
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from flows.spec import PipelineSpec, SpecError
from infra.aws.clients import AwsConfigError, AwsTarget, real_target
from infra.aws.reachability import check_endpoint, check_region, one_line


def check_before_start(spec: PipelineSpec, path: Path | str) -> PipelineSpec:
    """Raise ``SpecError`` (one line) for what would fail once the run started; else the spec.

    ``path`` (the spec file) is named in errors about the spec's own fields.
    """
    try:
        check_region(spec.region, field=f"pipeline spec {path}: region")
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
        if endpoint:
            check_endpoint(endpoint)
        target = None
        if spec.aws == "real":
            target = real_target(spec.region)  # credentials, without calling AWS
        if spec.kernel.input_key is not None:
            _check_input(spec, target or _embedded_target(spec, endpoint, path), path)
    except AwsConfigError as e:
        raise SpecError(str(e)) from None
    return spec


def _embedded_target(spec: PipelineSpec, endpoint: str | None, path: Path | str,
                     ) -> AwsTarget:
    from infra.aws.embedded import recorded_server

    if endpoint:
        return AwsTarget(region=spec.region, endpoint_url=endpoint, embedded=False)
    url = recorded_server()
    if url is None:
        uri = f"s3://{spec.storage.input_bucket}/{spec.kernel.input_key}"
        raise AwsConfigError(
            f"pipeline spec {path}: kernel.input_key: {uri} cannot exist: no AWS endpoint "
            "is running, and the one this run would start is "
            "empty; start `clusterflow local up` and upload it with `clusterflow stage`, or "
            "set AWS_ENDPOINT_URL to the endpoint that holds it")
    return AwsTarget(region=spec.region, endpoint_url=url, embedded=True)


def _check_input(spec: PipelineSpec, aws: AwsTarget, path: Path | str) -> None:
    bucket, key = spec.storage.input_bucket, spec.kernel.input_key
    uri = f"pipeline spec {path}: kernel.input_key: s3://{bucket}/{key}"
    try:
        aws.client("s3").head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            raise AwsConfigError(f"{uri} does not exist on {aws.label}; "
                                 "upload it with `clusterflow stage`") from None
        raise AwsConfigError(f"{uri} cannot be read: {one_line(e)}") from None
    except BotoCoreError as e:
        raise AwsConfigError(f"{uri} cannot be checked: {one_line(e)}") from None
