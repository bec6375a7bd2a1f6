"""Launchers: ask a scheduler for resources and start the app (`python -m pretrain.cli train`) there.

`launch.slurm` is `pretrain slurm`; the `*.sbatch` files beside it are hand-editable templates.
Nothing in the library or the engine imports this package.
"""
