"""`shoptalk demo`: the main job on the embedded default model, end to end,
on a repository's own history (by default, ShopTalk's)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from shoptalk.models.catalog import CATALOG, DEFAULT_BASE
from shoptalk.models.prompt import clip_context, completion_prompt

console = Console(stderr=True)

SAMPLE = '''import json
from pathlib import Path


def load_config(path: Path) -> dict:
    """Read a JSON config file and return it as a dict."""
    with path.open() as handle:
        return '''


def complete_sample(gguf: Path, prefix: str = SAMPLE, max_tokens: int = 32) -> tuple[str, float]:
    """Complete `prefix` with the GGUF at `gguf` (prefix-only); the text and seconds taken."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=None, verbose=False)
    base = CATALOG[DEFAULT_BASE]
    parts = clip_context(prefix.rstrip(" "), "")
    prompt = completion_prompt(base.fim, parts, use_fim=base.fim.trained)
    started = time.perf_counter()
    result = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stop=["\n\n"])
    elapsed = time.perf_counter() - started
    return str(result["choices"][0]["text"]), elapsed  # type: ignore[index]


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        repo: Annotated[Path, typer.Option(help="Repository whose history to learn.")] = Path("."),
    ) -> None:
        """Run the main job on the default model and print what it produced."""
        from shoptalk.models.cli import settings_for
        from shoptalk.models.provision import ensure_gguf

        settings = settings_for(repo)
        data_dir = settings.resolved_data_dir()
        gguf = ensure_gguf(data_dir, CATALOG[DEFAULT_BASE], console.print)
        text, seconds = complete_sample(gguf)
        console.rule("completion from the default model")
        print(SAMPLE + text)
        console.rule()
        console.print(f"latency: {seconds * 1000:.0f} ms for {len(text)} characters")
