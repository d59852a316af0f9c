"""Export quality and cost on the real default base (Gemma 3 270M).

    nice -n 10 .venv/bin/python bench/bench_export.py [--hf /tmp/gemma-hf] [--gguf /tmp/gemma.gguf]
        [--run DATA_DIR/repos/REPO/runs/RUN_ID] [--latency-only] [--repeats 3] [--latency-threads 1]

`--run` names a complete trained run (copied into a temp folder, so nothing
is written into it); its held-out text is the repository code of its
dataset's test split (the newest commits). Without `--run`, a LoRA (rank 16,
all linear layers of every block) with random non-zero B stands in, on
held-out standard library code (files the retention test reserves). The run
is exported to F16, Q8_0 and Q4_K_M (merged) and as a GGUF adapter; it
reports, next to the HF merged model measured in the same run as the baseline:

- top-1 next-token agreement with the HF merged model and perplexity (ratio to HF);
- file size and load time;
- latency of the packaged base GGUF + the adapter applied at run time vs the
  merged model of the same quantization (prompt + generation), as a ratio.

Nothing is written outside a temp folder.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

EVAL_TOKENS = 1024
PROMPT_TOKENS = 256
GEN_TOKENS = 32


def heldout_text(min_chars: int = 12_000) -> str:
    from shoptalk.trainer.retention import heldout_files

    parts: list[str] = []
    for path in sorted(heldout_files()):
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        if sum(map(len, parts)) >= min_chars:
            break
    return "".join(parts)


def repo_heldout_text(run_dir: Path, min_chars: int = 12_000) -> str:
    """Code around the newest commits' masked lines (the test split of the
    run's dataset): prefix, target and suffix of each instance in turn."""
    record = json.loads((run_dir / "record.json").read_text())
    test = Path(record["dataset"]["dir"]) / "completion.test.jsonl"
    parts: list[str] = []
    with test.open(encoding="utf-8") as lines:
        for line in lines:
            item = json.loads(line)
            parts.append(item["prefix"] + item["target"] + item.get("suffix", "") + "\n")
            if sum(map(len, parts)) >= min_chars:
                break
    return "".join(parts)


def copy_run(run: Path, root: Path) -> Path:
    """The parts of a trained run that export reads, in a scratch folder."""
    record = json.loads((run / "record.json").read_text())
    if record.get("status") != "complete":
        raise SystemExit(f"{run} is not a complete run (status {record.get('status')!r})")
    run_dir = root / "runs" / run.name
    run_dir.mkdir(parents=True)
    shutil.copytree(run / "adapter", run_dir / "adapter")
    for name in ("record.json", "config.json"):
        if (run / name).is_file():
            shutil.copy2(run / name, run_dir / name)
    return run_dir


def make_run(hf: Path, gguf: Path, root: Path, seed: int) -> Path:
    """A data-dir-shaped base (hf/ + marker naming the source GGUF, as
    provisioning leaves it) and a complete run with a random LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_root = root / "bases" / "gemma3-270m"
    (base_root / "hf").mkdir(parents=True)
    for item in hf.iterdir():
        (base_root / "hf" / item.name).symlink_to(item)
    (base_root / gguf.name).symlink_to(gguf)
    (base_root / "hf" / "shoptalk-checkpoint.json").write_text(json.dumps({"source": gguf.name}))
    base_path = base_root / "hf"

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.002)
    run_dir = root / "runs" / "bench-run"
    peft_model.save_pretrained(str(run_dir / "adapter"), safe_serialization=True)
    config_file = run_dir / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(base_path)
    config_file.write_text(json.dumps(config))
    record = {
        "run_id": "bench-run",
        "status": "complete",
        "base": {"key": "gemma3-270m", "path": str(base_path), "architecture": "gemma3"},
        "dataset": {},
    }
    (run_dir / "record.json").write_text(json.dumps(record))
    return run_dir


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    shifted = logits[:-1].astype(np.float64)
    shifted -= shifted.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -logprobs[np.arange(len(ids) - 1), ids[1:]].mean()
    return math.exp(nll)


def llama_logits(path: Path, ids: list[int], threads: int) -> tuple[np.ndarray, float]:
    import llama_cpp

    started = time.perf_counter()
    llm = llama_cpp.Llama(
        str(path), n_ctx=2048, logits_all=True, verbose=False, n_threads=threads, n_batch=512
    )
    load = time.perf_counter() - started
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32), load
    finally:
        llm.close()


def latencies(
    configs: dict[str, tuple[Path, Path | None]], ids: list[int], threads: int, repeats: int
) -> dict[str, float]:
    """Median seconds per configuration for PROMPT_TOKENS of prompt + GEN_TOKENS
    greedy tokens. The configurations are loaded together and measured in
    turn (round robin), so a changing machine load hits them all alike."""
    import llama_cpp

    from shoptalk.models.lora import LoraAdapters

    models = {}
    for name, (path, adapter) in configs.items():
        llm = llama_cpp.Llama(str(path), n_ctx=1024, verbose=False, n_threads=threads, n_batch=512)
        if adapter is not None:
            LoraAdapters(llm).apply(adapter)
        models[name] = llm
    times: dict[str, list[float]] = {name: [] for name in configs}
    try:
        for _ in range(repeats):
            for name, llm in models.items():
                llm.reset()
                started = time.perf_counter()
                llm.eval(ids[:PROMPT_TOKENS])
                for _ in range(GEN_TOKENS):
                    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
                times[name].append(time.perf_counter() - started)
    finally:
        for llm in models.values():
            llm.close()
    return {name: float(np.median(values)) for name, values in times.items()}


def report_latency(
    merged: Path, base: Path, adapter: Path, ids: list[int], args: argparse.Namespace
) -> None:
    seconds = latencies(
        {"merged": (merged, None), "adapter": (base, adapter), "base": (base, None)},
        ids,
        args.latency_threads,
        args.repeats,
    )
    print(
        f"latency ({PROMPT_TOKENS} prompt + {GEN_TOKENS} generated tokens, {args.latency_threads} "
        f"thread(s), median of {args.repeats}, round robin): merged Q4_K_M {seconds['merged']:.2f}s; "
        f"packaged Q4_K_M base + F16 adapter {seconds['adapter']:.2f}s "
        f"(ratio {seconds['adapter'] / seconds['merged']:.2f}); base alone {seconds['base']:.2f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", type=Path, default=Path("/tmp/gemma-hf"))
    parser.add_argument("--gguf", type=Path, default=Path("/tmp/gemma.gguf"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", type=Path, default=None, help="A complete trained run folder.")
    parser.add_argument("--latency-threads", type=int, default=1)
    parser.add_argument(
        "--latency-only", action="store_true", help="Skip the quality part (exports Q4_K_M only)."
    )
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from shoptalk.trainer.export import export_run, merged_model, read_run

    root = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        if args.run is not None:
            run_dir = copy_run(args.run, root)
            text, source = repo_heldout_text(args.run), "repository code (test split)"
        else:
            run_dir = make_run(args.hf, args.gguf, root, args.seed)
            text, source = heldout_text(), "standard-library code (random LoRA)"
        tokenizer = AutoTokenizer.from_pretrained(args.hf)
        ids = list(tokenizer(text).input_ids[:EVAL_TOKENS])
        if args.latency_only:
            merged = export_run(run_dir, "q4_k_m", threads=args.threads).files[0]
            adapter = export_run(run_dir, "f16", adapter_only=True).files[0]
            report_latency(merged, args.gguf, adapter, ids, args)
            return

        import torch

        started = time.perf_counter()
        model = merged_model(read_run(run_dir))
        with torch.no_grad():
            reference = model(torch.tensor([ids])).logits[0].float().numpy()
        del model
        hf_seconds = time.perf_counter() - started
        hf_ppl = perplexity(reference, ids)
        print(
            f"held-out tokens: {len(ids)} of {source}; HF merged (fp32) perplexity {hf_ppl:.3f} ({hf_seconds:.1f}s)"
        )

        rows: list[dict[str, Any]] = []
        files: dict[str, Path] = {}
        for quant in ("f16", "q8_0", "q4_k_m"):
            started = time.perf_counter()
            files[quant] = export_run(run_dir, quant, threads=args.threads).files[0]
            export_s = time.perf_counter() - started
            logits, load_s = llama_logits(files[quant], ids, args.threads)
            ppl = perplexity(logits, ids)
            rows.append(
                {
                    "file": files[quant].name,
                    "MB": files[quant].stat().st_size / 1e6,
                    "export_s": export_s,
                    "load_s": load_s,
                    "top1": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
                    "ppl": ppl,
                    "ppl/hf": ppl / hf_ppl,
                }
            )
        adapter = export_run(run_dir, "f16", adapter_only=True).files[0]
        base_logits, base_load = llama_logits(args.gguf, ids, args.threads)
        rows.append(
            {
                "file": f"{args.gguf.name} (packaged base, no LoRA)",
                "MB": args.gguf.stat().st_size / 1e6,
                "export_s": 0.0,
                "load_s": base_load,
                "top1": float((base_logits.argmax(-1) == reference.argmax(-1)).mean()),
                "ppl": perplexity(base_logits, ids),
                "ppl/hf": perplexity(base_logits, ids) / hf_ppl,
            }
        )
        print(
            f"{'file':44} {'MB':>8} {'export s':>9} {'load s':>7} {'top-1 vs HF':>12} {'ppl':>8} {'ppl/HF':>7}"
        )
        for row in rows:
            print(
                f"{row['file']:44} {row['MB']:8.1f} {row['export_s']:9.1f} {row['load_s']:7.2f} "
                f"{100 * row['top1']:11.1f}% {row['ppl']:8.3f} {row['ppl/hf']:7.3f}"
            )
        print(f"adapter {adapter.name}: {adapter.stat().st_size / 1e6:.1f} MB")

        report_latency(files["q4_k_m"], args.gguf, adapter, ids, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
