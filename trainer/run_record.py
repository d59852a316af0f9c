"""The folder of one training run and what it records.

    runs/<run_id>/
        config.json        resolved settings (and the command that ran)
        record.json        status, base id + sha, tokenizer hash, dataset
                           manifest sha256, seed, versions, throughput, wall
                           time, losses
        loss.csv, loss.png the loss curve (train and validation)
        checkpoints/       step-N/ folders and latest.json (resumable)
        adapter/           the PEFT adapter, present only when complete
        measured-adapter/  the measured checkpoint, when a final pass made adapter/
        export/            model-<quant>.gguf, adapter-<type>.gguf (`shoptalk export`),
                           measured-adapter-<type>.gguf (with a final pass)

`RunFolder` owns these paths: no other module spells them out. Every file
is written atomically; `record.json` says `complete` only after the adapter
is in place and validated. `RunFolder.load_record` is the one reader of
`record.json` (a typed `RunRecord`); training writes the record as a dict
(its keys: docs/architecture.md, Runs) and reads it back with `read_record`.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import write_json_atomic, write_text_atomic

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"
# Stopped by the user (Ctrl-C) after saving a checkpoint; `--resume` goes on.
STATUS_INTERRUPTED = "interrupted"

# Runs trained before `purpose` was recorded are the team's.
DEFAULT_PURPOSE = "org"
EXPORT_DIR = "export"

LOSS_COLUMNS = ("phase", "step", "tokens", "elapsed_s", "lr", "train_loss", "val_loss")

_VERSIONED = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "tokenizers",
    "shoptalk",
)


@dataclass(frozen=True)
class LossRow:
    phase: str
    step: int
    tokens: int
    elapsed_s: float
    lr: float
    train_loss: float | None
    val_loss: float | None

    def as_list(self) -> list[str]:
        def fmt(v: float | None) -> str:
            return "" if v is None else f"{v:.6g}"

        return [
            self.phase,
            str(self.step),
            str(self.tokens),
            f"{self.elapsed_s:.2f}",
            f"{self.lr:.3g}",
            fmt(self.train_loss),
            fmt(self.val_loss),
        ]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LossRow:
        def num(key: str) -> float | None:
            value = data.get(key)
            return None if value is None else float(value)

        return cls(
            phase=str(data["phase"]),
            step=int(data["step"]),
            tokens=int(data["tokens"]),
            elapsed_s=float(data["elapsed_s"]),
            lr=float(data["lr"]),
            train_loss=num("train_loss"),
            val_loss=num("val_loss"),
        )


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


class RunRecordError(ShopTalkError):
    pass


@dataclass(frozen=True)
class RunRecord:
    """A run's `record.json` as read: the fields other stages decide on, and
    the whole record as written (`data`, unchanged, for everything else)."""

    run_id: str
    status: str | None
    purpose: str
    developer: str | None
    repo: str | None
    data: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], run_id: str) -> RunRecord:
        """`run_id`: the folder's name, used when the record names none."""

        def text(key: str) -> str | None:
            value = data.get(key)
            return None if value is None else str(value)

        return cls(
            run_id=text("run_id") or run_id,
            status=text("status"),
            purpose=text("purpose") or DEFAULT_PURPOSE,
            developer=text("developer"),
            repo=text("repo"),
            data=data,
        )

    @property
    def complete(self) -> bool:
        return self.status == STATUS_COMPLETE


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def config_file(self) -> Path:
        return self.root / "config.json"

    @property
    def record_file(self) -> Path:
        return self.root / "record.json"

    @property
    def loss_csv(self) -> Path:
        return self.root / "loss.csv"

    @property
    def loss_png(self) -> Path:
        return self.root / "loss.png"

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def measured_adapter_dir(self) -> Path:
        """The checkpoint that was chosen and measured, when a final pass over
        the held-out windows made the served `adapter/` from it."""
        return self.root / "measured-adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest_file(self) -> Path:
        return self.checkpoints_dir / "latest.json"

    @property
    def export_dir(self) -> Path:
        return self.root / EXPORT_DIR

    def exported_models(self) -> list[Path]:
        """The merged models `shoptalk export` wrote (`model-<quant>.gguf`), by name."""
        return sorted(self.export_dir.glob("model-*.gguf"))

    def exported_adapters(self) -> list[Path]:
        """The run-time adapters `shoptalk export --adapter-only` wrote, by name."""
        return sorted(self.export_dir.glob("adapter-*.gguf"))

    def exported_measured_adapters(self) -> list[Path]:
        """The measured checkpoint's adapter (`measured-adapter-<type>.gguf`)
        that `shoptalk export` writes for a run with a final pass, by name."""
        return sorted(self.export_dir.glob("measured-adapter-*.gguf"))

    def load_record(self) -> RunRecord:
        """The run's record; `RunRecordError` (saying what to do) when the
        folder has none or it is not a JSON object."""
        try:
            data = json.loads(self.record_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunRecordError(
                f"{self.root} has no record.json: it is not a training run folder"
            ) from None
        except ValueError as exc:
            raise RunRecordError(
                f"{self.record_file} is not valid JSON ({exc}); the run folder is damaged"
            ) from None
        if not isinstance(data, dict):
            raise RunRecordError(
                f"{self.record_file} holds no run record; the run folder is damaged"
            )
        return RunRecord.from_dict(data, self.run_id)

    def read_record(self) -> dict[str, Any]:
        """The record as written, to update it; {} when there is none (yet)."""
        try:
            return self.load_record().data
        except RunRecordError:
            return {}

    def is_complete(self) -> bool:
        try:
            return self.load_record().complete
        except RunRecordError:
            return False

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.config_file, config)

    def write_record(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.record_file, record)

    def write_losses(self, rows: list[LossRow]) -> None:
        """The loss curve as CSV and, when matplotlib is present, a PNG plot."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(LOSS_COLUMNS)
        for row in rows:
            writer.writerow(row.as_list())
        write_text_atomic(self.loss_csv, buffer.getvalue())
        plot_losses(rows, self.loss_png)


def run_folders(runs_dir: Path) -> list[RunFolder]:
    """Every run folder of a store's `runs/` (none when it does not exist)."""
    if not runs_dir.is_dir():
        return []
    return [RunFolder(path) for path in sorted(runs_dir.iterdir()) if path.is_dir()]


def read_losses(path: Path) -> list[LossRow]:
    if not path.is_file():
        return []
    rows: list[LossRow] = []
    with path.open(newline="") as handle:
        for raw in csv.DictReader(handle):

            def num(key: str, raw: dict[str, str] = raw) -> float | None:
                value = raw.get(key, "")
                return float(value) if value else None

            rows.append(
                LossRow(
                    phase=raw["phase"],
                    step=int(raw["step"]),
                    tokens=int(raw["tokens"]),
                    elapsed_s=float(raw["elapsed_s"]),
                    lr=float(raw["lr"]),
                    train_loss=num("train_loss"),
                    val_loss=num("val_loss"),
                )
            )
    return rows


def plot_losses(rows: list[LossRow], out: Path) -> bool:
    """Train loss (per step) and validation loss (markers) against steps;
    False when matplotlib is not installed (the CSV is the record)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for phase, style in (("pretrain", "tab:gray"), ("sft", "tab:blue")):
        train = [(r.step, r.train_loss) for r in rows if r.phase == phase and r.train_loss]
        if train:
            ax.plot(*zip(*train, strict=True), color=style, lw=1, label=f"train ({phase})")
        val = [(r.step, r.val_loss) for r in rows if r.phase == phase and r.val_loss is not None]
        if val:
            ax.plot(
                *zip(*val, strict=True), "o-", color="tab:orange", label=f"validation ({phase})"
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per answer token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    from shoptalk.models.files import atomic_open

    with atomic_open(out, "wb") as handle:
        handle.write(buffer.getvalue())
    return True


def command_line() -> str:
    return " ".join(sys.argv)
