"""The stage task is cached by the input manifest, and never answers for a damaged destination."""

from __future__ import annotations

import uuid

from flows.pipeline import ensure_bucket


def test_stage_task_is_cached_by_the_input_manifest(aws, prefect_api, tmp_path):
    from prefect import flow
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_LOGGING_TO_API_ENABLED,
        temporary_settings,
    )

    from flows.staging_tasks import stage_tree

    bucket = f"task-{uuid.uuid4().hex[:8]}"
    ensure_bucket(aws, bucket)
    s3 = aws.client("s3")
    for i in range(5):
        s3.put_object(Bucket=bucket, Key=f"in/{i}.txt", Body=f"file {i}".encode())
    src, dst, cache = f"s3://{bucket}/in", str(tmp_path / "dst"), str(tmp_path / "cache")

    @flow(name="stage-cache-test")
    def stage_three_times() -> list[tuple[str, int]]:
        out = []
        for _ in range(3):
            state = stage_tree(src, dst, aws, cache_dir=cache, return_state=True)
            out.append((state.name, state.result()["copied"]))
        return out

    with temporary_settings(updates={PREFECT_API_URL: prefect_api,
                                     PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                                     PREFECT_LOGGING_TO_API_ENABLED: False,
                                     PREFECT_LOCAL_STORAGE_PATH: tmp_path / "results"}):
        first = stage_three_times()
        # 1st moves the data; 2nd proves the destination holds it (copies nothing) and is
        # recorded under the manifest key; from then on Prefect answers from its cache.
        assert first == [("Completed", 5), ("Completed", 0), ("Cached", 0)]

        # the input changes: a new manifest, so the task runs and moves just that file
        s3.put_object(Bucket=bucket, Key="in/2.txt", Body=b"changed")
        assert stage_three_times()[0] == ("Completed", 1)
        assert (tmp_path / "dst" / "2.txt").read_bytes() == b"changed"

        # the destination is damaged behind the cache's back: no cached answer, it is repaired
        (tmp_path / "dst" / "3.txt").unlink()
        assert stage_three_times()[0] == ("Completed", 1)
        assert (tmp_path / "dst" / "3.txt").read_bytes() == b"file 3"
