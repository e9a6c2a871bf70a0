"""Hydra loads launchers only from the ``hydra_plugins`` package: this shim exposes the project's Ray
launcher (implemented in ``pipeline/ray_launcher.py``) as ``hydra/launcher=ray``."""
