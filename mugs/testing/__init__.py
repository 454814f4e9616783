"""Test helpers that live in the package: code that runs inside SLURM jobs must be importable there."""
