"""``hydra/sweeper=pareto``: Hydra instantiates plugins by the module they are defined in, which must lie
in ``hydra_plugins``; the implementation is ``pipeline.search.SearchSweeper``."""

from pipeline.search import SearchSweeper


class ParetoSweeper(SearchSweeper):
    """Multi-objective search over pipeline settings (see ``pipeline.search``)."""
