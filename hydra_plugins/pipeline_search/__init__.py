"""Hydra loads sweepers only from the ``hydra_plugins`` package: this shim exposes the project's
multi-objective search sweeper (implemented in ``pipeline/search.py``) as ``hydra/sweeper=pareto``."""
