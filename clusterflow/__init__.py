"""clusterflow's Python API: run your own MPI programs as steps inside your own Prefect flows.

``session`` opens the AWS endpoint and backends once; ``mpi_step`` runs one command on N
ranks, stages its inputs and publishes its outputs (see ``flows.api``).
"""

from flows.api import Session, mpi_step, session

__all__ = ["Session", "mpi_step", "session"]
