"""timm's MViTv2: its relative positions added to q @ k^T write into a tensor in place (fx cannot trace
``x[...] = y``), so the function is one float op in the traced graph."""

from __future__ import annotations

from pipeline import families

families.whole_function("timm.models.mvitv2", "cal_rel_pos_type")
