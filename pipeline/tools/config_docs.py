"""Generate the configuration reference and ``--help`` from the commented YAML in ``conf/``.

    python -m pipeline.tools.config_docs            # write docs/configuration.md and conf/hydra/help/pipeline.yaml
    python -m pipeline.tools.config_docs --check    # exit 1 when either is stale (a test runs this)

The YAML files are the one place a knob is defined and explained: each key's trailing comment (and the
indented comment lines under it) is its description, a file's leading comment block its introduction,
and the first sentence of a preset's introduction its line in ``--help``.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import CONF_DIR

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"
HELP = CONF_DIR / "hydra" / "help" / "pipeline.yaml"
_KEY = re.compile(r"^(\s*)([A-Za-z_][\w@/.\-]*|/[\w/.\-]*):(?:\s+(.*))?$")
_ITEM = re.compile(r"^(\s*)-\s+(.*)$")
# group folder -> where its keys land in the composed config
_GROUPS = {"data": "data", "model": "model", "paths": "paths", "logger": "logger"}
COMMANDS = (
    ("python -m pipeline", "every stage on the embedded CIFAR-10 subset (no download)"),
    ("python -m pipeline experiment=tiny", "the whole chain in about a minute (smoke test)"),
    ("python -m pipeline stage=distill", "one stage; missing upstream artifacts are built first"),
    ("python -m pipeline -m prune.ratio=0.3,0.5,0.7", "a sweep: one job per ratio, the baseline trained once"),
    ("python -m pipeline model=timm model.name=NAME", "any timm model (model.weights=FILE: your weights)"),
)


@dataclass
class Entry:
    key: str  # dotted, relative to the file's package
    value: str
    comment: list[str] = field(default_factory=list)
    note: str | None = None  # a section comment printed before this entry


@dataclass
class ConfFile:
    path: Path
    intro: list[str]
    entries: list[Entry]

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def summary(self) -> str:
        """The first sentence of the introduction (one line of ``--help``)."""
        text = " ".join(line.strip() for line in self.intro if not line.lstrip().startswith("python "))
        depth, end = 0, len(text)
        for i, ch in enumerate(text):
            depth += (ch == "(") - (ch == ")")
            if depth == 0 and ch in ".:;" and (i + 1 == len(text) or text[i + 1] == " "):
                end = i
                break
        first = text[:end]
        return first if len(first) <= 96 else first[:93].rsplit(" ", 1)[0] + " ..."


def _split_comment(text: str) -> tuple[str, str | None]:
    """``value  # comment`` -> (value, comment), ignoring ``#`` inside quotes and brackets."""
    depth, quote = 0, None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "#" and depth == 0 and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip(), text[i + 1:].strip()
    return text.rstrip(), None


def _join_flow_values(lines: list[str]) -> list[str]:
    """Join a ``[...]`` / ``{...}`` value written over several lines into its first line."""
    out: list[str] = []
    for line in lines:
        if out and not line.lstrip().startswith("#"):
            value = _split_comment(out[-1].split(":", 1)[-1])[0]
            if value.count("[") + value.count("{") > value.count("]") + value.count("}"):
                head, comment = _split_comment(out[-1])
                tail, comment2 = _split_comment(line.strip())
                joined = f"{head} {tail}"
                out[-1] = f"{joined}  # {comment2 or comment}" if (comment2 or comment) else joined
                continue
        out.append(line)
    return out


def parse(path: Path) -> ConfFile:
    """Read one YAML file of ``conf/`` into its introduction and its keys with their comments."""
    lines = path.read_text().splitlines()
    intro: list[str] = []
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        text = lines[i][1:]
        if not text.strip().startswith("@package"):
            intro.append(text[1:] if text.startswith(" ") else text)
        i += 1
    entries: list[Entry] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    last: Entry | None = None
    last_indent = -1
    note: str | None = None
    body = _join_flow_values(lines[i:])
    for line in body:
        if not line.strip():
            last = None
            continue
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if stripped.startswith("#"):
            text = stripped[1:].strip()
            if last is not None and indent > last_indent:
                last.comment.append(text)  # continuation of the key above
            else:
                note = text
                last = None
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        prefix = ".".join(k for _, k in stack)
        if m := _ITEM.match(line):
            value, comment = _split_comment(m.group(2))
            last = Entry(prefix, value, [comment] if comment else [], note)  # "- data: embedded" (defaults)
        elif m := _KEY.match(line):
            value, comment = _split_comment(m.group(3) or "")
            key = f"{prefix}.{m.group(2)}" if prefix else m.group(2)
            last = Entry(key, value, [comment] if comment else [], note)
            if not value:
                stack.append((indent, m.group(2)))
        else:
            continue
        note = None
        last_indent = indent
        entries.append(last)
    # a mapping with keys under it is documented by its keys, unless it has a comment of its own
    parents = {e.key for e in entries for other in entries if other.key.startswith(e.key + ".")}
    listed = {e.key for e in entries if e.key and any(o.key == e.key and o is not e for o in entries)}
    entries = [e for e in entries if (e.key not in parents and not (e.key in listed and not e.value))
               or e.comment or e.note]
    return ConfFile(path, intro, entries)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _intro_md(intro: list[str]) -> list[str]:
    """Prose lines as a paragraph, indented command lines as a bash block."""
    out, prose, code = [], [], []
    for line in intro:
        if line.startswith("  ") and line.strip():
            code.append(line.strip())
        else:
            prose.append(line.strip())
    if prose:
        out += [" ".join(p for p in prose if p), ""]
    if code:
        out += ["```bash", *code, "```", ""]
    return out


def _table(cf: ConfFile, prefix: str) -> list[str]:
    out: list[str] = []
    header = ["| key | value | meaning |", "|---|---|---|"]
    open_table = False
    for e in cf.entries:
        if e.note:
            out += ["", f"*{e.note}*", ""] if open_table else [f"*{e.note}*", ""]
            open_table = False
        if not open_table:
            out += header
            open_table = True
        key = e.key if e.key.startswith("defaults") else f"{prefix}{e.key}"
        value = f"`{_cell(e.value)}`" if e.value else ""
        out.append(f"| `{_cell(key)}` | {value} | {_cell(' '.join(e.comment))} |")
    return [*out, ""]


def _defaults(root: ConfFile) -> dict[str, str]:
    """Group -> default option, from the root config's defaults list (``- data: embedded``)."""
    pairs = (e.value.split(": ", 1) for e in root.entries if e.key == "defaults" and ": " in e.value)
    return {group: option for group, option in pairs}


def _files(group: str) -> list[ConfFile]:
    return [parse(p) for p in sorted((CONF_DIR / group).glob("*.yaml"))]


def render_doc() -> str:
    """``docs/configuration.md``."""
    root = parse(CONF_DIR / "config.yaml")
    defaults = _defaults(root)
    out = ["# Configuration reference", "",
           "<!-- generated by `python -m pipeline.tools.config_docs` from the comments in conf/; do not edit -->", "",
           "Every knob lives in one YAML file under `conf/`, with its comment; this page is generated from",
           "those files. Override any key on the command line (`prune.ratio=0.5`), pick a file of a group",
           "(`model=mobilenet_v2`, `experiment=tiny`), print the composed result with `--cfg job`:", "",
           "```bash", "python -m pipeline experiment=tiny prune.ratio=0.5 --cfg job", "```", "",
           "Your own presets: put `experiment/<name>.yaml` (or `model/`, `data/`, ...) in a folder of your own and "
           "add it to the search path with `--config-dir`, e.g. `python -m pipeline --config-dir my_conf "
           "experiment=my_preset`; a file there is found beside the shipped ones.", "",
           "## Root: `conf/config.yaml`", "", *_intro_md(root.intro), *_table(root, "")]
    stage_files = [p for p in _files("stages")]
    out += ["## Stages: `conf/stages/`", "",
            "Each stage's knobs sit at its own key (`train.*`, `prune.*`, ...), whichever stage is run.", ""]
    for cf in stage_files:
        out += [f"### `{cf.name}.*`", "", *_intro_md(cf.intro), *_table(cf, f"{cf.name}.")]
    for group, title in (("data", "Data"), ("model", "Models"), ("paths", "Paths"), ("logger", "Experiment tracking")):
        out += [f"## {title}: `{group}=`", ""]
        for cf in _files(group):
            default = " (default)" if defaults.get(group) == cf.name else ""
            out += [f"### `{group}={cf.name}`{default}", "", *_intro_md(cf.intro), *_table(cf, f"{_GROUPS[group]}.")]
    out += ["## Presets: `experiment=`", "",
            "A preset holds only what differs from the defaults; keys are given from the config's root.", ""]
    for cf in _files("experiment"):
        out += [f"### `experiment={cf.name}`", "", *_intro_md(cf.intro), *_table(cf, "")]
    out += ["## Searches: `-m search=`", ""]
    for cf in _files("search"):
        out += [f"### `search={cf.name}`", "", *_intro_md(cf.intro), *_table(cf, "")]
    for cf in _files("hydra/sweeper"):
        out += [f"### `hydra/sweeper={cf.name}`", "", *_intro_md(cf.intro), *_table(cf, "hydra.sweeper.")]
    out += ["## Launchers: `hydra/launcher=`", "",
            "Hydra's own launchers (`basic`, `joblib`, `submitit_slurm`, `submitit_local`) are configured as Hydra "
            "documents them; the project's:", ""]
    for cf in _files("hydra/launcher"):
        out += [f"### `hydra/launcher={cf.name}`", "", *_intro_md(cf.intro), *_table(cf, "hydra.launcher.")]
    return "\n".join(out).rstrip() + "\n"


def render_help() -> str:
    """``conf/hydra/help/pipeline.yaml``: Hydra's ``--help`` template, listing presets and groups."""
    root = parse(CONF_DIR / "config.yaml")
    defaults = _defaults(root)
    width = max(len(c) for c, _ in COMMANDS) + 2
    lines = ["compress-pipeline: train -> prune -> distill -> qat -> export -> validate for image classifiers;",
             "every artifact under outputs/, one report per run (report.md, report.json, report.png).", "",
             "Usage: python -m pipeline [GROUP=OPTION ...] [KEY=VALUE ...]", "", "Common commands:"]
    lines += [f"  {c.ljust(width)}{what}" for c, what in COMMANDS]

    def listing(title: str, files: list[ConfFile]) -> list[str]:
        w = max(len(cf.name) for cf in files) + 2
        return ["", title, *(f"  {cf.name.ljust(w)}{cf.summary}" for cf in files if cf.name != "base")]

    lines += listing("Presets (experiment=NAME):", _files("experiment"))
    lines += listing("Searches (-m search=NAME):", _files("search"))
    lines += ["", "Config groups (GROUP=OPTION; the default first):"]
    for group in ("data", "model", "paths", "logger"):
        names = [cf.name for cf in _files(group)]
        names.sort(key=lambda n: n != defaults.get(group))
        lines.append(f"  {group.ljust(8)}{' | '.join(names)}")
    lines.append(f"  {'stages'.ljust(8)}each stage's knobs at its own key: "
                 + ", ".join(f"{cf.name}.*" for cf in _files("stages")))
    lines += ["", "Print the composed config: python -m pipeline [overrides] --cfg job",
              "Every key with its meaning: docs/configuration.md (configuration reference)",
              "Hydra's own flags (-m, --cfg, --config-dir, ...): python -m pipeline --hydra-help"]
    body = "\n".join(f"  {line}" if line else "" for line in lines)
    return ("# `python -m pipeline --help`. Generated by `python -m pipeline.tools.config_docs` from conf/\n"
            "# (a preset's line is the first sentence of its leading comment); do not edit.\n"
            "app_name: compress-pipeline\nheader: ''\nfooter: ''\ntemplate: |-\n" + body + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated file is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in ((DOC, render_doc()), (HELP, render_help())):
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    for path in stale:
        print(f"error: {path.name} is stale; run python -m pipeline.tools.config_docs", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
