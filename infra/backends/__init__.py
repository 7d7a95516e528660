"""How and where ranks run: providers (submit / status / cancel) and launchers (mpiexec, srun).

``providers/`` has one provider per backend, ``launchers`` builds the rank command line,
``settings`` turns a spec's backend section into a provider, ``remote_shell``/``ssm`` carry
commands to a head node. Backends never create clusters (``infra.clusters`` does) or move data.
"""
