"""Training throughput: `shoptalk train` against a naive loop, same run.

Both train LoRA on the same token sequences (FIM completion instances cut from
general code — the replay corpus, so no mined repository is needed) with the
same real base model:

* ours: `shoptalk.trainer.train.train_adapter` with its defaults (answer-only
  logits, bf16 where the CPU has it, LoRA on every projection of the upper
  half of the layers on CPU, batch 1 with gradient accumulation 4); tokens/s
  from its run record (training steps only); `ours-fp32` forces fp32,
  `ours-all-layers` puts LoRA on every layer;
* naive: plain `transformers.Trainer` + peft with default settings
  (`LoraConfig(task_type="CAUSAL_LM")`, fp32, full-vocabulary loss on every
  position), batch 1; tokens/s over the same number of sequences.

Each part runs in its own process so its peak RSS is its own. Prints each
figure and the ratio to the naive baseline.

    nice -n 10 .venv/bin/python bench/bench_train.py --base /tmp/gemma-hf --sequences 32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PARTS = ("ours", "ours-fp32", "ours-all-layers", "naive")


PREFIX_CHARS = 1000


def _records(count: int, seed: int) -> list[dict[str, Any]]:
    from shoptalk.trainer.replay import replay_records

    records = replay_records(count, prefix_chars=PREFIX_CHARS, suffix_chars=200, seed=seed)
    for k, r in enumerate(records):
        r.update(
            {
                "id": f"bench-{k}",
                "commit": "",
                "author_id": "bench",
                "author_date": "2025-06-01T00:00:00Z",
            }
        )
    return records


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(
    base: str, sequences: int, seed: int, variant: str, threads: int | None
) -> dict[str, Any]:
    from shoptalk.models.settings import Settings, TrainSettings
    from shoptalk.models.store import RepoStore
    from shoptalk.trainer.run_record import read_losses
    from shoptalk.trainer.train import train_adapter

    grad_accum = 4
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo, data_dir = root / "repo", root / "data"
        repo.mkdir()
        dataset = RepoStore.for_repo(data_dir, repo).dataset_dir
        dataset.mkdir(parents=True)
        records = _records(sequences + 4, seed)
        train, val = records[:sequences], records[sequences:]
        for r in val:
            r["split"] = "validation"
        (dataset / "completion.train.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in train)
        )
        (dataset / "completion.validation.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in val)
        )
        (dataset / "manifest.json").write_text(json.dumps({"repo": str(repo)}))
        settings = Settings(
            train=TrainSettings(
                base=base,
                max_steps=max(1, sequences // grad_accum),
                grad_accum=grad_accum,
                replay_share=0.0,
                val_every=10_000,
                threads=threads,
                layers_from=0.0 if variant == "ours-all-layers" else None,
            )
        )
        from shoptalk.trainer import train as train_module

        # Augmented copies would change the sequences; the bench compares
        # throughput on identical ones.
        train_module.AUGMENT_SHARE = 0.0
        result = train_adapter(
            repo,
            settings,
            data_dir,
            val_limit=2,
            precision="fp32" if variant == "ours-fp32" else "auto",
            show_progress=False,
            report=lambda _m: None,
        )
        record = result.record
        # Like the naive timer: leave the first step (one-off warm-up) out.
        rows = [r for r in read_losses(result.run_dir / "loss.csv") if r.train_loss is not None]
        first, last = rows[0], rows[-1]
        speed = (last.tokens - first.tokens) / (last.elapsed_s - first.elapsed_s)
    return {
        "tokens_per_second": speed,
        "tokens": record["tokens"],
        "steps": record["steps"],
        "device": record["device"],
        "first_step_excluded": True,
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_naive(base: str, sequences: int, seed: int, threads: int | None) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from shoptalk.models.catalog import resolve_base
    from shoptalk.trainer.formats import SequenceBuilder, build_examples

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(base)
    builder = SequenceBuilder(tokenizer, resolve_base(base).fim, 512)
    examples = build_examples(_records(sequences, seed), builder, seed)
    rows = [{"input_ids": list(e.input_ids), "labels": list(e.input_ids)} for e in examples]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))

    class Timer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.seconds = 0.0
            self.steps = 0
            self._start = 0.0

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self._start = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.steps += 1
            if self.steps > 1:  # the first step pays one-off costs in both loops
                self.seconds += time.perf_counter() - self._start

    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=1,
            max_steps=len(rows),
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[timer])
        trainer.train()
    # Sequences in the order the Trainer saw them are shuffled; the mean length
    # is the same, so count tokens as mean × timed steps.
    mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
    timed_tokens = mean_len * (timer.steps - 1)
    return {
        "tokens_per_second": timed_tokens / timer.seconds,
        "tokens": int(mean_len * timer.steps),
        "steps": timer.steps,
        "device": "cpu fp32 (Trainer default)",
        "peak_rss_mb": _peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--base", default="/tmp/gemma-hf", help="HF checkpoint (or catalog key)")
    parser.add_argument("--sequences", type=int, default=32, help="training sequences per part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prefix-chars", type=int, default=1000, help="context before the cursor")
    parser.add_argument("--parts", default="ours,naive", help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global PREFIX_CHARS
    PREFIX_CHARS = args.prefix_chars
    if args.part:
        if args.part == "naive":
            figures = run_naive(args.base, args.sequences, args.seed, args.threads)
        else:
            figures = run_ours(args.base, args.sequences, args.seed, args.part, args.threads)
        print(json.dumps(figures))
        return
    results: dict[str, dict[str, Any]] = {}
    for part in args.parts.split(","):
        if part not in PARTS:
            parser.error(f"unknown part {part!r}; known: {', '.join(PARTS)}")
        command = [sys.executable, __file__, "--part", part, "--base", args.base]
        command += ["--sequences", str(args.sequences), "--seed", str(args.seed)]
        command += ["--prefix-chars", str(args.prefix_chars)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"part {part} failed")
        results[part] = json.loads(done.stdout.strip().splitlines()[-1])
        results[part]["wall_s"] = time.perf_counter() - started
    baseline = results.get("naive")
    print(f"{'part':<12} {'tokens/s':>9} {'× naive':>8} {'peak RSS MB':>12} {'tokens':>7}  device")
    for part, fig in results.items():
        ratio = (
            fig["tokens_per_second"] / baseline["tokens_per_second"] if baseline else float("nan")
        )
        print(
            f"{part:<12} {fig['tokens_per_second']:>9.1f} {ratio:>8.2f} {fig['peak_rss_mb']:>12.0f} "
            f"{fig['tokens']:>7}  {fig['device']}"
        )


if __name__ == "__main__":
    main()
