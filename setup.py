"""Build hook: the wheel ships the repository's top-level ``conf/`` tree as ``pipeline/conf``.

Everything else about the package is in ``pyproject.toml``. ``conf/`` stays the one source of truth in the
repository; an editable install reads it in place (``pipeline.CONF_DIR``).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithConf(build_py):
    """``build_py`` that also copies ``conf/**/*.yaml`` into ``<build>/pipeline/conf``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        src = ROOT / "conf"
        for path in sorted(src.rglob("*.yaml")):
            target = Path(self.build_lib) / "pipeline" / "conf" / path.relative_to(src)
            self.mkpath(str(target.parent))
            self.copy_file(str(path), str(target))


setup(cmdclass={"build_py": BuildPyWithConf})
