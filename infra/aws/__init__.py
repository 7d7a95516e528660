"""Where AWS calls go: boto3 clients for real AWS or the embedded endpoint, and that endpoint.

``clients`` builds every boto3 client; ``embedded`` starts, reuses and stops the moto server;
``moto_gaps`` closes moto's gaps inside that server; ``preflight`` asks the account what only
it knows. Nothing here creates pipeline resources or knows about schedulers or staging.
"""
