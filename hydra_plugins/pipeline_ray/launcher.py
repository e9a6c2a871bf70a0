"""``hydra/launcher=ray``: Hydra instantiates plugins by the module they are defined in, which must lie in
``hydra_plugins``; the implementation is ``pipeline.ray_launcher.RayJobLauncher`` (Ray is imported there
only when a sweep launches)."""

from pipeline.ray_launcher import RayJobLauncher


class RayLauncher(RayJobLauncher):
    """Sweep and search jobs as Ray tasks, a worker process each (see ``pipeline.ray_launcher``)."""
