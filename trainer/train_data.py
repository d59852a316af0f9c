"""What a training run learns from: the mined dataset read and checked, the
instance mix (kind weights, replay share), and the order of micro-batches.

The order is a pure function of (seed, step), so a resumed run sees exactly
the batches the killed run would have seen next.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoptalk.trainer.dataset_folder import (
    SPLITS,
    DatasetError,
    load_manifest,
    read_shard,
    shard_files,
)
from shoptalk.trainer.formats import INSTANCE_KINDS, Example

# Fewer training instances than this cannot teach anything measurable.
MIN_TRAIN_INSTANCES = 8

# Default weight of each instance kind in the SFT mix (`train.kind_weights`
# overrides): completion is the product; lookups and artifacts support it.
DEFAULT_KIND_WEIGHTS: dict[str, float] = {
    "completion": 1.0,
    "module_lookup": 1.0,
    "doc_modules": 0.5,
    "commit_message": 0.5,
    "test_pair": 0.5,
}

# Examples of similar length are batched together out of windows this many
# batches wide (less padding, still shuffled).
BUCKET_BATCHES = 32


@dataclass
class Dataset:
    directory: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def split(self, name: str) -> list[dict[str, Any]]:
        return self.records.get(name, [])


def load_dataset(directory: Path, repo: Path | None = None) -> Dataset:
    """Read `manifest.json` and the `<kind>.<split>.jsonl` shards; check that
    the dataset belongs to `repo` (when given)."""
    manifest = load_manifest(directory, repo)
    if repo is not None:
        check_dataset_repo(manifest.data, repo, directory)
    records: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for kind, split, shard in shard_files(directory):
        for record in read_shard(shard):
            record.setdefault("kind", kind)
            records[split].append(record)
    return Dataset(directory, manifest.data, manifest.sha256, records)


def check_dataset_repo(manifest: Mapping[str, Any], repo: Path, directory: Path) -> None:
    named = str(manifest.get("repo", ""))
    if not named or named.startswith("general:"):
        return
    if Path(named).expanduser().resolve() != repo.expanduser().resolve():
        raise DatasetError(
            f"the dataset at {directory} was mined from {named}, not {repo.resolve()}: "
            f"mine this repository with `shoptalk mine --repo {repo}`"
        )


def check_dataset_base(
    manifest: Mapping[str, Any], base_key: str, tokenizer_sha256: str, directory: Path
) -> None:
    """A dataset that records the base or tokenizer it was prepared for must
    match the one we train (token-level artifacts would not transfer)."""
    recorded_tok = manifest.get("tokenizer_sha256")
    if recorded_tok and recorded_tok != tokenizer_sha256:
        raise DatasetError(
            f"the dataset at {directory} was prepared with another tokenizer "
            f"({str(recorded_tok)[:12]}…, this base's is {tokenizer_sha256[:12]}…) "
            f"for base {manifest.get('base', '?')!r}: mine again for base {base_key!r}, "
            "or train with the base it was mined for (--base)"
        )
    recorded_base = manifest.get("base")
    if recorded_base and recorded_tok is None and recorded_base != base_key:
        raise DatasetError(
            f"the dataset at {directory} was prepared for base {recorded_base!r}, not "
            f"{base_key!r}: mine again, or train with --base {recorded_base}"
        )


def check_enough(count: int, directory: Path, what: str = "training") -> None:
    if count < MIN_TRAIN_INSTANCES:
        raise DatasetError(
            f"the dataset at {directory} has {count} usable {what} instance(s); training "
            f"needs at least {MIN_TRAIN_INSTANCES} (a few hundred to learn anything useful). "
            "Mine a longer history (`shoptalk mine --since ...`), include more kinds "
            "(mine.kinds), or lower mine.test_share"
        )


def kind_weights(overrides: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(overrides) - set(INSTANCE_KINDS))
    if unknown:
        raise DatasetError(
            f"train.kind_weights names unknown kind(s) {', '.join(unknown)}; known: "
            + ", ".join(INSTANCE_KINDS)
        )
    bad = sorted(k for k, v in overrides.items() if v < 0)
    if bad:
        raise DatasetError(f"train.kind_weights must not be negative ({', '.join(bad)})")
    return {**DEFAULT_KIND_WEIGHTS, **overrides}


def weighted_records(
    records: Sequence[Mapping[str, Any]], weights: Mapping[str, float], seed: int
) -> list[Mapping[str, Any]]:
    """Records repeated (weight > 1) or subsampled (weight < 1) per kind."""
    rng = random.Random(seed)
    by_kind: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_kind.setdefault(str(record.get("kind")), []).append(record)
    chosen: list[Mapping[str, Any]] = []
    for kind, items in sorted(by_kind.items()):
        weight = weights.get(kind, 1.0)
        whole, frac = int(weight), weight - int(weight)
        chosen += items * whole
        if frac > 0:
            # At least one of a kind with a positive weight stays in the mix.
            chosen += rng.sample(items, max(1, round(len(items) * frac)))
    return chosen


def replay_count(team_examples: int, share: float) -> int:
    """Replay examples so that they are `share` of the whole mix."""
    if share <= 0:
        return 0
    return max(1, round(team_examples * share / (1.0 - share)))


# With `ordered` examples (newest first), the first epoch keeps that order
# window by window, shuffled inside each window of this many examples.
ORDERED_WINDOW = 256


def epoch_micro_batches(
    examples: Sequence[Example], batch_size: int, seed: int, epoch: int, ordered: bool = False
) -> list[list[int]]:
    """One epoch's micro-batches (lists of example indices): shuffled, then
    bucketed by length inside windows so padding stays small. With `ordered`,
    the first epoch follows the given order at the scale of `ORDERED_WINDOW`
    examples (a budget that ends early has seen the front of the list)."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(examples)))
    coarse = ordered and epoch == 0
    if coarse:
        for start in range(0, len(order), ORDERED_WINDOW):
            part = order[start : start + ORDERED_WINDOW]
            rng.shuffle(part)
            order[start : start + ORDERED_WINDOW] = part
    else:
        rng.shuffle(order)
    if batch_size == 1:
        return [[i] for i in order]
    batches: list[list[int]] = []
    window = batch_size * BUCKET_BATCHES
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i]))
        bucketed = [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
        if coarse:
            rng.shuffle(bucketed)
        batches += bucketed
    if not coarse:
        rng.shuffle(batches)
    return batches


def newest_first(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Records by author date, newest first (undated ones last, in order)."""
    return sorted(records, key=lambda r: str(r.get("author_date") or ""), reverse=True)


def interleave(main: Sequence[Example], extra: Sequence[Example]) -> list[Example]:
    """`extra` spread evenly through `main`, both keeping their order."""
    if not extra:
        return list(main)
    merged: list[Example] = []
    step = (len(main) + len(extra)) / len(extra)
    slots = {int(k * step + step / 2) for k in range(len(extra))}
    mi, ei = iter(main), iter(extra)
    for position in range(len(main) + len(extra)):
        source = ei if position in slots else mi
        item = next(source, None)
        if item is None:
            item = next(ei if source is mi else mi)
        merged.append(item)
    return merged


class BatchSchedule:
    """Micro-batches for every optimizer step, epoch after epoch; step `s`
    always gets the same ones for the same seed (resume-safe)."""

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        grad_accum: int,
        seed: int,
        ordered: bool = False,
    ) -> None:
        self.examples = examples
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.ordered = ordered
        self._epochs: dict[int, list[list[int]]] = {}
        self.per_epoch = len(epoch_micro_batches(examples, batch_size, seed, 0, ordered))

    @property
    def steps_per_epoch(self) -> int:
        return max(1, -(-self.per_epoch // self.grad_accum))

    def _micro(self, index: int) -> list[int]:
        epoch, offset = divmod(index, self.per_epoch)
        if epoch not in self._epochs:
            self._epochs = {
                epoch: epoch_micro_batches(
                    self.examples, self.batch_size, self.seed, epoch, self.ordered
                )
            }
        return self._epochs[epoch][offset]

    def step(self, step: int) -> list[list[Example]]:
        """The micro-batches of optimizer step `step` (0-based)."""
        first = step * self.grad_accum
        return [[self.examples[i] for i in self._micro(first + k)] for k in range(self.grad_accum)]

    def __iter__(self) -> Iterator[list[list[Example]]]:
        step = 0
        while True:
            yield self.step(step)
            step += 1
