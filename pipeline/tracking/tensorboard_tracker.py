"""TensorBoard (``logger=tensorboard``): event files in the run folder, so ``tensorboard --logdir outputs``
shows every run (a sweep's jobs are folders of the sweep).

The only module of the pipeline that imports ``torch.utils.tensorboard`` (which needs the ``tensorboard``
package: ``pip install -e '.[tensorboard]'``). Scalars are the same names and steps as MLflow's; the config
and the tags are text, the report's plot an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.tracking.base import RunInfo, Tracker


@dataclass
class Settings:
    """``conf/logger/tensorboard.yaml`` (``logger.tensorboard.*``)."""

    log_dir: str  # the event files' folder inside the run folder


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.writer = None
        self.log_dir: Path | None = None
        self.run_dir: Path | None = None
        self.tags: dict[str, str] = {}

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run.run_dir)
        self.log_dir = self.run_dir / self.settings.log_dir
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        indented = "\n".join("    " + line for line in run.config_yaml.splitlines())  # Markdown code block
        self.writer.add_text("config", indented, 0)
        self.set_tags(run.tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)  # written once, as a table, when the run finishes

    def log_file(self, path: Path, folder: str | None = None) -> None:
        """The files are in the run folder already; TensorBoard shows no files."""

    def log_image(self, path: Path, name: str) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            self.writer.add_image(name, np.asarray(im.convert("RGB")), 0, dataformats="HWC")

    def finish(self, status: str, error: str | None = None) -> None:
        rows = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in self.tags.items())
        self.writer.add_text("tags", f"| tag | value |\n|---|---|\n{rows}", 0)
        if error:
            self.writer.add_text("error", f"{status}: {error}", 0)
        self.writer.close()

    def info(self) -> dict:
        return {"backend": self.name, "uri": str(self.log_dir), "run_id": self.run_dir.name if self.run_dir else None}

    def open_hint(self) -> str:
        return f"tensorboard --logdir {self.log_dir}"
