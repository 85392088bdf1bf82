"""Launching layergraft jobs on Slurm clusters with submitit."""
