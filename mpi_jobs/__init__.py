"""The bundled MPI kernels (heat, var, k-mer), run as ``mpiexec -n N python -m mpi_jobs.<name>``.

Each gives bitwise-identical results for any rank count and checkpoints atomically. Kernels know
nothing of AWS, Prefect or schedulers: they read files and write files plus a manifest.
"""
