"""A training run's record: RunLogger (log.txt, results/metrics.jsonl, grids via save_grid) and the live
dashboards (`--logger`): TensorBoard and Weights & Biases, fed what metrics.jsonl gets.

    python training_vqgan.py --out-dir runs/x --logger tensorboard      # then: tensorboard --logdir runs/x
    python training_vqgan.py --out-dir runs/x --logger tensorboard,wandb  # or --logger tensorboard --logger wandb

What they get: every number of every metrics.jsonl record as the scalar `<stage>/<key>` at the record's
step (losses, lambda, codebook usage, perplexity, learning rate, images/s or tokens/s, validation metrics);
every grid a script saves as the image `<stage>/<file name without its number>` (rec_step, rec_epoch,
rec_final, transformer_epoch, transformer_final); and the run's config as hyper-parameters. Only rank 0
logs (loggers.RunLogger is disabled on the others). metrics.jsonl stays the record plots.py and tests read.

TensorBoard (torch.utils.tensorboard) writes to <out-dir>/tensorboard/<stage>/. A resumed run at step S
reopens that folder with purge_step S + 1: events an interrupted attempt wrote past its checkpoint are
dropped when the folder is read, as RunLogger.truncate_after drops them from metrics.jsonl, so each step
appears once. A fresh run purges from step 0, so a reused folder shows the new run only.

W&B (optional: `pip install wandb`; WANDB_MODE=offline works without an account) keeps its files in
<out-dir>/wandb/ and the run id in <out-dir>/wandb/<stage>_run_id.txt, which --resume continues.
WANDB_PROJECT names the project (default vqgan-pytorch). W&B never rewrites a step it already has, so
steps an interrupted attempt logged past the checkpoint keep their first values (resumes are exact).
"""

import atexit
import importlib.util
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import save_image

from cli import UserError

CHOICES = ("none", "tensorboard", "wandb")
_NUMBER = re.compile(r"\d+$")  # the step or epoch at the end of a grid's file name


def parse_names(values) -> list[str]:
    """The dashboards --logger asks for, from repeated flags and/or comma lists ('none' asks for none).
    UserError for an unknown name or a backend whose package is not installed."""
    names = []
    for value in [values] if isinstance(values, str) else values:
        for name in value.split(","):
            name = name.strip().lower()
            if name not in CHOICES and name:
                raise UserError(f"--logger {name!r}: choose from {', '.join(CHOICES)} (repeat the flag or give "
                                "a comma list, e.g. --logger tensorboard,wandb)")
            if name not in ("", "none") and name not in names:
                names.append(name)
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--logger tensorboard needs the tensorboard package: `pip install tensorboard`")
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise UserError("--logger wandb needs the wandb package: `pip install wandb` (WANDB_MODE=offline logs "
                        "without an account), or drop wandb from --logger")
    return names


def _hparam(value):
    """A config value as TensorBoard's hparams plugin takes it: numbers, strings and bools as they are,
    lists as their text."""
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


class TensorBoard:
    """Event files in log_dir, purged past the start step (see the module docstring)."""

    def __init__(self, log_dir: Path, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step > 0 else 0)
        # Into this run's own folder (SummaryWriter.add_hparams would start another run in a subfolder),
        # as Lightning's TensorBoardLogger does.
        for summary in hparams({k: _hparam(v) for k, v in config.items()}, {}):
            self.writer.file_writer.add_summary(summary, start_step)

    def scalars(self, values: dict, step: int):
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: np.ndarray, step: int):
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self):
        self.writer.close()


class WandB:
    """One W&B run per stage and run folder, continued on resume (see the module docstring)."""

    def __init__(self, out_dir: Path, stage: str, config: dict, start_step: int):
        import wandb

        self.wandb = wandb
        run_dir = out_dir / "wandb"
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / f"{stage}_run_id.txt"
        resume = start_step > 0 and id_file.is_file()
        run_id = id_file.read_text().strip() if resume else uuid.uuid4().hex[:8]  # W&B ids: [a-z0-9]
        id_file.write_text(run_id + "\n")
        name = out_dir.resolve().name
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vqgan-pytorch"), group=name,
                                  name=f"{name}-{stage}", job_type=stage, id=run_id, resume="allow",
                                  dir=str(out_dir))
        except wandb.errors.Error as e:  # not logged in, no network, ...
            raise UserError(f"--logger wandb: W&B did not start ({str(e).splitlines()[0]}); run `wandb login`, "
                            "or set WANDB_MODE=offline") from None
        self.run.config.update(config, allow_val_change=True)  # a resume may change e.g. --max-steps

    def scalars(self, values: dict, step: int):
        self.run.log(values, step=step)

    def image(self, tag: str, image: np.ndarray, step: int):
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self):
        self.run.finish()


class Dashboards:
    """The --logger dashboards of one stage of a run. loggers.RunLogger (attach) hands it every metrics
    record and grid; built on rank 0 only. With no names it does nothing."""

    def __init__(self, names, out_dir, stage: str, config: dict, start_step: int):
        self.stage = stage
        self.backends = []
        for name in parse_names(names):
            if name == "tensorboard":
                self.backends.append(TensorBoard(Path(out_dir) / "tensorboard" / stage, config, start_step))
            else:
                self.backends.append(WandB(Path(out_dir), stage, config, start_step))
        self._last_step = {}  # tag -> the last step it was logged at
        atexit.register(self.close)  # a run that stops on an error still flushes its events

    def metrics(self, record: dict):
        """A metrics.jsonl record ({"step": int, name: value, ...}): its numbers, as `<stage>/<name>`."""
        step = record["step"]
        values = {f"{self.stage}/{k}": float(v) for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        # One value per tag and step: an epoch's validation record repeats the epoch of the step's last
        # training record, and the final validation the epoch's own.
        values = {tag: v for tag, v in values.items() if self._last_step.get(tag) != step}
        self._last_step.update(dict.fromkeys(values, step))
        for backend in self.backends:
            backend.scalars(values, step)

    def image(self, path, step: int):
        """A grid PNG as saved (the scripts' save_grid output), as `<stage>/<file name without its number>`."""
        if not self.backends:
            return
        tag = f"{self.stage}/{_NUMBER.sub('', Path(path).stem)}"  # rec_step0000200 -> vqgan/rec_step
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
        for backend in self.backends:
            backend.image(tag, array, step)

    def close(self):
        """Flush and close every backend (safe to call twice)."""
        atexit.unregister(self.close)
        for backend in self.backends:
            backend.close()
        self.backends = []


# ----------------------------------------------------------------------------- the run's own record

class RunLogger:
    """Rank-0 logging: messages to stdout and <out>/log.txt, metrics to <out>/results/metrics.jsonl, and
    metrics and grids to the live dashboards attached (loggers.Dashboards, from --logger)."""

    def __init__(self, out_dir, stage: str, enabled: bool = True):
        self.out_dir, self.stage, self.enabled = Path(out_dir), stage, enabled
        self.results = self.out_dir / "results"
        self.metrics_path = self.results / "metrics.jsonl"
        self.dashboards = None
        if enabled:
            self.results.mkdir(parents=True, exist_ok=True)

    def attach(self, dashboards):
        """Send every later metrics record and grid to `dashboards` too (an object with metrics(record),
        image(path, step) and close(), e.g. loggers.Dashboards)."""
        self.dashboards = dashboards

    def log(self, msg: str):
        if not self.enabled:
            return
        from tqdm import tqdm
        tqdm.write(msg)
        with open(self.out_dir / "log.txt", "a") as f:
            f.write(msg + "\n")

    def metrics(self, record: dict):
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"stage": self.stage, **record}) + "\n")
        if self.dashboards is not None:
            self.dashboards.metrics(record)

    def image(self, path, step: int):
        """A grid just saved at `path` (PNG), for the dashboards."""
        if self.enabled and self.dashboards is not None:
            self.dashboards.image(path, step)

    def close(self):
        """Flush and close the dashboards."""
        if self.dashboards is not None:
            self.dashboards.close()

    def truncate_after(self, step: int):
        """On resume, drop this stage's records past the resumed step so the file reads as one run."""
        if not self.enabled or not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not (r.get("stage") == self.stage and r.get("step", 0) > step):
                keep.append(line)
        self.metrics_path.write_text("".join(line + "\n" for line in keep))


def save_grid(rows: list[torch.Tensor], path, nrow: int | None = None):
    """Stack equal-sized image batches (each (B, 3, H, W) in [-1, 1]) as grid rows, mapped to [0, 1]."""
    images = torch.cat([r.detach().float().cpu() for r in rows])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=nrow or rows[0].shape[0], normalize=True, value_range=(-1, 1), padding=2)
