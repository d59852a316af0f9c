"""Unit tests of the mining parts that work on plain data: masks, message
cleaning, secrets, dedup, balance, splits, ignore rules, alias merging and
the patch parser."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import pytest

from shoptalk.trainer.authors import Alias, is_bot, merge_aliases
from shoptalk.trainer.git_log import (
    FileChange,
    _parse_patch_stream,
    is_text_path,
    quote_path,
)
from shoptalk.trainer.hygiene import (
    SecretScrubber,
    cap_module_share,
    exact_key,
    has_placeholder,
    remove_test_overlap,
    top_level_module,
)
from shoptalk.trainer.instances import (
    MAX_MASK,
    MIN_MASK,
    clean_message,
    diff_text,
    line_rng,
    mask_span,
    record_id,
)
from shoptalk.trainer.source_files import (
    SkipRules,
    decode_source,
    is_test_file,
    parse_ignore_file,
    stem_under_test,
)
from shoptalk.trainer.splits import CommitPoint, WindowSizes, parse_cutoff, plan_splits


@pytest.mark.parametrize("tokens", [4, 5, 10, 51, 52, 120])
def test_mask_takes_the_last_n_tokens_with_n_in_range(tokens: int) -> None:
    words = [f"w{i}" for i in range(tokens)]
    line = "    " + " ".join(words) + "  "
    seen = set()
    for seed in range(200):
        span = mask_span(line, random.Random(seed))
        assert span is not None
        start, end, n = span
        seen.add(n)
        assert MIN_MASK <= n <= min(MAX_MASK, tokens - 1)
        assert line[start:end].split() == words[-n:]
        assert line[:start].split() == words[:-n]
    assert min(seen) == MIN_MASK
    assert max(seen) == min(MAX_MASK, tokens - 1)


def test_mask_needs_four_tokens_and_is_seeded() -> None:
    assert mask_span("return a + b", random.Random(1)) is not None
    assert mask_span("return a +", random.Random(1)) is None
    first = mask_span("x = compute(a, b, c, d, e, f, g)", line_rng(0, "c1", "a.py", 3))
    again = mask_span("x = compute(a, b, c, d, e, f, g)", line_rng(0, "c1", "a.py", 3))
    assert first == again


def test_clean_message_drops_trailers_issue_refs_and_ci_tags() -> None:
    message = (
        "PROJ-42: Fix rounding of refunds (#123) [skip ci]\n\n"
        "Refunds were rounded twice. Fixes #77, see org/repo#9.\n"
        "https://github.com/org/repo/issues/77\n\n"
        "Signed-off-by: Alice <alice@example.com>\n"
        "Co-authored-by: Bob <bob@example.com>\n"
    )
    assert clean_message(message) == "Fix rounding of refunds\n\nRefunds were rounded twice."


CANARY_LINES = {
    'aws = "AKIAQ7CANARY4Z2L9MBX"': "Q7CANARY4Z2L9MBX",
    'token = "ghp_Canary0Tok3nZx9Qm2Lk7Vb4Nc8Rt5Yw3Pj6"': "Canary0Tok3n",
    'DB_PASSWORD = "canary-Pa55w0rd-hunter"': "canary-Pa55w0rd",
    'SALT = "Zx9Qm2Lk7Vb4Nc8Rt5Yw3Pj6Hs1Df0GaEu"': "Zx9Qm2Lk7Vb4Nc8Rt5Yw3Pj6",
    "conn = connect(password='s3cr3t-Pa55')": "s3cr3t-Pa55",
}


def test_scrubber_replaces_secrets_with_typed_placeholders() -> None:
    with SecretScrubber() as scrubber:
        for line, canary in CANARY_LINES.items():
            clean, counts = scrubber.scrub(line, "settings.py")
            assert canary not in clean, line
            assert has_placeholder(clean) and sum(counts.values()) >= 1
        key = "k = '''-----BEGIN RSA PRIVATE KEY-----\nMIIEcanaryBODY\nQQ==\n-----END RSA PRIVATE KEY-----'''\nx = 1\n"
        clean, counts = scrubber.scrub(key, "keys.py")
        assert "canaryBODY" not in clean and counts["Private Key"] == 1
        assert clean.count("\n") == key.count("\n")  # line numbers stay valid
        clean, _ = scrubber.scrub("password: canaryYamlSecret42\n", "deploy/config.yaml")
        assert "canaryYamlSecret42" not in clean


def test_scrubber_leaves_ordinary_code_alone() -> None:
    code = (
        "def total(lines: list[int]) -> int:\n"
        '    """Sum the positive lines."""\n'
        "    token = next_token(stream)\n"
        "    password = settings.DB_PASSWORD\n"
        '    row = {"masked_tokens": f"{low}-{high}", "key": key}\n'
        "    return sum(line for line in lines if line > 0)  # test_alias_merging_2\n"
    )
    with SecretScrubber() as scrubber:
        clean, counts = scrubber.scrub(code, "billing.py")
    assert clean == code and not counts


# (line, file it is in, the secret) for credentials found by their context
# (shoptalk.trainer.secret_rules), issue 14's leaked forms first.
CONTEXT_LINES = [
    ('    conn = psycopg2.connect("prod-db", "admin", "Sup3rQ9vz!")', "db.py", "Sup3rQ9vz!"),
    ("mysql -u root -pMx0ijT4kq app < dump.sql", "README.md", "Mx0ijT4kq"),
    ("Send mail with key-3ax6xnjp29jd6fds4gc373sgvjxteol0", "COMMIT_EDITMSG", "3ax6xnjp29jd6"),
    ("credentials/AKIAQ7CANARY4Z2L9MBX.py", "credentials/AKIAQ7CANARY4Z2L9MBX.py", "Q7CANARY"),
    ("ghp_Canary0Tok3nZx9Qm2Lk7Vb4Nc8Rt5Yw3P@users.example", "AUTHORS", "Canary0Tok3n"),
    ("PASSWORD=hunter2x", "scripts/run.sh", "hunter2x"),
    ("  password: Zq8hunter", "deploy/values.yaml", "Zq8hunter"),
    ('{"password": "Zq8hunter"}', "config/app.json", "Zq8hunter"),
    ("docker login -u ci -p Zq8hunter registry.example.com", "ci.sh", "Zq8hunter"),
    ("pg_dump --password Zq8hunter app", "Makefile", "Zq8hunter"),
    ("mysqldump --password=Zq8hunter app", "backup.sh", "Zq8hunter"),
    ("curl -u admin:Zq8hunter https://x.example.com", "README.md", "Zq8hunter"),
    ('C = "Server=db;User Id=sa;Password=Zq8hunter;"', "Db.cs", "Zq8hunter"),
    ('dsn = "app:Zq8hunter@tcp(db:3306)/app"', "db.go", "Zq8hunter"),
    ("CREATE USER app IDENTIFIED BY 'Zq8hunter';", "001.sql", "Zq8hunter"),
    ("<password>Zq8hunter</password>", "settings.xml", "Zq8hunter"),
    ("machine x.example.com login bot password Zq8hunter", ".netrc", "Zq8hunter"),
    ("Rotate the staging password to Zq8hunter today", "COMMIT_EDITMSG", "Zq8hunter"),
    ('r = requests.get(u, auth=("svc", "Zq8hunter"))', "fetch.py", "Zq8hunter"),
    ('AUTH = HTTPBasicAuth("svc", "Zq8hunter")', "client.py", "Zq8hunter"),
    ('h = {"Authorization": "Bearer abcDEF0123456789xyzUVW"}', "api.py", "abcDEF0123456789"),
    ('KEY = "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW"', "maps.py", "SyA1b2C3d4E5f6"),
    (
        'T = "github_pat_11ABCDEFG0123456789abc_defghijklmnopqrstuvwxyz0123456789"',
        "gh.py",
        "11ABCDEFG0",
    ),
    ('T = "hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh"', "hub.py", "AbCdEfGhIjKlMnOp"),
]


@pytest.mark.parametrize(("line", "filename", "secret"), CONTEXT_LINES)
def test_context_rules_find_credentials_by_where_they_stand(
    line: str, filename: str, secret: str
) -> None:
    """Issue 14: these forms passed pattern and entropy detection."""
    from shoptalk.trainer.secret_rules import CONTEXT_HINT

    assert CONTEXT_HINT.search(line)  # the prefilter lets every rule's line through
    with SecretScrubber() as scrubber:
        clean, counts = scrubber.scrub(line, filename)
    assert secret not in clean and has_placeholder(clean) and sum(counts.values()) >= 1


def test_a_password_passed_across_lines_is_found_and_repeats_are_replaced() -> None:
    diff = '+    conn = pymysql.connect(\n+        "db",\n+        "root",\n+        "Zq8hunter",\n+    )\n'
    with SecretScrubber() as scrubber:
        clean, counts = scrubber.scrub(diff, "db.py")
        assert "Zq8hunter" not in clean and counts["Password"] == 1
        # The same password elsewhere in the commit (a message) goes too...
        assert scrubber.scrub_value("use Zq8hunter for root", "COMMIT_EDITMSG") == (
            "use <SECRET_PASSWORD> for root"
        )
        scrubber.forget()  # ...but not in the next commit's text.
        assert scrubber.scrub_value("Zq8hunter", "x.txt") == "Zq8hunter"
        assert scrubber.scrub_value(["a", {"k": os.fsdecode(b"caf\xe9")}]) == [
            "a",
            {"k": "caf\ufffd"},
        ]


def _completion(split: str, target: str, prefix: str = "x = 1\n") -> dict[str, object]:
    return {
        "kind": "completion",
        "split": split,
        "prefix": prefix,
        "target": target,
        "suffix": "\n",
        "path": "a.py",
    }


def test_dedup_removes_exact_and_near_copies_of_test_instances() -> None:
    test = [
        _completion("test", "return round_money(amount / parts, places=2)"),
        _completion(
            "test",
            "result = ledger.post(entry, account=account, when=when, memo=memo, tags=tags)",
            prefix="def post_entry(ledger, entry, account, when, memo, tags):\n    ",
        ),
    ]
    exact_copy = _completion("train", "return  round_money(amount /parts,   places=2)")
    near_copy = _completion(
        "train",
        "result = ledger.post(entry, account=account, when=when, memo=memo, tags=tags2)",
        prefix="def post_entry(ledger, entry, account, when, memo, tags):\n    ",
    )
    unrelated = _completion("validation", "for invoice in invoices: send(invoice)")
    result = remove_test_overlap([exact_copy, near_copy, unrelated], test)
    assert result.kept == [unrelated]
    assert (result.exact, result.near) == (1, 1)
    assert exact_key("a b\n c") == exact_key("ab c")


def test_balance_caps_the_biggest_module_among_comparable_ones() -> None:
    records = [{"path": f"billing/f{i}.py"} for i in range(80)]
    for module in ("reports", "ledger", "audit"):
        records += [{"path": f"{module}/f{i}.py"} for i in range(10)]
    result = cap_module_share(records, cap=0.4, seed=0)
    assert result.applied
    share = sum(1 for r in result.kept if r["path"].startswith("billing/")) / len(result.kept)
    assert share <= 0.4 + 1e-9
    assert result.distribution["billing"] == {"before": 80, "after": 20}
    assert result.distribution["reports"] == {"before": 10, "after": 10}
    # One package plus its tests: capping would throw most of the code away.
    package = [{"path": "src/app/x.py"}] * 80 + [{"path": "tests/test_x.py"}] * 20
    kept = cap_module_share(package, cap=0.3, seed=0)
    assert not kept.applied and len(kept.kept) == 100
    assert top_level_module("src/app/x.py") == "src/app"
    assert top_level_module("setup.py") == "(root)"


def test_splits_keep_everything_at_or_after_the_cutoff_out_of_train() -> None:
    points = [CommitPoint(f"c{i}", "alice" if i % 2 else "bob", 1000 + i, 5) for i in range(40)]
    points.append(CommitPoint("late-carol", "carol", 1100, 1))
    points += [CommitPoint(f"carol{i}", "carol", 900 + i, 4) for i in range(10)]
    plan = plan_splits(points, WindowSizes(test_share=0.1, validation_share=0.1), test_per_author=6)
    by_sha = {p.sha: p for p in points}
    for sha, split in plan.split_of.items():
        if by_sha[sha].time >= plan.cutoff:
            assert split == "test"
        if split == "validation":
            assert plan.validation_from <= by_sha[sha].time < plan.cutoff
    assert sum(1 for s in plan.split_of.values() if s == "validation") == 5
    carol_test = [p for p in points if p.author_id == "carol" and plan.split_of[p.sha] == "test"]
    # Carol had 1 instance after the cutoff; her newest earlier commits top her up to 6+.
    assert sum(p.completions for p in carol_test) >= 6
    assert plan.moved_to_test["carol"] == 2
    fixed = plan_splits(
        points, WindowSizes(validation_share=0.0), 0, cutoff=parse_cutoff("1970-01-01T00:16:50Z")
    )
    assert fixed.cutoff == 1010
    assert all(s != "validation" for s in fixed.split_of.values())


def test_ignore_rules_and_skip_reasons() -> None:
    rules = SkipRules(
        globs=("*.sql",),
        ignore_rules=tuple(
            parse_ignore_file("# comment\nfixtures/\n/build.py\n*.snap\n!keep.snap\n")
        ),
        max_file_bytes=100,
        max_line_chars=20,
    )
    assert rules.path_reason("tests/fixtures/data.py") == "shoptalkignore"
    assert rules.path_reason("build.py") == "shoptalkignore"
    assert rules.path_reason("tools/build.py") is None
    assert rules.path_reason("ui/a.snap") == "shoptalkignore"
    assert rules.path_reason("ui/keep.snap") is None
    assert rules.path_reason("db/schema.sql") == "ignore_glob"
    assert rules.path_reason("third_party/x.py") == "vendored"
    assert rules.path_reason("web/package-lock.json") == "lock_file"
    assert rules.path_reason("api/service_pb2.py") == "generated"
    assert rules.path_reason("requests/cacert.pem") == "key_material"
    assert rules.path_reason("deploy/id_rsa") == "key_material"
    assert rules.content_reason(b"a" * 101) == "huge"
    assert rules.content_reason(b"ab\x00cd") == "binary"
    assert rules.content_reason(b"x" * 30) == "minified_or_long_lines"
    assert rules.content_reason(b"# Code generated by protoc. DO NOT EDIT.\n") == "generated"
    assert decode_source("caf\xe9".encode("latin-1")) is None
    assert is_test_file("tests/test_pay.py") and not is_test_file("src/pay.py")
    assert stem_under_test("pkg/pay_test.go") == "pay"
    assert stem_under_test("src/PayTest.java") == "Pay"
    assert stem_under_test("web/pay.spec.ts") == "pay"


def test_alias_merging_keeps_people_apart_and_ids_stable(tmp_path: Path) -> None:
    first_seen = {
        Alias("Alice Smith", "alice@example.com"): 1,
        Alias("alice smith", "alice.smith@corp.example"): 5,
        Alias("Bob Jones", "bob@example.com"): 2,
        Alias("bjones", "BOB@example.com"): 9,
        Alias("Carol King", "carol@example.com"): 3,
    }
    people = merge_aliases(first_seen)
    ids = {alias.name: person.id for alias, person in people.items()}
    assert ids["Alice Smith"] == ids["alice smith"]
    assert ids["Bob Jones"] == ids["bjones"]
    assert len(set(ids.values())) == 3
    # More aliases later do not rename anyone.
    later = merge_aliases({**first_seen, Alias("Dan Brown", "dan@example.com"): 10})
    assert {a.name: p.id for a, p in later.items() if a.name != "Dan Brown"} == ids
    # gambit's answer is kept per alias list, and a kept answer is used as is.
    cache = tmp_path / "gambit.json"
    assert {a: p.id for a, p in merge_aliases(first_seen, cache_file=cache).items()} == {
        a: p.id for a, p in people.items()
    }
    saved = json.loads(cache.read_text())
    saved["pairs"] = []  # as if gambit had merged nobody
    cache.write_text(json.dumps(saved))
    from_cache = merge_aliases(first_seen, cache_file=cache)
    assert from_cache[Alias("Alice Smith", "alice@example.com")].id != (
        from_cache[Alias("alice smith", "alice.smith@corp.example")].id
    )
    assert is_bot(Alias("dependabot[bot]", "x@users.noreply.github.com"), ["[bot]"])
    assert not is_bot(Alias("Bob", "bob@example.com"), ["[bot]", "renovate"])


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # inside gambit, with new pandas
def test_alias_pairs_match_gambits_own_clustering() -> None:
    import pandas as pd
    from gambit import disambiguate_aliases

    from shoptalk.trainer.authors import _gambit_pairs

    aliases = [
        Alias("Alice Smith", "alice@example.com"),
        Alias("alice smith", "alice.smith@corp.example"),
        Alias("Smith, Alice", "asmith@home.example"),
        Alias("Bob Jones", "bob@example.com"),
        Alias("Robert Jones", "robert.jones@corp.example"),
        Alias("bjones", "bjones@corp.example"),
        Alias("Carol King", "carol@example.com"),
        Alias("Carol Kingsley", "ck@example.org"),
        Alias("dependabot[bot]", "49699333+dependabot[bot]@users.noreply.github.com"),
        Alias("", "anon@example.com"),
    ]
    frame = pd.DataFrame(
        {"alias_name": [a.name for a in aliases], "alias_email": [a.email for a in aliases]}
    )
    theirs = [int(x) for x in disambiguate_aliases(frame)["author_id"]]
    components = list(range(len(aliases)))

    def find(i: int) -> int:
        while components[i] != i:
            i = components[i]
        return i

    for i, j in _gambit_pairs(aliases, None):
        components[max(find(i), find(j))] = min(find(i), find(j))
    ours = [find(i) for i in range(len(aliases))]
    same_theirs = {(i, j) for i in range(len(aliases)) for j in range(i) if theirs[i] == theirs[j]}
    same_ours = {(i, j) for i in range(len(aliases)) for j in range(i) if ours[i] == ours[j]}
    assert same_ours == same_theirs
    assert (1, 0) in same_ours  # the name variants of Alice


def test_patch_parser_reads_renames_quoted_paths_and_modifications() -> None:
    stream = (
        b"\x00\x00aaa\x00p1\x00Alice\x00a@x\x00100\x00Subject\n\nBody\x00\n\n"
        b"diff --git a/old name.py b/new name.py\n"
        b"similarity index 80%\nrename from old name.py\nrename to new name.py\n"
        b"index 111..222 100644\n--- a/old name.py\n+++ b/new name.py\n"
        b"@@ -3 +3,2 @@ def f():\n-    return 1\n+    return 2\n+    --x\n"
        b'diff --git "a/caf\\303\\251.py" "b/caf\\303\\251.py"\nnew file mode 100644\n'
        b'index 000..333\n--- /dev/null\n+++ "b/caf\\303\\251.py"\n@@ -0,0 +1 @@\n+x = 1\n'
        b"diff --git a/logo.png b/logo.png\nindex 1..2 100644\nBinary files a/logo.png and b/logo.png differ\n"
        b"\x00\x00bbb\x00\x00Bob\x00b@x\x00200\x00\x00\n"
    )
    commits = list(_parse_patch_stream(io.BytesIO(stream)))
    assert [c.sha for c in commits] == ["aaa", "bbb"]
    first = commits[0]
    assert first.message == "Subject\n\nBody"
    renamed, added, binary = first.files
    assert (renamed.old_path, renamed.new_path, renamed.renamed) == (
        "old name.py",
        "new name.py",
        True,
    )
    assert renamed.hunks[0].removed == ["    return 1"]
    assert renamed.hunks[0].added == ["    return 2", "    --x"]
    assert (renamed.hunks[0].new_start, renamed.hunks[0].old_count) == (3, 1)
    assert (added.old_path, added.new_path, added.new_blob) == (None, "café.py", "333")
    assert binary.binary and binary.path == "logo.png"
    assert commits[1].files == [] and commits[1].parents == ()


def _one_commit(files: bytes) -> list[FileChange]:
    stream = b"\x00\x00ccc\x00\x00Al\x00a@x\x00100\x00msg\x00\n\n" + files
    (commit,) = _parse_patch_stream(io.BytesIO(stream))
    return commit.files


def test_patch_parser_reads_git_path_quoting_exactly() -> None:
    """Issue 14, defect 3: `+++ b/with space.py<TAB>` kept its tab."""
    spaced, tabbed, octal, mixed, renamed, deleted = _one_commit(
        b"diff --git a/with space.py b/with space.py\nnew file mode 100644\n"
        b"index 000..111\n--- /dev/null\n+++ b/with space.py\t\n@@ -0,0 +1 @@\n+x = 1\n"
        b'diff --git "a/tab\\there q.py" "b/tab\\there q.py"\nindex 1..2 100644\n'
        b'--- "a/tab\\there q.py"\t\n+++ "b/tab\\there q.py"\t\n@@ -1 +1 @@\n-a\n+b\n'
        # core.quotePath on: every byte above 0x7f as an octal escape (\351 is Latin-1 e-acute)
        b'diff --git "a/caf\\303\\251 \\"x\\".py" "b/caf\\351.py"\nnew file mode 100644\n'
        b'index 000..222\n--- /dev/null\n+++ "b/caf\\351.py"\n@@ -0,0 +1 @@\n+y = 2\n'
        b'diff --git a/plain.py "b/new\\nline.py"\nnew file mode 100644\nindex 000..333\n'
        b'Binary files /dev/null and "b/new\\nline.py" differ\n'
        b"diff --git a/old name.py b/new  name.py\nsimilarity index 100%\n"
        b"rename from old name.py\nrename to new  name.py\n"
        b"diff --git a/gone x.py b/gone x.py\ndeleted file mode 100644\nindex 444..000\n"
        b"--- a/gone x.py\t\n+++ /dev/null\n@@ -1 +0,0 @@\n-z\n"
    )
    assert (spaced.old_path, spaced.new_path) == (None, "with space.py")
    assert (tabbed.old_path, tabbed.new_path) == ("tab\there q.py", "tab\there q.py")
    assert octal.new_path == "caf\udce9.py" and not is_text_path(octal.new_path)
    assert os.fsencode(octal.new_path) == b"caf\xe9.py"  # the bytes, unchanged
    assert (mixed.new_path, mixed.binary) == ("new\nline.py", True)
    assert (renamed.old_path, renamed.new_path, renamed.renamed) == (
        "old name.py",
        "new  name.py",
        True,
    )
    assert (deleted.old_path, deleted.new_path) == ("gone x.py", None)
    # Written back as git writes them: C-quoted only where git quotes.
    assert diff_text([spaced, tabbed]).split("\n")[:2] == ["--- /dev/null", "+++ b/with space.py"]
    assert '+++ "b/tab\\there q.py"' in diff_text([tabbed])
    assert quote_path('a\\b\x01"c') == '"a\\\\b\\001\\"c"'


def test_patch_parser_keeps_a_huge_file_small() -> None:
    """A 3 MB line and 2 MB of lines: cut and capped, the next file intact."""
    from shoptalk.trainer.git_log import MAX_DIFF_BYTES_PER_FILE, MAX_DIFF_LINE_BYTES

    many = b"".join(b"+row %d\n" % i for i in range(300_000))
    huge, big, after = _one_commit(
        b"diff --git a/min.js b/min.js\nnew file mode 100644\nindex 000..111\n"
        b"--- /dev/null\n+++ b/min.js\n@@ -0,0 +1 @@\n+" + b"x" * 3_000_000 + b"\n"
        b"diff --git a/data.csv b/data.csv\nnew file mode 100644\nindex 000..222\n"
        b"--- /dev/null\n+++ b/data.csv\n@@ -0,0 +1,300000 @@\n"
        + many
        + b"diff --git a/ok.py b/ok.py\nnew file mode 100644\nindex 000..333\n"
        b"--- /dev/null\n+++ b/ok.py\n@@ -0,0 +1 @@\n+x = 1\n"
    )
    assert len(huge.hunks[0].added[0]) < MAX_DIFF_LINE_BYTES
    assert big.truncated and sum(len(a) for a in big.hunks[0].added) <= MAX_DIFF_BYTES_PER_FILE
    assert big.hunks[0].new_count == 300_000  # line numbers come from the header
    assert (after.new_path, after.hunks[0].added, after.truncated) == ("ok.py", ["x = 1"], False)


def test_ids_and_masks_of_a_non_utf8_path_do_not_fail() -> None:
    """Issue 14, defect 2: `line_rng` raised UnicodeEncodeError on such paths;
    seeds of ordinary paths stay what they were."""
    odd = os.fsdecode(b"caf\xe9.py")
    assert line_rng(7, "abc", odd, 3).random() != line_rng(7, "abc", "cafe.py", 3).random()
    assert line_rng(7, "abc", "a.py", 3).random() == random.Random("7:abc:a.py:3").random()
    assert len(record_id("completion", "abc", odd, 3)) == 16


def test_prefilter_passes_every_line_detect_secrets_flags() -> None:
    from detect_secrets.core.scan import _process_line_based_plugins
    from detect_secrets.settings import default_settings

    from shoptalk.trainer.hygiene import may_hold_secret

    lines = list(CANARY_LINES)
    lines += [
        "url = 'https://bob:pa55word@example.com/x'",
        "server = '52.95.110.1'",
        "jwt = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlX3ZhbHVlXzEyMw'",
        "slack = 'xoxb-123456789012-abcdefghijABCDEFGHIJ'",
        "stripe = 'sk_live_4eC39HqLyjWDarjtT1zdp7dc'",
        "nonce = 'a8f5f167f44f4964e6c998dee827110c'",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
    ]
    # Plus every line of this project's own sources: real code, no secrets.
    root = Path(__file__).resolve().parents[1]
    for folder in ("models",):
        for path in sorted((root / folder).glob("*.py")):
            lines += path.read_text().splitlines()
    flagged = 0
    with default_settings():
        for line in dict.fromkeys(lines):
            for filename in ("x.py", "x.yaml"):
                if list(_process_line_based_plugins([(1, line)], filename)):
                    flagged += 1
                    assert may_hold_secret(line), line
    assert flagged >= len(CANARY_LINES)
    assert not may_hold_secret("    return sum(line for line in lines if line > 0)")


# Lines on the edges of the secret scan's fast prefilters: each hint's words
# in other cases, shapes one character short, non-ASCII letters that `(?i)`
# folds onto ASCII ones (Kelvin sign, long s, dotless i), calls by name.
TRICKY_SECRET_LINES = [
    "PASS = 1",
    "x = 'Pa55'",
    "\u212aEY = 'hunter22hunter22'",  # KELVIN SIGN + EY: `(?i)key` matches it
    "\u017fecret = 'Sup3r-Secret!'",  # LATIN SMALL LETTER LONG S
    "tok\u0131n = 'x'",
    "café = 'AbCdEfGhIjKlMnOpQrSt'",
    "a" * 19,
    "a" * 20,
    "abcdefg1",
    "abcdefg",
    "ip = 10.0.0.1",
    "v = 1.2.3",
    "v = ١.٢.٣.٤",  # Arabic-Indic digits: `\\d` matches them
    "mysql -P3306 -uroot -pS3cret",
    "DSN = 'u:S3cret@tcp(db:3306)/x'",
    "GLPAT-abcdefghijklmnopqrstu",
    "GhP_abcdefghijklmnopqrstuvwxyz0123456789",
    "bot = '123456789:AAabcdefghijklmnopqrstuvwxyz0123456'",
    "Authorization: Bearer abcdefghijklmnopqrstuvwx",
    "GITHUB_PAT_abcdefghijklmnopqrstuvwxyz",
    "ftp = FTP('host', 'admin', 'Zq8hunter')",
    "conn = getConnection(url, 'sa', 'Zq8hunter')",
    "s.bind_s('cn=admin', 'Zq8hunter')",
    "x.pass_('Zq8hunter')",
    "requests.get(u, auth=HTTPBasicAuth('me', 'Zq8hunter'))",
    "NetworkCredential('me', 'Zq8hunter')",
    "    pass",
    "return sum(line for line in lines if line > 0)",
    "",
]


def test_fast_hints_agree_with_their_regexes() -> None:
    """The secret scan's prefilters answer as the regexes they replace
    (hygiene.may_hold_secret, secret_rules.has_context_hint), and every
    connect/login call name holds one of the call rule's literal parts."""
    from shoptalk.trainer import hygiene, secret_rules

    root = Path(__file__).resolve().parents[1]
    lines = list(TRICKY_SECRET_LINES) + list(CANARY_LINES) + [c[0] for c in CONTEXT_LINES]
    for path in sorted((root / "trainer").glob("*.py")):
        lines += path.read_text().splitlines()
    for line in dict.fromkeys(lines):
        for variant in (line, line.upper(), line.lower()):
            slow = hygiene._may_hold_secret_by_regex(variant)
            assert hygiene.may_hold_secret(variant) == slow, variant
            slow = secret_rules.CONTEXT_HINT.search(variant) is not None
            assert secret_rules.has_context_hint(variant) == slow, variant
    for name in secret_rules._PASSWORD_POSITION:
        assert any(part in name for part in secret_rules._CALL_PARTS), name


def test_fast_secret_scan_agrees_with_the_rule_by_rule_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scrubber with its prefilters gives the same texts, counts and
    remembered secrets as with every line (and text) run through each rule."""
    from shoptalk.trainer import hygiene, secret_rules

    root = Path(__file__).resolve().parents[1]
    texts = list(TRICKY_SECRET_LINES) + list(CANARY_LINES) + [c[0] for c in CONTEXT_LINES]
    texts.append("\n".join(TRICKY_SECRET_LINES))
    texts += [(root / "trainer" / name).read_text() for name in ("secret_rules.py", "hygiene.py")]

    def scan(cached: bool = True) -> list[object]:
        found: list[object] = []
        with SecretScrubber() as scrubber:

            def value(text: str, filename: str) -> object:
                if cached:
                    return scrubber.scrub_value(text, filename)
                clean, _ = scrubber.scrub(text, filename, count_lines=set())
                return hygiene._valid_utf8(scrubber.scrub_known(clean))

            for number, text in enumerate(texts):
                for filename in ("x.py", "x.yaml", ".env", "notes.md"):
                    found.append(value(text, filename))  # before and after its secrets are known
                    found.append(scrubber.scrub(text, filename))
                    found.append(scrubber.scrub_known(text))
                    found.append(value(text, filename))
                    found.append([value(t, filename) for t in texts[:number:7]])
                if number % 5 == 4:
                    scrubber.forget()
        return found

    fast = scan()
    assert scan(cached=False) == fast
    with SecretScrubber() as scrubber:  # a secret found after a text was scrubbed
        prose = "deploy with Zq8-hunter2! today"
        assert scrubber.scrub_value(prose, "notes.md") == prose
        scrubber.scrub('PASSWORD = "Zq8-hunter2!"', ".env")
        assert (
            scrubber.scrub_value(prose, "notes.md") == "deploy with <SECRET_SECRET_KEYWORD> today"
        )
    monkeypatch.setattr(hygiene, "may_hold_secret", hygiene._may_hold_secret_by_regex)
    monkeypatch.setattr(
        secret_rules, "has_context_hint", lambda line: bool(secret_rules.CONTEXT_HINT.search(line))
    )
    monkeypatch.setattr(secret_rules, "_CALL_PARTS", ("",))  # every text searched for calls
    assert scan() == fast


def test_a_bare_day_is_its_midnight_utc_for_git() -> None:
    from shoptalk.trainer.git_log import git_date

    assert git_date("2025-06-01") == "2025-06-01 00:00:00 +0000"
    assert git_date("2025-06-01T12:00:00Z") == "2025-06-01T12:00:00Z"
    assert git_date("2 weeks ago") == "2 weeks ago"
