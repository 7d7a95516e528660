"""``python -m infra.clusters.slurm_local up|down|status`` (what ``make slurm`` runs)."""

from __future__ import annotations

from infra.clusters.slurm_local.cli import app

app()
