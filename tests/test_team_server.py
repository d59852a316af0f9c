"""One team server for many developers, for real: `python -m llama_cpp.server
--config_file` on loopback serving the team model and a developer's adapter
by name (two tiny LoRA adapters of different seeds on one tiny base). Each
name answers what that model answers when loaded directly through llama.cpp;
a developer's language server asks for their own name; and a promoted
personal adapter published with `shoptalk models publish` is served under
its developer's name after the server restarts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from llama_servers import llama_server, model_entry, served_models, team_config
from test_server_e2e import start_session, stop_session

from shoptalk.models.backends import OpenAIBackend
from shoptalk.models.catalog import GEMMA3_FIM
from shoptalk.models.completion import CompletionEngine, EngineOptions
from shoptalk.models.store import RepoStore

pytestmark = pytest.mark.e2e

DOCUMENTS = [
    "def parse_header(line):\n    key, value = line.split(",
    "class Cache:\n    def __init__(self, size):\n        self.size = ",
    "for item in items:\n    total += item.",
]
SEEDS = {"team": 7, "alice": 8, "bob": 9}
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def team_files(
    tiny_gguf: Callable[..., Path], tiny_run: Callable[..., Path], tmp_path_factory: Any
) -> dict[str, Path]:
    """The base GGUF and one adapter GGUF per name (exported from runs of
    different seeds, as `shoptalk export --adapter-only` writes them)."""
    from shoptalk.trainer.export import export_run

    root = tmp_path_factory.mktemp("team-files")
    files = {"base": tiny_gguf("llama")}
    for name, seed in SEEDS.items():
        run = shutil.copytree(tiny_run("llama", seed=seed, train_steps=0), root / name)
        files[name] = export_run(Path(run), adapter_only=True).files[0]
    return files


@pytest.fixture(scope="module")
def team_server(team_files: dict[str, Path], tmp_path_factory: Any) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("team-server")
    config = folder / "config.json"
    models = [model_entry(n, team_files["base"], team_files[n]) for n in ("team", "alice")]
    port = team_config(config, models)
    with llama_server(["--config_file", str(config)], folder / "server.log", port) as url:
        yield url


def _suggest(backend: OpenAIBackend, document: str) -> str:
    """The suggestion of the local engine (context, healing, cache) over the backend."""
    engine = CompletionEngine(backend, GEMMA3_FIM, False, EngineOptions(max_tokens=12))
    return engine.complete(document, len(document), use_cache=False).text


def _direct(base: Path, adapter: Path) -> list[str]:
    """Greedy answers of base + adapter loaded directly through llama.cpp."""
    import llama_cpp

    llm = llama_cpp.Llama(str(base), lora_path=str(adapter), n_ctx=1024, n_threads=1, verbose=False)
    try:
        return [
            llm.create_completion(d, max_tokens=MAX_TOKENS, temperature=0.0)["choices"][0]["text"]
            for d in DOCUMENTS
        ]
    finally:
        llm.close()


def _served(url: str, name: str) -> list[str]:
    """The same requests to the team server, asking for `name`."""
    answers = []
    for document in DOCUMENTS:
        body = {"model": name, "prompt": document, "max_tokens": MAX_TOKENS, "temperature": 0.0}
        body["repeat_penalty"] = 1.0  # llama_cpp.server's default is 1.1, the library's 1.0
        request = urllib.request.Request(
            f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            answers.append(json.load(answer)["choices"][0]["text"])
    return answers


def _remote(url: str, name: str) -> list[str]:
    return [_suggest(OpenAIBackend(url, name), document) for document in DOCUMENTS]


def test_each_name_reaches_its_own_model(team_server: str, team_files: dict[str, Path]) -> None:
    assert served_models(team_server) == ["team", "alice"]
    team = _direct(team_files["base"], team_files["team"])
    alice = _direct(team_files["base"], team_files["alice"])
    assert team != alice  # the two models are told apart by their answers
    # Interleaved: the server switches models per request.
    assert _served(team_server, "team") == team
    assert _served(team_server, "alice") == alice
    assert _served(team_server, "team") == team
    # Through ShopTalk's backend and engine: one name per backend, each request.
    through_team, through_alice = _remote(team_server, "team"), _remote(team_server, "alice")
    assert through_team != through_alice
    assert _remote(team_server, "team") == through_team


@pytest.mark.asyncio
async def test_a_developers_language_server_asks_for_their_adapter(
    team_server: str, team_files: dict[str, Path], tmp_path: Path
) -> None:
    workspace, data_dir = tmp_path / "repo", tmp_path / "data"
    workspace.mkdir()
    data_dir.mkdir()
    options = {
        "backend": "openai",
        "openai_url": team_server,
        "openai_model": "team",
        "openai_personal_model": "alice",
        "max_tokens": 12,  # as `_suggest` asks
        "max_latency_ms": 60000,  # the whole answer, however loaded the machine
    }
    session = await start_session(workspace, data_dir, None, init_options=options)
    try:
        status = await session.wait_loaded()
        assert status["backend"] == "openai" and status["error"] is None
        document = DOCUMENTS[1]
        uri = await session.open("cache.py", document)
        lines = document.split("\n")
        answer = await session.inline(uri, len(lines) - 1, len(lines[-1]))
        texts = [item.insert_text for item in answer.items] if answer else []
        alice = _remote(team_server, "alice")[1]
        assert alice != _remote(team_server, "team")[1]
        assert texts and texts[0].endswith(alice)
    finally:
        await stop_session(session)


def test_a_promoted_personal_adapter_is_published_and_served_after_a_restart(
    team_files: dict[str, Path], tmp_path: Path
) -> None:
    served, data_dir, repo = tmp_path / "served", tmp_path / "data", tmp_path / "repo"
    served.mkdir()
    repo.mkdir()
    config = served / "config.json"
    alice = model_entry("alice", team_files["base"], team_files["alice"])
    port = team_config(config, [alice], interrupt_requests=False)
    (repo / "shoptalk.toml").write_text(
        f'[team]\nmodel_dir = "{served}"\nconfig_file = "{config}"\nteam_model = "team"\n'
    )
    command = [str(Path(sys.executable).parent / "shoptalk"), "--data-dir", str(data_dir)]
    command += ["models", "publish", "--repo", str(repo)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOPTALK_")}

    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode != 0
    assert "nothing is promoted" in refused.stderr and "Traceback" not in refused.stderr

    # What the local gate promoted for bob (a personal adapter on the base).
    RepoStore.for_repo(data_dir, repo).promote(
        {
            "run_id": "dev-bob-1",
            "model": str(team_files["base"]),
            "adapter": str(team_files["bob"]),
            "base_model": str(team_files["base"]),
            "personal": {"developer": "bob", "run_id": "dev-bob-1"},
        }
    )
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "published run dev-bob-1 as 'bob'" in done.stdout
    written = json.loads(config.read_text())
    assert written["interrupt_requests"] is False and written["port"] == port
    assert [m["model_alias"] for m in written["models"]] == ["alice", "bob"]
    bob = written["models"][1]
    assert bob["n_threads"] == 1 and Path(bob["lora_path"]).parent == served / "bob"
    assert Path(bob["model"]).read_bytes() == team_files["base"].read_bytes()
    assert Path(bob["lora_path"]).read_bytes() == team_files["bob"].read_bytes()
    assert not list(served.rglob("*.partial"))

    # The restart (llama_cpp.server reads its config at start): bob is served.
    with llama_server(["--config_file", str(config)], tmp_path / "server.log", port) as url:
        assert served_models(url) == ["alice", "bob"]
        assert _served(url, "bob") == _direct(team_files["base"], team_files["bob"])
        assert _served(url, "bob") != _served(url, "alice")
