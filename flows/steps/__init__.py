"""Multi-step pipelines: the user's own MPI programs and the bundled kernels, chained.

``model`` is the spec's ``steps:`` section (validated before anything exists), ``graph``
checks and orders it and expands sweeps into points, ``placeholders`` fills in ``{...}``
in commands, ``execute`` runs one point (stage in, launch, collect, publish) and ``runner``
schedules the graph as Prefect task runs. Steps never create AWS resources of their own: the
pipeline provisions; steps only read inputs and write their outputs.
"""
