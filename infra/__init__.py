"""Everything below the flows: AWS access, data staging, backends, clusters, head-node HA.

One package per job (``aws``, ``staging``, ``backends``, ``clusters``, ``ha``); ``iam/`` holds
policy documents, ``yaml_models`` the YAML-to-pydantic loader shared by specs and configs, and
``child_processes`` the parent-death signal for processes that must not outlive a command.
Nothing in ``infra`` imports ``flows`` or ``event_bridge``.
"""
