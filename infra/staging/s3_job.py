"""The stager inside a Batch job: inputs down before ``mpirun``, results up after it.

``infra/clusters/batch_mnp_entry.py`` runs it on the nodes when the job's environment asks:

- ``python -m infra.staging.s3_job in`` (every node, before the main node starts ``mpirun``):
  each ``{"uri", "path"}`` of ``$CLUSTERFLOW_STAGE_IN`` (JSON) is downloaded to the node's own
  disk and checked against the SHA-256 S3 holds for it, so every rank reads a verified local
  copy and no shared file system is needed for the input;
- ``python -m infra.staging.s3_job out`` (the main node, after ``mpirun`` succeeded): every file
  the kernel's ``manifest.json`` lists in ``$CLUSTERFLOW_STAGE_OUT``'s ``dir`` is uploaded to
  its ``bucket``/``prefix`` with a SHA-256 that S3 checks on receipt, then
  ``clusterflow-sums.json`` (the manifest and the sums of the bytes sent). ``manifest.json``
  itself is not uploaded: the flow checks the objects against the sums and publishes it, so
  the "results ready" event only follows verified results.

Why in the job and not DataSync: one input object and a few results per run cost S3 requests
here, against DataSync's per-GB fee, its per-execution start-up and the locations it needs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from infra.aws.clients import AwsTarget
from infra.staging.fsx_job import SUMS
from infra.staging.objects import download, sha256_file, upload

STAGE_IN, STAGE_OUT = "CLUSTERFLOW_STAGE_IN", "CLUSTERFLOW_STAGE_OUT"


def _target() -> AwsTarget:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return AwsTarget(region=region, endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def stage_in(aws: AwsTarget, items: list[dict[str, str]]) -> None:
    for item in items:
        got = download(aws, *_split(item["uri"]), Path(item["path"]))
        print(f"s3_job: {got.uri} -> {got.path} ({got.bytes} bytes, sha256 verified)",
              flush=True)


def stage_out(aws: AwsTarget, out_dir: Path, bucket: str, prefix: str) -> dict[str, object]:
    manifest = json.loads((out_dir / "manifest.json").read_text())
    sums: dict[str, str] = {}
    for entry in manifest["files"]:
        path = out_dir / entry["name"]
        digest = sha256_file(path)  # before sending: a changed file leaves nothing in S3
        if digest != entry["sha256"]:
            raise SystemExit(f"s3_job: {path} has sha256 {digest}, not the manifest's "
                             f"{entry['sha256']}")
        # upload() hashes what it sends and fails if the file changes meanwhile.
        sums[entry["name"]] = upload(aws, path, bucket, prefix + entry["name"]).sha256
    record = {"manifest": manifest, "sha256": sums}
    tmp = out_dir / SUMS
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    upload(aws, tmp, bucket, prefix + SUMS)
    print(f"s3_job: {len(sums)} result(s) to s3://{bucket}/{prefix} with their sums",
          flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in (["in"], ["out"]):
        print("usage: python -m infra.staging.s3_job in|out (reads $CLUSTERFLOW_STAGE_IN / "
              "$CLUSTERFLOW_STAGE_OUT)", file=sys.stderr)
        return 2
    aws = _target()
    if args == ["in"]:
        stage_in(aws, json.loads(os.environ[STAGE_IN]))
    else:
        spec = json.loads(os.environ[STAGE_OUT])
        stage_out(aws, Path(spec["dir"]), spec["bucket"], spec["prefix"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
