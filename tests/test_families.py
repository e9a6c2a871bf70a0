"""The families package: every family module registers something, and the core finds it through the registries."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from pipeline import families

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.stem for p in (ROOT / "pipeline" / "families").glob("*.py") if not p.stem.startswith("_"))


def test_every_family_module_is_listed_once():
    assert sorted(families.FAMILIES) == MODULES and len(set(families.FAMILIES)) == len(families.FAMILIES)


@pytest.mark.parametrize("name", MODULES)
def test_every_family_module_registers_something(name):
    importlib.import_module(f"pipeline.families.{name}")
    assert families.registered().get(f"pipeline.families.{name}"), f"{name} registers no hook"


def test_the_core_reads_the_families_hooks():
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    from pipeline import quant

    assert ("timm.models.mvitv2", "cal_rel_pos_type") in families.whole_functions()
    assert any(r.sized and r.matches(ShiftedWindowAttention(32, [7, 7], [3, 3], 2)) for r in families.attentions())
    assert quant.window_attention_bias is families.graph_functions()["window_attention_bias"]
    assert families.analysable_forms() and families.kept_width_rules() and families.plain_layers()
