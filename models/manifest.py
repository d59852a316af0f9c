"""Manifests beside every exported model file: what it is, where it came
from, and its sha256. The server refuses a file that does not match."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import sha256_file, write_json_atomic

MANIFEST_SUFFIX = ".manifest.json"


class ManifestError(ShopTalkError):
    pass


@dataclass
class ModelManifest:
    file: str  # file name, relative to the manifest's folder
    sha256: str
    size: int
    kind: str  # "model" (full GGUF) or "adapter" (GGUF LoRA)
    base: str  # catalog key or path of the base model
    base_sha256: str | None = None
    quant: str | None = None
    run_id: str | None = None
    repo: str | None = None
    dataset_sha256: str | None = None
    tokenizer_sha256: str | None = None
    architecture: str | None = None
    eval: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def manifest_path(model_file: Path) -> Path:
    return model_file.with_name(model_file.name + MANIFEST_SUFFIX)


def write_manifest(model_file: Path, **fields: Any) -> ModelManifest:
    manifest = ModelManifest(
        file=model_file.name,
        sha256=sha256_file(model_file),
        size=model_file.stat().st_size,
        **fields,
    )
    write_json_atomic(manifest_path(model_file), asdict(manifest))
    return manifest


def read_manifest(model_file: Path) -> ModelManifest:
    path = manifest_path(model_file)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(
            f"{model_file} has no manifest ({path.name}); export it again with `shoptalk export`"
        ) from None
    except ValueError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); export the model again") from None
    known = set(ModelManifest.__dataclass_fields__)
    return ModelManifest(**{k: v for k, v in data.items() if k in known})


def verify_model_file(model_file: Path) -> ModelManifest:
    """The file's manifest, after checking the file's sha256 against it."""
    if not model_file.is_file():
        raise ManifestError(f"model file {model_file} does not exist")
    manifest = read_manifest(model_file)
    actual = sha256_file(model_file)
    if actual != manifest.sha256:
        raise ManifestError(
            f"{model_file} does not match its manifest (sha256 {actual[:12]}… != {manifest.sha256[:12]}…): "
            "the file is damaged or was replaced; export it again or roll back (`shoptalk models rollback`)"
        )
    return manifest
