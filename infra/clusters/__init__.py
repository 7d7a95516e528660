"""The clusters ranks run on: the local Slurm, AWS ParallelCluster and AWS Batch MNP.

Creating, validating and deleting them (configs, offline validation against ParallelCluster's
own schema, the instance-type catalog, ``clusterflow validate``). Nothing here submits a job
(``infra.backends`` does) or stages data.
"""
