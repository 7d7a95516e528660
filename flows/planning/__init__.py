"""``clusterflow plan``: what a run would create and what it would cost, before it runs."""
