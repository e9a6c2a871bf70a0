"""One module per pipeline stage; ``REGISTRY`` maps stage names to modules (see pipeline.stage)."""

from stages import export, train, validate

REGISTRY = {m.NAME: m for m in (train, export, validate)}
