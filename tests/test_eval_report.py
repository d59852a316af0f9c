"""The report built from recorded predictions: figures match a recomputation
from predictions.jsonl, files are complete and self-contained, and the
comparison list / test split / model checks fail with clear messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from shoptalk.models.catalog import CATALOG, DEFAULT_BASE
from shoptalk.models.manifest import write_manifest
from shoptalk.models.settings import Settings
from shoptalk.models.store import RepoStore
from shoptalk.trainer.eval_types import CompletionInstance, EvalSet, ModelRun, ResolvedModel
from shoptalk.trainer.evaluate import EvalError, load_test_set, parse_specs, resolve_models
from shoptalk.trainer.metrics import exact_match, mcnemar, score_completion
from shoptalk.trainer.report import build_report_data, summary_tables, verdict_line, write_report

TARGETS = [
    ("alice", "return total + tax"),
    ("alice", "log.info('done %s', name)"),
    ("alice", "raise ConfigError(path)"),
    ("bob", "items.append(item)"),
    ("bob", "self.cache.clear()"),
    ("bob", "for row in rows:"),
    ("carol", "await session.close()"),
    ("carol", "yield from walk(child)"),
]
# What two models "said" (recorded, as the engine would return them).
BASE_SAID = ["return total", "log.info('done')", "raise ValueError(path)", "items.append(item)"]
BASE_SAID += ["self.cache = {}", "for row in  rows:", "session.close()", "return None"]
ORG_SAID = ["return total + tax", "log.info('done %s', name)", "raise ConfigError(path)"]
ORG_SAID += ["items.append(item)", "self.cache.clear()", "for row in rows:", "await session", ""]


def _eval_set() -> EvalSet:
    instances = [
        CompletionInstance(
            id=f"i{k}",
            commit=f"c{k // 2}",
            author_id=author,
            author_date=f"2025-06-0{k + 1}T10:00:00Z",
            path="pkg/mod.py",
            prefix="def f():\n    ",
            suffix="\n",
            target=target,
            masked_tokens=len(target.split()),
        )
        for k, (author, target) in enumerate(TARGETS)
    ]
    return EvalSet(instances, [], {"cutoff": "2025-06-01T00:00:00Z"}, available=len(instances))


def _models(tmp_path: Path) -> list[ResolvedModel]:
    base = CATALOG[DEFAULT_BASE]
    return [
        ResolvedModel("base", tmp_path / "base.gguf", None, False, base),
        ResolvedModel("org", tmp_path / "org.gguf", None, True, base, "run-1"),
    ]


def _report(tmp_path: Path) -> tuple[dict, EvalSet, list[ModelRun]]:
    test_set = _eval_set()
    runs = [
        ModelRun("base", BASE_SAID, [0.1 * (k + 1) for k in range(8)], 10, 5),
        ModelRun("org", ORG_SAID, [0.05 * (k + 1) for k in range(8)], 10, 4),
    ]
    trivial = frozenset({("(",), (")",)})
    scores = {
        run.spec: [
            score_completion(p, i.target, trivial)
            for p, i in zip(run.predictions, test_set.completion, strict=True)
        ]
        for run in runs
    }
    data = build_report_data(
        repo=tmp_path,
        test_set=test_set,
        models=_models(tmp_path),
        runs=runs,
        scores=scores,
        settings=Settings(),
        command="shoptalk eval --repo x",
        seconds=1.0,
    )
    return data, test_set, runs


def test_report_figures_match_a_recomputation_from_predictions(tmp_path: Path) -> None:
    data, test_set, runs = _report(tmp_path)
    out = tmp_path / "report"
    write_report(out, data, test_set, runs)
    assert sorted(p.name for p in out.iterdir()) == [
        "lookup.jsonl",
        "predictions.jsonl",
        "report.html",
        "report.json",
    ]
    saved = json.loads((out / "report.json").read_text())
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == len(TARGETS)
    by_spec = {m["spec"]: m for m in saved["models"]}
    for spec in ("base", "org"):
        hits = [exact_match(r["predictions"][spec], r["target"]) for r in records]
        pooled = by_spec[spec]["completion"]["pooled"]
        assert pooled["count"] == len(TARGETS)
        assert pooled["exact_match"]["value"] == pytest.approx(100 * sum(hits) / len(hits))
        for author in ("alice", "bob", "carol"):
            mine = [h for h, r in zip(hits, records, strict=True) if r["author_id"] == author]
            cell = by_spec[spec]["completion"]["per_author"][author]["exact_match"]
            assert cell["value"] == pytest.approx(100 * sum(mine) / len(mine))
            assert cell["low"] <= cell["value"] <= cell["high"]
    # Hand count: base gets "items.append(item)" and "for row in  rows:" (normalised).
    assert by_spec["base"]["completion"]["pooled"]["exact_match"]["value"] == pytest.approx(25.0)
    assert by_spec["org"]["completion"]["pooled"]["exact_match"]["value"] == pytest.approx(75.0)
    assert by_spec["base"]["completion"]["pooled"]["strict_exact_match"]["value"] == pytest.approx(
        12.5
    )
    (comparison,) = saved["comparisons"]
    expected = mcnemar(
        [exact_match(r["predictions"]["org"], r["target"]) for r in records],
        [exact_match(r["predictions"]["base"], r["target"]) for r in records],
    )
    assert (comparison["a"], comparison["b"]) == ("org", "base")
    assert (comparison["only_a"], comparison["only_b"]) == (4, 0)
    assert comparison["p_value"] == pytest.approx(expected.p_value)
    assert comparison["difference_points"] == pytest.approx(50.0)
    latency = by_spec["base"]["latency"]
    assert latency["p50_ms"] == pytest.approx(450.0)
    assert latency["p95_ms"] == pytest.approx(765.0)
    general = by_spec["org"]["retention"]["general"]
    assert general["exact_match"] == pytest.approx(40.0)
    assert general["ratio_to_base"] == pytest.approx(0.8)
    assert saved["dataset"]["instances"]["per_author"] == {"alice": 3, "bob": 3, "carol": 2}
    assert saved["dataset"]["commit_range"]["cutoff"] == "2025-06-01T00:00:00Z"
    assert saved["command"] == "shoptalk eval --repo x"
    assert saved["complete"] is True


def test_html_is_self_contained_and_tables_render(tmp_path: Path) -> None:
    data, test_set, runs = _report(tmp_path)
    out = tmp_path / "report"
    write_report(out, data, test_set, runs)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page
    assert "shoptalk eval --repo x" in page and "2025-06-01T00:00:00Z" in page
    console = Console(record=True, width=200)
    for table in summary_tables(data):
        console.print(table)
    text = console.export_text()
    assert "75.0 [" in text and "org vs base" in text and "80% of base" in text


def test_report_refuses_a_folder_with_other_files(tmp_path: Path) -> None:
    data, test_set, runs = _report(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="holds other files"):
        write_report(out, data, test_set, runs)
    assert (out / "notes.txt").read_text() == "keep me"


def test_parse_specs() -> None:
    assert parse_specs("base, org,baseline+,dev:alice,org+dev:bob,run:r1") == [
        "base",
        "org",
        "baseline+",
        "dev:alice",
        "org+dev:bob",
        "run:r1",
    ]
    with pytest.raises(EvalError, match=r"'tuned'.*base, org"):
        parse_specs("base,tuned")
    with pytest.raises(EvalError, match="twice"):
        parse_specs("base,base")
    with pytest.raises(EvalError, match="dev:"):
        parse_specs("dev:")


def _store(tmp_path: Path) -> tuple[Path, Path, RepoStore]:
    repo, data_dir = tmp_path / "repo", tmp_path / "data"
    repo.mkdir()
    return repo, data_dir, RepoStore.for_repo(data_dir, repo)


def test_no_dataset_and_no_test_split(tmp_path: Path) -> None:
    store = _store(tmp_path)[2]
    with pytest.raises(EvalError, match="shoptalk mine"):
        load_test_set(store, Settings(), None)
    store.dataset_dir.mkdir(parents=True)
    (store.dataset_dir / "manifest.json").write_text(
        json.dumps({"commit_range": {"mined_commits": 4}})
    )
    (store.dataset_dir / "completion.train.jsonl").write_text("")
    with pytest.raises(EvalError, match=r"has 4 usable commits.*at least 20 commits"):
        load_test_set(store, Settings(), None)


def test_limit_keeps_several_authors_newest_first(tmp_path: Path) -> None:
    store = _store(tmp_path)[2]
    store.dataset_dir.mkdir(parents=True)
    (store.dataset_dir / "manifest.json").write_text("{}")
    records = [
        {
            "id": f"{author}{k}",
            "kind": "completion",
            "split": "test",
            "commit": f"{author}{k}",
            "author_id": author,
            "author_date": f"2025-07-{10 + k:02d}T00:00:00Z",
            "path": "a.py",
            "prefix": "x = ",
            "suffix": "",
            "target": "call(a, b, c)",
            "masked_tokens": 3,
        }
        for author, n in (("alice", 6), ("bob", 2))
        for k in range(n)
    ]
    (store.dataset_dir / "completion.test.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records)
    )
    chosen = load_test_set(store, Settings(), 4).completion
    assert [i.id for i in chosen] == ["alice5", "bob1", "alice4", "bob0"]
    assert load_test_set(store, Settings(), None).available == 8
    # With a cutoff, "newest" keeps what was authored at or after it (any
    # time zone); "split" keeps the older test commits too.
    (store.dataset_dir / "manifest.json").write_text(json.dumps({"cutoff": "2025-07-13T00:00:00Z"}))
    newest = load_test_set(store, Settings(), None)
    assert sorted(i.id for i in newest.completion) == ["alice3", "alice4", "alice5"]
    assert load_test_set(store, Settings(), None, scope="split").available == 8
    # One developer's instances: what their adapter is judged on.
    bobs = load_test_set(store, Settings(), None, scope="split", author="bob").completion
    assert [i.id for i in bobs] == ["bob1", "bob0"]
    with pytest.raises(EvalError, match=r"'bob' has no completion test instances.*alice \(3\)"):
        load_test_set(store, Settings(), None, author="bob")
    (store.dataset_dir / "manifest.json").write_text(json.dumps({"cutoff": "2026-01-01"}))
    with pytest.raises(EvalError, match="--scope split"):
        load_test_set(store, Settings(), None)


def _fake_model(path: Path, **fields: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + path.name.encode())
    write_manifest(path, kind="model", **fields)
    return path


def _settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir)


def test_missing_models_are_all_named_at_once(tmp_path: Path) -> None:
    repo, data_dir, _ = _store(tmp_path)
    with pytest.raises(EvalError) as caught:
        resolve_models(
            ["org", "baseline+", "dev:alice", "run:nope"], repo, _settings(data_dir), data_dir
        )
    message = str(caught.value)
    for name in ("org (no promoted model", "baseline+", "dev:alice", "run:nope"):
        assert name in message


def test_models_from_another_repository_or_base_are_refused(tmp_path: Path) -> None:
    repo, data_dir, store = _store(tmp_path)
    run = store.run_dir("run-1") / "export" / "model-q4_k_m.gguf"
    _fake_model(run, base=DEFAULT_BASE, repo="/elsewhere/other-repo")
    store.promote({"run_id": "run-1", "model": str(run), "adapter": None})
    with pytest.raises(EvalError, match="tuned on repository /elsewhere/other-repo"):
        resolve_models(["org"], repo, _settings(data_dir), data_dir)
    _fake_model(run, base="qwen2.5-coder-0.5b", repo=str(repo.resolve()))
    with pytest.raises(EvalError, match=r"tuned from base 'qwen2\.5-coder-0\.5b'"):
        resolve_models(["org"], repo, _settings(data_dir), data_dir)
    _fake_model(run, base=DEFAULT_BASE, repo=str(repo.resolve()))
    (org,) = resolve_models(["org"], repo, _settings(data_dir), data_dir)
    assert (org.model, org.use_fim, org.run_id) == (run, True, "run-1")
    assert org.manifests["model"]["base"] == DEFAULT_BASE
    # A prefix-only run is evaluated (and served) prefix-only.
    _fake_model(run, base=DEFAULT_BASE, repo=str(repo.resolve()), extra={"prompt_format": "prefix"})
    (org,) = resolve_models(["org"], repo, _settings(data_dir), data_dir)
    assert org.use_fim is False
    (by_run,) = resolve_models(["run:run-1"], repo, _settings(data_dir), data_dir)
    assert by_run.use_fim is False
    run.write_bytes(b"replaced")
    with pytest.raises(Exception, match="does not match its manifest"):
        resolve_models(["org"], repo, _settings(data_dir), data_dir)


def test_runs_are_found_by_purpose(tmp_path: Path) -> None:
    repo, data_dir, store = _store(tmp_path)
    for run_id, purpose, developer in (("r-general", "baseline+", None), ("r-dev", "dev", "alice")):
        run_dir = store.run_dir(run_id)
        _fake_model(
            run_dir / "export" / "model-q4_k_m.gguf", base=DEFAULT_BASE, repo=str(repo.resolve())
        )
        record = {"status": "complete", "purpose": purpose, "developer": developer}
        (run_dir / "record.json").write_text(json.dumps(record))
    incomplete = store.run_dir("r-later")
    _fake_model(incomplete / "export" / "model-q4_k_m.gguf", base=DEFAULT_BASE)
    (incomplete / "record.json").write_text(
        json.dumps({"status": "running", "purpose": "baseline+"})
    )
    plus, dev, named = resolve_models(
        ["baseline+", "dev:alice", "run:r-general"], repo, _settings(data_dir), data_dir
    )
    assert (plus.run_id, dev.run_id, named.run_id) == ("r-general", "r-dev", "r-general")
    with pytest.raises(EvalError, match="dev:bob"):
        resolve_models(["dev:bob"], repo, _settings(data_dir), data_dir)


def test_module_lookup_top_k_per_ranking() -> None:
    from shoptalk.trainer.eval_types import LookupRankings, ModuleLookupInstance
    from shoptalk.trainer.report import module_lookup_section

    queries = [
        ModuleLookupInstance(f"q{k}", "c", "alice", f"query {k}", modules)
        for k, modules in enumerate([("pkg.a",), ("pkg.b", "pkg.c"), ("pkg.d",), ("pkg.e",)])
    ]
    test_set = EvalSet([], queries, {}, 0)
    rankings = {
        "retrieval": [["pkg.a"], ["pkg.x", "pkg.c"], ["pkg.x", "pkg.y", "pkg.z", "pkg.d"], []],
        "org: hybrid": [["pkg.a"], ["pkg.b"], ["pkg.d"], ["pkg.x", "pkg.y", "pkg.e"]],
    }
    section = module_lookup_section(test_set, LookupRankings(rankings), resamples=200)
    rows = {r["ranking"]: r for r in section["rows"]}
    assert (rows["retrieval"]["top1"], rows["retrieval"]["top3"]) == (25.0, 50.0)
    assert (rows["org: hybrid"]["top1"], rows["org: hybrid"]["top3"]) == (75.0, 100.0)
    assert rows["retrieval"]["top1_ci"]["low"] <= 25.0 <= rows["retrieval"]["top1_ci"]["high"]
    unavailable = module_lookup_section(test_set, LookupRankings(reason="no server"))
    assert unavailable == {"evaluated": False, "reason": "no server"}
    empty = module_lookup_section(EvalSet([], [], {}, 0), LookupRankings(rankings))
    assert empty["evaluated"] is False and "no module-lookup" in empty["reason"]


# ------------------------------------------------------------------ verdict, chart, page


def _team_report(tmp_path: Path, org_said: list[str]) -> tuple[dict, EvalSet, list[ModelRun]]:
    """Two authors with 12 instances each and 20 with one: the per-author chart
    must pool the twenty. `org_said[k]` is org's answer to instance k; base
    always answers "pass"."""
    authors = ["alice"] * 12 + ["bob"] * 12 + [f"drive-by-{k:02d}" for k in range(20)]
    instances = [
        CompletionInstance(
            id=f"i{k}",
            commit=f"c{k}",
            author_id=author,
            author_date=f"2025-06-{1 + k % 28:02d}T10:00:00Z",
            path="pkg/mod.py",
            prefix="def f():\n    ",
            suffix="\n",
            target=f"return value_{k} + offset",
            masked_tokens=3,
        )
        for k, author in enumerate(authors)
    ]
    test_set = EvalSet(instances, [], {"cutoff": "2025-06-01T00:00:00Z"}, available=len(instances))
    runs = [
        ModelRun("base", ["pass"] * len(instances), [0.1] * len(instances), 0, 0),
        ModelRun("org", org_said, [0.1] * len(instances), 0, 0),
    ]
    scores = {
        run.spec: [
            score_completion(p, i.target, frozenset())
            for p, i in zip(run.predictions, instances, strict=True)
        ]
        for run in runs
    }
    data = build_report_data(
        repo=tmp_path / "team",
        test_set=test_set,
        models=_models(tmp_path),
        runs=runs,
        scores=scores,
        settings=Settings(),
        command="shoptalk eval --repo team",
        seconds=3.0,
    )
    return data, test_set, runs


def test_verdict_names_the_better_model_the_margin_and_the_significance(tmp_path: Path) -> None:
    n = 44
    right = [f"return value_{k} + offset" for k in range(n)]
    # org right on 30 of 44 where base is never right: significant.
    data, _, _ = _team_report(tmp_path, right[:30] + ["pass"] * (n - 30))
    assert data["verdict"]["text"] == (
        "org is better than base by 68.2 EM points (68.2% vs 0.0% exact match, n=44); "
        "significant (McNemar p = 1.9e-09)."
    )
    assert data["verdict"]["significant"] is True
    # Right on 2: not significant, said so.
    data, _, _ = _team_report(tmp_path, right[:2] + ["pass"] * (n - 2))
    assert data["verdict"]["text"] == (
        "org is 4.5 EM points above base (4.5% vs 0.0% exact match, n=44), but that is not "
        "significant (McNemar p = 0.5): no difference shown."
    )
    data, _, _ = _team_report(tmp_path, ["pass"] * n)
    assert data["verdict"]["text"].startswith("org and base are tied (0.0% vs 0.0%")
    assert (
        verdict_line({"models": data["models"], "comparisons": data["comparisons"]})
        == (data["verdict"]["text"])
    )


def test_per_author_chart_pools_authors_with_few_instances(tmp_path: Path) -> None:
    data, _, _ = _team_report(tmp_path, ["pass"] * 44)
    groups = data["models"][1]["completion"]["author_groups"]
    assert [(g["label"], g["count"]) for g in groups] == [
        ("alice", 12),
        ("bob", 12),
        ("20 other authors", 20),
    ]
    assert len(groups[2]["authors"]) == 20


CHECK_PAGE_JS = r"""
const { chromium } = require("playwright-core");
const [url, shot, executablePath] = process.argv.slice(1);
(async () => {
  const browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-gpu"] });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(url);
  await page.waitForLoadState("load");
  const seen = await page.evaluate(() => {
    const verdict = document.getElementById("verdict");
    const box = verdict ? verdict.getBoundingClientRect() : null;
    const tables = [...document.querySelectorAll("table")].map((t) =>
      [...t.querySelectorAll("tr:first-child th")].map((th) => th.innerText));
    return {
      afterTitle: document.querySelector("h1").nextElementSibling.id,
      verdict: verdict ? verdict.innerText : null,
      verdictTop: box ? box.top : null,
      images: [...document.images].map((i) => ({ alt: i.alt, complete: i.complete, width: i.naturalWidth })),
      overflow: document.documentElement.scrollWidth - window.innerWidth,
      headers: tables,
      text: document.body.innerText,
      pre: document.querySelectorAll("pre").length,
    };
  });
  await page.screenshot({ path: shot, fullPage: true });
  await browser.close();
  console.log(JSON.stringify(seen));
})().catch((error) => { console.error(error); process.exit(1); });
"""


def test_report_page_in_headless_chromium(tmp_path: Path) -> None:
    """The page as a person sees it: the verdict first and above the fold,
    every chart decoded, nothing wider than the window, the models as a
    table; a screenshot is kept beside the report (report.png)."""
    import os
    import shutil
    import subprocess

    from shoptalk.trainer.report import MODEL_COLUMNS
    from tests.test_vscode import CHROMIUM, VSCODE_DIR, npm

    if not CHROMIUM.is_file():
        raise RuntimeError(f"{CHROMIUM} is missing: `make editor-deps` installs Debian's chromium")
    if not (VSCODE_DIR / "node_modules" / "playwright-core").is_dir():
        installed = npm("ci", "--no-audit", "--no-fund")
        assert installed.returncode == 0, installed.stderr[-2000:]
    right = [f"return value_{k} + offset" for k in range(44)]
    data, test_set, runs = _team_report(tmp_path, right[:30] + ["pass"] * 14)
    out = tmp_path / "report"
    write_report(out, data, test_set, runs)
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [
            shutil.which("node") or "node",
            "-e",
            CHECK_PAGE_JS,
            (out / "report.html").as_uri(),
            str(shot),
            str(CHROMIUM),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "NODE_PATH": str(VSCODE_DIR / "node_modules")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout)
    assert seen["afterTitle"] == "verdict"
    assert seen["verdict"] == data["verdict"]["text"]
    assert 0 <= seen["verdictTop"] < 200  # the first thing read, without scrolling
    assert len(seen["images"]) == 3
    assert all(i["complete"] and i["width"] > 300 for i in seen["images"]), seen["images"]
    assert seen["overflow"] <= 0  # nothing wider than the window
    assert list(MODEL_COLUMNS) in seen["headers"]
    assert seen["pre"] == 0  # no raw JSON block
    assert "{'" not in seen["text"] and '{"' not in seen["text"]
    assert "All 22 authors" in seen["text"]  # the long per-author table is folded away
    assert "None" not in seen["text"]
    assert shot.stat().st_size > 20_000
