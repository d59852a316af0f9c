"""Credentials recognised by where they stand, not only by what they look like.

detect-secrets and the entropy test find tokens with a known shape or a
random look; a password such as `Sup3r-Secret!` has neither. These rules
find values by their context — the password argument of a known
connect/login call, a `-p<password>` or `--password x` flag, an assignment
to a password/secret/token name in any syntax (`password: x`,
`"password": "x"`, `PASSWORD=x`, `<password>x</password>`, `IDENTIFIED BY
'x'`), an `Authorization` header, `user:pass@` in a DSN, "the password is x"
in prose — plus vendor token shapes detect-secrets does not know (Mailgun,
Google, fine-grained GitHub, Hugging Face, ...).

Pure functions on text; `shoptalk.trainer.hygiene.SecretScrubber` calls them
and replaces what they find. Each returns `(type, start, end)` spans: only
that place is replaced (a password `pass` found in one call must not turn
every `pass` and `password` of the file into a placeholder). To keep
false positives down, a value must look like a literal: not a placeholder
(`$VAR`, `<value>`, `{{ x }}`, `None`, `changeme`), and in code not a name,
an attribute or a call (`password = get_password()`, `password=password`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

PASSWORD = "Password"
TOKEN = "Token"
Span = tuple[str, int, int]  # (secret type, start, end)

# A line can only give a finding below if it holds one of these (checked
# before the rules run; `test_context_hint_passes_every_rule` keeps it true).
CONTEXT_HINT = re.compile(
    r"(?i)pass|pwd|secret|token|key|auth|cred|bearer|identified|login|connect|bind|"
    r"(?<![\w-])-[pau]|--user|@(?:tcp|unix)\(|xox|aiza|hf_|shp|_v1_|sk-|sk_|rk_|npm_|"
    r"pypi-|gl[a-z]{2,6}-|gh[pousr]_|eyj|akia|asia|abia|acca|\d:aa|sg\.|github_pat_"
)
# The same test without the regex's alternation (which Python tries at every
# position: ~17 µs a line, most of the rules' time on ordinary code): the
# hint's words looked up in the lowered line, and its few shapes only where
# a character they need is present. ASCII lines only (`(?i)` also folds some
# non-ASCII letters, e.g. the Kelvin sign, that `str.lower` keeps apart);
# `test_fast_hints_agree_with_their_regexes` holds the two together.
_CONTEXT_WORDS = (
    *("pass", "pwd", "secret", "token", "key", "auth", "cred", "bearer", "identified"),
    *("login", "connect", "bind", "--user", "xox", "aiza", "hf_", "shp", "_v1_", "sk-"),
    *("sk_", "rk_", "npm_", "pypi-", "eyj", "akia", "asia", "abia", "acca", "sg."),
    "github_pat_",
)
_CONTEXT_SHAPES = re.compile(r"(?<![\w-])-[pau]|@(?:tcp|unix)\(|gl[a-z]{2,6}-|gh[pousr]_|\d:aa")


def has_context_hint(line: str) -> bool:
    """`CONTEXT_HINT.search(line)`, faster: whether a rule below may find anything."""
    if not line.isascii():
        return CONTEXT_HINT.search(line) is not None
    low = line.lower()
    for word in _CONTEXT_WORDS:
        if word in low:
            return True
    if "-" in low or "@" in low or "gh" in low or ":aa" in low:
        return _CONTEXT_SHAPES.search(low) is not None
    return False


# ---- vendor token shapes detect-secrets 1.5 misses ---------------------------------

VENDOR_TOKENS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # key-<32 lowercase letters and digits> (hex in newer keys), two digits at least
    ("Mailgun Key", re.compile(r"(?<![\w-])key-(?=[a-z]*\d[a-z]*\d)[0-9a-z]{32}(?![\w-])")),
    ("GitHub Token", re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,}")),
    ("GitHub Token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}")),
    ("Google API Key", re.compile(r"\bAIza[0-9A-Za-z_\-]{35}")),
    ("GitLab Token", re.compile(r"\bgl(?:pat|dt|rt|cbt|ptt|oas|ft|imt|agent)-[A-Za-z0-9_\-]{20,}")),
    ("Slack Token", re.compile(r"\bxox[abeoprs]-[A-Za-z0-9-]{10,}")),
    ("Stripe Key", re.compile(r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}")),
    ("Hugging Face Token", re.compile(r"\bhf_[A-Za-z0-9]{30,}")),
    ("Shopify Token", re.compile(r"\bshp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}")),
    ("DigitalOcean Token", re.compile(r"\bdo[opr]_v1_[a-f0-9]{64}")),
    ("API Key", re.compile(r"\bsk-(?:ant-|proj-|live-)?[A-Za-z0-9_\-]{32,}")),
    ("npm Token", re.compile(r"\bnpm_[A-Za-z0-9]{36}")),
    ("PyPI Token", re.compile(r"\bpypi-[A-Za-z0-9_\-]{50,}")),
    ("AWS Access Key", re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Z0-9])")),
    (
        "JSON Web Token",
        re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),
    ),
    ("Telegram Bot Token", re.compile(r"(?<!\d)\d{8,10}:AA[A-Za-z0-9_\-]{33}(?![\w-])")),
)

# ---- what a literal value looks like -------------------------------------------------

_PLACEHOLDER = re.compile(
    r"(?i)^(?:<.*|\$.*|%.*|\{.*|\[.*|.*\{\{.*|.*\$\{.*|\*+|x+|\.+|-+|_+|\?+|#+|"
    r"none|null|nil|true|false|yes|no|on|off|undefined|empty|required|optional|"
    r"changeme|change[_-]?me|example|redacted|hidden|masked|secret|secrets|password|"
    r"passwd|pass|token|your[_-].*|my[_-]?password|placeholder|todo|fixme|xxx.*|-.*|.*\.\.\.|"
    r".*…|test|testing|dummy|fake|foo|bar|baz|wrong\w*|invalid\w*|bad\w*)$"
)
# Words that follow "password" in prose or docs but are no password.
_STOPWORDS = frozenset(
    re.findall(
        r"\w+",
        "a an and are as at be by for from if in into is it its of on or the then this to "
        "was when where which while with flag option argument value file env variable field "
        "parameter prompt stdin here there below above same again instead options flags "
        "arguments parameters values requires required must should can will may not",
    )
)
# Words joined by hyphens or underscores ("read-only", "USER_OAUTH_TOKEN"):
# names and prose, not passwords (which have digits or other symbols).
_WORDS = re.compile(r"[A-Za-z]+(?:[-_'][A-Za-z]+)*[.,;:!?]?")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_NUMBER = re.compile(r"[+-]?\d[\d_]*(?:[.:]\d[\d_]*)*")
_TRAILING = ".,;:)]}"


def is_placeholder(value: str) -> bool:
    """`$VAR`, `<value>`, `{{ x }}`, `None`, `changeme`...: no secret."""
    return _PLACEHOLDER.match(value) is not None


def is_distinctive(value: str) -> bool:
    """A found secret worth replacing wherever else it shows: long and
    password-like enough that it is no ordinary word (`password`, `example`)."""
    return len(value) >= 8 and _password_like(value)


def _literal(value: str) -> bool:
    """Not a placeholder, a template or a plain word of prose."""
    return len(value) >= 3 and not _PLACEHOLDER.match(value) and value.lower() not in _STOPWORDS


def _password_like(value: str) -> bool:
    """What prose calls a password: a literal with a digit, a symbol, or
    mixed case (so "the password is required" is no finding)."""
    if not _literal(value) or len(value) < 4:
        return False
    if _WORDS.fullmatch(value):
        return False
    has_digit = any(c.isdigit() for c in value)
    has_symbol = any(not c.isalnum() for c in value)
    mixed = any(c.islower() for c in value) and any(c.isupper() for c in value[1:])
    return has_digit or has_symbol or mixed


def _first(regex: re.Pattern[str], text: str) -> int:
    found = regex.search(text)
    return found.start() if found else len(text)


def _expression(value: str, after: str, config: bool) -> bool:
    """A call, an index or (outside configuration files) an attribute, as in
    a snippet of code in a README: `password = get_password()`."""
    if after[:1] in ("(", "["):
        return True
    return not config and "." in value and _IDENTIFIER.fullmatch(value) is not None


def _quoted_literal(value: str) -> bool:
    """A value inside a string or comment of code (`"...;Password=x;"`): a
    literal unless it is a plain name (`# password=password`)."""
    plain_name = _IDENTIFIER.fullmatch(value) and not any(c.isdigit() for c in value)
    return _literal(value) and not plain_name


def _code_literal(value: str, after: str) -> bool:
    """An unquoted value in code: a literal only if it is not a name, an
    attribute, a number or a call (`get_password()`, `settings.PASSWORD`)."""
    if after[:1] in ("(", "[", "."):
        return False
    if _IDENTIFIER.fullmatch(value) and not (any(c.isdigit() for c in value) and "." not in value):
        return False
    return _password_like(value) and not _NUMBER.fullmatch(value)


# ---- assignments ---------------------------------------------------------------------

_NAME = (
    r"[\w.-]*(?:password|passwd|passwort|passphrase|pwd|secret|token|api[_-]?key|apikey"
    r"|access[_-]?key|secret[_-]?key|private[_-]?key|client[_-]?secret|auth[_-]?token"
    r"|credentials?)"
)
_UNQUOTED = re.compile(
    rf"(?i)(?<![\w.-])(?:export\s+|ENV\s+|set\s+)?(?P<name>{_NAME})\s*(?P<sep>=|:)[ \t]*"
    r"(?P<v>[^\s'\"`]{3,})"
)
# Where an unquoted value ends outside configuration files (`Password=x;`,
# `?password=x&`, `PASSWORD=x)`): configuration values run to the space.
_VALUE_END = re.compile(r"[,;&|<>()\[\]{}#]")
_XML = re.compile(
    r"(?i)<(?P<tag>[\w.:-]*(?:password|passwd|secret|token|api[_-]?key|apikey))>"
    r"\s*(?P<v>[^<\s]{3,})\s*</(?P=tag)>"
)
_SQL = re.compile(
    r"(?i)\b(?:IDENTIFIED\s+BY(?:\s+PASSWORD)?|PASSWORD)\s+(?P<q>['\"])(?P<v>[^'\"]{3,})(?P=q)"
)
# auth=("user", "password"): a pair, not a longer tuple
_AUTH_TUPLE = re.compile(
    r"(?i)\bauth\s*=\s*[(\[]\s*(?P<q1>['\"])[^'\"]*(?P=q1)\s*,\s*"
    r"(?P<q>['\"])(?P<v>[^'\"]{3,})(?P=q)\s*,?\s*[)\]]"
)
_PROSE = re.compile(
    r"(?i)\b(?:password|passwd|passphrase|passcode|pwd|secret)\s+"
    r"(?P<sep>is|was|to|now|becomes|->|→)\s+(?:now\s+|set\s+to\s+)?[`'\"]?"
    r"(?P<v>[^\s`'\"]{4,})"
)
_NETRC = re.compile(r"(?i)\bpassword\s+(?P<v>\S{3,})")
_NETRC_NAMES = (".netrc", "_netrc", ".pgpass")


def in_string_or_comment(line: str, position: int) -> bool:
    """Whether line[position] sits inside a string literal or after a `#` or
    `//` comment marker on this line of code (by counting quotes)."""
    quote = ""
    i = 0
    while i < position:
        char = line[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char == "#" or line.startswith("//", i):
            return True
        i += 1
    return bool(quote)


def _assignment_findings(line: str, code: bool, config: bool) -> Iterator[Span]:
    for match in _UNQUOTED.finditer(line):
        raw, at = match["v"], match.start("v")
        cut = len(raw) if config else _first(_VALUE_END, raw)
        value, after = raw[:cut], raw[cut:] + line[match.end() :]
        if code:
            # `password=get_password()` is an expression; inside a string or a
            # comment a value is a literal unless it is a plain name.
            found = in_string_or_comment(line, match.start()) and _quoted_literal(value)
        elif _expression(value, after, config):
            found = False
        elif match["sep"] == "=" or config:
            found = _literal(value)
        else:
            found = _password_like(value)
        if found:
            yield PASSWORD, at, at + len(value)
    for regex in (_XML, _SQL, _AUTH_TUPLE):
        for match in regex.finditer(line):
            if _literal(match["v"]):
                yield PASSWORD, *match.span("v")
    for match in _PROSE.finditer(line):
        value = match["v"].rstrip(_TRAILING)
        if code:
            found = _code_literal(value, line[match.end() :])
        else:
            found = _password_like(value) and "(" not in value
        if found:
            yield PASSWORD, match.start("v"), match.start("v") + len(value)


# ---- command lines -------------------------------------------------------------------

_MYSQL = re.compile(r"(?i)\b(?:mysql\w*|mariadb\w*)\b|(?<![\w-])-u\s*\S")
# `-pSECRET` (mysql's password glued to the flag) and `-p'SECRET'`
_GLUED_P = re.compile(
    r"(?<![\w-])-p(?:(?P<q>['\"])(?P<qv>[^'\"\s]{3,})(?P=q)|(?P<v>[^\s'\"`;|&<>()]{3,}))"
)
_LOGIN_CLI = re.compile(
    r"(?i)\b(?:docker|podman|nerdctl|helm|oras|buildah|skopeo)\b.*\blogin\b|\bsshpass\b"
)
_SPACED_P = re.compile(r"(?<![\w-])-p\s+(?P<v>[^\s'\"`;|&<>]{3,})")
_REDIS_A = re.compile(r"\bredis-cli\b.*?(?<![\w-])-a\s+(?P<v>[^\s'\"`;|&<>]{3,})")
_LONG_FLAG = re.compile(
    r"(?i)(?:^|(?<=[\s\"'(\[,=]))--?[a-z-]*?(?:password|passwd|pass|pwd|secret|token|api-?key"
    r"|access-?key|secret-?key|client-?secret|auth-?token)(?:=|\s+)"
    r"(?:(?P<q>['\"])(?P<qv>[^'\"]{3,}?)(?P=q)|(?P<v>[^\s'\"`;|&<>]{3,}))"
)
_CURL_USER = re.compile(
    r"(?<![\w-])(?:-u|--user)\s*(?P<q>['\"]?)[^\s:'\"]+:(?P<v>[^\s'\"@]{3,})(?P=q)"
)
_DSN = re.compile(r"(?<![\w/])[\w.-]+:(?P<v>[^\s:@/'\"]{3,})@(?:tcp|unix)\(")
_AUTH_HEADER = re.compile(
    r"(?i)\b(?:Proxy-)?Authorization[\"']?\s*[:=,]\s*[\"']?(?:Basic|Bearer|Token|Bot)\s+"
    r"(?P<v>[A-Za-z0-9+/._~\-]{8,}=*)"
)
_BEARER = re.compile(r"(?i)\bBearer\s+(?P<v>[A-Za-z0-9._~+/\-]{20,}=*)")


def _value_span(match: re.Match[str]) -> tuple[str, int, int]:
    """The value a flag rule matched (quoted or not) and where it is."""
    group = "qv" if match.groupdict().get("qv") else "v"
    return match[group] or "", *match.span(group)


def _command_findings(line: str) -> Iterator[Span]:
    if _MYSQL.search(line):
        for match in _GLUED_P.finditer(line):
            value, start, end = _value_span(match)
            if _literal(value) and not _NUMBER.fullmatch(value):
                yield PASSWORD, start, end
    if _LOGIN_CLI.search(line):
        for match in _SPACED_P.finditer(line):
            if _literal(match["v"]):
                yield PASSWORD, *match.span("v")
    for regex in (_REDIS_A, _LONG_FLAG, _CURL_USER, _DSN):
        for match in regex.finditer(line):
            value, start, end = _value_span(match)
            if _literal(value):
                yield PASSWORD, start, end
    for regex in (_AUTH_HEADER, _BEARER):
        for match in regex.finditer(line):
            if _literal(match["v"]):
                yield TOKEN, *match.span("v")


def line_findings(line: str, *, code: bool, config: bool, filename: str = "") -> list[Span]:
    """Credentials on one line. `code`: the line is from a program (an
    unquoted value there must not be a name or a call); `config`: from a
    configuration file (`name: value` assigns there)."""
    if not has_context_hint(line):
        return []
    found = [(kind, *m.span()) for kind, regex in VENDOR_TOKENS for m in regex.finditer(line)]
    found += _assignment_findings(line, code, config)
    found += _command_findings(line)
    if filename.rsplit("/", 1)[-1].lower() in _NETRC_NAMES:
        found += [(PASSWORD, *m.span("v")) for m in _NETRC.finditer(line) if _literal(m["v"])]
    return found


# ---- calls (may span lines) ----------------------------------------------------------

# Known connect/login calls and the position of their password argument.
_PASSWORD_POSITION = {
    "connect": 2,
    "getConnection": 2,
    "get_connection": 2,
    "FTP": 2,
    "FTP_TLS": 2,
    "login": 1,
    "authenticate": 1,
    "bind": 1,
    "bind_s": 1,
    "simple_bind": 1,
    "simple_bind_s": 1,
    "HTTPBasicAuth": 1,
    "HTTPDigestAuth": 1,
    "HTTPProxyAuth": 1,
    "BasicAuth": 1,
    "DigestAuth": 1,
    "basicAuth": 1,
    "NetworkCredential": 1,
    "PasswordCredential": 1,
    "UsernamePasswordCredentials": 1,
    "set_password": 0,
    "pass_": 0,
}
_CALL = re.compile(r"(?<![\w$])(?P<name>" + "|".join(_PASSWORD_POSITION) + r")\s*\(")
# Each name above holds one of these: a text without any has no such call
# (an `in` test is ~100x faster than the regex's alternation over a file).
_CALL_PARTS = ("onnect", "FTP", "login", "authenticate", "bind", "Auth", "Credential", "pass")
_STRING = re.compile(r"[rRbBuU]{0,2}(?P<q>[\"'`])(?P<body>(?:\\.|(?!(?P=q))[^\\\n])*)(?P=q)")
# Between arguments: spaces, and line breaks (with a diff's +/- marker).
_GAP = re.compile(r"(?:[ \t\r]|\n[+-]?)*")
_KEYWORD_ARG = re.compile(r"[A-Za-z_]\w*\s*=(?!=)")
_MAX_CALL_CHARS = 600
_MAX_ARGS = 8


def _skip_gap(text: str, i: int, stop: int) -> int:
    gap = _GAP.match(text, i, stop)
    return gap.end() if gap else i


def _skip_argument(text: str, i: int, stop: int) -> int:
    """Index of the `,` or `)` that ends the non-literal argument at text[i]."""
    depth = 0
    while i < stop:
        char = text[i]
        if char in "\"'`":
            string = _STRING.match(text, i)
            i = string.end() if string else i + 1
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                return i
            depth -= 1
        elif char == "," and depth == 0:
            return i
        i += 1
    return stop


def positional_arguments(text: str, start: int) -> list[tuple[int, int] | None]:
    """The positional arguments of the call whose `(` ends at text[start-1]:
    where a string literal's body is, or None for anything else; stops at
    the first keyword argument."""
    stop = min(len(text), start + _MAX_CALL_CHARS)
    args: list[tuple[int, int] | None] = []
    i = _skip_gap(text, start, stop)
    while i < stop and text[i] != ")" and len(args) < _MAX_ARGS:
        if _KEYWORD_ARG.match(text, i):
            break
        string = _STRING.match(text, i, stop)
        after = _skip_gap(text, string.end(), stop) if string else i
        if string and after < stop and text[after] in ",)":
            args.append(string.span("body"))
            i = after
        else:
            args.append(None)
            i = _skip_argument(text, i, stop)
        if i >= stop or text[i] != ",":
            break
        i = _skip_gap(text, i + 1, stop)
    return args


def call_findings(text: str) -> list[Span]:
    """Password literals passed positionally to known connect/login calls,
    e.g. `psycopg2.connect("db", "admin", "Sup3r!")`, also across lines."""
    found: list[Span] = []
    if not any(part in text for part in _CALL_PARTS):
        return found
    for match in _CALL.finditer(text):
        position = _PASSWORD_POSITION[match["name"]]
        args = positional_arguments(text, match.end())
        where = args[position] if len(args) > position else None
        if where is not None and _literal(text[where[0] : where[1]]):
            found.append((PASSWORD, *where))
    return found
