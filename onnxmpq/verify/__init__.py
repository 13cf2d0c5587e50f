"""Judging a written model: fidelity against the float model on held-out samples (`judge`) and
evaluation on labelled or reference data (`evaluate`)."""
