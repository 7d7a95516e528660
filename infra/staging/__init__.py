"""Moving data between S3 and a cluster's storage: verified, resumable, incremental.

The stager (tree transfers with manifests and checksums), single-object transfers, FSx for
Lustre data repository associations and tasks, DataSync, and ``clusterflow stage``. Staging
never talks to a scheduler and never starts a job.
"""
