"""One module per pipeline stage; ``REGISTRY`` maps stage names to modules (see pipeline.stage)."""

from stages import distill, export, prune, qat, train, validate

REGISTRY = {m.NAME: m for m in (train, prune, distill, qat, export, validate)}
