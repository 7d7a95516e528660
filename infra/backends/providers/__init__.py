"""Execution providers: where ranks run (submit / status / cancel), apart from how they start."""
