"""The README and the docs say what the code does: commands compose, generated pages are fresh, no diary."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from pipeline import CONF_DIR
from pipeline.tools import config_docs

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# words that speak to the people who wrote a page, not to its reader
DIARY = re.compile(r"\bissue\b|\bissue's\b|\b(this|last|previous|next|earlier) sessions?\b|\bpreviously\b|"
                   r"\bprevious (rewrite|run|version)\b|\bno longer\b|\bused to be\b|\bthe default before\b|"
                   r"\bwe fixed\b|\bnow (uses|gives|runs|is)\b",
                   re.IGNORECASE)


def _bash_commands(text: str) -> list[str]:
    """Every command line of the fenced ``bash`` blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _pipeline_args(command: str) -> list[str] | None:
    """The arguments after ``-m pipeline`` (plain or under torchrun); None for other commands."""
    tokens = shlex.split(command)
    for i, token in enumerate(tokens[:-1]):
        if token == "-m" and tokens[i + 1] == "pipeline":
            return tokens[i + 2:]
    return None


README_COMMANDS = _bash_commands(README.read_text())
PIPELINE_COMMANDS = [c for c in README_COMMANDS if _pipeline_args(c) is not None]


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move reference material to docs/"
    head = "\n".join(lines[:60])
    for command in ('pip install -c .ci/constraints.txt -e ".[dev]"', "python -m pipeline\n",
                    "ruff check . && python -m pytest -q"):
        assert command in head, f"{command.strip()!r} is not in the README's first 60 lines"


def test_readme_commands_run_as_written():
    """No ``<placeholder>`` (a shell redirection) in a command a reader copies."""
    for command in README_COMMANDS:
        assert not re.search(r"[<>]", command), f"{command!r}: write a real value, not <placeholder>"


def test_ci_installs_and_tests_as_the_readme_says():
    ci = (ROOT / ".ci" / "run").read_text()
    install, test = README_COMMANDS[0], README_COMMANDS[2]
    assert install.startswith("pip install") and install in ci
    for part in test.split(" && "):
        assert part in ci, f"CI does not run the README's {part!r}"


@pytest.mark.parametrize("command", PIPELINE_COMMANDS, ids=range(len(PIPELINE_COMMANDS)))
def test_readme_pipeline_commands_compose(command, tmp_path):
    """Each ``python -m pipeline ...`` of the README composes (every sweep value too)."""
    args = _pipeline_args(command)
    flags = {"--config-path": None, "--config-name": "config", "--config-dir": None}
    overrides = []
    it = iter(args)
    for arg in it:
        if arg in flags:
            flags[arg] = next(it)
        elif arg in ("-m", "--multirun"):
            continue
        else:
            overrides.append(arg)
    if flags["--config-dir"]:  # run as a subprocess below (test_readme_user_preset)
        return
    config_dir = CONF_DIR
    if flags["--config-path"]:  # reproduce: a run's saved .hydra/config.yaml
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            saved = compose(config_name="config", overrides=["experiment=tiny"])
        config_dir = tmp_path / ".hydra"
        config_dir.mkdir()
        OmegaConf.save(saved, config_dir / "config.yaml")
    variants = [[]]
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            values = [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            variants = [v + [value] for v in variants for value in values]
        else:
            variants = [v + [o.input_line] for v in variants]
    for variant in variants:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name=flags["--config-name"], overrides=variant, return_hydra_config=True)
        assert "pipeline" in cfg and "hydra" in cfg, command


def _run(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_readme_user_preset(tmp_path):
    """The README's own-preset recipe: its YAML file in a folder of yours, found with --config-dir."""
    text = README.read_text()
    block = re.search(r"```yaml\n# (my_conf/\S+)\n(.*?)```", text, re.S)
    preset = tmp_path / block.group(1)
    preset.parent.mkdir(parents=True)
    preset.write_text(block.group(2))
    command = next(c for c in PIPELINE_COMMANDS if "--config-dir" in c)
    out = _run(*shlex.split(command)[2:], "--cfg", "job", cwd=tmp_path)
    cfg = yaml.safe_load(out)
    assert cfg["model"]["name"] == "mobilenet_v2" and cfg["prune"]["ratio"] == 0.5


def test_help_lists_presets_groups_and_commands(tmp_path):
    out = _run("pipeline", "--help", cwd=tmp_path)
    for preset in (CONF_DIR / "experiment").glob("*.yaml"):
        assert f"\n  {preset.stem} " in out, f"--help does not list experiment={preset.stem}"
    for group in ("data", "model", "paths"):
        assert f"\n  {group} " in out
    assert "\n  model   resnet20 | " in out  # the default option first
    assert "python -m pipeline -m prune.ratio=0.3,0.5,0.7" in out


def test_predict_flags_of_the_readme_exist(tmp_path):
    out = _run("pipeline.predict", "--help", cwd=tmp_path)
    for command in README_COMMANDS:
        if "pipeline.predict" in command:
            for flag in re.findall(r"\s(--[a-z-]+)", command):
                assert flag in out, f"pipeline.predict has no {flag}"


def test_generated_pages_are_fresh():
    """docs/configuration.md and --help are generated from conf/; edit the YAML, then regenerate."""
    assert config_docs.DOC.read_text() == config_docs.render_doc(), \
        "docs/configuration.md is stale: python -m pipeline.tools.config_docs"
    assert config_docs.HELP.read_text() == config_docs.render_help(), \
        "conf/hydra/help/pipeline.yaml is stale: python -m pipeline.tools.config_docs"


def test_config_reference_documents_every_stage_key():
    doc = config_docs.DOC.read_text()
    for path in (CONF_DIR / "stages").glob("*.yaml"):
        for key in yaml.safe_load(path.read_text()):
            assert f"| `{path.stem}.{key}` |" in doc, f"{path.stem}.{key} is missing from docs/configuration.md"


def test_config_docs_parses_comments():
    src = CONF_DIR / "stages" / "prune.yaml"
    cf = config_docs.parse(src)
    entries = {e.key: e for e in cf.entries}
    assert entries["ratio"].value == "0.3" and "fraction REMOVED" in entries["ratio"].comment[0]
    assert len(entries["round_to"].comment) == 2  # the indented line under it continues its comment
    assert entries["epochs"].note and "final fine-tune" in entries["epochs"].note


def test_docs_site_lists_every_page():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))["nav"]

    def pages(items) -> list[str]:
        out = []
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            out += pages(value) if isinstance(value, list) else [value]
        return out

    listed = set(pages(nav))
    present = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert present == listed, f"pages not in mkdocs.yml: {present - listed}; missing: {listed - present}"
    assert len(present) >= 4


def test_no_diary_wording():
    for page in [README, ROOT / "CHANGELOG.md", ROOT / "CONTRIBUTING.md", *DOCS.rglob("*.md")]:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            assert not DIARY.search(line), f"{page.relative_to(ROOT)}:{n}: {line.strip()[:100]}"


def test_tables_end_before_the_next_block():
    """A Markdown table takes every following line up to a blank one as a row: a list item right after a table
    renders as a row of it."""
    for page in [README, *DOCS.rglob("*.md")]:
        lines = page.read_text().splitlines()
        for n, (line, after) in enumerate(zip(lines, lines[1:], strict=False), 1):
            if line.lstrip().startswith("|") and after.strip() and not after.lstrip().startswith("|"):
                raise AssertionError(f"{page.relative_to(ROOT)}:{n + 1}: a blank line must end the table above")
