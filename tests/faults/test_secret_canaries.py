"""Canary secrets planted across a repository's history in many forms, mined
with the real `shoptalk mine`, then looked for in every file of the data dir
(dataset, mining cache, alias cache, state, manifest, the run's log): zero
hits allowed.

`canary_forms` is a generator: each form is a place and a syntax a secret
turns up in (code, configs, shell lines, docs, commit messages, author names
and emails, file and branch names), filled with a fresh random value, so a
rule that only knows the fixture's literal values cannot pass. The forms the
issue found leaking (issue 14) come first.
"""

from __future__ import annotations

import base64
import json
import os
import random
import string
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from git_repos import ALICE, BOB, CAROL, RepoBuilder, python_module

from shoptalk.models.store import RepoStore

pytestmark = pytest.mark.e2e

SEED = 14
CLI = (sys.executable, "-m", "shoptalk.models.cli", "-v")
ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True)
class Canary:
    """One planted secret: `value` (and every one of `cores`, its random
    parts) must never be found in what mining writes."""

    form: str
    value: str
    files: dict[str, str] = field(default_factory=dict)
    message: str = ""
    author: tuple[str, str] = ALICE
    cores: tuple[str, ...] = ()

    def needles(self) -> tuple[str, ...]:
        return (self.value, *self.cores)


class Values:
    """Random secret values of the shapes real ones have (seeded)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def chars(self, n: int, alphabet: str = ALNUM) -> str:
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    def password(self) -> str:
        # Mixed case and digits, like a real one; no character that ends a value.
        return f"Pw{self.chars(12)}7q"

    def aws(self) -> str:
        return "AKIA" + self.chars(16, string.ascii_uppercase + string.digits)

    def hexes(self, n: int) -> str:
        return self.chars(n, "0123456789abcdef")


def _code(name: str, body: str, functions: int = 2) -> str:
    """A Python module with ordinary code around `body` (so it is mined)."""
    return python_module(name, functions) + "\n\n" + body + "\n"


def canary_forms(values: Values) -> list[Canary]:
    v = values
    forms: list[Canary] = []

    def add(form: str, value: str, **kwargs: object) -> None:
        forms.append(Canary(form, value, **kwargs))  # type: ignore[arg-type]

    # ---- the five forms issue 14 found leaking ----------------------------------
    key = v.aws()
    add("aws key as a file name", key, files={f"credentials/{key}.py": _code("creds", "X = 1")})
    pw = f"Sup3r{v.chars(10)}!"
    add(
        "positional password in psycopg2.connect",
        pw,
        files={
            "app/db.py": _code(
                "db",
                f'def connect_prod():\n    return psycopg2.connect("prod-db", "admin", "{pw}")\n',
            )
        },
        cores=(pw[5:-1],),
    )
    pw = v.password()
    add(
        "mysql -p password in a README shell command",
        pw,
        files={
            "README.md": "# Service\n\nThe `app/db.py` module holds the queries. Load a dump:\n\n"
            f"```sh\nmysql -u root -p{pw} app < dump.sql\n```\n"
        },
    )
    mailgun = f"key-{v.hexes(32)}"
    add(
        "mailgun key in a commit message",
        mailgun,
        message=f"Send mail through Mailgun with {mailgun} for now",
        files={"app/mail.py": _code("mail", "SENDER = 'ops@example.com'")},
    )
    token = "ghp_" + v.chars(36)
    add(
        "token as an author email",
        token,
        author=("Build Robot Person", f"{token}@users.noreply.example.com"),
        files={"app/build.py": _code("build", "STEPS = 3")},
    )
    # ---- more forms --------------------------------------------------------------
    add(
        "aws key in code", key2 := v.aws(), files={"app/aws.py": _code("aws", f'ACCESS = "{key2}"')}
    )
    ghp = "ghp_" + v.chars(36)
    add("github token in code", ghp, files={"app/gh.py": _code("gh", f'GH = "{ghp}"')})
    pat = "github_pat_" + v.chars(22) + "_" + v.chars(59)
    add("fine-grained github token", pat, files={"app/ghpat.py": _code("ghpat", f'PAT = "{pat}"')})
    gl = "glpat-" + v.chars(20)
    add(
        "gitlab token in a clone url",
        gl,
        files={
            "docs/setup.md": f"Clone with `git clone https://oauth2:{gl}@gitlab.example.com/team/app.git`.\n"
        },
    )
    slack = f"xoxb-{v.chars(12, string.digits)}-{v.chars(13, string.digits)}-{v.chars(24)}"
    add("slack bot token", slack, files={"app/slack.py": _code("slack", f'BOT = "{slack}"')})
    hook = f"https://hooks.slack.com/services/T{v.chars(8, string.ascii_uppercase)}/B{v.chars(8, string.ascii_uppercase)}/{v.chars(24)}"
    add(
        "slack webhook url",
        hook,
        files={"deploy/alerts.yaml": f"webhook: {hook}\n"},
        cores=(hook[-24:],),
    )
    stripe = "sk_live_" + v.chars(24)
    add(
        "stripe live key",
        stripe,
        files={"app/pay.py": _code("pay", f'stripe.api_key = "{stripe}"')},
    )
    google = "AIza" + v.chars(35, ALNUM + "_-")
    add(
        "google api key in a docstring",
        google,
        files={
            "app/maps.py": f'"""Maps client (development key {google})."""\n\n\n'
            "def geocode(address: str) -> dict:\n"
            f'    """Geocode an address with key {google} in tests."""\n'
            "    return {'address': address, 'ok': len(address) > 3}\n"
        },
    )
    payload = (
        base64.urlsafe_b64encode(json.dumps({"sub": v.chars(12)}).encode()).decode().rstrip("=")
    )
    jwt = f"eyJhbGciOiJIUzI1NiJ9.{payload}.{v.chars(43, ALNUM + '_-')}"
    add(
        "jwt in javascript",
        jwt,
        files={
            "web/api.js": f'const TOKEN = "{jwt}";\nexport function call(u) {{ return fetch(u, {{ headers: {{ t: TOKEN }} }}); }}\n'
        },
        cores=(payload,),
    )
    body = [v.chars(64, ALNUM + "+/") for _ in range(3)]
    block = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\n"
        + "\n".join(body)
        + "\n-----END OPENSSH PRIVATE KEY-----"
    )
    add(
        "private key in yaml",
        body[0],
        files={"deploy/ssh.yaml": "key: |\n  " + block.replace("\n", "\n  ") + "\n"},
        cores=tuple(body[1:]),
    )
    pw = v.password()
    add(
        "password in a database url",
        pw,
        files={
            "app/settings.py": _code(
                "settings", f'DATABASE_URL = "postgres://app:{pw}@db.internal:5432/app"'
            )
        },
    )
    pw = v.password()
    add(".env line", pw, files={".env": f"DEBUG=false\nDB_PASSWORD={pw}\n"})
    pw = v.password()
    add(".env.production line", pw, files={".env.production": f"SESSION_SECRET={pw}\n"})
    pw = v.password()
    add("yaml password", pw, files={"deploy/values.yaml": f"db:\n  user: app\n  password: {pw}\n"})
    pw = v.password()
    add("yaml quoted api key", pw, files={"deploy/api.yml": f'service:\n  api_key: "{pw}"\n'})
    pw = v.password()
    add(
        "json password",
        pw,
        files={
            "config/app.json": json.dumps({"db": {"user": "app", "password": pw}}, indent=2) + "\n"
        },
    )
    pw = v.password()
    add("toml secret", pw, files={"config/app.toml": f'[auth]\nsecret_key = "{pw}"\n'})
    pw = v.password()
    add("ini passwd", pw, files={"config/app.ini": f"[db]\nuser = app\npasswd = {pw}\n"})
    pw = v.password()
    add(
        "java properties",
        pw,
        files={"src/main/resources/application.properties": f"spring.datasource.password={pw}\n"},
    )
    pw = v.password()
    add(
        "docker run -e",
        pw,
        files={
            "scripts/run.sh": f"#!/bin/sh\ndocker run -e POSTGRES_PASSWORD={pw} -p 5432:5432 postgres:16\n"
        },
    )
    pw = v.password()
    add(
        "docker login -p",
        pw,
        files={
            "scripts/publish.sh": f"#!/bin/sh\ndocker login -u ci -p {pw} registry.example.com\n"
        },
    )
    pw = v.password()
    add(
        "--password flag in a Makefile",
        pw,
        files={"Makefile": f"backup:\n\tpg_dump --username app --password {pw} app > app.sql\n"},
    )
    pw = v.password()
    add(
        "--password= flag",
        pw,
        files={
            "scripts/backup.sh": f"#!/bin/sh\nmysqldump --user=app --password={pw} app > app.sql\n"
        },
    )
    pw = v.password()
    add(
        "redis-cli -a",
        pw,
        files={"scripts/cache.sh": f"#!/bin/sh\nredis-cli -h cache -a {pw} FLUSHALL\n"},
    )
    pw = v.password()
    add(
        "curl -u in a README",
        pw,
        files={"docs/api.md": f"Call it: `curl -u admin:{pw} https://api.example.com/v1/health`\n"},
    )
    pw = v.password()
    add(
        "c# connection string",
        pw,
        files={
            "src/Db.cs": f'class Db {{ const string Conn = "Server=db;Database=app;User Id=sa;Password={pw};"; }}\n'
        },
    )
    pw = v.password()
    add(
        "jdbc url",
        pw,
        files={
            "src/Db.java": f'class Db {{ static final String URL = "jdbc:mysql://db:3306/app?user=app&password={pw}"; }}\n'
        },
    )
    pw = v.password()
    add(
        "go mysql dsn",
        pw,
        files={"db/db.go": f'package db\n\nconst dsn = "app:{pw}@tcp(db:3306)/app"\n'},
    )
    pw = v.password()
    add(
        "positional password across lines",
        pw,
        files={
            "app/db2.py": _code(
                "dbtwo",
                f'def open_db():\n    return pymysql.connect(\n        "db",\n        "root",\n        "{pw}",\n    )\n',
            )
        },
    )
    pw = v.password()
    add(
        "HTTPBasicAuth",
        pw,
        files={"app/client.py": _code("client", f'AUTH = HTTPBasicAuth("svc", "{pw}")')},
    )
    pw = v.password()
    add(
        "smtp login",
        pw,
        files={
            "app/smtp.py": _code(
                "smtp", f'def send():\n    server.login("mailer@example.com", "{pw}")\n'
            )
        },
    )
    pw = v.password()
    add(
        "ldap bind",
        pw,
        files={
            "app/ldap.py": _code(
                "ldap",
                f'def bind(conn):\n    conn.simple_bind_s("cn=admin,dc=example,dc=org", "{pw}")\n',
            )
        },
    )
    pw = v.password()
    add(
        "requests auth tuple",
        pw,
        files={
            "app/fetch.py": _code(
                "fetch", f'def get(url):\n    return requests.get(url, auth=("svc", "{pw}"))\n'
            )
        },
    )
    tok = v.chars(32)
    add(
        "bearer header in javascript",
        tok,
        files={"web/fetch.js": f'export const headers = {{ Authorization: "Bearer {tok}" }};\n'},
    )
    basic = base64.b64encode(f"svc:{v.password()}".encode()).decode()
    add(
        "basic auth header",
        basic,
        files={"app/basic.py": _code("basic", f'HEADERS = {{"Authorization": "Basic {basic}"}}')},
    )
    pw = v.password()
    add(
        "sql identified by",
        pw,
        files={"migrations/001_users.sql": f"CREATE USER app IDENTIFIED BY '{pw}';\n"},
    )
    pw = v.password()
    add(
        "sql role password",
        pw,
        files={"migrations/002_roles.sql": f"CREATE ROLE report WITH LOGIN PASSWORD '{pw}';\n"},
    )
    pw = v.password()
    add(
        "maven settings.xml",
        pw,
        files={
            "settings.xml": f"<settings><server><id>repo</id><password>{pw}</password></server></settings>\n"
        },
    )
    npm = "npm_" + v.chars(36)
    add(".npmrc auth token", npm, files={".npmrc": f"//registry.npmjs.org/:_authToken={npm}\n"})
    pypi = "pypi-AgEIcHlwaS5vcmc" + v.chars(60, ALNUM + "_-")
    add(
        ".pypirc token",
        pypi,
        files={".pypirc": f"[pypi]\nusername = __token__\npassword = {pypi}\n"},
        cores=(pypi[-40:],),
    )
    pw = v.password()
    add(".netrc", pw, files={".netrc": f"machine api.example.com login bot password {pw}\n"})
    pw = v.password()
    add(
        "export in a README",
        pw,
        files={
            "docs/deploy.md": f"Deploy the `app/build.py` step:\n\n```\nexport API_TOKEN={pw}\n```\n"
        },
    )
    pw = v.password()
    add(
        "password in a commit message",
        pw,
        message=f"Rotate the staging password to {pw} after the leak",
        files={"app/rotate.py": _code("rotate", "DAYS = 30")},
    )
    pw = v.password()
    add(
        "PASSWORD= in a commit message body",
        pw,
        message=f"Seed the test database\n\nRun it with PASSWORD={pw} set.",
        files={"app/seed.py": _code("seed", "ROWS = 10")},
    )
    ghp2 = "ghp_" + v.chars(36)
    add(
        "github token in a commit message",
        ghp2,
        message=f"Use the CI token {ghp2} in the pipeline",
        files={"app/ci.py": _code("ci", "JOBS = 4")},
    )
    stripe2 = "sk_live_" + v.chars(24)
    add(
        "token as an author name",
        stripe2,
        author=(stripe2, "deploy@example.com"),
        files={"app/deploy.py": _code("deploy", "TARGET = 'prod'")},
    )
    gl2 = "glpat-" + v.chars(20)
    add(
        "token as a folder name",
        gl2,
        files={f"keys/{gl2}/loader.py": _code("loader", "PATHS = []")},
    )
    azure = base64.b64encode(v.chars(64).encode()).decode()
    add(
        "azure storage key",
        azure,
        files={
            "app/blob.py": _code(
                "blob",
                f'CONN = "DefaultEndpointsProtocol=https;AccountName=app;AccountKey={azure};EndpointSuffix=core.windows.net"',
            )
        },
    )
    twilio = "SK" + v.hexes(32)
    add("twilio key", twilio, files={"app/sms.py": _code("sms", f'TWILIO_KEY = "{twilio}"')})
    sendgrid = f"SG.{v.chars(22, ALNUM + '_-')}.{v.chars(43, ALNUM + '_-')}"
    add(
        "sendgrid key",
        sendgrid,
        files={"app/mailer.py": _code("mailer", f'SENDGRID = "{sendgrid}"')},
    )
    telegram = f"{v.chars(9, string.digits)}:AA{v.chars(33, ALNUM + '_-')}"
    add(
        "telegram bot token",
        telegram,
        files={"app/bot.py": _code("bot", f'BOT_TOKEN = "{telegram}"')},
        cores=(telegram[12:],),
    )
    hf = "hf_" + v.chars(34, string.ascii_letters)
    add("hugging face token", hf, files={"app/hub.py": _code("hub", f'login(token="{hf}")')})
    django = f"django-insecure-{v.chars(30)}"
    add("django secret key", django, files={"app/web.py": _code("web", f'SECRET_KEY = "{django}"')})
    pw = v.password()
    add(
        "docker-compose environment",
        pw,
        files={
            "docker-compose.yml": f"services:\n  db:\n    environment:\n      MYSQL_ROOT_PASSWORD: {pw}\n"
        },
    )
    salt = v.chars(36)
    add("high-entropy salt", salt, files={"app/salt.py": _code("salt", f'SESSION_SALT = "{salt}"')})
    return forms


# ---- the repository and the run ------------------------------------------------------

BRANCH_KEY = Values(SEED + 1).aws()


def _plant(root: Path, forms: list[Canary]) -> tuple[RepoBuilder, dict[str, str]]:
    """One commit per form (authors rotate), then a commit that edits some
    code files again (their secrets stay in later versions too)."""
    repo = RepoBuilder(root / "canaries", branch=f"release-{BRANCH_KEY}")
    repo.write("app/__init__.py", '"""The app."""\n')
    repo.write("app/core.py", python_module("core", 3))
    repo.commit("Start the service with its core module", ALICE)
    commits: dict[str, str] = {}
    authors: list[tuple[str, str]] = [ALICE, BOB, CAROL]
    for index, canary in enumerate(forms):
        for path, content in canary.files.items():
            repo.write(path, content)
        repo.write(f"app/step_{index}.py", python_module(f"step{index}", 1))
        message = canary.message or f"Add {canary.form} support to the service"
        author = canary.author if canary.author != ALICE else authors[index % 3]
        commits[canary.form] = repo.commit(message, author)
    for index, canary in enumerate(forms[::4]):
        for path, content in canary.files.items():
            if path.endswith(".py"):
                later = f"\n\ndef later_{index}(x: int) -> int:\n    return x * {index} + 1\n"
                repo.write(path, content + later)
    repo.commit("Add later helpers everywhere", BOB)
    return repo, commits


def _found_in(data: Path, needles: dict[str, str]) -> list[str]:
    """'form: file' for every needle found in a file's bytes or name under `data`."""
    hits: list[str] = []
    lowered = {form: needle.lower().encode() for form, needle in needles.items()}
    for path in sorted(data.rglob("*")):
        name = str(path.relative_to(data)).lower().encode()
        content = path.read_bytes().lower() if path.is_file() else b""
        hits += [f"{form}: {path}" for form, n in lowered.items() if n in content or n in name]
    return hits


@pytest.fixture(scope="module")
def forms() -> list[Canary]:
    return canary_forms(Values(SEED))


def test_the_generator_makes_many_distinct_forms(forms: list[Canary]) -> None:
    assert len(forms) >= 35
    assert len({c.form for c in forms}) == len(forms)
    values = [n for c in forms for n in c.needles()]
    assert len(set(values)) == len(values)
    # Another seed gives other values: nothing is tuned to one literal.
    assert not {c.value for c in forms} & {c.value for c in canary_forms(Values(SEED + 7))}


@pytest.mark.parametrize(("policy", "seed"), [("scrub", SEED), ("drop", SEED), ("scrub", 2718)])
def test_no_canary_reaches_any_file_of_the_data_dir(tmp_path: Path, policy: str, seed: int) -> None:
    forms = canary_forms(Values(seed))
    repo, commits = _plant(tmp_path, forms)
    data = tmp_path / "data"
    (data / "logs").mkdir(parents=True)
    config = tmp_path / "config.toml"
    config.touch()
    env = {"SHOPTALK_DATA_DIR": str(data), "SHOPTALK_CONFIG": str(config)}
    with (data / "logs" / "mine.log").open("w") as log:
        run = subprocess.run(
            [*CLI, "mine", "--repo", str(repo.path), "--secrets", policy],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**_base_env(), **env},
            check=False,
        )
    log_text = (data / "logs" / "mine.log").read_text(errors="replace")
    assert run.returncode == 0, log_text
    needles = {f"{c.form} #{i}": n for c in forms for i, n in enumerate(c.needles())}
    needles["secret in the branch name"] = BRANCH_KEY
    assert _found_in(data, needles) == []
    # The run did mine the canaries' commits (so a leak was possible)...
    store = RepoStore.for_repo(data, repo.path)
    manifest = json.loads((store.dataset_dir / "manifest.json").read_text())
    assert manifest["commit_range"]["mined_commits"] == len(forms) + 2
    assert manifest["skipped_commits"] == {} and manifest["skipped_files"] == {}
    assert sum(manifest["secrets"]["found"].values()) >= len(forms)
    if policy == "scrub":
        cached = [
            json.loads(line)
            for batch in store.root.rglob("batch-*.jsonl")
            for line in batch.read_text().splitlines()
        ]
        mined_commits = {r["commit"] for r in cached}
        assert set(commits.values()) <= mined_commits
        placeholders = "\n".join(json.dumps(r) for r in cached)
        assert placeholders.count("<SECRET_") >= len(forms)
    else:
        assert manifest["secrets"]["instances_dropped"] > 0
    # ...and the names and branch it writes are the scrubbed ones.
    assert manifest["branch"].endswith("<SECRET_AWS_ACCESS_KEY>")
    emails = [e for a in manifest["authors"].values() for e in a["emails"]]
    assert any(e.startswith("<SECRET_") for e in emails)


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SHOPTALK_")}


# A rule that looks for secrets must not turn ordinary text into placeholders:
# code (also quoted in a README or a commit message), configs, prose.
CODE_PLACES = ("app/x.py", "web/x.js", "README.md", "COMMIT_EDITMSG")
CONFIG_PLACES = ("deploy/x.yaml", "config/app.toml", ".env", "README.md", "COMMIT_EDITMSG")
ORDINARY = [
    (line, place)
    for lines, places in (
        (
            (
                "password = get_password()",
                "password=None",
                "    token = next_token(stream)",
                "    password = settings.DB_PASSWORD",
                "def login(self, user: str, password: str) -> bool:",
                "    client.login(username=user, password=password)",
                'parser.add_argument("--password", help="the password (prompted when missing)")',
                "signal.connect(handler, sender=Model)",
                'sock.connect(("localhost", 8080))',
                "tokenizer = AutoTokenizer.from_pretrained(name)",
                "// read-only: the token is refreshed by the client",
                "    secret = os.environ['APP_SECRET']",
            ),
            CODE_PLACES,
        ),
        (
            (
                "max_tokens: 256",
                "tokenizer: bert-base-uncased",
                "password_min_length = 12",
                "password:",
                "token_url: https://auth.example.com/token",
                "DB_PASSWORD=${DB_PASSWORD}",
                "password: ${{ secrets.DB_PASSWORD }}",
                "api_key: <your api key>",
                "secret: changeme",
            ),
            CONFIG_PLACES,
        ),
        (
            (
                "mkdir -p build/out && cp -p a b",
                "docker run -p 8080:80 nginx",
                "export DB_PASSWORD=$DB_PASSWORD",
                "mysql -u root -p app < dump.sql",
                "The password is required for the admin user.",
                "Set `password: <your password>` in the config.",
                "Pass the token to the client; the secret is rotated weekly.",
            ),
            ("README.md", "scripts/run.sh", "COMMIT_EDITMSG"),
        ),
    )
    for line in lines
    for place in places
]


@pytest.mark.parametrize(("line", "filename"), ORDINARY)
def test_ordinary_lines_are_left_alone(line: str, filename: str) -> None:
    from shoptalk.trainer.hygiene import SecretScrubber

    with SecretScrubber() as scrubber:
        clean, counts = scrubber.scrub(line, filename)
    assert (clean, dict(counts)) == (line, {})
