#!/usr/bin/env python3
"""Sage Router: one local endpoint for every model.

A self-hosted gateway, standard library only. Point any OpenAI- or Anthropic-dialect client at
http://127.0.0.1:8790 and the router translates the request for whichever provider serves the
model, streams the answer back in the client's own dialect, and fails over to the next candidate
when a provider is down, slow, rate-limited or out of quota.

Run:    python3 router.py [--host 127.0.0.1] [--port 8790] [--config providers.json]
                          [--env-file .env] [--data-dir DIR]
Test:   python3 -m unittest test_router -v          (benchmark: python3 test_router.py bench)

A request travels one straight line (see DESIGN.md of the project):
    front (HTTP, auth, limits) -> decode (client dialect -> neutral request)
    -> plan (model name -> ordered candidates) -> dispatch (encode, send, first event?, failover,
    pipe) -> record.

Contents (each section uses only the sections above it):
    1. Settings and config ........ .env parsing, ${VAR} expansion, providers.json validation
    2. Neutral form and codecs .... the neutral request/event form; SSE framing; one codec per
                                    dialect: OpenAI Chat Completions, Anthropic Messages, OpenAI
                                    Responses, Gemini, Ollama; the codec table
    3. Catalogue .................. providers, keys, models and capabilities; discovery; OpenClaw
                                    import
    4. Routing .................... intent detection, health (circuit breakers), affinity, the plan
    5. Transport and dispatch ..... upstream connection pool, timeouts, failover, stream piping
    6. Observability .............. request log (SQLite), usage and cost, metrics, /health
    7. The router ................. the composition root: state, reload, persistence, threads
    8. HTTP front ................. handler, endpoints, auth, limits, error replies, status page
    9. Command line and main ...... serve, check, models, route, reset, systemd-unit
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import binascii
import difflib
import errno
import fnmatch
import functools
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import os
import queue
import random
import re
import secrets
import select
import signal
import socket
import sqlite3
import struct
import subprocess
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "0.1.0"

log = logging.getLogger("sage-router")


# =================================================================================================
# 1. Settings and config
# =================================================================================================

DEFAULT_PORT = 8790

#: Tunables under "settings" in providers.json; every one can be overridden there.
DEFAULT_SETTINGS = {
    "connect_timeout": 10.0,         # seconds to open a TCP/TLS connection to a provider
    "first_byte_timeout": 120.0,     # seconds from sending a request to the response headers
    "idle_timeout": 300.0,           # longest silence allowed inside a provider's stream
    "client_header_timeout": 30.0,   # a client must send its request headers within this
    "client_body_timeout": 60.0,     # ... and its body with no gap longer than this
    "client_body_deadline": 300.0,   # ... and all of it within this
    # open client connections at most; 0: sized to the file limit (<= 512)
    "max_connections": 0,
    # Host names the router answers to without a key, beyond its own address
    "allowed_hosts": [],
    # web origins (https://app.example) that may call it from a browser
    "allowed_origins": [],
    "max_body_bytes": 32 * 1024 * 1024,
    "cooldown_seconds": 30.0,        # first cooldown of a failed candidate (doubles, capped)
    "max_cooldown_seconds": 600.0,
    "quota_cooldown_seconds": 3600.0,  # cooldown after a quota or billing error
    "breaker_threshold": 1,          # consecutive failures that open a candidate's breaker
    # first probe of an open breaker after this (then 10, 20, ...); 0: never
    "probe_seconds": 5.0,
    # "PROVIDER/MODEL" asked for the intent when the rules are unsure
    "intent_model": None,
    "intent_model_below": 0.3,       # ... when their confidence is below this
    "intent_model_timeout": 1.5,     # ... within this many seconds (else the rules' answer stands)
    # memory for Responses kept for previous_response_id (oldest go first)
    "response_store_mb": 32.0,
    "default_max_tokens": 4096,      # sent to providers that need max_tokens when none was given
    "discovery_interval": 60.0,      # seconds between two refreshes of a provider's model list
    "import_openclaw": True,         # import the providers of ~/.openclaw/openclaw.json
    "log_prompts": False,            # store prompt and reply text in the request log
    "log_retention_days": 30.0,      # request log rows older than this are deleted
    "log_retention_rows": 1000000,   # ... and beyond this many rows
    "shutdown_grace_seconds": 30.0,  # SIGTERM: how long in-flight requests may take to finish
    "verify_tls": True,
    # "redis://[:password@]host:6379/0" (Redis or Valkey; ${VAR} from .env): state shared by
    # several routers (boxes); null: each keeps its own
    "shared_state": None,
}

# numeric settings where 0 means off / automatic
ZERO_OK_SETTINGS = {"probe_seconds", "max_connections"}

#: Keys a provider entry may carry (anything else is a config error: typos must not pass).
PROVIDER_KEYS = {
    "api", "base_url", "api_key", "models", "enabled", "headers", "verify_tls", "ca_file",
    "connect_timeout", "first_byte_timeout", "idle_timeout", "max_tokens_field",
    "anthropic_version", "discover", "discover_interval", "description", "quirks",
}

#: What some OpenAI-compatible servers do that OpenAI does not, and the OpenAI codec mends when a
#: provider lists the quirk in "quirks" or its host is in HOST_QUIRKS (faithful providers keep their
#: byte-for-byte stream passthrough). Data, read by the codec: never a provider key or branch each.
PROVIDER_QUIRKS = {
    "max_completion_tokens": "the server wants max_completion_tokens, not max_tokens (OpenAI's "
                             "reasoning models; the same as \"max_tokens_field\": "
                             "\"max_completion_tokens\")",
    "tool_choice_any": "the server says tool_choice \"any\" where OpenAI says \"required\" "
                       "(Mistral)",
    "embed_input_type": "its retrieval embedding models need input_type \"query\" or \"passage\" "
                        "(NVIDIA NIM; the router sends query unless the client said otherwise)",
    "repeats_tool_call_ids": "its streams repeat a tool call's id and name in every chunk "
                             "(llama-cpp-python's server; reported of Fireworks, DeepSeek and "
                             "Qwen's API): OpenAI clients would join them into one long id and "
                             "name; the router sends them once",
}
#: Hosts whose quirks are known: they apply without a "quirks" entry.
HOST_QUIRKS = {"api.mistral.ai": ("tool_choice_any",),
               "integrate.api.nvidia.com": ("embed_input_type",)}
PROVIDER_APIS = ("openai", "anthropic", "openai-responses", "gemini", "ollama")
AUTO_NAMES = ("auto",)          # model names that mean "detect the intent and use its route"


def _is_glob(s):
    return any(c in s for c in "*?[")


class ConfigError(Exception):
    """An invalid config: names the file, the key and the expected form."""

    def __init__(self, file, key, expected):
        self.file, self.key, self.expected = file, key, expected
        super().__init__(f"{file}: {key}: {expected}")


class MissingVar(Exception):
    """A ${VAR} without default whose variable is not set."""


def parse_dotenv(text):
    """Parse a .env file: `KEY=value` lines, `export KEY=value`, `#` comments, single quotes
    (literal), double quotes (with \\n, \\t, \\" and \\\\ escapes) and ` # inline comments` after
    unquoted values. Returns a dict; malformed lines are skipped."""
    out = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            continue
        value = value.strip()
        if value[:1] in ("'", '"'):
            quote = value[0]
            end = value.find(quote, 1)
            while quote == '"' and end > 0 and value[end - 1] == "\\":
                end = value.find(quote, end + 1)
            body = value[1:end] if end > 0 else value[1:]
            if quote == '"':
                body = re.sub(r'\\([nt"\\])',
                              lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)
            value = body
        else:
            value = re.split(r"\s+#", value, 1)[0].strip()
        out[key] = value
    return out


_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_vars(value, env, used=None):
    """Expand ${VAR} and ${VAR:-default} in a string. An unset VAR without default raises
    MissingVar; an empty one with `:-` takes the default. `used` collects the names seen."""
    def sub(m):
        name, default = m.group(1), m.group(2)
        if used is not None:
            used.append(name)
        val = env.get(name)
        if val is None or (val == "" and default is not None):
            if default is None:
                raise MissingVar(name)
            return default
        return val
    return _VAR_RE.sub(sub, value)


def default_data_dir():
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                            ".local", "state")
    return os.path.join(base, "sage-router")


def private_dir(path):
    """Create the data directory 0700 (one that exists is left as it is: it may be shared)."""
    os.makedirs(path, mode=0o700, exist_ok=True)


def open_private(path, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC):
    """Open (creating it 0600) a state file; one an older version left readable by others is
    tightened. Returns the descriptor."""
    fd = os.open(path, flags, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except OSError:
        pass                         # not ours to change (a shared data directory): keep going
    return fd


def private_db(path):
    """An SQLite file (and its -wal and -shm) made 0600 without opening a descriptor to one that
    exists: closing any descriptor of a file drops every POSIX lock this process holds on it,
    SQLite's included (another connection of this process would then see a disk I/O error)."""
    for name in (path, path + "-wal", path + "-shm"):
        try:
            if not os.path.exists(name):
                if name == path:
                    os.close(os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            elif os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)
        except OSError:
            pass                     # created meanwhile, or not ours to change: keep going


def _commit(db):
    """COMMIT, or, when it fails, ROLLBACK (so the connection is never left in a transaction)."""
    try:
        db.execute("COMMIT")
    except sqlite3.Error:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        raise


def write_tx(db, fn):
    """fn(db) inside one write transaction (BEGIN IMMEDIATE: other connections wait), committed,
    or rolled back when it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        out = fn(db)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    _commit(db)
    return out


def open_db(path, schema=(), **kw):
    """An SQLite connection to a state file in WAL mode, with its tables: `schema`'s statements
    run in one write transaction. Several connections (the request log's writer, the key store,
    another process) may open one file at once: switching a fresh file to WAL can be refused
    while another does (SQLITE_BUSY, not waited for), so that is tried again for a while."""
    private_dir(os.path.dirname(path))
    private_db(path)             # (SQLite gives its journal files the database's mode)
    db = sqlite3.connect(path, timeout=10, **kw)
    for attempt in range(200):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or attempt == 199:
                db.close()
                raise
            time.sleep(0.05)
    db.execute("PRAGMA synchronous=NORMAL")
    if schema:
        write_tx(db, lambda db: [db.execute(sql) for sql in schema])
    return db


def _check(cond, file, key, expected):
    if not cond:
        raise ConfigError(file, key, expected)


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


#: Model metadata fields and the form each must have (providers.json, and what a cache file gives).
MODEL_META_FORMS = {
    "context_window": (_positive_int, "a positive integer"),
    "max_output": (_positive_int, "a positive integer"),
    "tools": (lambda v: isinstance(v, bool), "true or false"),
    "reasoning": (lambda v: isinstance(v, bool), "true or false"),
    "chat": (lambda v: isinstance(v, bool), "true or false"),
    "embedding": (lambda v: isinstance(v, bool), "true or false"),
    "dimensions": (_positive_int, "a positive integer (an embedding model's vector size)"),
    "structured": (lambda v: v in ("native", "tool", "prompt"),
                   "\"native\", \"tool\" or \"prompt\" (how it gives JSON that fits a schema)"),
    "input": (lambda v: isinstance(v, list) and set(v) <= {"text", "image", "pdf"},
              "a list of \"text\", \"image\" and \"pdf\""),
    "cost": (lambda v: isinstance(v, dict) and all(
        k in ("input", "output", "cached", "cache_write", "reasoning") and _num(x) and x >= 0
        for k, x in v.items()),
             "{\"input\": USD, \"output\": USD, \"cached\": USD, \"cache_write\": USD, "
             "\"reasoning\": USD} per million tokens (all optional)"),
    "intents": (lambda v: isinstance(v, list) and set(v) <= {"code", "creative",
                                                             "reasoning", "general"},
                "a list of \"code\", \"creative\", \"reasoning\", \"general\""),
    "description": (lambda v: isinstance(v, str), "a string (a free-text note)"),
    "completions": (lambda v: v in ("native", "template", "chat"),
                    "\"native\", \"template\" or \"chat\" (how it fills in the middle for "
                    "/v1/completions)"),
    "fim": (lambda v: v in FIM_TEMPLATES or isinstance(v, str) and "{prefix}" in v
            and "{suffix}" in v,
            "a template's name (qwen, codellama, starcoder, deepseek, codegemma) or a template "
            "with {prefix} and {suffix}"),
}


def clean_model_meta(meta):
    """The well-formed part of model metadata read from a state file (anything else is dropped)."""
    return {k: v for k, v in meta.items() if k in MODEL_META_FORMS and MODEL_META_FORMS[k][0](v)} \
        if isinstance(meta, dict) else {}


def validate_config(cfg, file):
    """Check the shape of a parsed providers.json. Raises ConfigError naming the first problem."""
    _check(isinstance(cfg, dict), file, "(top level)",
           "a JSON object with \"providers\" and \"routes\"")
    known = {"providers", "routes", "aliases", "strict", "settings", "description",
             "$schema", "_comment"}
    for k in cfg:
        _check(k in known, file, k, f"unknown top-level key; expected one of {sorted(known)}")
    providers = cfg.get("providers", {})
    _check(isinstance(providers, dict), file, "providers", "an object mapping NAME to a provider")
    for name, p in providers.items():
        _validate_provider(name, p, file)
    _validate_routes(cfg, providers, file)
    _check(isinstance(cfg.get("strict", False), bool), file, "strict", "true or false")
    settings = cfg.get("settings", {})
    _check(isinstance(settings, dict), file, "settings", "an object of tunables")
    for k, v in settings.items():
        _validate_setting(k, v, providers, file)
    return cfg


def _validate_provider(name, p, file):
    """One entry of "providers"."""
    at = f"providers.{name}"
    _check(re.fullmatch(r"[A-Za-z0-9_.-]+", name) is not None, file, at,
           "a provider name of letters, digits, '_', '.' or '-'")
    _check(isinstance(p, dict), file, at, "an object with api, base_url, api_key, models")
    for k in p:
        _check(k in PROVIDER_KEYS, file, f"{at}.{k}",
               f"unknown key; expected one of {sorted(PROVIDER_KEYS)}")
    _check(p.get("api") in PROVIDER_APIS, file, f"{at}.api", f"one of {list(PROVIDER_APIS)}")
    _check(isinstance(p.get("base_url"), str) and p["base_url"], file, f"{at}.base_url",
           "a URL string such as \"https://api.openai.com/v1\"")
    key = p.get("api_key")
    _check(key is None or isinstance(key, str) or
           (isinstance(key, list) and all(isinstance(x, str) for x in key)),
           file, f"{at}.api_key", "a string like \"${OPENAI_API_KEY}\" or a list of strings")
    models = p.get("models", {})
    if isinstance(models, list):
        _check(all(isinstance(m, str) for m in models), file,
               f"{at}.models", "model id strings")
    else:
        _check(isinstance(models, dict), file, f"{at}.models",
               "an object mapping MODEL_ID to its metadata")
        for mid, meta in models.items():
            _check(isinstance(meta, dict), file, f"{at}.models.{mid}",
                   "an object (may be empty: {})")
            # a typo ("context" for "context_window") would be ignored in silence
            for k in meta:
                near = difflib.get_close_matches(k, list(MODEL_META_FORMS), n=1, cutoff=0.5)
                _check(k in MODEL_META_FORMS, file, f"{at}.models.{mid}.{k}",
                       f"a model metadata key, one of {sorted(MODEL_META_FORMS)}" +
                       (f" (did you mean \"{near[0]}\"?)" if near else ""))
            for f, (ok, expected) in MODEL_META_FORMS.items():
                _check(f not in meta or ok(meta[f]), file, f"{at}.models.{mid}.{f}", expected)
    _check(isinstance(p.get("headers", {}), dict), file, f"{at}.headers",
           "an object of header: value")
    for f in ("connect_timeout", "first_byte_timeout", "idle_timeout"):
        _check(f not in p or (_num(p[f]) and p[f] > 0), file, f"{at}.{f}",
               "a positive number of seconds")
    _check(p.get("enabled", True) in (True, False) or isinstance(p.get("enabled"), str), file,
           f"{at}.enabled", "true, false or a string like \"${OLLAMA_ENABLED:-false}\"")
    _check(isinstance(p.get("discover", True), bool), file, f"{at}.discover", "true or false")
    di = p.get("discover_interval", 1)
    _check(_num(di) and di > 0, file, f"{at}.discover_interval", "a positive number of seconds")
    _check(p.get("max_tokens_field", "max_tokens") in ("max_tokens", "max_completion_tokens"),
           file, f"{at}.max_tokens_field", "\"max_tokens\" or \"max_completion_tokens\"")
    quirks = p.get("quirks", [])
    _check(isinstance(quirks, list) and all(q in PROVIDER_QUIRKS for q in quirks),
           file, f"{at}.quirks",
           f"a list of quirk names, each one of {sorted(PROVIDER_QUIRKS)}")
    _check(not quirks or p.get("api") == "openai", file, f"{at}.quirks",
           "quirks only on an \"api\": \"openai\" provider (they mend OpenAI-compatible "
           "servers)")


def _validate_routes(cfg, providers, file):
    """"routes" and "aliases": each entry names a configured provider (or a glob of them)."""
    routes = cfg.get("routes", {})
    _check(isinstance(routes, dict), file, "routes",
           "an object mapping ROUTE_NAME to [\"PROVIDER/MODEL\", ...]")
    for name, lst in routes.items():
        if isinstance(lst, dict):          # {"models": [...], "mix_models": true}
            _check(set(lst) <= {"models", "mix_models"} and isinstance(
                lst.get("mix_models", False), bool), file, f"routes.{name}",
                "a list of \"PROVIDER/MODEL\" strings, or {\"models\": [...], \"mix_models\": true}")
            lst = lst.get("models")
        _check(isinstance(lst, list) and all(isinstance(x, str) and x for x in lst), file,
               f"routes.{name}", "a list of \"PROVIDER/MODEL\" strings")
        for entry in lst:
            prov = entry.split("/", 1)[0]
            _check("/" in entry and (prov in providers or _is_glob(prov)), file, f"routes.{name}",
                   f"\"{entry}\" must be PROVIDER/MODEL (globs allowed) with PROVIDER one of "
                   f"{sorted(providers)}")
    aliases = cfg.get("aliases", {})
    _check(isinstance(aliases, dict), file, "aliases",
           "an object mapping a model-name glob to a route name")
    for pat, target in aliases.items():
        _check(isinstance(target, str) and (target in routes or target in AUTO_NAMES or
                                            target.split("/", 1)[0] in providers),
               file, f"aliases.{pat}",
               f"a route name (one of {sorted(set(routes) | set(AUTO_NAMES))}) or PROVIDER/MODEL")


def route_entries(value):
    """A route's entries: the list itself, or the "models" of its object form."""
    return value.get("models", []) if isinstance(value, dict) else value


def _validate_setting(k, v, providers, file):
    """One entry of "settings": a known name, and a value of its default's kind."""
    _check(k in DEFAULT_SETTINGS, file, f"settings.{k}",
           f"unknown setting; expected one of {sorted(DEFAULT_SETTINGS)}")
    want = DEFAULT_SETTINGS[k]
    if isinstance(want, bool):
        _check(isinstance(v, bool), file, f"settings.{k}", "true or false")
    elif isinstance(want, list):
        _check(isinstance(v, list) and all(isinstance(x, str) and x for x in v),
               file, f"settings.{k}", "a list of strings")
        if k == "allowed_origins":
            for x in v:
                _check(x == "*" or re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#\s]+/?", x),
                       file, f"settings.{k}",
                       "origins such as \"https://app.example\" or \"http://localhost:3000\" "
                       f"(scheme://host[:port], no path), or \"*\"; got {x!r}")
    elif k == "shared_state":
        _check(v is None or isinstance(v, str) and re.fullmatch(
            r"rediss?://(?:[^@/\s]*@)?[^@/:\s]+(?::\d{1,5})?(?:/\d{1,2})?/?", v) is not None,
               file, f"settings.{k}", "null or \"redis://[:PASSWORD@]HOST[:PORT][/DB]\" (rediss:// "
                                      "for TLS; ${VAR} takes the password from .env)")
    elif k == "intent_model":
        _check(v is None or isinstance(v, str) and "/" in v and v.split("/", 1)[0] in providers,
               file, f"settings.{k}",
               f"null or \"PROVIDER/MODEL\" with PROVIDER one of {sorted(providers)}")
    elif k in ZERO_OK_SETTINGS:
        _check(_num(v) and v >= 0, file, f"settings.{k}", "a number, 0 or more")
    else:
        _check(_num(v) and v > 0, file, f"settings.{k}", "a positive number")


def shown_url(url):
    """A URL as /health and the log may show it: no user name, password, query or fragment (a
    template's ${VARIABLES} stay as written; they are not expanded here)."""
    scheme, netloc, path, _query, _fragment = urllib.parse.urlsplit(str(url))
    return urllib.parse.urlunsplit((scheme, netloc.rpartition("@")[2], path, "", ""))


def clean_key(key, what):
    """A key as docker's --env-file or compose's env_file may deliver it, quotes and inline
    comments kept literally: quotes around it are dropped and a space in it is reported, by
    `what` (never the key)."""
    if len(key) > 1 and key[0] == key[-1] and key[0] in "'\"":
        log.warning("%s is wrapped in quotes; using it without them (docker's --env-file keeps "
                    "quotes: write KEY=value there)", what)
        key = key[1:-1]
    if any(c.isspace() for c in key):
        log.warning("%s contains a space, so it will be refused (an inline comment that docker's "
                    "--env-file kept?)", what)
    return key


def _here(name):
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def load_env(env_file, explicit):
    """Environment for config expansion: the .env file under the real environment (which wins)."""
    env = {}
    path = env_file
    if not explicit and not os.path.exists(path) and os.path.exists(_here(".env")):
        path = _here(".env")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                mode = os.fstat(f.fileno()).st_mode
                env.update(parse_dotenv(f.read()))
            if mode & 0o006:
                log.warning(".env: %s can be read or changed by every user on this "
                            "machine (mode %03o) and it holds your keys: chmod 600 %s "
                            "(or 640 with the router's group)", path, mode & 0o777, path)
        except OSError as e:
            # systemd's EnvironmentFile= and docker --env-file read it as root and put the variables
            # in the environment; a router running as its own user then cannot (and need not) read
            # it
            why = e.strerror or e
            if os.path.isdir(path):
                why = ("it is a directory (Docker makes one where a bind-mounted file did not exist: "
                       "create the file on the host, then recreate the container)")
            log.warning(".env: cannot read %s (%s); using the variables of the environment only. "
                        "If a provider's key is then missing, let the router's user read the file "
                        "(chgrp it to that user's group and chmod 640)", path, why)
    elif explicit:
        raise ConfigError(path, "(file)", "an existing .env file (given with --env-file)")
    env.update(os.environ)
    return env


def load_config(config_file, explicit):
    """Read and validate providers.json. Without --config: ./providers.json, else the one beside
    router.py, else an empty config (the router still starts and explains how to add providers)."""
    path = config_file
    if not explicit and not os.path.exists(path):
        path = _here("providers.json") if os.path.exists(_here("providers.json")) else None
    if path is None:
        return {"providers": {}, "routes": {}}, "(built-in empty config)"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, "(file)", f"a readable JSON file ({e.strerror or e})")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(path, f"line {e.lineno} column {e.colno}", f"valid JSON ({e.msg})")
    return validate_config(cfg, path), path


# =================================================================================================
# 2. Neutral form and codecs
# =================================================================================================
#
# Neutral request (a dict):
#   model, system: [text parts], messages: [{"role": "user"|"assistant"|"system", "content":
#   [parts]}],
#   tools: [{"name", "description", "parameters"}], tool_choice: None | {"type": "auto"|"none"|
#   "any"|"tool", "name"?}, parallel_tool_calls, max_tokens, temperature, top_p, top_k, stop: [..],
#   stream, include_usage, reasoning: None | {"effort"?, "budget_tokens"?, "enabled": bool},
#   user, extra: {dialect-only fields} (Responses: custom_tools, store, previous_response_id,
#   response_id; Ollama: ollama_generate; Gemini: response format fields). Built by neutral_request.
# Parts:
#   {"type": "text", "text"}
#   {"type": "image", "media_type", "data"} (base64) or {"type": "image", "url"}
#   {"type": "tool_call", "id", "name", "arguments": dict}
#   {"type": "tool_result", "id", "content": [text/image parts], "is_error": bool}
#   {"type": "thinking", "text", "signature"?}   {"type": "redacted_thinking", "data"}
# Neutral stream events (tuples; the first item names the event):
#   ("start", {"id", "model", "usage"?})     ("text", str)      ("thinking", str)
#   ("signature", str)   ("redacted_thinking", data)   ("tool", id, name)   ("args", json_fragment)
#   ("end", stop_reason, usage, stop_sequence)   ("error", ApiError)
#   ("text", str, logprobs): the same with its log probabilities, when they were asked;
#   ("logprobs", [{"token", "logprob", "top": [{"token", "logprob"}]}]) when they come apart
# Stop reasons are Anthropic's words: end_turn, max_tokens, tool_use, stop_sequence, refusal,
# pause_turn. Usage: {"input" (prompt incl. cache), "output", "cache_read", "cache_write",
# "reasoning"}. A neutral response is the folded stream: {"id", "model", "content": [parts],
# "stop_reason", "stop_sequence", "usage"}.

CONTENT_EVENTS = frozenset(("text", "thinking", "tool", "redacted_thinking", "signature"))


class DiscoveryError(Exception):
    """A provider's own API (its model list, a probe) could not be read."""


class ApiError(Exception):
    """An error with an HTTP status and a neutral type, rendered in each dialect by its codec.
    Neutral types: invalid_request, authentication, permission, not_found, request_too_large,
    rate_limit, billing, api_error, overloaded, timeout."""

    # raised in place of a provider stream's end marker (which must not reach the client)
    at_end = False
    # OpenAI's machine-readable "code" (context_length_exceeded, ...), where one applies
    code = None

    def __init__(self, status, etype, message, param=None, headers=None):
        super().__init__(message)
        self.status, self.etype, self.message, self.param = status, etype, message, param
        self.headers = headers or {}


class Failover(Exception):
    """A candidate (or one key of it) failed in a way worth trying the next one; also the record
    of a failed attempt (cand: (provider, model)), as the request log and the errors show it.
    kind: connect, timeout, status, stream, empty, context, auth, missing (no such model), input
    (parts only the client's own dialect can carry), format (a structured reply that is not JSON),
    broken (a stream that failed after it started: recorded, never moved on), completion (a
    completion call the provider refused: asked again as a chat turn on the same candidate)."""

    def __init__(self, kind, reason, status=None, retry_after=None, next_key=True,
                 fallback=None, quota=False, cand=None):
        super().__init__(reason)
        self.kind, self.reason, self.status = kind, reason, status
        self.retry_after, self.next_key = retry_after, next_key
        self.fallback, self.quota = fallback, quota
        self.cand = cand

    def line(self):
        return f"{self.cand[0]}/{self.cand[1]}: {self.reason}"


def bad_request(field, problem):
    return ApiError(400, "invalid_request", f"{field}: {problem}", param=field)


STATUS_ERROR_TYPE = {400: "invalid_request", 401: "authentication",
                     402: "billing", 403: "permission",
                     404: "not_found", 408: "timeout", 413: "request_too_large",
                     422: "invalid_request",
                     429: "rate_limit", 500: "api_error", 502: "api_error", 503: "overloaded",
                     504: "timeout", 529: "overloaded"}


def dumps(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")        # \uD800-\uDFFF written as an escape
_SURROGATE_BYTES_RE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")   # ... or as (CESU) bytes
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def loads(data):
    """json.loads for anything a client or a provider sent (str or bytes): a lone UTF-16
    surrogate in it (a string cut mid-emoji by a JavaScript program) becomes U+FFFD, so no text
    the router passes on, keeps or logs can fail to encode. The scan is one regular-expression
    search; only a text that has such an escape is walked."""
    obj = json.loads(data)
    if (_SURROGATE_ESCAPE_RE if isinstance(data, str) else _SURROGATE_BYTES_RE).search(data):
        obj = _replace_surrogates(obj)
    return obj


def _replace_surrogates(obj):
    """obj with every lone surrogate in its strings (keys too) replaced by U+FFFD."""
    def fix(v):
        return _SURROGATE_RE.sub("\ufffd", v) if isinstance(v, str) else v
    root = [fix(obj)]
    stack = [(root, 0)]
    while stack:
        holder, key = stack.pop()
        v = holder[key]
        if isinstance(v, dict):
            fixed = {fix(k): fix(x) for k, x in v.items()}
            holder[key] = fixed
            stack += [(fixed, k) for k, x in fixed.items() if isinstance(x, (dict, list))]
        elif isinstance(v, list):
            for i, x in enumerate(v):
                v[i] = fix(x)
                if isinstance(v[i], (dict, list)):
                    stack.append((v, i))
    return root[0]


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def clean_text(s, limit=300):
    """A client-supplied string as it may appear in a log line: control characters (CR, LF, ...)
    escaped, at most `limit` characters."""
    s = str(s)
    if len(s) > limit:
        s = s[:limit] + "..."
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", s)


def safe_text(s, limit=200):
    """clean_text, quoted (quotes and backslashes escaped), for a name inside a message."""
    return "'" + clean_text(str(s).replace("\\", "\\\\").replace("'", "\\'"), limit) + "'"


_HEADER_SAFE = "".join(c for c in map(chr, range(33, 127)) if c != "%")


def header_value(s):
    """A value for a response header: printable ASCII, anything else percent-encoded (a model
    name may hold any Unicode; CR and LF never reach a header)."""
    return urllib.parse.quote(s, safe=_HEADER_SAFE)


def new_id(prefix):
    return prefix + os.urandom(12).hex()


def empty_usage():
    return {"input": 0, "output": 0, "cache_read": 0, "cache_write": 0, "reasoning": 0}


_DATA_URL_RE = re.compile(r"data:([\w.+-]+/[\w.+-]+)?(?:;[^,;]*)*?;base64,(.*)", re.S)
_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
          (b"RIFF", "image/webp"))


def sniff_mime(b64):
    try:
        head = base64.b64decode(b64[:24] + "=" * (-len(b64[:24]) % 4))
    except (binascii.Error, ValueError):
        return "image/png"
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    return "image/png"


def file_part_from_url(url, name=None):
    """A data URL of a PDF -> a neutral file part, else None (other files have no neutral form)."""
    m = re.match(r"data:(application/pdf)(?:;[^,]*)?;base64,(.*)", url, re.S)
    if not m:
        return None
    return {"type": "file", "media_type": m.group(1), "data": m.group(2),
            "name": name if isinstance(name, str) and name else None}


def data_url_of(p):
    """A neutral image or file part with data as a data URL."""
    return f"data:{p['media_type']};base64,{p['data']}"


def image_part_from_url(url):
    """An image part from an OpenAI-style URL: data URLs become base64 parts."""
    m = _DATA_URL_RE.match(url)
    if m:
        data = m.group(2)
        return {"type": "image", "media_type": m.group(1) or sniff_mime(data), "data": data}
    return {"type": "image", "url": url}


def image_url_of(part):
    return data_url_of(part) if "data" in part else part["url"]


def parse_args_json(s):
    """Tool-call arguments string -> dict ('' is {}; a truncated object gets a light repair)."""
    if isinstance(s, dict):
        return s
    if not s or not s.strip():
        return {}
    try:
        v = loads(s)
    except ValueError:
        v = None
        for tail in ("}", "\"}", "]}", "\"]}"):
            try:
                v = loads(s + tail)
                break
            except ValueError:
                continue
        if v is None:
            log.warning("tool-call arguments are not valid JSON; passing them as {\"_raw\": ...}")
            return {"_raw": s}
    return v if isinstance(v, dict) else {"value": v}


def text_of(parts):
    return "".join(p.get("text", "") for p in parts if p.get("type") == "text")


def result_text(part):
    """A tool result as one text, for dialects whose tool results are strings ("Error: " first
    when the tool failed)."""
    return ("Error: " if part.get("is_error") else "") + text_of(part["content"])


# ---------------------------------------------------------------------------------------- SSE --

#: The longest line a provider's stream may send (an event's data, an NDJSON object).
MAX_STREAM_LINE = 32 << 20


class SSEParser:
    """Incremental Server-Sent Events parser: feed bytes, get (event, data) pairs. Accepts \\n and
    \\r\\n, joins multi-line data, ignores comments."""

    __slots__ = ("buf", "scanned", "event", "data")

    def __init__(self):
        self.buf = bytearray()
        self.scanned = 0          # bytes of buf already known to hold no newline
        self.event = None
        self.data = []

    def feed(self, chunk):
        """Linear in the bytes fed, however long a line grows before its newline arrives."""
        buf = self.buf
        buf += chunk
        out = []
        start = 0
        while True:
            nl = buf.find(b"\n", max(start, self.scanned))
            if nl < 0:
                break
            line = bytes(buf[start:nl])
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self.data or self.event:
                    out.append((self.event, "\n".join(self.data)))
                    self.event, self.data = None, []
                continue
            if line[:1] == b":":
                continue
            field, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                self.data.append(value.decode("utf-8", "replace"))
            elif field == b"event":
                self.event = value.decode("utf-8", "replace")
        if start:
            del buf[:start]
        self.scanned = len(buf)
        if len(buf) > MAX_STREAM_LINE:
            raise ValueError(f"a stream line longer than {MAX_STREAM_LINE >> 20} MiB")
        return out

    def close(self):
        """End of stream: a final event without its blank line still counts."""
        out = self.feed(b"\n\n") if self.buf else []
        if self.data:
            out.append((self.event, "\n".join(self.data)))
        self.event, self.data, self.buf, self.scanned = None, [], bytearray(), 0
        return out


class SSEDecoder:
    """Base of the SSE stream decoders: bytes go to an SSEParser, each event's data to
    self._data(data, out). At the end of the stream, close() flushes the parser and, if the
    dialect's own end never came, self._finish(out) says how the stream ended."""

    def __init__(self, prov=None):
        self.sse = SSEParser()
        self.prov = prov
        self.ended = False

    def feed(self, chunk):
        out = []
        for _event, data in self.sse.feed(chunk):
            self._data(data, out)
        return out

    def close(self):
        out = []
        for _event, data in self.sse.close():
            self._data(data, out)
        if not self.ended:
            self.ended = True
            self._finish(out)
        return out

    def _finish(self, out):
        out.append(("error", ApiError(502, "api_error",
                                      "the provider closed the stream before it finished")))

    def _json(self, data):
        """An event's data as JSON, or None (after the end, empty, or not JSON: skipped)."""
        if self.ended or not data:
            return None
        try:
            return loads(data)
        except ValueError:
            return None


def _clean(meta):
    return {k: v for k, v in meta.items() if v is not None}


def _is_stream(content_type):
    """Whether a provider's reply is a stream (SSE or NDJSON), by its content type."""
    return "event-stream" in content_type or "ndjson" in content_type


def _caps_entry(meta):
    """What a served model list says of a model: a route's members, or its capabilities."""
    if "route" in meta:
        return {"route": meta["route"]}
    if meta.get("embedding"):
        return {"capabilities": {k: meta[k] for k in ("embedding", "dimensions", "context_window",
                                                      "cost") if meta.get(k) is not None}}
    return {"capabilities": {k: meta.get(k) for k in ("context_window",
                                                      "max_output", "input", "tools", "reasoning",
                                                      "intents", "cost") if meta.get(k) is not None}}


class StreamPassthrough:
    """A same-dialect stream, byte for byte: each piece's complete events go out as they came (the
    codec's `boundary` finds them), a partial one waits for the rest. A codec whose providers need
    it subclasses this to step in at its end marker or to mend events (see OpenAIPassthrough).
    One per stream."""

    def __init__(self, codec, ctx, prov):
        self.cc, self.ctx = codec, ctx
        self.tail = b""
        # the end marker must not reach the client (our error replaces it)
        self.drop_end = False

    @staticmethod
    def body(raw, usage):
        """A whole (non-stream) reply passed through, given the router's usage estimate when the
        provider reported none: as it came, unless the dialect can carry the estimate."""
        return raw

    def usage(self, usage):
        """The provider reported no usage and `usage` is the router's estimate (before feed)."""

    def feed(self, raw):
        data = self.tail + raw
        cut = self.cc.boundary(data)
        self.tail = data[cut:]
        return self.events(data[:cut]) if cut else b""

    def events(self, data):
        """Complete events about to go out (the hook a dialect's subclass overrides)."""
        return data

    def observe(self, evs):
        """The neutral events decoded from the piece about to go out (a subclass may follow them)."""

    def error_event(self, err):
        """Our error event, for a stream that failed after it started."""
        return self.cc.stream_encoder(self.ctx.model, self.ctx.req, 0).encode(("error", err))

    def close(self):
        """The stream ended cleanly: what is left (a last event without its blank line)."""
        out, self.tail = self.tail, b""
        return self.events(out) if out else b""

    def fail(self, raw, err):
        """The bytes that end the client's stream after the failure `err` was decoded from `raw`:
        the provider's own error event as it came, or (the stream broke, or ended without
        finishing) the complete events before it, without a partial event or an end marker,
        and our error event."""
        if raw and not err.at_end:
            return self.feed(raw)
        self.drop_end = True
        out = self.feed(raw) if raw else b""
        self.tail = b""
        return out + self.error_event(err)


def fold_events(events, resp=None):
    """Fold neutral stream events into a neutral response (the one code path for both shapes)."""
    resp = resp or {"id": None, "model": None, "content": [], "stop_reason": None,
                    "stop_sequence": None, "usage": empty_usage()}
    content = resp["content"]
    pieces = {}          # id(part) -> [text pieces], joined at the end: folding stays linear
    for ev in events:
        kind = ev[0]
        if kind == "text":
            if len(ev) > 2:
                resp.setdefault("logprobs", []).extend(ev[2])
            if content and content[-1]["type"] == "text":
                pieces.setdefault(id(content[-1]), [content[-1]["text"]]).append(ev[1])
            else:
                content.append({"type": "text", "text": ev[1]})
        elif kind == "thinking":
            if content and content[-1]["type"] == "thinking" and not content[-1].get("signature"):
                pieces.setdefault(id(content[-1]), [content[-1]["text"]]).append(ev[1])
            else:
                content.append({"type": "thinking", "text": ev[1]})
        elif kind == "signature":
            if content and content[-1]["type"] == "thinking":
                content[-1]["signature"] = content[-1].get("signature", "") + ev[1]
            else:
                content.append({"type": "thinking", "text": "", "signature": ev[1]})
        elif kind == "redacted_thinking":
            content.append({"type": "redacted_thinking", "data": ev[1]})
        elif kind == "tool":
            content.append({"type": "tool_call", "id": ev[1], "name": ev[2], "_args": []})
        elif kind == "args":
            if content and content[-1]["type"] == "tool_call":
                content[-1]["_args"].append(ev[1])
        elif kind == "logprobs":
            resp.setdefault("logprobs", []).extend(ev[1])
        elif kind == "start":
            meta = ev[1]
            resp["id"] = resp["id"] or meta.get("id")
            resp["model"] = resp["model"] or meta.get("model")
            if meta.get("usage"):
                resp["usage"].update(meta["usage"])
        elif kind == "end":
            resp["stop_reason"], resp["stop_sequence"] = ev[1], ev[3]
            if ev[2]:
                resp["usage"].update({k: v for k, v in ev[2].items() if v})
    for p in content:
        if id(p) in pieces:
            p["text"] = "".join(pieces[id(p)])
        if p["type"] == "tool_call" and "_args" in p:
            p["arguments"] = parse_args_json("".join(p.pop("_args")))
    return resp


def response_events(resp):
    """The events of a whole neutral response, in stream order (the inverse of fold_events)."""
    yield ("start", {"id": resp.get("id"), "model": resp.get("model"), "usage": None})
    for p in resp["content"]:
        t = p["type"]
        if t == "text":
            yield ("text", p["text"])
        elif t == "thinking":
            yield ("thinking", p["text"])
            if p.get("signature"):
                yield ("signature", p["signature"])
        elif t == "redacted_thinking":
            yield ("redacted_thinking", p["data"])
        elif t == "tool_call":
            yield ("tool", p["id"], p["name"])
            yield ("args", dumps(p["arguments"]))
    if resp.get("logprobs"):
        yield ("logprobs", resp["logprobs"])
    yield ("end", resp["stop_reason"], resp["usage"], resp.get("stop_sequence"))


#: Marks thinking signatures the router made for reasoning from non-Anthropic providers, so the
#: block can be recognised (and not sent to Anthropic) when the client echoes it back.
ROUTER_SIGNATURE_PREFIX = "sage-router:"
THINKING_PARTS = ("thinking", "redacted_thinking")
MARK_EVENTS = ("signature", "redacted_thinking")      # stream events that carry a block's mark


def stable_hash(text):
    """A 63-bit hash of a text that is the same in every process and on every box (Python's own
    hash of a str is salted per process); it fits SQLite's integers."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "big") >> 1


def thinking_mark(block):
    """What identifies a thinking block (neutral part or raw Anthropic block): its signature or
    its redacted data, hashed."""
    return stable_hash(block.get("signature") or block.get("data") or "")


def thinking_marks(req):
    """The marks of the provider-made thinking blocks in a neutral request's history (blocks the
    router signed itself are handled by the encoders)."""
    return frozenset(thinking_mark(p) for m in req["messages"] if m["role"] == "assistant"
                     for p in m["content"] if p["type"] in THINKING_PARTS
                     and not (p.get("signature") or "").startswith(ROUTER_SIGNATURE_PREFIX))


def drop_thinking(req, keep=frozenset()):
    """A copy of a neutral request without the thinking blocks whose marks are not in `keep`: a
    block's signature is only valid at the provider that made it. If the last assistant turn
    loses one, thinking is turned off for the turn (Anthropic rejects a tool-use turn replayed
    without its thinking); older turns may lose theirs freely."""
    msgs, last_lost = [], False
    last = max((i for i, m in enumerate(req["messages"]) if m["role"] == "assistant"), default=-1)
    for i, m in enumerate(req["messages"]):
        parts = [p for p in m["content"]
                 if p["type"] not in THINKING_PARTS or thinking_mark(p) in keep]
        if len(parts) != len(m["content"]):
            m = dict(m, content=parts)
            last_lost = last_lost or i == last
        msgs.append(m)
    return dict(req, messages=msgs, reasoning=None if last_lost else req.get("reasoning"))


def _weight(text):
    """Characters of a text, plus 0.4 tokens' worth for every byte beyond ASCII: Chinese or
    Japanese runs about one token a character, accented Latin barely more than English."""
    if text.isascii():
        return len(text)
    return len(text) + (len(text.encode("utf-8")) - len(text)) * 1.6


def estimate_tokens(req):
    """Local token estimate of a neutral request: 4 characters a token for text and JSON (ASCII),
    more for other scripts, a flat 1,600 per image (Anthropic's figure for a ~1.15 MP image).
    Measured against OpenAI's tokenizers by `python3 test_router.py tokens` (the table is in the
    README): code within a few percent, English prose about 20% high, other scripts within about
    25% either way."""
    chars = sum(_weight(p.get("text", "")) for p in req.get("system") or [])
    images = 0
    for m in req.get("messages", []):
        chars += 8
        for p in m["content"]:
            t = p["type"]
            if t in ("text", "thinking"):
                chars += _weight(p.get("text", ""))
            elif t == "image":
                images += 1
            elif t == "file":
                # about 1,500 tokens a page, a page about 50 KB (1,500 at least)
                chars += 4 * max(1500, len(p["data"]) * 3 // 4 // 50_000 * 1500)
            elif t == "tool_call":
                chars += len(p["name"]) + _weight(dumps(p["arguments"]))
            elif t == "tool_result":
                for q in p["content"]:
                    if q["type"] == "image":
                        images += 1
                    else:
                        chars += _weight(q.get("text", ""))
    for t in req.get("tools") or []:
        chars += len(t["name"]) + _weight(t.get("description") or "")
        chars += len(dumps(t.get("parameters") or {}))
    return max(1, int(chars // 4) + images * 1600)


def _need(cond, field, problem):
    if not cond:
        raise bad_request(field, problem)


MAX_MODEL_NAME = 256


#: The neutral request's fields beyond model, system and messages, with their defaults.
NEUTRAL_FIELDS = {"tools": (), "tool_choice": None, "parallel_tool_calls": None, "max_tokens": None,
                  "temperature": None, "top_p": None, "top_k": None, "stop": None, "stream": False,
                  "include_usage": True, "reasoning": None, "user": None, "response_format": None,
                  "seed": None, "presence_penalty": None, "frequency_penalty": None,
                  "logprobs": None, "completion": None}


def neutral_request(model, system, messages, extra=None, **fields):
    """The one constructor of neutral requests (every request decoder uses it): the fields named in
    NEUTRAL_FIELDS, defaults for those not given, and what only one dialect knows under `extra`."""
    unknown = set(fields) - set(NEUTRAL_FIELDS)
    if unknown:
        raise TypeError(f"not a neutral request field: {sorted(unknown)} (dialect-only fields go "
                        "in extra)")
    req = {"model": model, "system": system, "messages": messages}
    for k, default in NEUTRAL_FIELDS.items():
        v = fields.get(k, default)
        req[k] = list(v) if isinstance(v, tuple) else v
    req["extra"] = extra or {}
    # a PDF travels in a user turn only; in a system prompt or a tool result, no other dialect
    # has a place for it, so such a request stays in its own dialect
    misplaced = [f"a PDF in {where}" for where, parts in
                 [("the system prompt", system)]
                 + [("a system message" if m["role"] == "system" else "a tool result",
                     m["content"] if m["role"] == "system" else
                     [q for p in m["content"] if p["type"] == "tool_result" for q in p["content"]])
                    for m in messages]
                 if any(p["type"] == "file" for p in parts)]
    if misplaced:
        req["extra"]["same_dialect_only"] = req["extra"].get("same_dialect_only", []) + misplaced
    return req


def sampling_out(req, table):
    """The flat sampling parameters as a dialect takes them, by its table of (neutral field, its
    field, limit): a number is capped at the limit, a list cut to that many items; unset fields are
    left out. Transforms that are logic (thinking forbids some) stay in the encoder."""
    out = {}
    for field, target, limit in table:
        v = req.get(field)
        if v is None or v == []:
            continue
        if limit is not None:
            v = v[:limit] if isinstance(v, list) else min(v, limit)
        out[target] = v
    return out


def output_limit(req, model_meta, default=None):
    """The request's max_tokens (else `default`), clamped to the model's max_output; None when
    neither is set."""
    mt = req.get("max_tokens") or default
    cap = model_meta.get("max_output")
    return min(mt, cap) if mt and cap else mt


# -- reasoning: effort <-> thinking budget ----------------------------------------------------
#: The one table between a reasoning effort and a thinking budget in tokens, for every dialect:
#: efforts (OpenAI, Responses, Gemini's thinkingLevel, Ollama's think) become budgets (Anthropic,
#: Gemini's thinkingBudget) and budgets become the nearest effort at or below them.
REASONING_BUDGETS = (("minimal", 1024), ("low", 2048), ("medium", 8192), ("high", 16384),
                     ("xhigh", 32000), ("max", 32000))
MIN_THINKING_BUDGET = 1024          # Anthropic's smallest budget_tokens


def reasoning_budget(r, model_meta, limit=None):
    """A neutral reasoning request as a thinking budget in tokens: its own budget, else its
    effort's, within MIN_THINKING_BUDGET and the model's max_output (and `limit`, when the budget
    must leave room for the answer inside max_tokens)."""
    budget = r.get("budget_tokens") or dict(REASONING_BUDGETS).get(r.get("effort") or "medium")
    budget = budget or dict(REASONING_BUDGETS)["high"]     # "max" and other unknown words
    for cap in (model_meta.get("max_output"), limit):
        if cap:
            budget = min(budget, cap)
    return max(MIN_THINKING_BUDGET, budget)


def reasoning_effort(r, allowed=("minimal", "low", "medium", "high")):
    """A neutral reasoning request as an effort word the target takes: its own effort if allowed,
    else the largest allowed effort whose budget is at most its budget (or the effort's)."""
    effort = r.get("effort")
    if effort in allowed:
        return effort
    budgets = dict(REASONING_BUDGETS)
    budget = r.get("budget_tokens") or budgets.get(effort) or budgets["high"]
    fits = [e for e, b in REASONING_BUDGETS if e in allowed and b <= budget]
    return fits[-1] if fits else allowed[0]


# -- structured outputs -----------------------------------------------------------------------
# A request's response_format is None (free text) or {"type": "json_object" | "json_schema",
# "name", "schema", "strict"}. A candidate serves it by one of three paths:
#   native: its dialect's own field (the codec's `structured` names the types it takes);
#   tool:   one forced tool whose input schema is the schema; its arguments come back as the text;
#   prompt: the schema in the system prompt (when the request has tools of its own or thinking,
#           which a forced tool would break), the answer checked to be JSON.
# A model's metadata says "native" or "tool" ("structured"; name defaults in MODEL_RULES).

STRUCTURED_TOOL = "json_answer"      # the forced tool's name when the format has none


def neutral_format(kind, schema=None, name=None, strict=None, field="response_format",
                   description=None):
    """A response_format in the neutral form (None for free text), its parts checked."""
    _need(kind in ("text", "json_object", "json_schema"), field + ".type",
          "must be \"text\", \"json_object\" or \"json_schema\"")
    if kind == "text":
        return None
    if kind == "json_schema" and schema is None:
        kind = "json_object"            # (the schema is optional in Chat Completions)
    if kind == "json_schema":
        _need(isinstance(schema, dict), field + ".schema", "must be a JSON Schema object")
    _need(name is None or isinstance(name, str), field + ".name", "must be a string")
    _need(strict is None or isinstance(strict, bool), field + ".strict", "must be true or false")
    return {"type": kind, "schema": schema if kind == "json_schema" else None,
            "name": name or None, "strict": bool(strict),
            "description": description if isinstance(description, str) and description else None}


def structured_path(req, caps, codec):
    """How a candidate serves the request's response_format: None (none asked), "native", "tool"
    or "prompt"."""
    rf = req.get("response_format")
    if not rf:
        return None
    path = caps.get("structured") or "native"
    if path == "native" and rf["type"] not in codec.structured:
        path = "tool"
    if path == "native" and req.get("tools") and caps.get("structured_tools") is False:
        path = "prompt"           # (Gemini before 3: a JSON mime type and tools are refused)
    thinking = (req.get("reasoning") or {}).get("enabled") and caps.get("reasoning")
    if path == "tool" and (req.get("tools") or thinking):
        path = "prompt"
    return path


#: What OpenAI's json_object mode needs to read somewhere in the messages (it refuses the request
#: otherwise); said in the system prompt when the conversation does not say "JSON" itself.
JSON_SAID = "Answer in JSON."


def json_unsaid(req, rf):
    """Whether a json_object request's conversation never says "json" (OpenAI's rule)."""
    if rf["type"] != "json_object":
        return False
    texts = [p.get("text", "") for p in req["system"]] + [
        p.get("text", "") for m in req["messages"] for p in m["content"] if p["type"] == "text"]
    return not any("json" in t.lower() for t in texts)


def openai_format(rf):
    """A neutral response_format in the flat shape of the OpenAI family (Responses' text.format;
    Chat Completions nests all but the type under json_schema)."""
    if rf["type"] == "json_object":
        return {"type": "json_object"}
    out = {"type": "json_schema", "name": format_name(rf), "schema": rf["schema"],
           "strict": rf["strict"]}
    if rf.get("description"):
        out["description"] = rf["description"]
    return out


def format_name(rf):
    """The format's name as OpenAI's name rules want it (the forced tool's name too)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", rf.get("name") or "")[:64]
    return name or STRUCTURED_TOOL


def structured_request(req, path):
    """The request as a candidate on `path` is sent it: unchanged on the native path; with one
    forced tool on the tool path; with the format told in the system prompt on the prompt path."""
    rf = req.get("response_format")
    if path == "tool":
        tool = {"name": format_name(rf),
                "description": "Give your whole answer as this tool's input.",
                "parameters": rf["schema"] or {"type": "object"}}
        return dict(req, tools=[tool], tool_choice={"type": "tool", "name": tool["name"]},
                    parallel_tool_calls=False, response_format=None)
    if path == "prompt":
        said = ("Answer with one JSON value and nothing else: no prose, no code fences."
                + (" It must fit this JSON Schema: " + dumps(rf["schema"]) if rf["schema"] else
                   " It must be a JSON object."))
        return dict(req, system=list(req["system"]) + [{"type": "text", "text": said}],
                    response_format=None)
    return req


def structured_source(source, name):
    """A tool-path reply as the client asked for it: the forced tool's arguments as text, its
    stop reason end_turn (the client asked for an answer, not a tool call). `source` yields
    (raw bytes, events) as the dispatcher reads them; a call's pieces may span several."""
    inside = False
    for raw, events in source:
        out = []
        for ev in events:
            if ev[0] == "tool":
                inside = ev[2] == name
                if inside:
                    continue
            elif ev[0] == "args" and inside:
                ev = ("text", ev[1])
            elif ev[0] == "end" and ev[1] == "tool_use":
                ev = ("end", "end_turn") + tuple(ev[2:])
            out.append(ev)
        yield raw, out


_FENCE_RE = re.compile(r"\A\s*```(?:json)?\s*\n(.*?)\n?```\s*\Z", re.S)


def structured_text_ok(resp, path):
    """Whether a whole structured reply is what was asked (its text parses as JSON). A reply cut by
    max_tokens or refused passes: the client is told so by its finish reason. On the prompt path a
    fenced answer is unwrapped in place."""
    if resp["stop_reason"] not in (None, "end_turn", "stop_sequence"):
        return True
    texts = [p for p in resp["content"] if p["type"] == "text"]
    text = "".join(p["text"] for p in texts)
    if path == "prompt":
        m = _FENCE_RE.match(text)
        if m:
            text = m.group(1)
            resp["content"] = [p for p in resp["content"] if p["type"] != "text"]
            resp["content"].append({"type": "text", "text": text})
    try:
        loads(text)
        return True
    except ValueError:
        return False


# -- text completions and fill-in-the-middle ---------------------------------------------------
# A completion request (POST /v1/completions; Ollama's /api/generate with a suffix or raw) carries
# `completion`: {"prompt", "suffix": str | None, "raw": bool}; its messages hold the same texts as
# one user turn (for planning and estimates). A candidate serves it by one of three paths:
#   native:   its dialect's own completion call (codec `completes`): OpenAI's /completions with
#             `suffix`, Ollama's /api/generate with `suffix`;
#   template: the model's fill-in-the-middle tokens around prefix and suffix as a raw prompt
#             (servers that refuse or ignore `suffix`: vLLM, llama.cpp, Ollama models whose
#             template takes no suffix), the template's end tokens as stop sequences;
#   chat:     a chat turn that asks for the middle part only (Anthropic, Gemini, chat-only models).
# Model metadata "completions" names the path for a request with a suffix ("chat" also for one
# without), "fim" the template (a FIM_TEMPLATES name by MODEL_RULES, or a string with {prefix} and
# {suffix}). A native or template call the provider refuses is tried once more on the chat path.

#: Fill-in-the-middle templates of the code model families: (template, its end tokens).
FIM_TEMPLATES = {
    "qwen": ("<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",
             ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
              "<|repo_name|>", "<|file_sep|>", "<|im_start|>", "<|im_end|>"]),
    "codellama": ("<PRE> {prefix} <SUF>{suffix} <MID>", ["<PRE>", "<SUF>", "<MID>", "<EOT>"]),
    "starcoder": ("<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>",
                  ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<|endoftext|>",
                   "<file_sep>"]),
    "deepseek": ("<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>",
                 ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", "<|EOT|>",
                  "<｜end▁of▁sentence｜>"]),
    "codegemma": ("<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",
                  ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_separator|>",
                   "<end_of_turn>", "<eos>"]),
}
_FIM_TOKEN_RE = re.compile(r"<[^<>\s]{1,40}>|\[[A-Z_]{2,20}\]")

FIM_SAID = ("You fill in a gap in a file. The user's message holds the text before the gap "
            "between <before> and </before> and the text after it between <after> and </after>, "
            "exactly, whitespace included. Reply with exactly the text that belongs in the gap, so "
            "that the text before, your reply and the text after read as one file: no "
            "explanation, no code fences, no repeating of the text around the gap. If nothing "
            "belongs there, reply with nothing.")
CONTINUE_SAID = ("Continue the text in the user's message from exactly where it ends. Reply with "
                 "the continuation only: no explanation, no code fences, no repeating of the "
                 "text.")
#: A reasoning model's thinking counts toward its output limit: the chat path gives it this much
#: more (a completion's own limit is small, 16 tokens unless the client says).
COMPLETION_THINKING_ROOM = 1024


def fim_template(meta):
    """A model's fill-in-the-middle template and end tokens, or None."""
    fim = meta.get("fim")
    if fim in FIM_TEMPLATES:
        return FIM_TEMPLATES[fim]
    if isinstance(fim, str) and "{prefix}" in fim and "{suffix}" in fim:
        return fim, sorted(set(_FIM_TOKEN_RE.findall(fim)))
    return None


def completion_path(req, meta, codec, refused=False):
    """How a candidate serves the request's completion: None (a chat request), "native",
    "template" or "chat" (`refused`: its native or template call was refused before)."""
    c = req.get("completion")
    if not c:
        return None
    said = meta.get("completions")
    if not codec.completes or refused or said == "chat":
        return "chat"
    if not c["suffix"] or c.get("raw"):
        return "native"
    path = said or ("template" if fim_template(meta) else "native")
    return "chat" if path == "template" and not fim_template(meta) else path


def completion_request(req, path, meta):
    """The request as a candidate on `path` is sent it: unchanged on the native path; the
    template's raw prompt and end tokens on the template path; a chat turn asking for the middle
    (thinking off where it can be, room for it where it cannot) on the chat path."""
    c = req.get("completion")
    if path == "template":
        template, ends = fim_template(meta)
        parts = {"prefix": c["prompt"], "suffix": c["suffix"]}
        prompt = re.sub(r"\{(prefix|suffix)\}", lambda m: parts[m.group(1)], template)
        return dict(req, completion={"prompt": prompt, "suffix": None, "raw": True},
                    stop=(req["stop"] or []) + [e for e in ends if e not in (req["stop"] or ())])
    if path != "chat":
        return req
    text = (f"<before>{c['prompt']}</before>\n<after>{c['suffix']}</after>" if c["suffix"]
            else c["prompt"])
    room = COMPLETION_THINKING_ROOM if meta.get("reasoning") else 0
    return dict(req, completion=None,
                system=list(req["system"]) + [{"type": "text",
                                               "text": FIM_SAID if c["suffix"] else CONTINUE_SAID}],
                messages=[{"role": "user", "content": [{"type": "text", "text": text}]}],
                max_tokens=(req["max_tokens"] or 0) + room or None,
                reasoning={"enabled": False, "effort": "none"})


def stop_source(source, stops):
    """A translated reply held to the client's stop sequences, whatever the provider could take
    (Anthropic refuses whitespace-only ones, OpenAI takes four, a chat model asked for a middle
    runs past them): the text up to the first one, then at once the end (stop_sequence; usage
    unknown, so estimated), and the provider's stream is left (the dispatcher closes it). Text
    that may be the start of a stop sequence waits for the next piece."""
    keep = max(map(len, stops)) - 1
    held = ""
    for raw, events in source:
        out = []
        for ev in events:
            kind = ev[0]
            if kind != "text":
                if held and kind in ("end", "tool", "error"):
                    out.append(("text", held))
                    held = ""
                out.append(ev)
                continue
            held += ev[1]
            hits = [(held.find(s), s) for s in stops if s in held]
            if hits:
                at, cut = min(hits)
                out += [("text", held[:at])] if at else []
                out += [("logprobs", ev[2])] if len(ev) > 2 and ev[2] else []
                yield raw, out + [("end", "stop_sequence", None, cut)]
                return
            if len(held) > keep:
                out.append(("text", held[:len(held) - keep]))
                held = held[len(held) - keep:]
            if len(ev) > 2 and ev[2]:
                out.append(("logprobs", ev[2]))
        yield raw, out


def unfenced_source(source):
    """A chat-path completion without the code fence a chat model may wrap it in despite being
    told not to: an opening ```lang line is dropped, and then a closing ``` on the last line.
    (Leading whitespace is the completion's own: it goes out as it came when there is no fence.)"""
    head, fenced, tail, emitted = "", None, "", False
    for raw, events in source:
        out = []
        for ev in events:
            if ev[0] != "text":
                if ev[0] == "end":
                    rest = head if fenced is None else "" if tail.strip() == "```" else tail
                    if rest:
                        out.append(("text", rest))
                    head = tail = ""
                out.append(ev)
                continue
            text = ev[1]
            if fenced is None:
                head += text
                lead = head.lstrip()
                if lead.startswith("```"):
                    if "\n" not in lead:
                        continue
                    fenced, text = True, lead.split("\n", 1)[1]
                elif "```".startswith(lead):     # (only whitespace or a backtick or two so far)
                    continue
                else:
                    fenced, text = False, head
                head = ""
            if fenced:
                text, tail, cut = tail + text, "", None
                # the last lines wait while they may be the closing fence
                at = text.rfind("\n")
                while at >= 0 and "```".startswith(text[at:].strip()):
                    cut, at = at, text.rfind("\n", 0, at)
                if cut is None and not emitted and "```".startswith(text.strip()):
                    cut = 0
                if cut is not None:
                    text, tail = text[:cut], text[cut:]
            if text:
                emitted = True
                out.append(("text", text))
            if len(ev) > 2 and ev[2]:
                out.append(("logprobs", ev[2]))
        yield raw, out


# -- log probabilities --------------------------------------------------------------------------
# A request's `logprobs` is None, or the number of alternatives wanted per token (0: the chosen
# token's only). Two wire shapes carry them: OpenAI's (also Ollama's) and Gemini's.

def with_logprobs(out, lp):
    """Decoded log probabilities onto the text event they belong to (so a client gets them in the
    same chunk as the text), or as an event of their own when no text came just before."""
    if not lp:
        return
    if out and out[-1][0] == "text" and len(out[-1]) == 2:
        out[-1] = out[-1] + (lp,)
    else:
        out.append(("logprobs", lp))


def text_logprobs(ev):
    """The log probabilities a text or logprobs event carries ([] for none)."""
    if ev[0] == "logprobs":
        return ev[1]
    return ev[2] if len(ev) > 2 else []


def logprobs_out(req, flag, top, asked=True):
    """A request's log-probability ask in a dialect's two fields: the flag (`asked` its value) and
    the number of alternatives (left out when 0)."""
    n = req.get("logprobs")
    if n is None:
        return {}
    return {flag: asked, **({top: n} if n else {})}


def logprobs_from_openai(items):
    """OpenAI's (and Ollama's) logprobs content items -> neutral ones."""
    return [{"token": str(c.get("token", "")), "logprob": c.get("logprob"),
             "top": [{"token": str(t.get("token", "")), "logprob": t.get("logprob")}
                     for t in c.get("top_logprobs") or [] if isinstance(t, dict)]}
            for c in items or [] if isinstance(c, dict)]


def logprobs_to_openai(items):
    """Neutral logprobs -> OpenAI's content items (with the tokens' UTF-8 bytes)."""
    return [{"token": c["token"], "logprob": c["logprob"], "bytes": list(c["token"].encode()),
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"],
                               "bytes": list(t["token"].encode())} for t in c["top"]]}
            for c in items]


def logprobs_from_legacy(lp):
    """OpenAI Completions' logprobs ({tokens, token_logprobs, top_logprobs: [{token: logprob}]})
    -> neutral ones."""
    if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list):
        return []
    scores, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
    return [{"token": str(t), "logprob": scores[i] if i < len(scores) else None,
             "top": [{"token": str(k), "logprob": v}
                     for k, v in (tops[i] if i < len(tops) and isinstance(tops[i], dict)
                                  else {}).items()]}
            for i, t in enumerate(lp["tokens"])]


def logprobs_to_legacy(items, offset=0):
    """Neutral logprobs -> OpenAI Completions' shape (text_offset counted from `offset`, the
    completion's characters before them)."""
    offsets = []
    for c in items:
        offsets.append(offset)
        offset += len(c["token"])
    return {"tokens": [c["token"] for c in items],
            "token_logprobs": [c["logprob"] for c in items],
            "top_logprobs": [{t["token"]: t["logprob"] for t in c["top"]} for c in items],
            "text_offset": offsets}


def logprobs_from_gemini(result):
    """A Gemini candidate's logprobsResult -> neutral logprobs."""
    if not isinstance(result, dict):
        return []
    chosen = result.get("chosenCandidates") or []
    tops = result.get("topCandidates") or []
    out = []
    for i, c in enumerate(chosen):
        top = tops[i].get("candidates") if i < len(tops) and isinstance(tops[i], dict) else []
        # (proto JSON leaves out a field that is 0: a certain token's logProbability)
        out.append({"token": str(c.get("token", "")), "logprob": c.get("logProbability", 0.0),
                    "top": [{"token": str(t.get("token", "")),
                             "logprob": t.get("logProbability", 0.0)}
                            for t in top or [] if isinstance(t, dict)]})
    return out


def logprobs_to_gemini(items):
    """Neutral logprobs -> a Gemini logprobsResult."""
    return {"chosenCandidates": [{"token": c["token"], "logProbability": c["logprob"]}
                                 for c in items],
            "topCandidates": [{"candidates": [{"token": t["token"], "logProbability": t["logprob"]}
                                              for t in c["top"]]} for c in items]}


# -- embeddings ---------------------------------------------------------------------------------
# A neutral embeddings request: {"model", "inputs": [text, or a list of token ids], "dimensions",
# "task": "query" | "document" | None, "base64": the client wants base64 vectors, "legacy": the
# client's one-text form (Ollama's /api/embeddings)}. The answer: the vectors in input order and
# the input tokens (None when the provider does not say).

def embed_request(model, inputs, dimensions=None, task=None, base64_out=False, legacy=False,
                  **extra):
    """The one constructor of neutral embeddings requests (`extra`: what one dialect passes on
    as it came: Gemini's own task type, NVIDIA's input_type)."""
    _need(isinstance(inputs, list) and inputs and all(isinstance(x, str) and x or isinstance(x, list) and x and all(
        isinstance(t, int) and not isinstance(t, bool) for t in x) for x in inputs),
        "input", "must be a non-empty string, an array of them, or an array of token-id arrays")
    return {"model": model, "inputs": inputs, "dimensions": dimensions, "task": task,
            "base64": base64_out, "legacy": legacy, **extra}


def embed_batches(ereq, n, tokens=250_000):
    """The inputs in batches of at most n inputs and about `tokens` tokens (OpenAI takes 300,000
    a request), in order."""
    batch, size = [], 0
    for x in ereq["inputs"]:
        t = len(x) if isinstance(x, list) else max(1, len(x) // 4)
        if batch and (len(batch) == n or size + t > tokens):
            yield batch
            batch, size = [], 0
        batch.append(x)
        size += t
    if batch:
        yield batch


def checked_vectors(vectors, count, n):
    """A provider's vectors if they are n non-empty lists of numbers (and its token count, when it
    is one), else a Failover naming what is wrong."""
    if len(vectors) != n:
        raise Failover("stream", f"{len(vectors)} vectors for {n} inputs")
    if not all(isinstance(v, list) and v and all(_num(x) for x in v) for v in vectors):
        raise Failover("stream", "a vector that is not a list of numbers")
    return vectors, count if isinstance(count, int) and not isinstance(count, bool) else None


def floats_base64(vector):
    """A vector as OpenAI's base64 encoding: little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def base64_floats(text):
    data = base64.b64decode(text)
    return list(struct.unpack(f"<{len(data) // 4}f", data))


def embed_tokens(ereq):
    """A local count of an embeddings request's input tokens (4 characters a token)."""
    return sum(len(x) if isinstance(x, list) else max(1, len(x) // 4) for x in ereq["inputs"])


# -- what a translation drops ------------------------------------------------------------------
#: Neutral fields a provider dialect may not carry (its codec's `carries` says which it does).
OPTIONAL_FIELDS = ("top_k", "stop", "seed", "presence_penalty", "frequency_penalty",
                   "parallel_tool_calls", "logprobs")


def unread_fields(body, reads, norm=None):
    """The fields of a client's body its decoder does not translate, in the client's spelling:
    `reads` maps a top-level field to None (read whole) or to the set of its own fields read."""
    norm = norm or (lambda d: d)
    out = []
    body = norm(body)
    for k, v in body.items():
        if k not in reads:
            out.append(k)
        elif reads[k] is not None and isinstance(v, dict):
            out += [f"{k}.{sub}" for sub in norm(v) if sub not in reads[k]]
    return out


def dropped_fields(client, body, req, target):
    """What a translation from the client's codec to the target's leaves out, by the client's
    names: fields its decoder does not read, and neutral fields the target cannot carry."""
    out = client.unread(body) if client.unread is not None else []
    out += req["extra"].get("dropped_parts", [])
    out += [client.spelling.get(f, f) for f in OPTIONAL_FIELDS
            if req.get(f) is not None and f not in target.carries]
    return out


def error_json(status, body):
    """A provider's error body as (JSON, None), or, when it is not JSON, (None, its first 300
    characters as the message)."""
    try:
        return loads(body), None
    except ValueError:
        return None, body[:300].decode("utf-8", "replace").strip() or f"HTTP {status}"


def system_text(req):
    """The system prompt as one text, for dialects that take a string (blocks joined by a blank line)."""
    return "\n\n".join(p["text"] for p in req["system"] if p.get("text"))


def add_tool_result(messages, result):
    """A tool result joins the user turn before it when that turn ends with results (one turn of
    results answers one turn of calls), else it opens a user turn of its own."""
    last = messages[-1] if messages else None
    if (last is not None and last["role"] == "user" and last["content"]
            and last["content"][-1]["type"] == "tool_result"):
        last["content"].append(result)
    else:
        messages.append({"role": "user", "content": [result]})


def _body_model(body):
    """The decoders' prologue: the body is a JSON object, and its `model` a valid name."""
    _need(isinstance(body, dict), "body", "must be a JSON object")
    return _model_name(body)


def _model_name(body):
    """A request's `model`: a string of 1 to 256 characters with no control characters (it reaches
    headers, logs and the routing tables)."""
    model = body.get("model")
    _need(isinstance(model, str) and model, "model", "is required and must be a string")
    _need(len(model) <= MAX_MODEL_NAME, "model", f"is longer than {MAX_MODEL_NAME} characters")
    _need(not _CONTROL_RE.search(model), "model",
          "must not contain control characters (CR, LF, tab, ...)")
    return model


def neutral_tool(name, description, parameters, field, params_field="parameters"):
    """A tool in the neutral form, its description a string and its schema an object."""
    _need(description is None or isinstance(description, str),
          f"{field}.description", "must be a string")
    _need(parameters is None or isinstance(parameters, dict), f"{field}.{params_field}",
          "must be a JSON Schema object")
    return {"name": name, "description": description or "",
            "parameters": parameters or {"type": "object", "properties": {}}}


def _opt_num(body, field, lo=None, hi=None, at=""):
    """An optional number of the body (its field named `at` + field in an error), within limits."""
    v = body.get(field)
    if v is None:
        return None
    _need(_num(v), at + field, "must be a number")
    _need((lo is None or v >= lo) and (hi is None or v <= hi), at + field,
          f"must be between {lo} and {hi}")
    return v


def _opt_int(body, field, lo=1):
    v = body.get(field)
    if v is None:
        return None
    _need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, field,
          f"must be an integer >= {lo}")
    return v


def _merge_roles(messages):
    """Merge consecutive messages of one role (Anthropic and many chat templates want turns that
    alternate); drops messages left empty."""
    out = []
    for m in messages:
        if not m["content"]:
            continue
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + m["content"]}
        else:
            out.append(m)
    return out


# ------------------------------------------------------------------ OpenAI Chat Completions --

OPENAI_FINISH_TO_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                         "function_call": "tool_use", "content_filter": "refusal"}
STOP_TO_OPENAI_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                         "tool_use": "tool_calls", "refusal": "content_filter",
                         "pause_turn": "stop", "model_context_window_exceeded": "length"}
OPENAI_ERROR_TYPE = {"invalid_request": "invalid_request_error",
                     "authentication": "authentication_error",
                     "permission": "permission_error", "not_found": "not_found_error",
                     "request_too_large": "invalid_request_error", "rate_limit": "rate_limit_error",
                     "billing": "insufficient_quota", "quota": "insufficient_quota",
                     "api_error": "server_error",
                     "overloaded": "server_error", "timeout": "timeout"}
OPENAI_TOOL_CHOICE = {"auto": {"type": "auto"}, "none": {"type": "none"},
                      "required": {"type": "any"}}


def _openai_content(content, field, only):
    """OpenAI message content (string, null or parts of Chat Completions or Responses) -> neutral
    parts. Parts with no neutral form (audio, a file by id or URL) are named in `only`: they reach
    a provider of the client's own dialect on the byte passthrough, and no other."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    _need(isinstance(content, list), field, "must be a string or an array of content parts")
    parts = []
    for i, p in enumerate(content):
        _need(isinstance(p, dict), f"{field}[{i}]", "must be an object")
        t = p.get("type")
        if t in ("text", "input_text", "output_text", "summary_text", "reasoning_text"):
            _need(isinstance(p.get("text"), str), f"{field}[{i}].text", "must be a string")
            if p["text"]:
                parts.append({"type": "text", "text": p["text"]})
        elif t == "refusal":
            parts.append({"type": "text", "text": str(p.get("refusal", ""))})
        elif t in ("image_url", "input_image"):   # Chat Completions / Responses
            iu = p.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            _need(isinstance(url, str) and url, f"{field}[{i}].image_url",
                  "must be a URL or data URL string")
            parts.append(image_part_from_url(url))
        elif t in ("file", "input_file"):          # Chat Completions / Responses
            f = p.get("file") if t == "file" else p
            data = f.get("file_data") if isinstance(f, dict) else None
            part = file_part_from_url(data, f.get("filename")) if isinstance(data, str) else None
            if part is None:
                only.append(f"{field}[{i}].{t} (by id or URL, or not a PDF)")
            else:
                parts.append(part)
        elif t is not None:
            only.append(f"{field}[{i}].{t}")
    return parts


def _openai_tool_calls(calls, f, i):
    """An assistant message's tool_calls -> neutral tool_call parts."""
    _need(isinstance(calls, list), f + ".tool_calls", "must be an array")
    parts = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        _need(isinstance(fn, dict) and isinstance(fn.get("name"), str),
              f"{f}.tool_calls[{j}].function.name", "must be a string")
        args = fn.get("arguments", "")
        _need(isinstance(args, (str, dict)), f"{f}.tool_calls[{j}].function.arguments",
              "must be a JSON string")
        _need(c.get("id") is None or isinstance(c["id"], str),
              f"{f}.tool_calls[{j}].id", "must be a string")
        parts.append({"type": "tool_call", "id": c.get("id") or f"call_{i}_{j}",
                      "name": fn["name"], "arguments": parse_args_json(args)})
    return parts


def _openai_tools(body, dropped):
    """Chat Completions' tools and tool_choice -> (neutral tools, neutral tool_choice); tools of
    another type than function (custom) are named in `dropped`."""
    tools = []
    raw_tools = body.get("tools") or []
    _need(isinstance(raw_tools, list), "tools", "must be an array")
    for i, t in enumerate(raw_tools):
        _need(isinstance(t, dict), f"tools[{i}]", "must be an object")
        if t.get("type", "function") != "function":
            dropped.append(f"tools[{i}].{t.get('type')}")
            continue
        fn = t.get("function")
        _need(isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"],
              f"tools[{i}].function.name", "is required and must be a string")
        tools.append(neutral_tool(fn["name"], fn.get("description"), fn.get("parameters"),
                                  f"tools[{i}].function"))
    tc = body.get("tool_choice")
    if tc is None:
        return tools, None
    if isinstance(tc, str):
        _need(tc in OPENAI_TOOL_CHOICE, "tool_choice",
              "must be none, auto, required or {\"type\":\"function\",...}")
        return tools, dict(OPENAI_TOOL_CHOICE[tc])
    name = (tc.get("function") or {}).get("name") if isinstance(tc, dict) else None
    _need(isinstance(name, str), "tool_choice.function.name", "must be a string")
    return tools, {"type": "tool", "name": name}


def openai_decode_request(body, completion=False):
    """OpenAI Chat Completions request body (or, `completion`, a Completions one) -> neutral
    request (raises ApiError 400 on bad input)."""
    if completion:
        return openai_completion_decode(body)
    model = _body_model(body)
    msgs = body.get("messages")
    _need(isinstance(msgs, list) and msgs, "messages", "is required and must be a non-empty array")
    system, messages, only = [], [], []
    for i, m in enumerate(msgs):
        f = f"messages[{i}]"
        _need(isinstance(m, dict), f, "must be an object")
        role = m.get("role")
        if role in ("system", "developer"):
            parts = _openai_content(m.get("content"), f + ".content", only)
            if not messages:
                system.extend(parts)
            else:
                messages.append({"role": "system", "content": parts})
        elif role == "user":
            messages.append({"role": "user",
                             "content": _openai_content(m.get("content"), f + ".content", only)})
        elif role == "assistant":
            parts = []
            reasoning = m.get("reasoning_content") or m.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                parts.append({"type": "thinking", "text": reasoning})
            parts += _openai_content(m.get("content"), f + ".content", only)
            parts += _openai_tool_calls(m.get("tool_calls") or [], f, i)
            messages.append({"role": "assistant", "content": parts})
        elif role in ("tool", "function"):
            tid = m.get("tool_call_id") or m.get("name")
            _need(isinstance(tid, str) and tid, f + ".tool_call_id",
                  "is required for role \"tool\"")
            add_tool_result(messages, {"type": "tool_result", "id": tid, "is_error": False,
                                       "content": _openai_content(m.get("content"), f + ".content",
                                                                  only)})
        else:
            raise bad_request(f + ".role",
                              "must be one of system, developer, user, assistant, tool")
    dropped = []
    tools, tool_choice = _openai_tools(body, dropped)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    _need(stop is None or (isinstance(stop, list) and all(isinstance(s, str) for s in stop)),
          "stop", "must be a string or an array of strings")
    stream = body.get("stream", False)
    _need(isinstance(stream, bool), "stream", "must be true or false")
    max_tokens = _opt_int(body, "max_completion_tokens") or _opt_int(body, "max_tokens")
    effort = body.get("reasoning_effort")
    if not effort and isinstance(body.get("reasoning"), dict):
        effort = body["reasoning"].get("effort")
    _need(effort is None or isinstance(effort, str), "reasoning_effort",
          "must be a string such as \"low\" or \"high\"")
    so = body.get("stream_options")
    n = body.get("n") if body.get("n") is not None else 1
    _need(isinstance(n, int) and not isinstance(n, bool) and n >= 1, "n", "must be an integer >= 1")
    return neutral_request(
        model, system, messages, tools=tools, tool_choice=tool_choice,
        parallel_tool_calls=body.get("parallel_tool_calls"), max_tokens=max_tokens,
        temperature=_opt_num(body, "temperature", 0, 2),
        top_p=_opt_num(body, "top_p", 0, 1), stop=stop or None,
        stream=stream, include_usage=bool(isinstance(so, dict) and so.get("include_usage")),
        reasoning={"effort": effort, "enabled": effort not in ("none", None)} if effort else None,
        user=body.get("user") if isinstance(body.get("user"), str) else None,
        response_format=_openai_format(body.get("response_format")), **_penalties(body),
        logprobs=_logprobs_asked(body, "logprobs", "top_logprobs"),
        extra=dict({"same_dialect_only": only + ([f"n ({n} choices)"] if n > 1 else [])}
                   if only or n > 1 else {}, **({"dropped_parts": dropped} if dropped else {})))


def _token_ids(xs):
    return bool(xs) and all(isinstance(t, int) and not isinstance(t, bool) for t in xs)


def openai_completion_decode(body):
    """OpenAI's Completions body (POST /v1/completions, what editors' autocomplete sends) ->
    neutral request: `completion` for the providers that complete text, the same texts as a user
    turn for the plan. What only OpenAI-compatible servers take (token ids, several prompts, echo,
    best_of, n) keeps the request on them."""
    model = _body_model(body)
    prompt, only = body.get("prompt"), []
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
        only.append(f"prompt ({len(prompt)} prompts)")
        prompt = "\n".join(prompt)
    elif isinstance(prompt, list) and prompt and all(
            _token_ids([x]) or isinstance(x, list) and _token_ids(x) for x in prompt):
        only.append("prompt as token ids")
        prompt = ""
    _need(isinstance(prompt, str), "prompt", "is required: a string (or an array of strings or of "
                                             "token ids)")
    suffix = body.get("suffix")
    _need(suffix is None or isinstance(suffix, str), "suffix", "must be a string")
    for field in ("echo", "stream"):
        _need(body.get(field) in (None, True, False), field, "must be true or false")
    if body.get("echo"):
        only.append("echo")
    for field in ("n", "best_of"):
        v = _opt_int(body, field)
        if v and v > 1:
            only.append(f"{field} ({v})")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    _need(stop is None or (isinstance(stop, list) and all(isinstance(x, str) for x in stop)),
          "stop", "must be a string or an array of strings")
    lp = _opt_int(body, "logprobs", 0)
    _need(lp is None or lp <= 5, "logprobs", "must be between 0 and 5")
    so = body.get("stream_options")
    _need(so is None or isinstance(so, dict), "stream_options", "must be an object")
    mt = body.get("max_tokens")
    return neutral_request(
        model, [], [{"role": "user", "content": [{"type": "text", "text": t}
                                                  for t in (prompt, suffix) if t]}],
        # (OpenAI's default; 0 with echo scores a prompt)
        max_tokens=16 if mt is None else _opt_int(body, "max_tokens", 0 if body.get("echo") else 1),
        temperature=_opt_num(body, "temperature", 0, 2), top_p=_opt_num(body, "top_p", 0, 1),
        stop=[x for x in stop or () if x] or None, stream=bool(body.get("stream")),
        include_usage=bool(isinstance(so, dict) and so.get("include_usage")),
        user=body.get("user") if isinstance(body.get("user"), str) else None,
        # (a prompt alone is text to continue as it is, the client's own FIM tokens and all: an
        # Ollama model's chat template must not wrap it)
        logprobs=lp, completion={"prompt": prompt, "suffix": suffix or None, "raw": not suffix},
        extra={"same_dialect_only": only} if only else None, **_penalties(body))


def _logprobs_asked(obj, flag, top, at=""):
    """A request's log-probability ask (the flag, and how many alternatives) -> neutral."""
    _need(obj.get(flag) in (None, True, False), at + flag, "must be true or false")
    n = _opt_int(obj, top, 0)
    _need(n is None or n <= 20, at + top, "must be between 0 and 20")
    return (n or 0) if obj.get(flag) else None


def _openai_format(rf):
    """Chat Completions' response_format (the schema nested under json_schema) -> neutral."""
    if rf is None:
        return None
    _need(isinstance(rf, dict), "response_format", "must be an object")
    js = rf.get("json_schema") if rf.get("type") == "json_schema" else {}
    _need(isinstance(js, dict), "response_format.json_schema", "must be an object")
    return neutral_format(rf.get("type"), js.get("schema"), js.get("name"), js.get("strict"),
                          "response_format", js.get("description"))


def _penalties(body, spelled=("seed", "presence_penalty", "frequency_penalty"), at=""):
    """seed and the two penalties, by the names a dialect gives them (-2 to 2, as OpenAI's)."""
    seed, presence, frequency = spelled
    v = body.get(seed)
    _need(v is None or isinstance(v, int) and not isinstance(v, bool), at + seed,
          "must be an integer")
    return {"seed": v, "presence_penalty": _opt_num(body, presence, -2, 2, at),
            "frequency_penalty": _opt_num(body, frequency, -2, 2, at)}


def _openai_usage(u):
    if not u:
        return None
    details = u.get("prompt_tokens_details") or {}
    cdetails = u.get("completion_tokens_details") or {}
    return {"input": u.get("prompt_tokens") or 0, "output": u.get("completion_tokens") or 0,
            "cache_read": details.get("cached_tokens") or 0, "cache_write": 0,
            "reasoning": cdetails.get("reasoning_tokens") or 0}


def _to_openai_usage(u):
    return {"prompt_tokens": u["input"], "completion_tokens": u["output"],
            "total_tokens": u["input"] + u["output"],
            "prompt_tokens_details": {"cached_tokens": u["cache_read"]},
            "completion_tokens_details": {"reasoning_tokens": u["reasoning"]}}


def openai_encode_response(resp, model, req=None):
    """Neutral response -> chat.completion object (text_completion for a completion request)."""
    if req is not None and req.get("completion"):
        return openai_completion_response(resp, model)
    msg = {"role": "assistant", "content": None}
    text = text_of(resp["content"])
    thinking = "".join(p["text"] for p in resp["content"] if p["type"] == "thinking")
    calls = [{"id": p["id"], "type": "function",
              "function": {"name": p["name"], "arguments": dumps(p["arguments"])}}
             for p in resp["content"] if p["type"] == "tool_call"]
    msg["content"] = text if text or not calls else None
    if thinking:
        msg["reasoning_content"] = thinking
    if calls:
        msg["tool_calls"] = calls
    finish = "tool_calls" if calls else STOP_TO_OPENAI_FINISH.get(resp["stop_reason"], "stop")
    return {"id": resp.get("id") or new_id("chatcmpl-"), "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": msg, "finish_reason": finish,
                         "logprobs": {"content": logprobs_to_openai(resp["logprobs"]),
                                      "refusal": None} if resp.get("logprobs") else None}],
            "usage": _to_openai_usage(resp["usage"])}


def openai_completion_response(resp, model):
    """Neutral response -> text_completion object."""
    lp = resp.get("logprobs")
    rid = resp.get("id") or ""
    return {"id": rid if rid.startswith("cmpl-") else new_id("cmpl-"), "object": "text_completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text_of(resp["content"]),
                         "logprobs": logprobs_to_legacy(lp) if lp else None,
                         "finish_reason": _completion_finish(resp["stop_reason"])}],
            "usage": _completion_usage(resp["usage"])}


def _completion_finish(stop):
    """A neutral stop reason as Completions says it (stop, length, content_filter only)."""
    finish = STOP_TO_OPENAI_FINISH.get(stop, "stop")
    return finish if finish in ("length", "content_filter") else "stop"


def _completion_usage(u):
    return {k: v for k, v in _to_openai_usage(u).items() if k != "completion_tokens_details"}


def openai_encode_error(err):
    body = {"error": {"message": err.message,
                      "type": OPENAI_ERROR_TYPE.get(err.etype, "server_error"),
                      "param": err.param, "code": err.code}}
    return dumps(body).encode()


class OpenAIStreamEncoder:
    """Neutral events -> OpenAI chat.completion.chunk SSE bytes, one event at a time."""

    def __init__(self, model, req, input_estimate=0):
        self.model, self.include_usage = model, req.get("include_usage")
        self.id = new_id("chatcmpl-")
        self.created = int(time.time())
        self.tool_index = -1
        self.saw_tool = False

    OBJECT = "chat.completion.chunk"
    USAGE = staticmethod(_to_openai_usage)

    def _event(self, choices, **more):
        return b"data: " + dumps(dict({"id": self.id, "object": self.OBJECT,
                                       "created": self.created, "model": self.model,
                                       "choices": choices}, **more)).encode() + b"\n\n"

    def usage_chunk(self, usage):
        """The chunk with `usage` that include_usage asks for (choices empty), before [DONE]."""
        return self._event([], usage=self.USAGE(usage))

    def _end(self, last, usage):
        """The stream's last chunk, the usage chunk if asked, [DONE]."""
        return last + (self.usage_chunk(usage or empty_usage()) if self.include_usage
                       else b"") + b"data: [DONE]\n\n"

    def _chunk(self, delta, finish=None, logprobs=None):
        return self._event([{"index": 0, "delta": delta, "logprobs": logprobs,
                             "finish_reason": finish}])

    def encode(self, ev):
        kind = ev[0]
        if kind in ("text", "logprobs"):
            lp = text_logprobs(ev)
            return self._chunk({"content": ev[1]} if kind == "text" else {},
                               logprobs={"content": logprobs_to_openai(lp), "refusal": None}
                               if lp else None)
        if kind == "thinking":
            return self._chunk({"reasoning_content": ev[1]})
        if kind == "tool":
            self.tool_index += 1
            self.saw_tool = True
            return self._chunk({"tool_calls": [{"index": self.tool_index,
                                                "id": ev[1], "type": "function",
                                                "function": {"name": ev[2], "arguments": ""}}]})
        if kind == "args":
            return self._chunk({"tool_calls": [{"index": self.tool_index,
                                                "function": {"arguments": ev[1]}}]})
        if kind == "start":
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "end":
            finish = "tool_calls" if self.saw_tool else STOP_TO_OPENAI_FINISH.get(ev[1], "stop")
            return self._end(self._chunk({}, finish), ev[2])
        if kind == "error":
            return b"data: " + openai_encode_error(ev[1]) + b"\n\ndata: [DONE]\n\n"
        return b""


class CompletionStreamEncoder(OpenAIStreamEncoder):
    """Neutral events -> OpenAI text_completion SSE chunks: each chunk's `text` a delta, the last
    one with finish_reason, a `choices: []` chunk with usage when include_usage asked, [DONE]."""

    OBJECT = "text_completion"
    USAGE = staticmethod(_completion_usage)

    def __init__(self, model, req, input_estimate=0):
        super().__init__(model, req, input_estimate)
        self.id = new_id("cmpl-")
        self.offset = 0

    def _text(self, text, finish=None, lp=None):
        legacy = logprobs_to_legacy(lp, self.offset) if lp else None
        self.offset += len(text)
        return self._event([{"index": 0, "text": text, "logprobs": legacy,
                             "finish_reason": finish}])

    def encode(self, ev):
        kind = ev[0]
        if kind in ("text", "logprobs"):
            return self._text(ev[1] if kind == "text" else "", lp=text_logprobs(ev))
        if kind == "end":
            return self._end(self._text("", _completion_finish(ev[1])), ev[2])
        if kind == "error":
            return super().encode(ev)
        return b""


def openai_stream_encoder(model, req, input_estimate=0):
    """The OpenAI codec's stream encoder: chat chunks, or text_completion ones for a completion."""
    cls = CompletionStreamEncoder if req.get("completion") else OpenAIStreamEncoder
    return cls(model, req, input_estimate)


def _openai_part(p):
    """A neutral text, image or file part as a Chat Completions content part."""
    if p["type"] == "text":
        return {"type": "text", "text": p["text"]}
    if p["type"] == "file":
        return {"type": "file", "file": {"filename": p.get("name") or "document.pdf",
                                         "file_data": data_url_of(p)}}
    return {"type": "image_url", "image_url": {"url": image_url_of(p)}}


def openai_encode_request(req, model_id, provider, model_meta, settings=None):
    """Neutral request -> OpenAI Chat Completions body for an OpenAI-compatible provider (a
    Completions one for a completion)."""
    if req.get("completion"):
        return openai_completion_body(req, model_id, model_meta)
    out = []
    sys_text = system_text(req)
    if sys_text:
        out.append({"role": "system", "content": sys_text})
    for m in req["messages"]:
        role, parts = m["role"], m["content"]
        if role == "system":
            out.append({"role": "system", "content": text_of(parts)})
        elif role == "assistant":
            # "content" is "" (never null) beside tool calls: OpenAI takes either, strict servers
            # (llama-cpp-python, vLLM's validators) refuse null with a 500
            msg = {"role": "assistant", "content": text_of(parts)}
            calls = [{"id": p["id"], "type": "function",
                      "function": {"name": p["name"], "arguments": dumps(p["arguments"])}}
                     for p in parts if p["type"] == "tool_call"]
            if calls:
                msg["tool_calls"] = calls
            elif not msg["content"]:
                continue
            out.append(msg)
        else:
            rest, moved_images = [], []
            for p in parts:
                if p["type"] == "tool_result":
                    out.append({"role": "tool", "tool_call_id": p["id"],
                                "content": result_text(p)})
                    moved_images += [q for q in p["content"] if q["type"] == "image"]
                elif p["type"] in ("text", "image", "file"):
                    rest.append(p)
            rest = moved_images + rest
            if rest:
                if all(p["type"] == "text" for p in rest):
                    out.append({"role": "user", "content": text_of(rest)})
                else:
                    out.append({"role": "user", "content": [_openai_part(p) for p in rest]})
    body = {"model": model_id, "messages": out}
    mt = output_limit(req, model_meta)
    quirks = provider.quirks if provider is not None else frozenset()
    if mt:
        body["max_completion_tokens" if "max_completion_tokens" in quirks else "max_tokens"] = mt
    body.update(sampling_out(req, OPENAI_SAMPLING))
    body.update(logprobs_out(req, "logprobs", "top_logprobs"))
    rf = req.get("response_format")
    if rf:
        fmt = openai_format(rf)
        body["response_format"] = fmt if rf["type"] == "json_object" else {
            "type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
        if json_unsaid(req, rf):
            body["messages"].insert(0, {"role": "system", "content": JSON_SAID})
    if req["tools"]:
        body.update(openai_family_tools(req, nested=True,
                                        required="any" if "tool_choice_any" in quirks else "required"))
    r = req.get("reasoning")
    if r and r.get("enabled") and model_meta.get("reasoning"):
        # Only for models marked "reasoning": true; others reject the parameter with a 400.
        body["reasoning_effort"] = reasoning_effort(r)
    return _openai_user_stream(body, req)


def _openai_user_stream(body, req):
    """The fields both OpenAI bodies end with: the user, and a stream that reports its usage."""
    if req.get("user"):
        body["user"] = req["user"][:256]
    if req["stream"]:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def openai_completion_body(req, model_id, model_meta):
    """A neutral completion -> an OpenAI Completions body (POST /completions)."""
    c = req["completion"]
    body = {"model": model_id, "prompt": c["prompt"]}
    if c["suffix"]:
        body["suffix"] = c["suffix"]
    mt = output_limit(req, model_meta)
    if mt:
        body["max_tokens"] = mt
    body.update(sampling_out(req, OPENAI_SAMPLING))
    if req.get("logprobs") is not None:
        body["logprobs"] = req["logprobs"]
    return _openai_user_stream(body, req)


#: neutral field -> Chat Completions field, limit (OpenAI takes at most 4 stop sequences)
OPENAI_SAMPLING = (("temperature", "temperature", None), ("top_p", "top_p", None),
                   ("stop", "stop", 4), ("seed", "seed", None),
                   ("presence_penalty", "presence_penalty", None),
                   ("frequency_penalty", "frequency_penalty", None))


def openai_family_tools(req, nested, required="required"):
    """tools, tool_choice and parallel_tool_calls as the OpenAI family writes them: Chat nests a
    function's fields under "function" (nested), Responses does not."""
    def fn(name, **more):
        return {"type": "function", "function": dict(name=name, **more)} if nested else \
            dict({"type": "function", "name": name}, **more)
    out = {"tools": [fn(t["name"], description=t["description"],
                        parameters=t["parameters"]) for t in req["tools"]]}
    tc = req.get("tool_choice")
    if tc:
        out["tool_choice"] = (fn(tc["name"]) if tc["type"] == "tool"
                              else {"any": required}.get(tc["type"], tc["type"]))
    if req.get("parallel_tool_calls") is not None:
        out["parallel_tool_calls"] = bool(req["parallel_tool_calls"])
    return out


def openai_no_null_content(body):
    """A client's Chat Completions body with `"content": null` beside tool calls made "" (what
    the router's own encoder writes): strict servers refuse null. The body is copied only if
    something changes."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not any(
            isinstance(m, dict) and m.get("content", "") is None for m in msgs):
        return body
    return dict(body, messages=[
        dict(m, content="") if isinstance(m, dict) and m.get("content", "") is None
        and m.get("tool_calls") else m for m in msgs])


_SSE_EVENT_END = re.compile(rb"\r?\n\r?\n")
_OPENAI_DONE_EVENT = re.compile(rb"\s*data: ?\[DONE\]\s*")


class OpenAIPassthrough(StreamPassthrough):
    """An OpenAI Chat stream passed through. Byte for byte, except: the usage chunk the client
    asked for (include_usage) goes before [DONE] when the router had to estimate it; a [DONE]
    that came without a finish reason is replaced by the error; and, for a provider with the
    quirk repeats_tool_call_ids, a tool call's id, type and name are sent once (a server that
    repeats them in every chunk makes OpenAI clients join them into one long id and name). Only
    then are events parsed: [DONE] is matched as a whole event, never inside a string."""

    def __init__(self, codec, ctx, prov):
        super().__init__(codec, ctx, prov)
        self.seen = {} if "repeats_tool_call_ids" in prov.quirks else None     # index -> id
        self.before_done = None

    @staticmethod
    def body(raw, usage):
        return dumps(dict(loads(raw), usage=_to_openai_usage(usage))).encode()

    def usage(self, usage):
        if self.ctx.req.get("include_usage"):
            self.before_done = openai_stream_encoder(self.ctx.model,
                                                     self.ctx.req).usage_chunk(usage)

    def events(self, data):
        if self.seen is None and self.before_done is None and not self.drop_end:
            return data
        out = []
        for block in _SSE_EVENT_END.split(data):
            if not block:
                continue
            if _OPENAI_DONE_EVENT.fullmatch(block):
                if self.drop_end:
                    continue                       # (our error event and its [DONE] follow)
                if self.before_done is not None:
                    out.append(self.before_done)
                    self.before_done = None
            elif self.seen is not None and b'"tool_calls"' in block:
                block = self._mend(block)
            out.append(block + b"\n\n")
        return b"".join(out)

    def close(self):
        out = super().close()
        if self.before_done is not None:           # a stream that ended without [DONE]
            out, self.before_done = out + self.before_done, None
        return out

    def _mend(self, block):
        head, _sep, payload = block.partition(b":")
        try:
            obj = json.loads(payload) if head.strip() == b"data" else None
        except ValueError:
            obj = None
        changed = False
        for ch in (obj.get("choices") or []) if isinstance(obj, dict) else ():
            delta = ch.get("delta") if isinstance(ch, dict) else None
            calls = delta.get("tool_calls") if isinstance(delta, dict) else None
            if not calls or not isinstance(calls, list):
                continue
            if delta.pop("function_call", None) is not None:
                # the legacy copy beside tool_calls (llama-cpp-python)
                changed = True
            for tc in calls:
                i, tid = tc.get("index", 0), tc.get("id")
                if tid and self.seen.get(i) == tid:
                    tc.pop("id")
                    tc.pop("type", None)
                    if isinstance(tc.get("function"), dict):
                        tc["function"].pop("name", None)
                    changed = True
                elif tid:
                    self.seen[i] = tid
        return b"data: " + dumps(obj).encode() if changed else block


def _openai_message_parts(msg):
    parts = []
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    content = msg.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if (not reasoning and isinstance(content, str) and content.startswith("<think>")
            and "</think>" in content):
        reasoning, _, content = content[7:].partition("</think>")
        content = content.lstrip()
    if isinstance(reasoning, str) and reasoning:
        parts.append({"type": "thinking", "text": reasoning})
    if content:
        parts.append({"type": "text", "text": content})
    if isinstance(msg.get("refusal"), str) and msg["refusal"]:
        parts.append({"type": "text", "text": msg["refusal"]})
    for i, c in enumerate(msg.get("tool_calls") or []):
        fn = c.get("function") or {}
        parts.append({"type": "tool_call", "id": c.get("id") or new_id("call_"),
                      "name": fn.get("name", ""),
                      "arguments": parse_args_json(fn.get("arguments") or "")})
    return parts


def openai_decode_response(body, prov=None):
    choices = body.get("choices") or [{}]
    c = choices[0]
    if "text" in c and "message" not in c:             # a Completions reply
        lp = logprobs_from_legacy(c.get("logprobs"))
        return {"id": body.get("id"), "model": body.get("model"),
                "content": [{"type": "text", "text": str(c["text"])}] if c["text"] else [],
                "stop_reason": OPENAI_FINISH_TO_STOP.get(c.get("finish_reason"), "end_turn"),
                "stop_sequence": None, "usage": _openai_usage(body.get("usage")) or empty_usage(),
                **({"logprobs": lp} if lp else {})}
    parts = _openai_message_parts(c.get("message") or {})
    finish = c.get("finish_reason")
    stop = OPENAI_FINISH_TO_STOP.get(finish, "end_turn")
    if any(p["type"] == "tool_call" for p in parts):
        stop = "tool_use"
    elif (c.get("message") or {}).get("refusal") and stop == "end_turn":
        stop = "refusal"
    resp = {"id": body.get("id"), "model": body.get("model"), "content": parts, "stop_reason": stop,
            "stop_sequence": None, "usage": _openai_usage(body.get("usage")) or empty_usage()}
    lp = logprobs_from_openai((c.get("logprobs") or {}).get("content"))
    if lp:
        resp["logprobs"] = lp
    return resp


class OpenAIStreamDecoder(SSEDecoder):
    """OpenAI chat.completion.chunk SSE bytes -> neutral events. Tool-call fragments are tracked by
    `index` (a new `id` on a reused index starts a new call); `end` is emitted at [DONE] or at a
    clean end of stream after a finish_reason, because usage arrives after finish_reason."""

    def __init__(self, prov=None):
        super().__init__(prov)
        self.started = False
        self.finish = None
        self.usage = None
        self.tools = {}          # upstream index -> our call id
        self.current = None      # upstream index of the tool call whose args are streaming
        self.saw_tool = False
        self.think = None        # "<think>" tag state for servers that inline reasoning
        self.refused = False

    def _finish(self, out):
        if self.finish is None:
            super()._finish(out)
        else:
            out.append(self._end())

    def _end(self):
        self.ended = True
        stop = "tool_use" if self.saw_tool else OPENAI_FINISH_TO_STOP.get(self.finish, "end_turn")
        if self.refused and stop == "end_turn":
            stop = "refusal"
        return ("end", stop, self.usage, None)

    def _data(self, data, out):
        if self.ended or not data:
            return
        if data.startswith("[DONE]"):
            if self.finish is None:
                # [DONE] without any finish_reason: the server was interrupted (llama.cpp's server
                # does this): a truncated reply, not a finished one
                self.ended = True
                err = ApiError(502, "api_error",
                               "the provider's stream ended without a finish reason (cut short)")
                err.at_end = True
                out.append(("error", err))
                return
            out.append(self._end())
            return
        try:
            obj = loads(data)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if obj.get("error"):
            e = obj["error"]
            msg = e.get("message") if isinstance(e, dict) else str(e)
            self.ended = True
            out.append(("error", ApiError(502, "api_error", msg or "provider error in stream")))
            return
        if not self.started:
            self.started = True
            out.append(("start", {"id": obj.get("id"), "model": obj.get("model")}))
        if obj.get("usage"):
            self.usage = _openai_usage(obj["usage"])
        for c in obj.get("choices") or ():
            if c.get("index", 0) != 0:
                continue
            if "text" in c and "delta" not in c:         # a Completions chunk
                if c["text"]:
                    out.append(("text", str(c["text"])))
                with_logprobs(out, logprobs_from_legacy(c.get("logprobs")))
                if c.get("finish_reason"):
                    self.finish = c["finish_reason"]
                continue
            d = c.get("delta") or {}
            r = d.get("reasoning_content") or d.get("reasoning")
            if isinstance(r, str) and r:
                out.append(("thinking", r))
            t = d.get("content")
            if t:
                self._text(t, out)
            if isinstance(d.get("refusal"), str) and d["refusal"]:
                self.refused = True                  # (a structured-output refusal)
                out.append(("text", d["refusal"]))
            with_logprobs(out, logprobs_from_openai((c.get("logprobs") or {}).get("content")))
            for tc in d.get("tool_calls") or ():
                idx = tc.get("index", self.current if self.current is not None else 0)
                fn = tc.get("function") or {}
                tid = tc.get("id")
                if idx not in self.tools or (tid and tid != self.tools[idx]):
                    self.tools[idx] = tid or new_id("call_")
                    self.current = idx
                    self.saw_tool = True
                    out.append(("tool", self.tools[idx], fn.get("name") or ""))
                args = fn.get("arguments")
                if args:
                    out.append(("args", args if isinstance(args, str) else dumps(args)))
            if c.get("finish_reason"):
                self.finish = c["finish_reason"]

    def _text(self, t, out):
        # Some hosts of reasoning models inline "<think>...</think>" at the start of content.
        if self.think is None:
            if t.startswith("<think>"):
                self.think = True
                t = t[7:]
            else:
                self.think = False
        if self.think:
            head, sep, tail = t.partition("</think>")
            if head:
                out.append(("thinking", head))
            if not sep:
                return
            self.think = False
            t = tail.lstrip("\n")
            if not t:
                return
        out.append(("text", t))


def openai_parse_error(status, body):
    """Message and code of an OpenAI-compatible error body (also NVIDIA's problem JSON)."""
    obj, text = error_json(status, body)
    if obj is None:
        return text, None
    if isinstance(obj, dict):
        e = obj.get("error")
        if isinstance(e, dict):
            return str(e.get("message") or e)[:1000], e.get("code") or e.get("type")
        if isinstance(e, str):
            return e[:1000], None
        if obj.get("detail") or obj.get("title"):
            return str(obj.get("detail") or obj.get("title"))[:1000], None
        if isinstance(obj.get("message"), str):
            return obj["message"][:1000], obj.get("code")
    return str(obj)[:300], None


#: Model ids that are not chat models (OpenAI-style lists mix them in).
NON_CHAT_RE = re.compile(r"embed|rerank|whisper|tts|audio|transcribe|dall-e|gpt-image|image-gen|"
                         r"moderation|realtime|davinci|babbage|computer-use|sora|parakeet|"
                         r"nemoretriever|-guard|turbo-instruct|(?:^|[-/])o\d-pro|"
                         r"gpt-5(?:\.\d)?-pro|codex-mini|deep-research", re.I)


#: Ids of embedding models in such lists (kept, as embedding models).
EMBEDDING_RE = re.compile(r"embed|(?:^|[-/_])(?:bge|e5|gte)(?:[-_]|$)|minilm|nemoretriever-.*embed",
                          re.I)


def _openai_list_meta(m):
    """What an OpenAI-style list entry says of a model (OpenRouter's lists say a lot; vLLM's,
    and NVIDIA NIM's that run on it, give the served window as max_model_len)."""
    meta = {}
    window = m.get("context_length") or m.get("max_model_len")
    if _positive_int(window):
        meta["context_window"] = window
    mods = (m.get("architecture") or {}).get("input_modalities")
    if isinstance(mods, list):
        meta["input"] = ["text"] + (["image"] if "image" in mods else []) + (
            ["pdf"] if "file" in mods else [])
    params = m.get("supported_parameters")
    if isinstance(params, list):
        meta["tools"] = "tools" in params
        meta["reasoning"] = "reasoning" in params or "include_reasoning" in params
    top = (m.get("top_provider") or {}).get("max_completion_tokens")
    if isinstance(top, int):
        meta["max_output"] = top
    pricing = m.get("pricing") or {}
    try:
        fields = (("input", "prompt"), ("output", "completion"), ("cached", "input_cache_read"),
                  ("cache_write", "input_cache_write"))
        cost = {k: round(float(pricing[p]) * 1e6, 4) for k, p in fields if p in pricing
                and 0 <= float(pricing[p]) < float("inf")}
        if cost:
            meta["cost"] = cost
    except (TypeError, ValueError):
        pass
    return meta


def openai_embed_decode(body):
    """POST /v1/embeddings body -> neutral embeddings request (NVIDIA's input_type read too)."""
    model = _body_model(body)
    inp = body.get("input")
    if isinstance(inp, str) or (isinstance(inp, list) and inp
                                and all(isinstance(t, int) and not isinstance(t, bool) for t in inp)):
        inp = [inp]
    _need(isinstance(inp, list), "input", "must be a string, an array of strings or of token arrays")
    fmt = body.get("encoding_format") or "float"
    _need(fmt in ("float", "base64"), "encoding_format", "must be \"float\" or \"base64\"")
    kind = body.get("input_type")
    task = {"query": "query", "passage": "document"}.get(kind)
    return embed_request(model, inp, _opt_int(body, "dimensions"), task, fmt == "base64",
                         **({"input_type": kind} if isinstance(kind, str) else {}))


def openai_embed_encode(vectors, model, ereq, tokens):
    """Vectors -> the /v1/embeddings reply (base64 when the client asked for it)."""
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i,
                      "embedding": floats_base64(v) if ereq["base64"] else v}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def openai_embed_request(ereq, inputs, model_id, provider=None):
    body = {"model": model_id, "input": inputs, "encoding_format": "float"}
    if ereq["dimensions"]:
        body["dimensions"] = ereq["dimensions"]
    if ereq.get("input_type"):                     # the client's own, for its NIM
        body["input_type"] = ereq["input_type"]
    elif "embed_input_type" in getattr(provider, "quirks", ()):
        body["input_type"] = "passage" if ereq["task"] == "document" else "query"
    return body


def openai_embed_response(obj):
    """A /v1/embeddings reply -> (vectors in input order, input tokens or None)."""
    data = sorted(obj.get("data") or [], key=lambda d: d.get("index", 0))
    vectors = [base64_floats(d["embedding"]) if isinstance(d.get("embedding"), str)
               else d.get("embedding") for d in data]
    return vectors, (obj.get("usage") or {}).get("prompt_tokens")


def openai_list_models(fetch, known):
    """GET /models: chat models only (OpenAI, NVIDIA NIM, OpenRouter, the OpenClaw gateway, vLLM,
    LM Studio, ...; their lists mix in embedding, audio, image and moderation models)."""
    out = {}
    for m in fetch("/models").get("data") or []:
        mid = m.get("id") if isinstance(m, dict) else None
        if isinstance(mid, str) and not NON_CHAT_RE.search(mid):
            out[mid] = _openai_list_meta(m)
        elif isinstance(mid, str) and EMBEDDING_RE.search(mid):
            out[mid] = {"embedding": True, "chat": False, "tools": False}
    return out


def openai_auth(prov, key, path, data):
    return {"Authorization": "Bearer " + key} if key else {}


def openai_adjust(body, prov, req, meta, headers, foreign):
    """The same-dialect body as it goes out: null content beside tool calls made "" (strict servers
    refuse null), and the provider's body quirks (tool_choice "any", max_completion_tokens)."""
    body = openai_no_null_content(body)
    if "tool_choice_any" in prov.quirks and body.get("tool_choice") == "required":
        body = dict(body, tool_choice="any")
    if "max_completion_tokens" in prov.quirks and "max_tokens" in body and not req.get("completion"):
        body = dict(body)
        body.setdefault("max_completion_tokens", body.pop("max_tokens"))
    return body, {}


def openai_list_shape(entries, query=None):
    return {"object": "list",
            "data": [openai_model_shape(e) for e in entries if "shared" not in e[2]]}


def openai_model_shape(entry):
    mid, owner, meta = entry
    return dict({"id": mid, "object": "model", "created": 0, "owned_by": owner},
                **_caps_entry(meta))

# ----------------------------------------------------------------------- Anthropic Messages --

ANTHROPIC_ERROR_TYPE = {"invalid_request": "invalid_request_error",
                        "authentication": "authentication_error",
                        "permission": "permission_error", "not_found": "not_found_error",
                        "request_too_large": "request_too_large", "rate_limit": "rate_limit_error",
                        "billing": "billing_error", "quota": "rate_limit_error",
                        "api_error": "api_error",
                        "overloaded": "overloaded_error", "timeout": "timeout_error"}


ANTHROPIC_TOOL_CHOICE = ("auto", "any", "tool", "none")

def _anthropic_blocks(content, field, allow_tools=True, only=None, dropped=None):
    """Anthropic content -> neutral parts. Input with no neutral form (a document by URL or as
    text, search results) is named in `only`: it reaches an Anthropic provider on the byte
    passthrough, and no other; other blocks without one (server tools' calls and results) are
    named in `dropped` (X-Router-Dropped) when they are left out."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    _need(isinstance(content, list), field, "must be a string or an array of content blocks")
    parts = []
    for i, b in enumerate(content):
        f = f"{field}[{i}]"
        _need(isinstance(b, dict), f, "must be an object")
        t = b.get("type")
        if t == "text":
            _need(isinstance(b.get("text"), str), f + ".text", "must be a string")
            if b["text"]:
                parts.append({"type": "text", "text": b["text"]})
        elif t == "image":
            src = b.get("source")
            _need(isinstance(src, dict), f + ".source", "must be an object")
            if src.get("type") == "url":
                _need(isinstance(src.get("url"), str), f + ".source.url", "must be a string")
                parts.append({"type": "image", "url": src["url"]})
            else:
                _need(isinstance(src.get("data"), str), f + ".source.data",
                      "must be a base64 string")
                parts.append({"type": "image",
                              "media_type": src.get("media_type") or sniff_mime(src["data"]),
                              "data": src["data"]})
        elif t == "tool_use" and allow_tools:
            _need(isinstance(b.get("name"), str), f + ".name", "must be a string")
            _need(isinstance(b.get("id"), str), f + ".id", "must be a string")
            inp = b.get("input", {})
            _need(isinstance(inp, dict), f + ".input", "must be an object")
            parts.append({"type": "tool_call", "id": b["id"], "name": b["name"], "arguments": inp})
        elif t == "tool_result" and allow_tools:
            _need(isinstance(b.get("tool_use_id"), str), f + ".tool_use_id", "must be a string")
            parts.append({"type": "tool_result", "id": b["tool_use_id"],
                          "is_error": bool(b.get("is_error")),
                          "content": _anthropic_blocks(b.get("content") or [],
                                                       f + ".content", False, only, dropped)})
        elif t == "thinking":
            parts.append({"type": "thinking", "text": str(b.get("thinking", "")),
                          "signature": b.get("signature") or ""})
        elif t == "redacted_thinking":
            parts.append({"type": "redacted_thinking", "data": str(b.get("data", ""))})
        elif t == "document" and isinstance(b.get("source"), dict) \
                and b["source"].get("type") == "base64" \
                and b["source"].get("media_type") == "application/pdf":
            _need(isinstance(b["source"].get("data"), str), f + ".source.data",
                  "must be a base64 string")
            parts.append({"type": "file", "media_type": "application/pdf",
                          "data": b["source"]["data"],
                          "name": b.get("title") if isinstance(b.get("title"), str) else None})
        elif t in ("document", "search_result") and only is not None:
            only.append(f"{f}.{t}")
        elif t not in ("tool_use", "tool_result") and dropped is not None:
            dropped.append(f"{f}.{t}")
    return parts


def anthropic_decode_request(body, count_only=False):
    """Anthropic Messages request body -> neutral request."""
    model = _body_model(body)
    msgs = body.get("messages")
    _need(isinstance(msgs, list) and (msgs or count_only), "messages",
          "is required and must be a non-empty array")
    system = body.get("system")
    if system is None:
        system = []
    else:
        system = _anthropic_blocks(system, "system", False)
    messages, only, dropped = [], [], []
    for i, m in enumerate(msgs):
        f = f"messages[{i}]"
        _need(isinstance(m, dict), f, "must be an object")
        role = m.get("role")
        _need(role in ("user", "assistant", "system"), f + ".role",
              "must be \"user\" or \"assistant\"")
        messages.append({"role": role, "content": _anthropic_blocks(
            m.get("content"), f + ".content", only=only, dropped=dropped)})
    tools = []
    raw_tools = body.get("tools") or []
    _need(isinstance(raw_tools, list), "tools", "must be an array")
    for i, t in enumerate(raw_tools):
        _need(isinstance(t, dict) and isinstance(t.get("name"), str),
              f"tools[{i}].name", "must be a string")
        if t.get("type") not in (None, "custom"):
            # server tools (web_search, bash_2025...) only exist at Anthropic
            dropped.append(f"tools[{i}].{t.get('type')}")
            continue
        tools.append(neutral_tool(t["name"], t.get("description"), t.get("input_schema"),
                                  f"tools[{i}]", "input_schema"))
    tc = body.get("tool_choice")
    tool_choice, parallel = None, None
    if tc is not None:
        _need(isinstance(tc, dict) and tc.get("type") in ANTHROPIC_TOOL_CHOICE, "tool_choice.type",
              "must be one of auto, any, tool, none")
        tool_choice = {"type": tc["type"]}
        if tc["type"] == "tool":
            _need(isinstance(tc.get("name"), str), "tool_choice.name", "must be a string")
            tool_choice["name"] = tc["name"]
        if tc.get("disable_parallel_tool_use"):
            parallel = False
    stop = body.get("stop_sequences")
    _need(stop is None or (isinstance(stop, list) and all(isinstance(s, str) for s in stop)),
          "stop_sequences", "must be an array of strings")
    stream = body.get("stream", False)
    _need(isinstance(stream, bool), "stream", "must be true or false")
    reasoning = None
    th = body.get("thinking")
    if isinstance(th, dict) and th.get("type") in ("enabled", "adaptive"):
        oc = body.get("output_config")
        reasoning = {"enabled": True, "budget_tokens": th.get("budget_tokens"),
                     "effort": oc.get("effort") if isinstance(oc, dict) else None}
    meta = body.get("metadata")
    user = meta.get("user_id") if isinstance(meta, dict) else None
    user = user if isinstance(user, str) else None
    oc = body.get("output_config")
    _need(oc is None or isinstance(oc, dict), "output_config", "must be an object")
    # (output_format: the beta's name, before output_config.format)
    fmt, at = ((oc or {}).get("format"), "output_config.format") if (oc or {}).get("format") \
        else (body.get("output_format"), "output_format")
    _need(fmt is None or isinstance(fmt, dict), at, "must be an object")
    return neutral_request(
        model, system, messages, tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel,
        max_tokens=None if count_only else _opt_int(body, "max_tokens"),
        temperature=_opt_num(body, "temperature", 0, 2), top_p=_opt_num(body, "top_p", 0, 1),
        top_k=_opt_int(body, "top_k", 0), stop=stop or None, stream=stream,
        reasoning=reasoning, user=user,
        response_format=neutral_format(fmt.get("type"), fmt.get("schema"), field=at)
        if fmt else None, extra=dict({"same_dialect_only": only} if only else {},
                                     **({"dropped_parts": dropped} if dropped else {})))


def _anthropic_usage(u):
    if not u:
        return None
    cr = u.get("cache_read_input_tokens") or 0
    cw = u.get("cache_creation_input_tokens") or 0
    out = {"output": u.get("output_tokens") or 0, "cache_read": cr,
           "cache_write": cw, "reasoning": 0}
    if u.get("input_tokens") is not None:
        out["input"] = (u.get("input_tokens") or 0) + cr + cw
    return out


def _to_anthropic_usage(u):
    u = u or empty_usage()
    return {"input_tokens": max(0, u["input"] - u["cache_read"] - u["cache_write"]),
            "output_tokens": u["output"], "cache_creation_input_tokens": u["cache_write"],
            "cache_read_input_tokens": u["cache_read"]}


def _anthropic_block(p):
    t = p["type"]
    if t == "text":
        return {"type": "text", "text": p["text"]}
    if t == "thinking":
        return {"type": "thinking", "thinking": p["text"],
                "signature": p.get("signature") or ROUTER_SIGNATURE_PREFIX + "none"}
    if t == "redacted_thinking":
        return {"type": "redacted_thinking", "data": p["data"]}
    if t == "tool_call":
        return {"type": "tool_use", "id": anthropic_tool_id(p["id"]), "name": p["name"],
                "input": p["arguments"]}
    if t == "image":
        if "data" in p:
            return {"type": "image",
                    "source": {"type": "base64", "media_type": p["media_type"], "data": p["data"]}}
        return {"type": "image", "source": {"type": "url", "url": p["url"]}}
    if t == "file":
        return {"type": "document", **({"title": p["name"]} if p.get("name") else {}),
                "source": {"type": "base64", "media_type": p["media_type"], "data": p["data"]}}
    if t == "tool_result":
        return {"type": "tool_result", "tool_use_id": anthropic_tool_id(p["id"]),
                "content": [_anthropic_block(q) for q in p["content"]] or "(empty)",
                **({"is_error": True} if p.get("is_error") else {})}
    return None


_BAD_ID_CHARS = re.compile(r"[^a-zA-Z0-9_-]")


def anthropic_tool_id(tid):
    """Anthropic tool ids must match ^[a-zA-Z0-9_-]+$; other dialects' ids are mapped stably."""
    if tid and not _BAD_ID_CHARS.search(tid):
        return tid
    return "toolu_" + hashlib.sha1((tid or "").encode()).hexdigest()[:24]


def anthropic_encode_response(resp, model, req=None):
    content = [_anthropic_block(p) for p in resp["content"]
               if p["type"] != "thinking" or p.get("signature") or p["text"]]
    has_tool = any(p["type"] == "tool_call" for p in resp["content"])
    stop = "tool_use" if has_tool else (resp["stop_reason"] or "end_turn")
    return {"id": resp.get("id") if (resp.get("id") or "").startswith("msg_") else new_id("msg_"),
            "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop, "stop_sequence": resp.get("stop_sequence"),
            "usage": _to_anthropic_usage(resp["usage"])}


def anthropic_encode_error(err):
    return dumps({"type": "error",
                  "error": {"type": ANTHROPIC_ERROR_TYPE.get(err.etype, "api_error"),
                                             "message": err.message}}).encode()


def _sse(event, obj):
    return b"event: " + event.encode() + b"\ndata: " + dumps(obj).encode() + b"\n\n"


class AnthropicStreamEncoder:
    """Neutral events -> Anthropic Messages SSE bytes. Opens and closes content blocks as the
    event kinds change; thinking from non-Anthropic providers gets a router-made signature."""

    def __init__(self, model, req, input_estimate=0):
        self.model = model
        self.input_estimate = input_estimate
        self.index = -1
        self.open = None          # kind of the open block: "text" | "thinking" | "tool"
        self.signed = False
        self.usage_in = None

    def _close(self):
        if self.open is None:
            return b""
        out = b""
        if self.open == "thinking" and not self.signed:
            out += _sse("content_block_delta", {"type": "content_block_delta", "index": self.index,
                        "delta": {"type": "signature_delta",
                                  "signature": ROUTER_SIGNATURE_PREFIX + "none"}})
        self.open = None
        return out + _sse("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _open(self, kind, block):
        out = self._close()
        self.index += 1
        self.open = kind
        self.signed = False
        return out + _sse("content_block_start",
                          {"type": "content_block_start", "index": self.index,
                                                  "content_block": block})

    def encode(self, ev):
        kind = ev[0]
        if kind == "text":
            out = b"" if self.open == "text" else self._open("text", {"type": "text", "text": ""})
            return out + _sse("content_block_delta",
                              {"type": "content_block_delta", "index": self.index,
                                                      "delta": {"type": "text_delta", "text": ev[1]}})
        if kind == "thinking":
            out = b"" if self.open == "thinking" and not self.signed else \
                self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            return out + _sse("content_block_delta",
                              {"type": "content_block_delta", "index": self.index,
                                                      "delta": {"type": "thinking_delta",
                                                                "thinking": ev[1]}})
        if kind == "signature":
            out = b"" if self.open == "thinking" else \
                self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self.signed = True
            return out + _sse("content_block_delta",
                              {"type": "content_block_delta", "index": self.index,
                                                      "delta": {"type": "signature_delta",
                                                                "signature": ev[1]}})
        if kind == "tool":
            return self._open("tool", {"type": "tool_use", "id": anthropic_tool_id(ev[1]),
                                       "name": ev[2], "input": {}})
        if kind == "args":
            return _sse("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                "delta": {"type": "input_json_delta",
                                                          "partial_json": ev[1]}})
        if kind == "redacted_thinking":
            out = self._open("redacted", {"type": "redacted_thinking", "data": ev[1]})
            return out + self._close()
        if kind == "start":
            meta = ev[1]
            known = meta.get("usage") and "input" in meta["usage"]
            usage = _to_anthropic_usage(meta["usage"] if known
                                        else dict(empty_usage(), input=self.input_estimate))
            usage["output_tokens"] = 1
            mid = meta.get("id") or ""
            return _sse("message_start", {"type": "message_start", "message": {
                "id": mid if mid.startswith("msg_") else new_id("msg_"), "type": "message",
                "role": "assistant", "model": self.model, "content": [], "stop_reason": None,
                "stop_sequence": None, "usage": usage}})
        if kind == "end":
            was_tool = self.open == "tool" or ev[1] == "tool_use"
            out = self._close()
            stop = "tool_use" if was_tool else (ev[1] or "end_turn")
            usage = _to_anthropic_usage(ev[2]) if ev[2] else {"output_tokens": 0}
            return out + _sse("message_delta", {"type": "message_delta", "delta": {
                "stop_reason": stop, "stop_sequence": ev[3]}, "usage": usage}) + \
                _sse("message_stop", {"type": "message_stop"})
        if kind == "error":
            return self._close() + _sse("error", {"type": "error", "error": {
                "type": ANTHROPIC_ERROR_TYPE.get(ev[1].etype, "api_error"),
                "message": ev[1].message}})
        return b""


#: neutral field -> Messages field, limit (temperature is 0..1; with thinking only the stop
#: sequences)
ANTHROPIC_SAMPLING = (("temperature", "temperature", 1.0), ("top_p", "top_p", None),
                      ("top_k", "top_k", None), ("stop", "stop_sequences", None))


def anthropic_encode_request(req, model_id, provider, model_meta, settings):
    """Neutral request -> Anthropic Messages body (its conversation repaired to the API's rules)."""
    mt = output_limit(req, model_meta, settings["default_max_tokens"])
    body = {"model": model_id, "messages": _anthropic_conversation(req), "max_tokens": mt}
    if req["system"]:
        body["system"] = [{"type": "text",
                           "text": p["text"]} for p in req["system"] if p.get("text")]
    r = req.get("reasoning")
    thinking = False
    if r and r.get("enabled") and model_meta.get("reasoning", True):
        budget = reasoning_budget(r, model_meta)
        if budget < mt:
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
            thinking = True
    body.update(sampling_out(req, ANTHROPIC_SAMPLING if not thinking else ANTHROPIC_SAMPLING[-1:]))
    if "stop_sequences" in body:    # (whitespace-only ones are refused; the router cuts at them)
        body["stop_sequences"] = [x for x in body["stop_sequences"] if x.strip()]
        if not body["stop_sequences"]:
            del body["stop_sequences"]
    if req["tools"]:
        body["tools"] = [{"name": t["name"], "description": t["description"],
                          "input_schema": t["parameters"] if t["parameters"].get("type") == "object"
                          else {"type": "object", "properties": {}}} for t in req["tools"]]
        tc = req.get("tool_choice")
        if tc or req.get("parallel_tool_calls") is False:
            tc = dict(tc or {"type": "auto"})
            if thinking and tc["type"] in ("any", "tool"):
                tc = {"type": "auto"}
            if req.get("parallel_tool_calls") is False and tc["type"] != "none":
                tc["disable_parallel_tool_use"] = True
            body["tool_choice"] = tc
    if req.get("user"):
        body["metadata"] = {"user_id": req["user"][:256]}
    rf = req.get("response_format")
    if rf:
        body["output_config"] = {"format": {"type": "json_schema",
                                            "schema": anthropic_schema(rf["schema"])}}
    if req["stream"]:
        body["stream"] = True
    return body


#: JSON Schema keywords Anthropic's structured outputs take; the others (limits, patterns) are
#: said in the description instead, as Anthropic's SDK does.
ANTHROPIC_SCHEMA_KEYS = {"type", "properties", "required", "items", "enum", "const", "anyOf",
                         "allOf", "$ref", "$defs", "definitions", "description", "title",
                         "additionalProperties", "format", "default"}
ANTHROPIC_STRING_FORMATS = {"date-time", "time", "date", "duration", "email", "hostname", "uri",
                            "ipv4", "ipv6", "uuid"}


def anthropic_schema(schema):
    """A JSON Schema as Anthropic's output_config.format takes it: every object closed
    (additionalProperties false), oneOf as anyOf, unsupported keywords moved into the
    description."""
    if isinstance(schema, list):
        return [anthropic_schema(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    if isinstance(schema.get("type"), list):    # ["object", "null"]: one branch a type
        rest = {k: v for k, v in schema.items() if k not in ("type", "description")}
        out = {"anyOf": [{"type": "null"} if t == "null" else anthropic_schema(dict(rest, type=t))
                         for t in schema["type"]]}
        if isinstance(schema.get("description"), str):
            out["description"] = schema["description"]
        return out
    out, said = {}, []
    for k, v in schema.items():
        if k == "oneOf":
            k = "anyOf"
        if k in ("properties", "$defs", "definitions") and isinstance(v, dict):
            out[k] = {n: anthropic_schema(x) for n, x in v.items()}
        elif k in ("items", "anyOf", "allOf"):
            out[k] = anthropic_schema(v)
        elif k == "minItems" and v in (0, 1) and not isinstance(v, bool):
            out[k] = v
        elif k in ANTHROPIC_SCHEMA_KEYS and k not in ("minItems", "format") \
                or k == "format" and v in ANTHROPIC_STRING_FORMATS:
            out[k] = v
        elif k != "$schema":
            said.append(f"{k}: {dumps(v)}")
    if out.get("type") == "object" or "properties" in out:
        out["additionalProperties"] = False
    if said:
        out["description"] = (out.get("description", "") + " (" + ", ".join(said) + ")").strip()
    return out


def _anthropic_conversation(req):
    """The neutral messages as the Messages API takes them: tool results first in their user turn,
    every tool_use answered, no empty blocks, alternating roles, a user turn first; thinking blocks
    whose signature Anthropic did not make are dropped."""
    messages = []
    for m in req["messages"]:
        role = m["role"]
        blocks = []
        parts = m["content"]
        if role == "system":
            role = "user"
            parts = [{"type": "text",
                      "text": "[system] " + text_of(parts)}] if text_of(parts) else []
        if role == "user":
            parts = sorted(parts, key=lambda p: p["type"] != "tool_result")   # results first
        for p in parts:
            sig = p.get("signature") or ""
            if p["type"] == "thinking" and (not sig or sig.startswith(ROUTER_SIGNATURE_PREFIX)):
                continue
            if p["type"] in ("thinking", "redacted_thinking") and role != "assistant":
                continue
            if p["type"] == "tool_call" and role != "assistant":
                continue
            b = _anthropic_block(p)
            if b is not None:
                blocks.append(b)
        messages.append({"role": role, "content": blocks})
    messages = _merge_roles(messages)
    # Pair tool_use with tool_result: orphans on either side would be rejected.
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        ids = [b["id"] for b in m["content"] if b["type"] == "tool_use"]
        if not ids:
            continue
        nxt = messages[i + 1] if i + 1 < len(messages) else None
        if nxt is None:
            continue  # final assistant turn: a prefill
        if nxt["role"] != "user":
            nxt = {"role": "user", "content": []}
            messages.insert(i + 1, nxt)
        have = {b["tool_use_id"] for b in nxt["content"] if b["type"] == "tool_result"}
        missing = [{"type": "tool_result", "tool_use_id": t,
                    "content": "(no result)", "is_error": True}
                   for t in ids if t not in have]
        nxt["content"][0:0] = missing
    known = set()
    for m in messages:
        if m["role"] == "assistant":
            known = {b["id"] for b in m["content"] if b["type"] == "tool_use"}
        else:
            fixed = []
            for b in m["content"]:
                if b["type"] == "tool_result" and b["tool_use_id"] not in known:
                    b = {"type": "text", "text": "[tool result] " + dumps(b.get("content"))}
                fixed.append(b)
            m["content"] = fixed
            known = set()
    if not messages or messages[0]["role"] != "user":
        messages.insert(0, {"role": "user", "content": [{"type": "text", "text": "(continue)"}]})
    return messages


def anthropic_strip_thinking(body, keep=frozenset()):
    """drop_thinking for a raw Anthropic body on the passthrough path."""
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        return body
    last = max((i for i, m in enumerate(msgs)
                if isinstance(m, dict) and m.get("role") == "assistant"), default=-1)
    dropped = last_lost = False
    out = []
    for i, m in enumerate(msgs):
        c = m.get("content") if isinstance(m, dict) else None
        if m.get("role") == "assistant" and isinstance(c, list):
            kept = [b for b in c if not (isinstance(b, dict) and b.get("type") in THINKING_PARTS
                                         and thinking_mark(b) not in keep)]
            if len(kept) != len(c):
                dropped, last_lost = True, last_lost or i == last
                m = dict(m, content=kept)
        out.append(m)
    if not dropped:
        return body
    body = dict(body, messages=out)
    if last_lost:
        body.pop("thinking", None)
    return body


def anthropic_decode_response(body, prov=None):
    parts = []
    for b in body.get("content") or []:
        t = b.get("type")
        if t == "text":
            parts.append({"type": "text", "text": b.get("text", "")})
        elif t == "thinking":
            parts.append({"type": "thinking", "text": b.get("thinking", ""),
                          "signature": b.get("signature", "")})
        elif t == "redacted_thinking":
            parts.append({"type": "redacted_thinking", "data": b.get("data", "")})
        elif t == "tool_use":
            parts.append({"type": "tool_call", "id": b.get("id") or new_id("toolu_"),
                          "name": b.get("name", ""), "arguments": b.get("input") or {}})
    usage = empty_usage()
    usage.update(_anthropic_usage(body.get("usage")) or {})
    return {"id": body.get("id"), "model": body.get("model"), "content": parts,
            "stop_reason": body.get("stop_reason") or "end_turn",
            "stop_sequence": body.get("stop_sequence"), "usage": usage}


class AnthropicStreamDecoder(SSEDecoder):
    """Anthropic Messages SSE bytes -> neutral events (dispatching on data.type)."""

    def __init__(self, prov=None):
        super().__init__(prov)
        self.usage = empty_usage()
        self.stop = None
        self.stop_seq = None

    def _finish(self, out):
        if self.stop:   # message_delta came, message_stop did not: the answer is complete
            out.append(("end", self.stop, self.usage, self.stop_seq))
        else:
            super()._finish(out)

    def _data(self, data, out):
        obj = self._json(data)
        if obj is None:
            return
        t = obj.get("type") if isinstance(obj, dict) else None
        if t == "content_block_delta":
            d = obj.get("delta") or {}
            dt = d.get("type")
            if dt == "text_delta":
                out.append(("text", d.get("text", "")))
            elif dt == "input_json_delta":
                if d.get("partial_json"):
                    out.append(("args", d["partial_json"]))
            elif dt == "thinking_delta":
                out.append(("thinking", d.get("thinking", "")))
            elif dt == "signature_delta":
                out.append(("signature", d.get("signature", "")))
        elif t == "content_block_start":
            b = obj.get("content_block") or {}
            bt = b.get("type")
            if bt == "tool_use":
                out.append(("tool", b.get("id") or new_id("toolu_"), b.get("name", "")))
                if b.get("input"):
                    out.append(("args", dumps(b["input"])))
            elif bt == "text" and b.get("text"):
                out.append(("text", b["text"]))
            elif bt == "thinking" and b.get("thinking"):
                out.append(("thinking", b["thinking"]))
            elif bt == "redacted_thinking":
                out.append(("redacted_thinking", b.get("data", "")))
        elif t == "message_start":
            msg = obj.get("message") or {}
            self.usage.update(_anthropic_usage(msg.get("usage")) or {})
            out.append(("start", {"id": msg.get("id"), "model": msg.get("model"),
                                  "usage": dict(self.usage)}))
        elif t == "message_delta":
            d = obj.get("delta") or {}
            self.stop = d.get("stop_reason") or self.stop
            self.stop_seq = d.get("stop_sequence") or self.stop_seq
            u = _anthropic_usage(obj.get("usage"))
            if u:
                self.usage["output"] = u["output"] or self.usage["output"]
                if "input" in u and u["input"]:
                    self.usage.update(input=u["input"], cache_read=u["cache_read"],
                                      cache_write=u["cache_write"])
        elif t == "message_stop":
            self.ended = True
            out.append(("end", self.stop or "end_turn", self.usage, self.stop_seq))
        elif t == "error":
            e = obj.get("error") or {}
            etype = {v: k for k, v in ANTHROPIC_ERROR_TYPE.items()}.get(e.get("type"), "api_error")
            self.ended = True
            out.append(("error", ApiError(529 if etype == "overloaded" else 502, etype,
                                          e.get("message") or "provider error in stream")))


def anthropic_parse_error(status, body):
    obj, text = error_json(status, body)
    if obj is None:
        return text, None
    e = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(e, dict):
        return str(e.get("message") or e)[:1000], e.get("type")
    return str(obj)[:300], None


def anthropic_list_models(fetch, known):
    """GET /v1/models, every page (after_id)."""
    out, after = {}, None
    for _page in range(100):
        after_q = f"&after_id={urllib.parse.quote(after)}" if after else ""
        page = fetch("/v1/models?limit=1000" + after_q)
        for m in page.get("data") or []:
            if isinstance(m, dict):
                out[m.get("id")] = _clean({"context_window": m.get("max_input_tokens"),
                                           "max_output": m.get("max_tokens")})
        after = page.get("last_id")
        if not page.get("has_more") or not after:
            break
    return out


def anthropic_auth(prov, key, path, data):
    h = {"anthropic-version": prov.anthropic_version}
    if key:
        h["x-api-key"] = key
    return h


def anthropic_adjust(body, prov, req, meta, headers, foreign):
    """The same-dialect body as it goes out: thinking another provider signed is left out (it
    would be refused), and the client's anthropic-beta goes along."""
    if foreign is not None:
        body = anthropic_strip_thinking(body, foreign)
    beta = headers.get("anthropic-beta")
    return body, ({"anthropic-beta": beta} if beta else {})


def anthropic_list_shape(entries, query=None):
    data = [anthropic_model_shape(e) for e in entries if "shared" not in e[2]]
    return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def anthropic_model_shape(entry):
    mid, _owner, meta = entry
    return dict({"type": "model", "id": mid, "display_name": mid,
                 "created_at": "2025-01-01T00:00:00Z"},
                **_caps_entry(meta))

# ------------------------------------------------------------------------- OpenAI Responses --

RESPONSES_STATUS = {"max_tokens": ("incomplete", {"reason": "max_output_tokens"}),
                    "refusal": ("incomplete", {"reason": "content_filter"})}
CUSTOM_TOOL_PARAMS = {"type": "object",
                      "properties": {"input": {"type": "string", "description": "The raw input"}},
                      "required": ["input"]}


def _append(messages, role, parts, merge=True):
    if merge and messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(parts)
    else:
        messages.append({"role": role, "content": list(parts)})


#: The `include` value that asks Responses for the output text's log probabilities.
RESPONSES_LOGPROBS = "message.output_text.logprobs"


def _responses_unread(body):
    """Responses fields the translation does not read, and `include` values other than logprobs."""
    inc = body.get("include") if isinstance(body.get("include"), list) else []
    return unread_fields(body, RESPONSES_READS) + [f"include.{v}" for v in inc
                                                   if v != RESPONSES_LOGPROBS and isinstance(v, str)]


def _responses_format(text):
    """Responses' text.format (flat: type, name, schema, strict) -> neutral."""
    if text is None:
        return None
    _need(isinstance(text, dict), "text", "must be an object")
    f = text.get("format")
    if f is None:
        return None
    _need(isinstance(f, dict), "text.format", "must be an object")
    return neutral_format(f.get("type"), f.get("schema"), f.get("name"), f.get("strict"),
                          "text.format", f.get("description"))


def responses_decode_request(body):
    """OpenAI Responses request body -> neutral request. Custom (freeform) tools become functions
    with one string parameter `input`; their calls go back out as custom_tool_call items."""
    model = _body_model(body)
    inp = body.get("input")
    _need(isinstance(inp, (str, list)), "input",
          "is required and must be a string or an array of items")
    if isinstance(inp, str):
        inp = [{"type": "message", "role": "user", "content": inp}]
    system, messages, only = [], [], []
    instructions = body.get("instructions")
    _need(instructions is None or isinstance(instructions, str), "instructions", "must be a string")
    if instructions:
        system.append({"type": "text", "text": instructions})
    for i, item in enumerate(inp):
        f = f"input[{i}]"
        _need(isinstance(item, dict), f, "must be an object")
        t = item.get("type") or ("message" if "role" in item else None)
        if t == "message":
            role = item.get("role")
            _need(role in ("user", "assistant", "system", "developer"), f + ".role",
                  "must be one of user, assistant, system, developer")
            parts = _openai_content(item.get("content"), f + ".content", only)
            if role in ("system", "developer"):
                if messages:
                    messages.append({"role": "system", "content": parts})
                else:
                    system.extend(parts)
            else:
                _append(messages, role, parts, merge=role == "assistant")
        elif t in ("function_call", "custom_tool_call"):
            _need(isinstance(item.get("name"), str), f + ".name", "must be a string")
            cid = item.get("call_id") or item.get("id") or f"call_{i}"
            args = ({"input": item.get("input", "")} if t == "custom_tool_call"
                    else parse_args_json(item.get("arguments") or ""))
            _append(messages, "assistant",
                    [{"type": "tool_call", "id": cid, "name": item["name"], "arguments": args}])
        elif t in ("function_call_output", "custom_tool_call_output"):
            _need(isinstance(item.get("call_id"), str), f + ".call_id", "must be a string")
            out = item.get("output", "")
            content = _openai_content(out, f + ".output", only) if isinstance(out, list) else \
                [{"type": "text", "text": out if isinstance(out, str) else dumps(out)}]
            add_tool_result(messages,
                            {"type": "tool_result", "id": item["call_id"], "is_error": False,
                                       "content": content})
        elif t == "reasoning":
            pieces = (item.get("summary") or []) + (item.get("content") or [])
            text = "".join(s.get("text", "") for s in pieces if isinstance(s, dict))
            if text:
                _append(messages, "assistant", [{"type": "thinking", "text": text}])
        # local_shell_call, web_search_call, item_reference, compaction: OpenAI-only, dropped.
    tools, custom, dropped = [], [], []
    raw_tools = body.get("tools") or []
    _need(isinstance(raw_tools, list), "tools", "must be an array")
    for i, t in enumerate(raw_tools):
        _need(isinstance(t, dict), f"tools[{i}]", "must be an object")
        if t.get("type") == "function":
            _need(isinstance(t.get("name"), str) and t["name"], f"tools[{i}].name",
                  "is required and must be a string")
            tools.append(neutral_tool(t["name"], t.get("description"),
                                      t.get("parameters"), f"tools[{i}]"))
        elif t.get("type") == "custom" and isinstance(t.get("name"), str):
            custom.append(t["name"])
            tools.append(neutral_tool(t["name"], t.get("description"),
                                      CUSTOM_TOOL_PARAMS, f"tools[{i}]"))
        else:                        # hosted tools (web_search, file_search, local_shell, mcp...)
            dropped.append(f"tools[{i}].{t.get('type')}")
    tc = body.get("tool_choice")
    if tc is None or isinstance(tc, str):
        _need(tc in (None, "auto", "none", "required"), "tool_choice",
              "must be auto, none, required or {\"type\": \"function\", \"name\": ...}")
        tool_choice = dict(OPENAI_TOOL_CHOICE[tc]) if tc else None
    else:
        _need(isinstance(tc, dict) and isinstance(tc.get("name"), str),
              "tool_choice.name", "must be a string")
        tool_choice = {"type": "tool", "name": tc["name"]}
    stream = body.get("stream", False)
    _need(isinstance(stream, bool), "stream", "must be true or false")
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    effort = reasoning.get("effort")
    prev = body.get("previous_response_id")
    _need(prev is None or isinstance(prev, str), "previous_response_id", "must be a string")
    include = body.get("include") or []
    _need(isinstance(include, list) and all(isinstance(x, str) for x in include), "include",
          "must be an array of strings")
    return neutral_request(
        model, system, messages, tools=tools, tool_choice=tool_choice,
        parallel_tool_calls=body.get("parallel_tool_calls"),
        max_tokens=_opt_int(body, "max_output_tokens"),
        temperature=_opt_num(body, "temperature", 0, 2),
        top_p=_opt_num(body, "top_p", 0, 1), stream=stream,
        reasoning={"effort": effort, "enabled": effort != "none"} if effort else None,
        user=body.get("user") if isinstance(body.get("user"), str) else None,
        response_format=_responses_format(body.get("text")),
        logprobs=_logprobs_asked(
            {"asked": RESPONSES_LOGPROBS in include, "top_logprobs": body.get("top_logprobs")},
            "asked", "top_logprobs"),
        extra={"custom_tools": custom, "store": body.get("store", True) is not False,
               **({"same_dialect_only": only} if only else {}),
               **({"dropped_parts": dropped} if dropped else {}),
               "previous_response_id": prev, "response_id": new_id("resp_")})


def _responses_usage(u):
    u = u or empty_usage()
    return {"input_tokens": u["input"], "input_tokens_details": {"cached_tokens": u["cache_read"]},
            "output_tokens": u["output"],
            "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
            "total_tokens": u["input"] + u["output"]}


def _responses_item(p, custom, idx):
    """A neutral part -> a finished Responses output item."""
    if p["type"] == "thinking":
        return {"type": "reasoning", "id": f"rs_{idx}",
                "summary": [{"type": "summary_text", "text": p["text"]}]}
    if p["type"] == "tool_call":
        if p["name"] in custom:
            return {"type": "custom_tool_call", "id": f"ctc_{idx}",
                    "call_id": p["id"], "name": p["name"],
                    "input": str(p["arguments"].get("input", "")), "status": "completed"}
        return {"type": "function_call", "id": f"fc_{idx}", "call_id": p["id"], "name": p["name"],
                "arguments": dumps(p["arguments"]), "status": "completed"}
    return {"type": "message", "id": f"msg_{idx}", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": p["text"], "annotations": []}]}


def _responses_object(req, model, status, output, usage, details=None, error=None):
    custom = set(req["extra"].get("custom_tools") or ())
    tc = req.get("tool_choice") or {"type": "auto"}
    if tc["type"] == "tool":
        choice = {"type": "custom" if tc["name"] in custom else "function", "name": tc["name"]}
    else:
        choice = {"any": "required"}.get(tc["type"], tc["type"])
    tools = [{"type": "custom", "name": t["name"],
              "description": t["description"]} if t["name"] in custom else
             {"type": "function", "name": t["name"], "description": t["description"],
              "parameters": t["parameters"], "strict": False} for t in req.get("tools") or ()]
    return {"id": req["extra"].get("response_id") or new_id("resp_"), "object": "response",
            "created_at": int(time.time()),
            "status": status, "model": model, "error": error, "incomplete_details": details,
            "output": output, "parallel_tool_calls": req.get("parallel_tool_calls") is not False,
            "tool_choice": choice, "tools": tools, "max_output_tokens": req.get("max_tokens"),
            "temperature": req.get("temperature"), "top_p": req.get("top_p"),
            "store": req["extra"].get("store", False),
            "usage": _responses_usage(usage) if usage is not None else None}


def responses_encode_response(resp, model, req):
    custom = set(req["extra"].get("custom_tools") or ())
    output = [_responses_item(p, custom, i) for i, p in enumerate(resp["content"])
              if p["type"] in ("text", "thinking", "tool_call")]
    first = next((o for o in output if o["type"] == "message"), None)
    if resp.get("logprobs") and first is not None:
        first["content"][0]["logprobs"] = logprobs_to_openai(resp["logprobs"])
    status, details = RESPONSES_STATUS.get(resp["stop_reason"], ("completed", None))
    return _responses_object(req, model, status, output, resp["usage"], details)


class ResponsesStreamEncoder:
    """Neutral events -> the Responses event sequence Codex parses: created, in_progress, per item
    output_item.added / content or summary or argument deltas / .done events / output_item.done,
    then completed (or incomplete, or failed), all with sequence_number."""

    quiet = False       # True: follow the events (state, sequence numbers) without writing them

    def __init__(self, model, req, input_estimate=0):
        self.model, self.req = model, req
        self.custom = set(req["extra"].get("custom_tools") or ())
        self.seq = 0
        self.output = []          # finished items, for response.completed
        self.item = None          # the open item (dict) and its text / arguments so far
        self.buf = []
        self.logprobs = []        # the open message's log probabilities (when asked)

    def _ev(self, obj):
        obj["sequence_number"] = self.seq
        self.seq += 1
        if self.quiet:
            return b""
        return b"event: " + obj["type"].encode() + b"\ndata: " + dumps(obj).encode() + b"\n\n"

    def _open(self, item):
        out = self._close()
        self.item, self.buf = item, []
        idx = len(self.output)
        out += self._ev({"type": "response.output_item.added", "output_index": idx,
                         "item": dict(item)})
        if item["type"] == "message":
            out += self._ev({"type": "response.content_part.added", "item_id": item["id"],
                             "output_index": idx, "content_index": 0,
                             "part": {"type": "output_text", "text": "", "annotations": []}})
        elif item["type"] == "reasoning":
            out += self._ev({"type": "response.reasoning_summary_part.added", "item_id": item["id"],
                             "output_index": idx, "summary_index": 0,
                             "part": {"type": "summary_text", "text": ""}})
        return out

    def _close(self):
        item = self.item
        if item is None:
            return b""
        self.item = None
        idx, text = len(self.output), "".join(self.buf)
        out = b""
        if item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            if self.logprobs:
                part["logprobs"] = self.logprobs
            out += self._ev({"type": "response.output_text.done", "item_id": item["id"],
                             "output_index": idx, "content_index": 0, "text": text,
                             "logprobs": self.logprobs})
            self.logprobs = []
            out += self._ev({"type": "response.content_part.done", "item_id": item["id"],
                             "output_index": idx, "content_index": 0, "part": part})
            item = dict(item, status="completed", content=[part])
        elif item["type"] == "reasoning":
            part = {"type": "summary_text", "text": text}
            out += self._ev({"type": "response.reasoning_summary_text.done", "item_id": item["id"],
                             "output_index": idx, "summary_index": 0, "text": text})
            out += self._ev({"type": "response.reasoning_summary_part.done", "item_id": item["id"],
                             "output_index": idx, "summary_index": 0, "part": part})
            item = dict(item, summary=[part])
        elif item["type"] == "function_call":
            out += self._ev({"type": "response.function_call_arguments.done", "item_id": item["id"],
                             "output_index": idx, "name": item["name"], "arguments": text})
            item = dict(item, arguments=text, status="completed")
        # custom_tool_call: the input is the `input` argument, known once the call is complete
        else:
            value = str(parse_args_json(text).get("input", ""))
            out += self._ev({"type": "response.custom_tool_call_input.done", "item_id": item["id"],
                             "output_index": idx, "input": value})
            item = dict(item, input=value, status="completed")
        self.output.append(item)
        return out + self._ev({"type": "response.output_item.done",
                               "output_index": idx, "item": item})

    def _partial(self):
        """The item that was streaming when the reply failed, as far as it got (status
        incomplete), for response.failed: what the client saw streamed is not lost."""
        item, text = self.item, "".join(self.buf)
        if item is None:
            return []
        if item["type"] == "message":
            return [dict(item, status="incomplete",
                         content=[{"type": "output_text", "text": text, "annotations": []}])]
        if item["type"] == "reasoning":
            return [dict(item, summary=[{"type": "summary_text", "text": text}])]
        if item["type"] == "function_call":
            return [dict(item, arguments=text, status="incomplete")]
        if item["type"] == "custom_tool_call":
            return [dict(item, input=str(parse_args_json(text).get("input", "")),
                         status="incomplete")]
        return [dict(item, status="incomplete")]

    def encode(self, ev):
        kind = ev[0]
        idx = len(self.output)
        if kind == "logprobs":
            if not (self.item and self.item["type"] == "message"):
                return b""
            lp = logprobs_to_openai(ev[1])
            self.logprobs += lp
            return self._ev({"type": "response.output_text.delta", "item_id": self.item["id"],
                             "output_index": idx, "content_index": 0, "delta": "",
                             "logprobs": lp})
        if kind == "text":
            out = b"" if self.item and self.item["type"] == "message" else self._open(
                {"type": "message", "id": f"msg_{idx}", "status": "in_progress",
                 "role": "assistant", "content": []})
            self.buf.append(ev[1])
            lp = logprobs_to_openai(text_logprobs(ev))
            self.logprobs += lp
            return out + self._ev({"type": "response.output_text.delta", "item_id": self.item["id"],
                                   "output_index": len(self.output), "content_index": 0,
                                   "delta": ev[1], "logprobs": lp})
        if kind == "thinking":
            out = b"" if self.item and self.item["type"] == "reasoning" else self._open(
                {"type": "reasoning", "id": f"rs_{idx}", "summary": []})
            self.buf.append(ev[1])
            return out + self._ev({"type": "response.reasoning_summary_text.delta",
                                   "item_id": self.item["id"], "output_index": len(self.output),
                                   "summary_index": 0, "delta": ev[1]})
        if kind == "tool":
            if ev[2] in self.custom:
                return self._open({"type": "custom_tool_call", "id": f"ctc_{idx}",
                                   "call_id": ev[1], "name": ev[2],
                                   "input": "", "status": "in_progress"})
            return self._open({"type": "function_call", "id": f"fc_{idx}",
                               "call_id": ev[1], "name": ev[2],
                               "arguments": "", "status": "in_progress"})
        if kind == "args":
            if self.item is None:
                return b""
            self.buf.append(ev[1])
            if self.item["type"] != "function_call":
                return b""
            return self._ev({"type": "response.function_call_arguments.delta",
                             "item_id": self.item["id"],
                             "output_index": len(self.output), "delta": ev[1]})
        if kind == "start":
            obj = _responses_object(self.req, self.model, "in_progress", [], None)
            return self._ev({"type": "response.created", "response": obj}) + \
                self._ev({"type": "response.in_progress", "response": obj})
        if kind == "end":
            out = self._close()
            status, details = RESPONSES_STATUS.get(ev[1], ("completed", None))
            obj = _responses_object(self.req, self.model, status, self.output,
                                    ev[2] or empty_usage(), details)
            done = "response.completed" if status == "completed" else "response.incomplete"
            return out + self._ev({"type": done, "response": obj})
        if kind == "error":
            err = ev[1]
            code = {"rate_limit": "rate_limit_exceeded",
                    "billing": "insufficient_quota"}.get(err.etype, "server_error")
            obj = _responses_object(self.req, self.model, "failed",
                                    self.output + self._partial(), None,
                                    error={"code": code, "message": err.message})
            return self._ev({"type": "error", "code": code,
                             "message": err.message, "param": None}) + \
                self._ev({"type": "response.failed", "response": obj})
        return b""


#: neutral field -> Responses field, limit (the Responses API has no stop sequences)
RESPONSES_SAMPLING = (("temperature", "temperature", None), ("top_p", "top_p", None))


def responses_encode_request(req, model_id, provider, model_meta, settings=None):
    """Neutral request -> Responses body, for providers only served there."""
    items = []
    for m in req["messages"]:
        role, parts = m["role"], m["content"]
        if role == "assistant":
            for p in parts:
                if p["type"] == "text" and p["text"]:
                    items.append({"role": "assistant",
                                  "content": [{"type": "output_text", "text": p["text"]}]})
                elif p["type"] == "tool_call":
                    items.append({"type": "function_call", "call_id": p["id"], "name": p["name"],
                                  "arguments": dumps(p["arguments"])})
            continue
        content = []
        for p in parts:
            if p["type"] == "tool_result":
                items.append({"type": "function_call_output", "call_id": p["id"],
                              "output": result_text(p)})
                content += [{"type": "input_image",
                             "image_url": image_url_of(q)} for q in p["content"] if q["type"] == "image"]
            elif p["type"] == "text":
                content.append({"type": "input_text", "text": p["text"]})
            elif p["type"] == "image":
                content.append({"type": "input_image", "image_url": image_url_of(p)})
            elif p["type"] == "file":
                content.append({"type": "input_file", "filename": p.get("name") or "document.pdf",
                                "file_data": data_url_of(p)})
        if content:
            items.append({"role": "developer" if role == "system" else "user", "content": content})
    body = {"model": model_id, "input": items, "store": False}
    sys_text = system_text(req)
    if sys_text:
        body["instructions"] = sys_text
    mt = output_limit(req, model_meta)
    if mt:
        body["max_output_tokens"] = mt
    body.update(sampling_out(req, RESPONSES_SAMPLING))
    body.update(logprobs_out(req, "include", "top_logprobs", [RESPONSES_LOGPROBS]))
    rf = req.get("response_format")
    if rf:
        body["text"] = {"format": openai_format(rf)}
        if json_unsaid(req, rf):
            body["instructions"] = (body.get("instructions", "") + "\n\n" + JSON_SAID).strip()
    if req["tools"]:
        body.update(openai_family_tools(req, nested=False))
    r = req.get("reasoning")
    if r and r.get("enabled") and model_meta.get("reasoning"):
        body["reasoning"] = {"effort": reasoning_effort(r), "summary": "auto"}
    if req["stream"]:
        body["stream"] = True
    return body


def _responses_usage_in(u):
    if not u:
        return None
    return {"input": u.get("input_tokens") or 0, "output": u.get("output_tokens") or 0,
            "cache_read": (u.get("input_tokens_details") or {}).get("cached_tokens") or 0,
            "cache_write": 0,
            "reasoning": (u.get("output_tokens_details") or {}).get("reasoning_tokens") or 0}


def _responses_stop(obj, saw_tool):
    if obj.get("status") == "incomplete":
        reason = (obj.get("incomplete_details") or {}).get("reason")
        return "refusal" if reason == "content_filter" else "max_tokens"
    return "tool_use" if saw_tool else "end_turn"


def responses_decode_response(body, prov=None):
    parts, lp = [], []
    for item in body.get("output") or []:
        t = item.get("type")
        if t == "message":
            texts = [c for c in item.get("content") or [] if c.get("type") in ("output_text", "text")]
            text = "".join(c.get("text", "") for c in texts)
            lp += [x for c in texts for x in logprobs_from_openai(c.get("logprobs"))]
            if text:
                parts.append({"type": "text", "text": text})
        elif t == "reasoning":
            pieces = (item.get("summary") or []) + (item.get("content") or [])
            text = "".join(s.get("text", "") for s in pieces)
            if text:
                parts.append({"type": "thinking", "text": text})
        elif t in ("function_call", "custom_tool_call"):
            args = ({"input": item.get("input", "")} if t == "custom_tool_call"
                    else parse_args_json(item.get("arguments") or ""))
            parts.append({"type": "tool_call", "id": item.get("call_id") or new_id("call_"),
                          "name": item.get("name", ""), "arguments": args})
    usage = empty_usage()
    usage.update(_responses_usage_in(body.get("usage")) or {})
    return {"id": body.get("id"), "model": body.get("model"), "content": parts,
            "stop_sequence": None,
            "stop_reason": _responses_stop(body, any(p["type"] == "tool_call" for p in parts)),
            "usage": usage, **({"logprobs": lp} if lp else {})}


class ResponsesStreamDecoder(SSEDecoder):
    """Responses SSE bytes -> neutral events (dispatching on data.type, as Codex does)."""

    def __init__(self, prov=None):
        super().__init__(prov)
        self.saw_tool = False
        self.args_seen = set()

    def _data(self, data, out):
        obj = self._json(data)
        if obj is None:
            return
        t = obj.get("type") if isinstance(obj, dict) else None
        if t in ("response.output_text.delta", "response.refusal.delta"):
            if obj.get("delta"):
                out.append(("text", obj["delta"]))
            with_logprobs(out, logprobs_from_openai(obj.get("logprobs")))
        elif t in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            if obj.get("delta"):
                out.append(("thinking", obj["delta"]))
        elif t == "response.function_call_arguments.delta":
            if obj.get("delta"):
                self.args_seen.add(obj.get("item_id"))
                out.append(("args", obj["delta"]))
        elif t == "response.output_item.added":
            item = obj.get("item") or {}
            if item.get("type") in ("function_call", "custom_tool_call"):
                self.saw_tool = True
                out.append(("tool", item.get("call_id") or new_id("call_"), item.get("name", "")))
        elif t == "response.output_item.done":
            item = obj.get("item") or {}
            if (item.get("type") == "function_call" and item.get("id") not in self.args_seen
                    and item.get("arguments")):
                out.append(("args", item["arguments"]))     # servers that send no argument deltas
            elif item.get("type") == "custom_tool_call":
                out.append(("args", dumps({"input": item.get("input", "")})))
        elif t == "response.created":
            r = obj.get("response") or {}
            out.append(("start", {"id": r.get("id"), "model": r.get("model")}))
        elif t in ("response.completed", "response.incomplete"):
            r = obj.get("response") or {}
            self.ended = True
            out.append(("end", _responses_stop(r, self.saw_tool),
                        _responses_usage_in(r.get("usage")), None))
        elif t in ("response.failed", "error"):
            e = (obj.get("response") or {}).get("error") or obj
            self.ended = True
            status = 429 if e.get("code") == "rate_limit_exceeded" else 502
            out.append(("error", ApiError(status, STATUS_ERROR_TYPE.get(status, "api_error"),
                                          e.get("message") or "provider error in stream")))


_RESPONSES_SEQ = re.compile(rb'"sequence_number":\s*(\d+)')
_RESPONSES_ID = re.compile(rb'"id":\s*"(resp_[^"]*)"')


class ResponsesPassthrough(StreamPassthrough):
    """A Responses stream passed through, byte for byte. A failure after it started is told in the
    stream's own terms: the provider's response id, the next sequence_number, and the output
    streamed so far (a quiet encoder follows the stream's neutral events to know it)."""

    def __init__(self, codec, ctx, prov):
        super().__init__(codec, ctx, prov)
        self.shadow = ResponsesStreamEncoder(ctx.model, ctx.req)
        self.shadow.quiet = True
        self.last_seq, self.rid = -1, None

    def observe(self, evs):
        for ev in evs:
            if ev[0] != "error":
                self.shadow.encode(ev)

    def events(self, data):
        at = data.rfind(b'"sequence_number"')
        found = _RESPONSES_SEQ.match(data, at) if at >= 0 else None
        if found:
            self.last_seq = int(found.group(1))
        if self.rid is None:
            found = _RESPONSES_ID.search(data)
            self.rid = found.group(1).decode() if found else None
        return data

    def error_event(self, err):
        enc = self.shadow
        enc.quiet, enc.seq = False, max(enc.seq, self.last_seq + 1)
        if self.rid:
            enc.req = dict(enc.req, extra=dict(enc.req["extra"], response_id=self.rid))
        return enc.encode(("error", err))


def responses_list_models(fetch, known):
    return openai_list_models(fetch, known)

# ----------------------------------------------------------------------------------- Gemini --

GEMINI_FINISH = {"STOP": "end_turn", "MAX_TOKENS": "max_tokens", "SAFETY": "refusal",
                 "RECITATION": "refusal",
                 "BLOCKLIST": "refusal", "PROHIBITED_CONTENT": "refusal", "SPII": "refusal",
                 "LANGUAGE": "refusal",
                 "IMAGE_SAFETY": "refusal", "IMAGE_PROHIBITED_CONTENT": "refusal",
                 "IMAGE_RECITATION": "refusal"}
GEMINI_TOOL_MODE = {"auto": "AUTO", "none": "NONE", "any": "ANY", "tool": "ANY"}
#: The OpenAPI-3.0 subset Gemini accepts in functionDeclarations[].parameters.
GEMINI_SCHEMA_KEYS = {"type", "format", "title", "description", "nullable", "enum",
                      "properties", "required",
                      "items", "minItems", "maxItems", "minLength", "maxLength",
                      "minProperties", "maxProperties",
                      "minimum", "maximum", "pattern", "example", "default",
                      "anyOf", "propertyOrdering"}
#: Placeholder for function calls whose thought signature Gemini never issued (history from
#: another provider); Gemini 3 rejects function calls without one.
GEMINI_SKIP_SIGNATURE = "skip_thought_signature_validator"


def gemini_schema(schema, root=None, depth=0):
    """Reduce a JSON Schema to what Gemini accepts: drop unknown keywords ($schema,
    additionalProperties, const, exclusiveMinimum, ...), inline $ref, turn type arrays and
    anyOf-with-null into nullable, oneOf into anyOf, allOf into one merged object, keep only string
    enums and the date-time/enum formats, and prune `required` to existing properties."""
    if not isinstance(schema, dict):
        return {}
    root = root if root is not None else schema
    if depth > 12:
        return {"type": "OBJECT"}
    s = _gemini_schema_normal(schema, root, depth)
    out = {}
    typ = s.get("type")
    if isinstance(typ, list):
        kinds = [t for t in typ if t != "null"]
        if len(kinds) < len(typ):
            out["nullable"] = True
        typ = kinds[0] if kinds else "string"
    if typ == "null":
        typ, out["nullable"] = "string", True
    any_of = s.get("anyOf")
    if isinstance(any_of, list):
        subs = [x for x in any_of if not (isinstance(x, dict) and x.get("type") == "null")]
        if len(subs) < len(any_of):
            out["nullable"] = True
        if len(subs) == 1:
            inner = gemini_schema(subs[0], root, depth + 1)
            inner.update({k: v for k, v in out.items()})
            for k in ("description", "title"):
                if k in s and k not in inner:
                    inner[k] = s[k]
            return inner
        if subs:
            out["anyOf"] = [gemini_schema(x, root, depth + 1) for x in subs]
            typ = None
    if isinstance(typ, str):
        out["type"] = typ.upper()
    for k, v in s.items():
        if k not in GEMINI_SCHEMA_KEYS or k in ("type", "anyOf", "nullable") and k in out:
            continue
        if k == "properties" and isinstance(v, dict):
            out[k] = {name: gemini_schema(sub, root, depth + 1) for name, sub in v.items()}
        elif k == "items":
            out[k] = gemini_schema(v, root, depth + 1)
        elif k == "enum":
            if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
                out[k] = v
        elif k == "format":
            if v in ("enum", "date-time") and out.get("type") == "STRING":
                out[k] = v
        elif k == "required":
            continue
        elif k in ("type", "anyOf", "nullable"):
            continue
        else:
            out[k] = v
    if isinstance(s.get("required"), list):
        req = [r for r in s["required"] if r in (out.get("properties") or {})]
        if req:
            out["required"] = req
    if "anyOf" in out:
        out.pop("type", None)
    return out


def _gemini_schema_normal(schema, root, depth):
    """A schema's keywords Gemini has no word for, said in ones it has: $ref inlined, allOf merged,
    oneOf as anyOf, const as an enum, exclusive bounds as inclusive ones."""
    s = dict(schema)
    ref = s.pop("$ref", None)
    if isinstance(ref, str) and ref.startswith("#/"):
        target = root
        for key in ref[2:].split("/"):
            target = target.get(key, {}) if isinstance(target, dict) else {}
        s = dict(target, **s)
    if "allOf" in s:
        merged = {}
        for sub in s.pop("allOf") or []:
            sub = gemini_schema(sub, root, depth + 1)
            for k, v in sub.items():
                if k == "properties":
                    merged.setdefault("properties", {}).update(v)
                elif k == "required":
                    merged.setdefault("required", []).extend(v)
                else:
                    merged.setdefault(k, v)
        s = dict(merged, **s)
    if "oneOf" in s and "anyOf" not in s:
        s["anyOf"] = s.pop("oneOf")
    if "const" in s and "enum" not in s:
        s["enum"] = [s["const"]]
    if "exclusiveMinimum" in s and "minimum" not in s and _num(s["exclusiveMinimum"]):
        s["minimum"] = s["exclusiveMinimum"]
    if "exclusiveMaximum" in s and "maximum" not in s and _num(s["exclusiveMaximum"]):
        s["maximum"] = s["exclusiveMaximum"]
    return s


#: neutral field -> generationConfig field, limit (at most 5 stop sequences)
GEMINI_SAMPLING = (("temperature", "temperature", None), ("top_p", "topP", None),
                   ("top_k", "topK", None), ("stop", "stopSequences", 5), ("seed", "seed", None),
                   ("presence_penalty", "presencePenalty", None),
                   ("frequency_penalty", "frequencyPenalty", None))
#: Models that take real JSON Schema as responseJsonSchema (Gemini 2.5 and later); older ones get
#: responseSchema, the schema reduced as tool parameters are.
GEMINI_JSON_SCHEMA_RE = re.compile(r"gemini-(?:2\.5|[3-9])", re.I)
#: Thinking asked off, for the Gemini models that cannot turn it off (others: a budget of 0).
GEMINI_THINKING_OFF = ((re.compile(r"gemini-2\.5-pro", re.I), {"thinkingBudget": 128}),
                       (re.compile(r"gemini-[3-9]", re.I), {"thinkingLevel": "low"}))


def gemini_encode_request(req, model_id, provider, model_meta, settings=None):
    """Neutral request -> generateContent body."""
    names = {p["id"]: p["name"] for m in req["messages"] if m["role"] == "assistant"
             for p in m["content"] if p["type"] == "tool_call"}
    memo = getattr(provider, "memo", None) or {}
    gemini3 = "gemini-3" in model_id
    contents = []
    for m in req["messages"]:
        role = "model" if m["role"] == "assistant" else "user"
        parts, signed = [], False
        for p in m["content"]:
            t = p["type"]
            if t == "text":
                parts.append({"text": ("[system] " if m["role"] == "system" else "") + p["text"]})
            elif t == "image":
                parts.append({"inlineData": {"mimeType": p["media_type"],
                                             "data": p["data"]}} if "data" in p
                             else {"fileData": {"mimeType": "image/*", "fileUri": p["url"]}})
            elif t == "file":
                parts.append({"inlineData": {"mimeType": p["media_type"], "data": p["data"]}})
            elif t == "tool_result":
                key = "error" if p.get("is_error") else "result"
                parts.append({"functionResponse": {"name": names.get(p["id"], "tool"),
                                                   "response": {key: text_of(p["content"])}}})
                parts += [{"inlineData": {"mimeType": q["media_type"], "data": q["data"]}}
                          for q in p["content"] if q["type"] == "image" and "data" in q]
            elif t == "tool_call" and role == "model":
                part = {"functionCall": {"name": p["name"], "args": p["arguments"]}}
                sig = memo.get(p["id"]) or (GEMINI_SKIP_SIGNATURE if gemini3 and not signed else None)
                if sig:
                    part["thoughtSignature"] = sig
                    signed = True
                parts.append(part)
        if not parts:
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"] += parts
        else:
            contents.append({"role": role, "parts": parts})
    if not contents or contents[0]["role"] != "user":
        contents.insert(0, {"role": "user", "parts": [{"text": "Continue."}]})
    body = {"contents": contents}
    if req["system"]:
        body["systemInstruction"] = {"parts": [{"text": p["text"]} for p in req["system"]
                                               if p.get("text")]}
    if req["tools"]:
        decls = []
        for t in req["tools"]:
            d = {"name": t["name"], "description": t["description"]}
            params = gemini_schema(t["parameters"])
            if params.get("properties"):
                d["parameters"] = params
            decls.append(d)
        body["tools"] = [{"functionDeclarations": decls}]
        tc = req.get("tool_choice")
        if tc:
            cfg = {"mode": GEMINI_TOOL_MODE[tc["type"]]}
            if tc["type"] == "tool":
                cfg["allowedFunctionNames"] = [tc["name"]]
            body["toolConfig"] = {"functionCallingConfig": cfg}
    gen = {}
    if req.get("max_tokens"):
        gen["maxOutputTokens"] = output_limit(req, model_meta)
    gen.update(sampling_out(req, GEMINI_SAMPLING))
    gen.update(logprobs_out(req, "responseLogprobs", "logprobs"))
    rf = req.get("response_format")
    if rf:
        gen["responseMimeType"] = "application/json"
        if rf["schema"] is not None and GEMINI_JSON_SCHEMA_RE.search(model_id):
            gen["responseJsonSchema"] = {k: v for k, v in rf["schema"].items() if k != "$schema"}
        elif rf["schema"] is not None:
            gen["responseSchema"] = gemini_schema(rf["schema"])
    r = req.get("reasoning")
    if r and r.get("enabled") and model_meta.get("reasoning"):
        gen["thinkingConfig"] = {"includeThoughts": True,
                                 "thinkingBudget": reasoning_budget(r, model_meta)}
    elif r and model_meta.get("reasoning"):     # asked off: as little as the model allows
        gen["thinkingConfig"] = next((off for rx, off in GEMINI_THINKING_OFF
                                      if rx.search(model_id)), {"thinkingBudget": 0})
    if gen:
        body["generationConfig"] = gen
    return body


def _gemini_usage(u):
    if not u:
        return None
    thoughts = u.get("thoughtsTokenCount") or 0
    return {"input": (u.get("promptTokenCount") or 0) + (u.get("toolUsePromptTokenCount") or 0),
            "output": (u.get("candidatesTokenCount") or 0) + thoughts,
            "cache_read": u.get("cachedContentTokenCount") or 0, "cache_write": 0,
            "reasoning": thoughts}


def _gemini_parts_events(parts, prov):
    """Gemini parts -> neutral events; function calls get ids (Gemini rarely gives them), and
    their thought signatures are remembered by id so they can be sent back later."""
    out = []
    memo = getattr(prov, "memo", None)
    for p in parts or ():
        if "functionCall" in p:
            fc = p["functionCall"] or {}
            cid = fc.get("id") or new_id("call_")
            if p.get("thoughtSignature") and memo is not None:
                memo[cid] = p["thoughtSignature"]
                while len(memo) > 5000:
                    del memo[next(iter(memo))]
            out.append(("tool", cid, fc.get("name", "")))
            out.append(("args", dumps(fc.get("args") or {})))
        elif p.get("text"):
            out.append(("thinking" if p.get("thought") else "text", p["text"]))
    return out


def gemini_decode_response(body, prov=None):
    if isinstance(body, list):
        body = body[0] if body else {}
    evs = []
    cands = body.get("candidates") or []
    c = cands[0] if cands else {}
    evs = _gemini_parts_events((c.get("content") or {}).get("parts"), prov)
    resp = fold_events([("start",
                         {"id": body.get("responseId"), "model": body.get("modelVersion")})] + evs)
    has_tool = any(e[0] == "tool" for e in evs)
    stop = "refusal" if not cands and (body.get("promptFeedback") or {}).get("blockReason") else \
        GEMINI_FINISH.get(c.get("finishReason"), "end_turn")
    resp["stop_reason"] = "tool_use" if has_tool and stop == "end_turn" else stop
    resp["usage"].update(_gemini_usage(body.get("usageMetadata")) or {})
    lp = logprobs_from_gemini(c.get("logprobsResult"))
    if lp:
        resp["logprobs"] = lp
    return resp


class GeminiStreamDecoder(SSEDecoder):
    """Gemini SSE (alt=sse) -> neutral events. No sentinel: a stream ends when the connection does,
    after a chunk with finishReason (a stream that stops before one is an error)."""

    def __init__(self, prov=None):
        super().__init__(prov)
        self.started = False
        self.finish = None
        self.usage = None
        self.saw_tool = False

    def _finish(self, out):
        if self.finish is None:
            super()._finish(out)
        else:
            stop = GEMINI_FINISH.get(self.finish, "end_turn")
            out.append(("end", "tool_use" if self.saw_tool and stop == "end_turn" else stop,
                        self.usage, None))

    def _data(self, data, out):
        obj = self._json(data)
        if obj is None:
            return
        if isinstance(obj, list):
            obj = obj[0] if obj else {}
        if obj.get("error"):
            e = obj["error"]
            self.ended = True
            status = e.get("code") if isinstance(e.get("code"), int) else 502
            out.append(("error", ApiError(status, STATUS_ERROR_TYPE.get(status, "api_error"),
                                          e.get("message") or "error")))
            return
        if not self.started:
            self.started = True
            out.append(("start", {"id": obj.get("responseId"), "model": obj.get("modelVersion")}))
        if obj.get("usageMetadata"):
            self.usage = _gemini_usage(obj["usageMetadata"])
        cands = obj.get("candidates") or []
        if not cands and (obj.get("promptFeedback") or {}).get("blockReason"):
            self.finish = "SAFETY"
            return
        for c in cands[:1]:
            evs = _gemini_parts_events((c.get("content") or {}).get("parts"), self.prov)
            self.saw_tool = self.saw_tool or any(e[0] == "tool" for e in evs)
            out.extend(evs)
            with_logprobs(out, logprobs_from_gemini(c.get("logprobsResult")))
            if c.get("finishReason"):
                self.finish = c["finishReason"]


def gemini_parse_error(status, body):
    obj, text = error_json(status, body)
    if obj is None:
        return text, None
    if isinstance(obj, list):
        obj = obj[0] if obj else {}
    e = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(e, dict):
        return str(e.get("message") or e)[:1000], e.get("status")
    return str(obj)[:300], None


# Client side: what the google-genai SDK and Gemini CLI send (PROTOCOLS.md section 12). The
# model and the stream flag come from the path: POST .../models/{model}:generateContent or
# :streamGenerateContent?alt=sse.

GEMINI_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED",
                 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 405: "UNIMPLEMENTED", 408: "DEADLINE_EXCEEDED", 409: "ABORTED",
                 413: "INVALID_ARGUMENT",
                 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
                 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
TO_GEMINI_FINISH = {"end_turn": "STOP", "tool_use": "STOP", "stop_sequence": "STOP",
                    "pause_turn": "STOP", "max_tokens": "MAX_TOKENS", "refusal": "SAFETY"}


def gemini_json_schema(schema, depth=0):
    """A Gemini (OpenAPI-subset) schema as JSON Schema: its upper-case type names lower-cased,
    `nullable` as a "null" type."""
    if not isinstance(schema, dict) or depth > 24:
        return schema
    out = {}
    for k, v in schema.items():
        if k == "type" and isinstance(v, str):
            out["type"] = v.lower()
        elif k == "properties" and isinstance(v, dict):
            out[k] = {name: gemini_json_schema(sub, depth + 1) for name, sub in v.items()}
        elif k == "items":
            out[k] = gemini_json_schema(v, depth + 1)
        elif k == "anyOf" and isinstance(v, list):
            out[k] = [gemini_json_schema(sub, depth + 1) for sub in v]
        elif k != "nullable" and k != "propertyOrdering":
            out[k] = v
    if schema.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _gkeys(d):
    """A Gemini object's own keys in lowerCamelCase: proto JSON takes the field names either way
    (the python SDK sends parameters_json_schema), and this level's keys only, so user data
    (arguments, schemas' property names, function responses) is never renamed."""
    if not isinstance(d, dict) or not any("_" in k for k in d):
        return d
    return {re.sub(r"_([a-z])", lambda m: m.group(1).upper(), k): v for k, v in d.items()}


def _gemini_in_part(p, f, calls, results, only_gemini):
    """One part of a client's content -> neutral parts. `calls`: name -> ids of earlier function
    calls (a functionResponse without an id answers the oldest call of its name). A part with no
    neutral form (a PDF, code execution) is left out and named in `only_gemini`: it still reaches
    a Gemini provider on the byte passthrough, and no other provider is sent the request without
    it."""
    _need(isinstance(p, dict), f, "must be an object")
    p = _gkeys(p)
    if "text" in p:
        _need(isinstance(p["text"], str), f + ".text", "must be a string")
        if p.get("thought"):
            part = {"type": "thinking", "text": p["text"]}
            if isinstance(p.get("thoughtSignature"), str):
                text, part["signature"] = _gemini_unwrap_signature(p["thoughtSignature"])
                if text is not None:          # the whole block: the fragments before it are in it
                    part.update(text=text, whole=True)
            return [part]
        return [{"type": "text", "text": p["text"]}] if p["text"] else []
    if "inlineData" in p:
        d = _gkeys(p["inlineData"])
        _need(isinstance(d, dict) and all(isinstance(d.get(k), str) for k in ("data", "mimeType")),
              f + ".inlineData", "must be {\"mimeType\", \"data\"} with base64 data")
        if d["mimeType"] == "application/pdf":
            return [{"type": "file", "media_type": "application/pdf", "data": d["data"],
                     "name": d.get("displayName")}]
        if not d["mimeType"].startswith("image/"):
            only_gemini.append(f"{f}.inlineData ({d['mimeType']})")
            return []
        return [{"type": "image", "media_type": d["mimeType"], "data": d["data"]}]
    if "fileData" in p:
        d = _gkeys(p["fileData"])
        _need(isinstance(d, dict) and isinstance(d.get("fileUri"), str), f + ".fileData",
              "must have a fileUri string")
        if not str(d.get("mimeType") or "image/").startswith("image/"):
            only_gemini.append(f"{f}.fileData ({d.get('mimeType')})")
            return []
        return [{"type": "image", "url": d["fileUri"]}]
    if "functionCall" in p:
        fc = _gkeys(p["functionCall"])
        _need(isinstance(fc, dict) and isinstance(fc.get("name"), str),
              f + ".functionCall.name", "must be a string")
        _need(isinstance(fc.get("args") or {}, dict), f + ".functionCall.args", "must be an object")
        cid = fc.get("id") if isinstance(fc.get("id"), str) and fc["id"] else None
        cid = cid or f"call_{len(results)}_{fc['name']}"
        results.append(cid)
        calls.setdefault(fc["name"], []).append(cid)
        return [{"type": "tool_call", "id": cid, "name": fc["name"],
                 "arguments": fc.get("args") or {}}]
    if "functionResponse" in p:
        fr = _gkeys(p["functionResponse"])
        _need(isinstance(fr, dict) and isinstance(fr.get("name"), str),
              f + ".functionResponse.name", "must be a string")
        resp = fr.get("response")
        _need(resp is None or isinstance(resp, dict), f + ".functionResponse.response",
              "must be an object")
        resp = resp or {}
        lone = len(resp) == 1 and next(iter(resp)) in ("result", "output", "error")
        only = next(iter(resp.values())) if lone else None
        text = only if isinstance(only, str) else dumps(only if only is not None else resp)
        pending = calls.get(fr["name"]) or []
        cid = fr.get("id") if isinstance(fr.get("id"), str) and fr["id"] else None
        if cid is None:
            cid = pending.pop(0) if pending else f"call_{fr['name']}"
        if cid in pending:
            pending.remove(cid)
        return [{"type": "tool_result", "id": cid, "is_error": "error" in resp and len(resp) == 1,
                 "content": [{"type": "text", "text": text}]}]
    if set(p) <= {"thoughtSignature", "thought"}:
        return []             # a signature on an empty part: Gemini's own, meaningless elsewhere
    gemini_only = {"executableCode", "codeExecutionResult", "videoMetadata"} & set(p)
    if gemini_only:
        only_gemini.append(f"{f}.{min(gemini_only)}")
        return []
    raise ApiError(400, "invalid_request", f"{f}: a part needs one of text, inlineData, fileData, "
                                           "functionCall, functionResponse", param=f)


def gemini_decode_request(body, model=None, stream=False, count_only=False):
    """A generateContent (or countTokens) body -> neutral request. The model and the stream flag
    are the path's."""
    _need(isinstance(body, dict), "body", "must be a JSON object")
    body = _gkeys(body)
    if count_only and isinstance(body.get("generateContentRequest"), dict):
        body = _gkeys(body["generateContentRequest"])
    # POST /v1/route: the model in the body
    if model is None and isinstance(body.get("model"), str):
        model = body["model"][7:] if body["model"].startswith("models/") else body["model"]
    model = _model_name({"model": model})
    contents = body.get("contents")
    _need(isinstance(contents, list) and (contents or count_only), "contents",
          "is required and must be a non-empty array")
    messages, calls, ids, only_gemini = [], {}, [], []
    for i, c in enumerate(contents):
        f = f"contents[{i}]"
        _need(isinstance(c, dict), f, "must be an object")
        role = c.get("role") or "user"
        _need(role in ("user", "model", "function"), f + ".role", "must be \"user\" or \"model\"")
        parts = c.get("parts")
        _need(isinstance(parts, list), f + ".parts", "must be an array")
        out = []
        for j, p in enumerate(parts):
            out += _gemini_in_part(p, f"{f}.parts[{j}]", calls, ids, only_gemini)
        if any(q.get("whole") for q in out):      # a wrapped block replaces its streamed fragments
            out = [dict((k, v) for k, v in q.items() if k != "whole") for q in out
                   if q["type"] != "thinking" or q.get("signature")]
        role = "assistant" if role == "model" else "user"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += out
        else:
            messages.append({"role": role, "content": out})
    sys_in = _gkeys(body.get("systemInstruction"))
    _need(sys_in is None or isinstance(sys_in, (dict, str)), "systemInstruction",
          "must be a content object")
    if isinstance(sys_in, str):
        sys_in = {"parts": [{"text": sys_in}]}
    system = [{"type": "text", "text": p["text"]} for p in (sys_in or {}).get("parts") or []
              if isinstance(p, dict) and isinstance(p.get("text"), str) and p["text"]]
    tools = []
    dropped = []
    for i, t in enumerate(body.get("tools") or []):
        _need(isinstance(t, dict), f"tools[{i}]", "must be an object")
        # built-in tools (googleSearch, codeExecution, urlContext...) only exist at Gemini
        dropped += [f"tools[{i}].{k}" for k in _gkeys(t) if k != "functionDeclarations"]
        for j, d in enumerate(_gkeys(t).get("functionDeclarations") or []):
            f = f"tools[{i}].functionDeclarations[{j}]"
            d = _gkeys(d)
            _need(isinstance(d, dict) and isinstance(d.get("name"), str), f + ".name",
                  "is required and must be a string")
            params = (d.get("parametersJsonSchema") if "parametersJsonSchema" in d
                      else gemini_json_schema(d.get("parameters")))
            tools.append(neutral_tool(d["name"], d.get("description"), params, f))
    fcc = _gkeys(_gkeys(body.get("toolConfig") or {}).get("functionCallingConfig") or {}) \
        if isinstance(body.get("toolConfig"), dict) else {}
    mode = str(fcc.get("mode") or "").upper()
    allowed = fcc.get("allowedFunctionNames") or []
    tool_choice = None
    if mode == "NONE":
        tool_choice = {"type": "none"}
    elif mode == "ANY":
        tool_choice = {"type": "tool", "name": allowed[0]} if len(allowed) == 1 else {"type": "any"}
    elif mode in ("AUTO", "VALIDATED"):
        tool_choice = {"type": "auto"}
    gen = _gkeys(body.get("generationConfig") or {})
    _need(isinstance(gen, dict), "generationConfig", "must be an object")
    count = gen.get("candidateCount") if gen.get("candidateCount") is not None else 1
    _need(isinstance(count, int) and not isinstance(count, bool) and count >= 1,
          "generationConfig.candidateCount", "must be an integer >= 1")
    if count > 1:
        only_gemini.append(f"generationConfig.candidateCount ({count} candidates)")
    stop = gen.get("stopSequences")
    _need(stop is None or isinstance(stop, list), "generationConfig.stopSequences",
          "must be an array of strings")
    think = _gkeys(gen["thinkingConfig"]) if isinstance(gen.get("thinkingConfig"), dict) else {}
    budget, level = think.get("thinkingBudget"), think.get("thinkingLevel")
    # (includeThoughts alone only asks to see thoughts there are: Gemini CLI always sends it)
    reasoning = None
    if budget == 0:
        reasoning = {"enabled": False}
    elif isinstance(budget, int) and (budget > 0 or budget == -1) or level:
        reasoning = {"enabled": True,
                     "budget_tokens": budget if isinstance(budget, int) and budget > 0 else None,
                     "effort": str(level).lower() if level else None}
    mime = gen.get("responseMimeType") or "text/plain"
    _need(isinstance(mime, str), "generationConfig.responseMimeType", "must be a string")
    if mime not in ("text/plain", "application/json"):
        only_gemini.append(f"generationConfig.responseMimeType {mime}")
    schema = gen.get("responseJsonSchema")
    if schema is None and gen.get("responseSchema") is not None:
        schema = gemini_json_schema(gen["responseSchema"])
    rf = neutral_format("json_schema" if schema is not None else "json_object", schema,
                        field="generationConfig.responseJsonSchema") \
        if mime == "application/json" else None
    extra = dict({"same_dialect_only": only_gemini} if only_gemini else {},
                 **({"dropped_parts": dropped} if dropped else {}))
    return neutral_request(
        model, system, messages, tools=tools, tool_choice=tool_choice, stream=bool(stream),
        max_tokens=None if count_only else _opt_int(gen, "maxOutputTokens"),
        temperature=_opt_num(gen, "temperature", 0, 2), top_p=_opt_num(gen, "topP", 0, 1),
        top_k=_opt_int(gen, "topK", 0), stop=stop or None, reasoning=reasoning, extra=extra,
        response_format=rf, **_penalties(gen, ("seed", "presencePenalty", "frequencyPenalty"),
                                         "generationConfig."),
        logprobs=_logprobs_asked(gen, "responseLogprobs", "logprobs", "generationConfig."))


def _gemini_wrap_signature(text, sig):
    """Another provider's signed thinking block as a Gemini client must hold a signature (base64
    bytes): the whole block, text and signature, since the provider checks one against the other
    and a client may keep the streamed thought fragments apart, or drop them."""
    return base64.b64encode(dumps({"t": text, "s": sig}).encode()).decode()


def _gemini_unwrap_signature(sig):
    """-> (thinking text, signature) of a block the router wrapped, else (None, sig as it came)."""
    try:
        obj = loads(base64.b64decode(sig, validate=True))
        if isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in ("s", "t")):
            return obj["t"], obj["s"]
    except (binascii.Error, ValueError, UnicodeDecodeError):
        pass
    return None, sig


def _to_gemini_usage(u):
    u = u or empty_usage()
    out = {"promptTokenCount": u.get("input", 0),
           "candidatesTokenCount": u.get("output", 0) - u.get("reasoning", 0),
           "totalTokenCount": u.get("input", 0) + u.get("output", 0)}
    if u.get("reasoning"):
        out["thoughtsTokenCount"] = u["reasoning"]
    if u.get("cache_read"):
        out["cachedContentTokenCount"] = u["cache_read"]
    return out


def _gemini_out_part(p):
    if p["type"] == "text":
        return {"text": p["text"]}
    if p["type"] == "thinking":
        part = {"text": p.get("text") or "", "thought": True}
        if p.get("signature"):
            part["thoughtSignature"] = _gemini_wrap_signature(part["text"], p["signature"])
        return part
    if p["type"] == "tool_call":
        return {"functionCall": {"id": p["id"], "name": p["name"], "args": p["arguments"]}}
    return None


def gemini_encode_response(resp, model, req):
    parts = [q for q in (_gemini_out_part(p) for p in resp["content"]) if q is not None]
    cand = {"content": {"role": "model", "parts": parts},
            "finishReason": TO_GEMINI_FINISH.get(resp["stop_reason"] or "end_turn", "STOP"),
            "index": 0}
    if resp.get("logprobs"):
        cand["logprobsResult"] = logprobs_to_gemini(resp["logprobs"])
    return {"candidates": [cand],
            "usageMetadata": _to_gemini_usage(resp["usage"]), "modelVersion": model,
            "responseId": resp.get("id") or new_id("")}


def gemini_encode_error(err):
    e = {"code": err.status, "message": err.message,
         "status": GEMINI_STATUS.get(err.status, "UNKNOWN")}
    retry = err.headers.get("Retry-After")
    # Gemini CLI retries a 429 or 503 only with a RetryInfo it can read
    if retry:
        e["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                         "retryDelay": f"{retry}s"}]
    return dumps({"error": e}).encode()


class GeminiStreamEncoder:
    """Neutral events -> Gemini SSE chunks (data: GenerateContentResponse, no sentinel). Text and
    thoughts go out as they come; a function call goes out whole once its arguments are complete;
    the last chunk carries finishReason and usageMetadata. Every chunk has the stream's
    responseId."""

    def __init__(self, model, req, input_estimate=0):
        self.model, self.input_estimate = model, input_estimate
        self.id = new_id("")
        # [id, name, [argument pieces]] of the function call being streamed
        self.call = None
        self.thought = []         # the thinking text since the last signature

    def _chunk(self, parts, finish=None, usage=None, logprobs=None):
        cand = {"content": {"role": "model", "parts": parts}, "index": 0}
        if finish:
            cand["finishReason"] = finish
        if logprobs:
            cand["logprobsResult"] = logprobs_to_gemini(logprobs)
        obj = {"candidates": [cand], "modelVersion": self.model, "responseId": self.id}
        if usage is not None:
            obj["usageMetadata"] = _to_gemini_usage(usage)
        return b"data: " + dumps(obj).encode() + b"\r\n\r\n"

    def _flush_call(self):
        if self.call is None:
            return []
        cid, name, pieces = self.call
        self.call = None
        return [{"functionCall": {"id": cid, "name": name,
                                  "args": parse_args_json("".join(pieces))}}]

    def encode(self, ev):
        kind = ev[0]
        if kind == "args":
            if self.call is not None:
                self.call[2].append(ev[1])
            return b""
        if kind in ("start", "redacted_thinking"):
            return b""
        if kind == "error":
            return b"data: " + gemini_encode_error(ev[1]) + b"\r\n\r\n"
        if kind == "logprobs":
            return self._chunk([{"text": ""}], logprobs=ev[1])
        parts = self._flush_call()
        if kind == "text" and len(ev) > 2:
            return self._chunk(parts + [{"text": ev[1]}], logprobs=ev[2])
        if kind == "tool":
            self.call = [ev[1], ev[2], []]
        elif kind == "text":
            parts.append({"text": ev[1]})
        elif kind == "thinking":
            parts.append({"text": ev[1], "thought": True})
            self.thought.append(ev[1])
        elif kind == "signature":
            parts.append({"text": "", "thought": True,
                          "thoughtSignature": _gemini_wrap_signature("".join(self.thought), ev[1])})
            self.thought = []
        # (never empty parts: the SDK's chat drops a turn whose last chunk has none)
        elif kind == "end":
            return self._chunk(parts or [{"text": ""}],
                               TO_GEMINI_FINISH.get(ev[1] or "end_turn", "STOP"), ev[2])
        return self._chunk(parts) if parts else b""


def gemini_adjust(body, prov, req, meta, headers, foreign):
    """The same-dialect body as it goes out: the model is the path's, never a body field."""
    mid = body.pop("model", None)
    inner = body.get("generateContentRequest")
    if isinstance(inner, dict) and mid:                    # countTokens' form names the model again
        body["generateContentRequest"] = dict(inner, model="models/" + mid)
    return body, {}


def gemini_model_shape(entry):
    mid, _owner, meta = entry
    return {"name": "models/" + mid, "baseModelId": mid, "version": "001", "displayName": mid,
            "description": "routed by Sage Router"
                           + (f" to {', '.join(meta['route'])}" if "route" in meta else ""),
            "inputTokenLimit": meta.get("context_window") or 0,
            "outputTokenLimit": meta.get("max_output") or 0,
            "supportedGenerationMethods": ["generateContent", "countTokens"],
            "thinking": bool(meta.get("reasoning"))}


def gemini_list_shape(entries, query=None):
    """GET /v1beta/models, paginated as Gemini does (pageSize, default 50, at most 1000; pageToken)."""
    query = query or {}
    entries = [e for e in entries if "shared" not in e[2]]
    try:
        size = max(1, min(1000, int(query.get("pageSize") or 50)))
        start = max(0, int(query.get("pageToken") or 0))
    except ValueError:
        raise ApiError(400, "invalid_request", "pageSize and pageToken must be integers",
                       param="pageSize") from None
    out = {"models": [gemini_model_shape(e) for e in entries[start:start + size]]}
    if start + size < len(entries):
        out["nextPageToken"] = str(start + size)
    return out


GEMINI_TASK = {"query": "RETRIEVAL_QUERY", "document": "RETRIEVAL_DOCUMENT"}


def gemini_embed_decode(body, model=None, single=False):
    """:embedContent ({"content"}) or :batchEmbedContents ({"requests": [...]}) -> neutral; the
    model is the path's, the task type and output size the first request's."""
    model = _model_name({"model": model})
    body = _gkeys(body)
    reqs = [body] if single else body.get("requests")
    _need(isinstance(reqs, list) and reqs and all(isinstance(r, dict) for r in reqs),
          "content" if single else "requests", "must be an object" if single else
          "must be a non-empty array of {\"content\": {\"parts\": [...]}}")
    reqs = [_gkeys(r) for r in reqs]
    texts = []
    for i, r in enumerate(reqs):
        parts = (_gkeys(r.get("content") or {}).get("parts")) or []
        _need(isinstance(parts, list) and all(isinstance(p, dict) for p in parts),
              "content.parts" if single else f"requests[{i}].content.parts", "must be an array")
        texts.append("".join(p.get("text", "") for p in parts if isinstance(p.get("text"), str)))
    raw = reqs[0].get("taskType")
    task = {v: k for k, v in GEMINI_TASK.items()}.get(raw)
    if raw in ("SEMANTIC_SIMILARITY", "CLASSIFICATION", "CLUSTERING"):
        task = "document"                     # (for NVIDIA's input_type: not a search query)
    return embed_request(model, texts, _opt_int(reqs[0], "outputDimensionality"), task,
                         legacy=single, **({"gemini_task": raw} if isinstance(raw, str) else {}))


def gemini_embed_encode(vectors, model, ereq, tokens):
    if ereq["legacy"]:
        return {"embedding": {"values": vectors[0]}}
    return {"embeddings": [{"values": v} for v in vectors]}


def gemini_embed_request(ereq, inputs, model_id, provider=None):
    """Neutral inputs -> a batchEmbedContents body (each entry names the model again)."""
    def one(text):
        r = {"model": "models/" + model_id, "content": {"parts": [{"text": text}]}}
        if ereq.get("gemini_task") or ereq["task"]:
            r["taskType"] = ereq.get("gemini_task") or GEMINI_TASK[ereq["task"]]
        if ereq["dimensions"]:
            r["outputDimensionality"] = ereq["dimensions"]
        return r
    return {"requests": [one(t) for t in inputs]}


def gemini_embed_response(obj):
    """A batchEmbedContents reply -> (vectors, None: Gemini gives no token count)."""
    return [e.get("values") or [] for e in obj.get("embeddings") or []], None


def gemini_list_models(fetch, known):
    """GET /models, every page (pageToken): the models that support generateContent, and the
    embedding models (embedContent)."""
    out, token = {}, None
    for _page in range(100):
        token_q = f"&pageToken={urllib.parse.quote(token)}" if token else ""
        page = fetch("/models?pageSize=1000" + token_q)
        for m in page.get("models") or []:
            methods = m.get("supportedGenerationMethods") or []
            mid = m.get("baseModelId") or m.get("name", "").split("/", 1)[-1]
            if "generateContent" not in methods:
                if "embedContent" in methods:
                    out[mid] = _clean({"embedding": True, "chat": False, "tools": False,
                                       "context_window": m.get("inputTokenLimit")})
                continue
            out[mid] = _clean({"context_window": m.get("inputTokenLimit"),
                               "max_output": m.get("outputTokenLimit"),
                               "input": ["text", "image", "pdf"],
                               "reasoning": True if m.get("thinking") else None})
        token = page.get("nextPageToken")
        if not token:
            break
    return out


def _gemini_model_path(prov, mid):
    """The path of a Gemini model's methods (the id quoted whole: it may hold "/")."""
    return f"{prov.base_path}/models/{urllib.parse.quote(mid, safe='')}"


def gemini_auth(prov, key, path, data):
    return {"x-goog-api-key": key} if key else {}

# ----------------------------------------------------------------------------------- Ollama --

OLLAMA_DONE = {"stop": "end_turn", "length": "max_tokens"}
STOP_TO_OLLAMA = {"max_tokens": "length"}


def _ollama_images(images, field):
    _need(images is None or (isinstance(images, list) and all(isinstance(x, str) for x in images)),
          field, "must be an array of base64 strings")
    parts = []
    for b in images or ():
        m = _DATA_URL_RE.match(b)
        data = m.group(2) if m else b
        parts.append({"type": "image",
                      "media_type": (m.group(1) if m else None) or sniff_mime(data), "data": data})
    return parts


def _ollama_options(body):
    opts = body.get("options")
    _need(opts is None or isinstance(opts, dict), "options", "must be an object")
    opts = opts or {}
    stop = opts.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    _need(stop is None or isinstance(stop, list) and all(isinstance(x, str) for x in stop),
          "options.stop", "must be an array of strings")
    n = opts.get("num_predict")
    return {"max_tokens": n if isinstance(n, int) and n > 0 else None,
            "temperature": _opt_num(opts, "temperature", 0, 2),
            "top_p": _opt_num(opts, "top_p", 0, 1),
            "top_k": _opt_int(opts, "top_k", 0), "stop": stop or None,
            **_penalties(opts, at="options.")}


def ollama_decode_request(body):
    """Ollama /api/chat (or /api/generate, with `prompt`) body -> neutral request. Ollama's
    native endpoints stream unless told "stream": false."""
    model = _body_model(body)
    system, messages = [], []
    generate = "prompt" in body and "messages" not in body
    completion = None
    if generate:
        _need(isinstance(body["prompt"], str), "prompt", "must be a string")
        suffix = body.get("suffix")
        _need(suffix is None or isinstance(suffix, str), "suffix", "must be a string")
        _need(body.get("raw") in (None, True, False), "raw", "must be true or false")
        if suffix or body.get("raw"):       # fill in the middle, or the model's own raw prompt
            completion = {"prompt": body["prompt"], "suffix": suffix or None,
                          "raw": bool(body.get("raw"))}
        if isinstance(body.get("system"), str) and body["system"]:
            system.append({"type": "text", "text": body["system"]})
        content = [{"type": "text", "text": t} for t in (body["prompt"], body.get("suffix")) if t] \
            + _ollama_images(body.get("images"), "images")
        messages.append({"role": "user", "content": content})
    else:
        msgs = body.get("messages")
        _need(isinstance(msgs, list), "messages", "is required and must be an array")
        calls_by_name = {}
        for i, m in enumerate(msgs):
            f = f"messages[{i}]"
            _need(isinstance(m, dict), f, "must be an object")
            role = m.get("role")
            _need(role in ("system", "user", "assistant", "tool"), f + ".role",
                  "must be one of system, user, assistant, tool")
            content = m.get("content") or ""
            _need(isinstance(content, str), f + ".content", "must be a string")
            text = [{"type": "text", "text": content}] if content else []
            if role == "system":
                if messages:
                    messages.append({"role": "system", "content": text})
                else:
                    system += text
            elif role == "user":
                messages.append({"role": "user",
                                 "content": text + _ollama_images(m.get("images"), f + ".images")})
            elif role == "assistant":
                thought = m.get("thinking")
                parts = ([{"type": "thinking", "text": thought}]
                         if isinstance(thought, str) and thought else [])
                parts += text
                calls = m.get("tool_calls") or []
                _need(isinstance(calls, list), f + ".tool_calls", "must be an array")
                for j, c in enumerate(calls):
                    fn = c.get("function") if isinstance(c, dict) else None
                    _need(isinstance(fn, dict) and isinstance(fn.get("name"), str),
                          f"{f}.tool_calls[{j}].function.name", "must be a string")
                    _need(isinstance(fn.get("arguments") or {}, (dict, str)),
                          f"{f}.tool_calls[{j}].function.arguments", "must be an object")
                    _need(c.get("id") is None or isinstance(c["id"], str),
                          f"{f}.tool_calls[{j}].id", "must be a string")
                    cid = c.get("id") or f"call_{i}_{j}"
                    calls_by_name.setdefault(fn["name"], []).append(cid)
                    parts.append({"type": "tool_call", "id": cid, "name": fn["name"],
                                  "arguments": parse_args_json(fn.get("arguments") or {})})
                messages.append({"role": "assistant", "content": parts})
            else:
                name = m.get("tool_name") or m.get("name")
                cid = m.get("tool_call_id") or ((calls_by_name.get(name) or [None]).pop(0)
                                                if name else None) or f"call_{i}"
                add_tool_result(messages, {"type": "tool_result", "id": cid,
                                           "is_error": False, "content": text})
    tools = []
    for i, t in enumerate(body.get("tools") or []):
        fn = t.get("function") if isinstance(t, dict) else None
        _need(isinstance(fn, dict) and isinstance(fn.get("name"), str), f"tools[{i}].function.name",
              "is required and must be a string")
        tools.append(neutral_tool(fn["name"], fn.get("description"), fn.get("parameters"),
                                  f"tools[{i}].function"))
    stream = body.get("stream", True)
    _need(isinstance(stream, bool), "stream", "must be true or false")
    think = body.get("think")
    fmt = body.get("format")
    _need(fmt in (None, "", "json") or isinstance(fmt, dict), "format",
          "must be \"json\" or a JSON Schema object")
    rf = neutral_format("json_schema" if isinstance(fmt, dict) else "json_object",
                        fmt if isinstance(fmt, dict) else None, field="format") if fmt else None
    return neutral_request(
        model, system, messages, tools=tools, stream=stream, response_format=rf,
        logprobs=_logprobs_asked(body, "logprobs", "top_logprobs"),
        reasoning={"enabled": True,
                   "effort": think if isinstance(think, str) else None} if think else None,
        completion=completion, extra={"ollama_generate": generate}, **_ollama_options(body))


def _ollama_now():
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


def _ollama_final(model, stop, usage, generate):
    u = usage or empty_usage()
    out = {"model": model, "created_at": _ollama_now()}
    if generate:
        out["response"] = ""
    else:
        out["message"] = {"role": "assistant", "content": ""}
    out.update({"done": True, "done_reason": STOP_TO_OLLAMA.get(stop, "stop"), "total_duration": 0,
                "load_duration": 0, "prompt_eval_count": u["input"], "prompt_eval_duration": 0,
                "eval_count": u["output"], "eval_duration": 0})
    return out


def ollama_encode_response(resp, model, req):
    out = _ollama_final(model, resp["stop_reason"], resp["usage"],
                        req["extra"].get("ollama_generate"))
    text = text_of(resp["content"])
    thinking = "".join(p["text"] for p in resp["content"] if p["type"] == "thinking")
    if req["extra"].get("ollama_generate"):
        out["response"] = text
        if thinking:
            out["thinking"] = thinking
        return out
    msg = out["message"]
    msg["content"] = text
    if thinking:
        msg["thinking"] = thinking
    calls = [{"id": p["id"],
              "function": {"index": i, "name": p["name"], "arguments": p["arguments"]}}
             for i, p in enumerate(q for q in resp["content"] if q["type"] == "tool_call")]
    if calls:
        msg["tool_calls"] = calls
    if resp.get("logprobs"):
        out["logprobs"] = logprobs_to_openai(resp["logprobs"])
    return out


def ollama_encode_error(err):
    return dumps({"error": err.message}).encode()


class OllamaStreamEncoder:
    """Neutral events -> Ollama NDJSON lines. Tool calls go out whole, once their arguments are
    complete (Ollama never fragments them)."""

    def __init__(self, model, req, input_estimate=0):
        self.model, self.generate = model, req["extra"].get("ollama_generate")
        self.call = None
        self.args = []
        self.index = 0

    def _line(self, **fields):
        obj = {"model": self.model, "created_at": _ollama_now()}
        if "logprobs" in fields:            # beside the message, not in it
            obj["logprobs"] = fields.pop("logprobs")
        if self.generate:
            obj["response"] = fields.pop("content", "")
            obj.update(fields)
        else:
            obj["message"] = dict({"role": "assistant", "content": ""}, **fields)
        obj["done"] = False
        return dumps(obj).encode() + b"\n"

    def _flush(self):
        if self.call is None:
            return b""
        cid, name = self.call
        self.call = None
        call = {"id": cid, "function": {"index": self.index, "name": name,
                                        "arguments": parse_args_json("".join(self.args))}}
        self.index += 1
        if self.generate:
            return b""
        return self._line(tool_calls=[call])

    def encode(self, ev):
        kind = ev[0]
        if kind == "args":
            self.args.append(ev[1])
            return b""
        out = self._flush()
        if kind in ("text", "logprobs"):
            lp = text_logprobs(ev)
            return out + self._line(**({"content": ev[1]} if kind == "text" else {}),
                                    **({"logprobs": logprobs_to_openai(lp)} if lp else {}))
        if kind == "thinking":
            return out + self._line(thinking=ev[1])
        if kind == "tool":
            self.call, self.args = (ev[1], ev[2]), []
            return out
        if kind == "end":
            return out + dumps(_ollama_final(self.model, ev[1],
                                             ev[2], self.generate)).encode() + b"\n"
        if kind == "error":
            return out + ollama_encode_error(ev[1]) + b"\n"
        return out


def ollama_num_ctx(req, model_meta):
    """The context window to ask Ollama for: the request's estimated input plus its output, rounded
    up to a power of two (few distinct sizes, so Ollama rarely reloads the model), at least 8,192,
    at most the model's known window. Ollama otherwise truncates long prompts silently."""
    need = estimate_tokens(req) + (req.get("max_tokens") or 4096)
    size = 8192
    while size < need:
        size *= 2
    window = model_meta.get("context_window")
    return min(size, window) if window else size


#: neutral field -> Ollama option, limit
OLLAMA_SAMPLING = (("max_tokens", "num_predict", None), ("temperature", "temperature", None),
                   ("top_p", "top_p", None), ("top_k", "top_k", None), ("stop", "stop", None),
                   ("seed", "seed", None), ("presence_penalty", "presence_penalty", None),
                   ("frequency_penalty", "frequency_penalty", None))


def ollama_encode_request(req, model_id, provider, model_meta, settings=None):
    """Neutral request -> native /api/chat body (an /api/generate one for a completion)."""
    c = req.get("completion")
    if c:
        body = {"model": model_id, "prompt": c["prompt"], "stream": bool(req["stream"]),
                "options": dict({"num_ctx": ollama_num_ctx(req, model_meta)},
                                **sampling_out(req, OLLAMA_SAMPLING))}
        if c["suffix"]:
            body["suffix"] = c["suffix"]
        if c.get("raw"):
            body["raw"] = True
        if model_meta.get("reasoning"):
            body["think"] = False             # (a completion is not a question to think over)
        body.update(logprobs_out(req, "logprobs", "top_logprobs"))
        return body
    names = {p["id"]: p["name"] for m in req["messages"] if m["role"] == "assistant"
             for p in m["content"] if p["type"] == "tool_call"}
    msgs = []
    sys_text = system_text(req)
    if sys_text:
        msgs.append({"role": "system", "content": sys_text})
    for m in req["messages"]:
        role, parts = m["role"], m["content"]
        if role == "assistant":
            msg = {"role": "assistant", "content": text_of(parts)}
            calls = [{"id": p["id"], "function": {"name": p["name"], "arguments": p["arguments"]}}
                     for p in parts if p["type"] == "tool_call"]
            if calls:
                msg["tool_calls"] = calls
            msgs.append(msg)
            continue
        text, images = [], []
        for p in parts:
            if p["type"] == "tool_result":
                msgs.append({"role": "tool",
                             "content": result_text(p),
                             "tool_name": names.get(p["id"], ""), "tool_call_id": p["id"]})
                images += [q["data"] for q in p["content"] if q["type"] == "image" and "data" in q]
            elif p["type"] == "text":
                text.append(p["text"])
            elif p["type"] == "image":
                if "data" in p:
                    images.append(p["data"])
                else:
                    text.append(f"[image: {p['url']}]")   # Ollama takes base64 images only
        if text or images:
            msg = {"role": "system" if role == "system" else "user", "content": "\n".join(text)}
            if images:
                msg["images"] = images
            msgs.append(msg)
    opts = {"num_ctx": ollama_num_ctx(req, model_meta)}
    opts.update(sampling_out(req, OLLAMA_SAMPLING))
    body = {"model": model_id, "messages": msgs, "stream": bool(req["stream"]), "options": opts}
    if req["tools"] and not (req.get("tool_choice") or {}).get("type") == "none":
        body["tools"] = [{"type": "function",
                          "function": {"name": t["name"], "description": t["description"],
                                       "parameters": t["parameters"]}} for t in req["tools"]]
    r = req.get("reasoning")
    if r and r.get("enabled") and model_meta.get("reasoning"):
        # (gpt-oss takes an effort word; other thinking models true)
        body["think"] = reasoning_effort(r, ("low", "medium", "high")) \
            if r.get("effort") and "gpt-oss" in model_id else True
    elif r and model_meta.get("reasoning"):
        body["think"] = False               # (asked off: thinking models think by default)
    rf = req.get("response_format")
    if rf:
        body["format"] = rf["schema"] if rf["schema"] is not None else "json"
    body.update(logprobs_out(req, "logprobs", "top_logprobs"))
    return body


def _ollama_usage(obj):
    return {"input": obj.get("prompt_eval_count") or 0, "output": obj.get("eval_count") or 0,
            "cache_read": 0, "cache_write": 0, "reasoning": 0}


def _ollama_events(obj):
    out = []
    msg = obj.get("message") or {}
    thinking = msg.get("thinking") or obj.get("thinking")
    if thinking:
        out.append(("thinking", thinking))
    text = msg.get("content") or obj.get("response")
    if text:
        out.append(("text", text))
    with_logprobs(out, logprobs_from_openai(obj.get("logprobs")))
    for c in msg.get("tool_calls") or ():
        fn = c.get("function") or {}
        out.append(("tool", c.get("id") or new_id("call_"), fn.get("name", "")))
        args = fn.get("arguments")
        out.append(("args", args if isinstance(args, str) else dumps(args or {})))
    return out


def ollama_decode_response(body, prov=None):
    evs = _ollama_events(body)
    resp = fold_events([("start", {"id": None, "model": body.get("model")})] + evs)
    stop = OLLAMA_DONE.get(body.get("done_reason"), "end_turn")
    called = any(e[0] == "tool" for e in evs)
    resp["stop_reason"] = "tool_use" if called and stop == "end_turn" else stop
    resp["usage"] = _ollama_usage(body)
    return resp


class OllamaStreamDecoder:
    """Ollama NDJSON -> neutral events; the line with "done": true ends the stream."""

    def __init__(self, prov=None):
        self.buf = bytearray()
        self.started = False
        self.ended = False
        self.saw_tool = False

    def feed(self, chunk):
        self.buf += chunk
        if b"\n" not in chunk:          # a line still arriving: linear, however long it grows
            if len(self.buf) > MAX_STREAM_LINE:
                raise ValueError(f"a stream line longer than {MAX_STREAM_LINE >> 20} MiB")
            return []
        lines = self.buf.split(b"\n")
        self.buf = bytearray(lines.pop())
        out = []
        for line in lines:
            self._line(bytes(line), out)
        return out

    def close(self):
        out = []
        if self.buf.strip():
            self._line(bytes(self.buf), out)
        self.buf = bytearray()
        if not self.ended:
            self.ended = True
            out.append(("error", ApiError(502, "api_error",
                                          "the provider closed the stream before it finished")))
        return out

    def _line(self, line, out):
        if self.ended or not line.strip():
            return
        try:
            obj = loads(line)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if obj.get("error"):
            self.ended = True
            out.append(("error", ApiError(502, "api_error", str(obj["error"]))))
            return
        if not self.started:
            self.started = True
            out.append(("start", {"id": None, "model": obj.get("model")}))
        evs = _ollama_events(obj)
        self.saw_tool = self.saw_tool or any(e[0] == "tool" for e in evs)
        out.extend(evs)
        if obj.get("done"):
            self.ended = True
            stop = OLLAMA_DONE.get(obj.get("done_reason"), "end_turn")
            out.append(("end", "tool_use" if self.saw_tool and stop == "end_turn" else stop,
                        _ollama_usage(obj), None))


def ollama_parse_error(status, body):
    obj, text = error_json(status, body)
    if isinstance(obj, dict) and obj.get("error"):
        return str(obj["error"])[:1000], None
    return text or body[:300].decode("utf-8", "replace").strip() or f"HTTP {status}", None


def _ollama_meta(show):
    """Capabilities from Ollama's /api/show."""
    caps = show.get("capabilities")
    info = show.get("model_info") or {}
    window = next((v for k, v in info.items()
                   if k.endswith(".context_length") and isinstance(v, int)), None)
    meta = {"context_window": window}
    if isinstance(caps, list) and caps:
        meta.update(tools="tools" in caps, reasoning="thinking" in caps,
                    input=["text", "image"] if "vision" in caps else ["text"],
                    chat="completion" in caps,
                    # (insert: its template takes a suffix; else the FIM tokens, raw, if known)
                    completions="native" if "insert" in caps else "template")
    return _clean(meta)


def ollama_embed_decode(body, legacy=False):
    """POST /api/embed ({"input": text or [texts]}) or, `legacy`, the older /api/embeddings
    ({"prompt": text})."""
    model = _body_model(body)
    inp = body.get("prompt") if legacy else body.get("input")
    return embed_request(model, [inp] if isinstance(inp, str) else inp,
                         _opt_int(body, "dimensions"), legacy=legacy)


def ollama_embed_encode(vectors, model, ereq, tokens):
    if ereq["legacy"]:
        return {"embedding": vectors[0]}
    return {"model": model, "embeddings": vectors, "prompt_eval_count": tokens}


def ollama_embed_request(ereq, inputs, model_id, provider=None):
    body = {"model": model_id, "input": inputs}
    if ereq["dimensions"]:
        body["dimensions"] = ereq["dimensions"]
    return body


def ollama_embed_response(obj):
    return obj.get("embeddings") or [], obj.get("prompt_eval_count")


def ollama_list_models(fetch, known):
    """GET /api/tags, then POST /api/show for each model not seen before (`known`)."""
    out = {}
    for m in fetch("/api/tags").get("models") or []:
        name = m.get("name") or m.get("model")
        if not isinstance(name, str):
            continue
        if name.endswith(":latest"):
            name = name[:-7]            # Ollama takes "llama3.2" for "llama3.2:latest"
        if name in known:
            out[name] = known[name]
            continue
        try:
            out[name] = _ollama_meta(fetch("/api/show", "POST", {"model": name}))
        except DiscoveryError:
            out[name] = {}
    return out


def ollama_adjust(body, prov, req, meta, headers, foreign):
    """The same-dialect body as it goes out: a context window that fits the request (Ollama's own
    default silently cuts long prompts)."""
    if not (body.get("options") or {}).get("num_ctx"):
        body["options"] = dict(body.get("options") or {}, num_ctx=ollama_num_ctx(req, meta))
    return body, {}


def ollama_list_shape(entries, query=None):
    """GET /api/tags: every name a client may ask for (bare ids several providers have too)."""
    return {"models": [{"name": mid, "model": mid, "modified_at": "2025-01-01T00:00:00Z", "size": 0,
                        "digest": hashlib.sha256(mid.encode()).hexdigest(),
                        "details": {"parent_model": "", "format": "sage-router",
                                    "family": mid.split("/")[0],
                                    "families": [mid.split("/")[0]], "parameter_size": "",
                                    "quantization_level": ""}}
                       for mid, _owner, _meta in entries]}


def ollama_model_shape(entry):
    """POST /api/show: a model's details and capabilities (a route's are its first candidate's)."""
    mid, owner, caps = entry
    owner = caps["route"][0].split("/", 1)[0] if "route" in caps else owner
    abilities = (["completion"] + (["tools"] if caps.get("tools") else [])
                 + (["vision"] if "image" in (caps.get("input") or ()) else [])
                 + (["thinking"] if caps.get("reasoning") else []))
    if caps.get("embedding"):
        abilities = ["embedding"]            # as Ollama says of its embedding models
    return {"modelfile": "", "parameters": "", "template": "",
            "modified_at": "2025-01-01T00:00:00Z",
            "details": {"parent_model": "", "format": "sage-router", "family": owner,
                        "families": [owner], "parameter_size": "", "quantization_level": ""},
            "model_info": {"general.architecture": "sage-router",
                           "sage-router.context_length": caps.get("context_window") or 0},
            "capabilities": abilities}

# ------------------------------------------------------------------------------- codec table --

def go_duration(seconds):
    """Seconds as OpenAI's rate-limit headers write them: 20ms, 1s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    s = int(-(-seconds // 1))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return (f"{h}h{m}m{s}s" if h else f"{m}m{s}s" if m else f"{s}s")


def openai_limit_headers(limits, now):
    return {f"x-ratelimit-{what}-{kind}": v for kind, (limit, left, reset) in limits.items()
            for what, v in (("limit", str(limit)), ("remaining", str(left)),
                            ("reset", go_duration(reset)))}


def anthropic_limit_headers(limits, now):
    return {f"anthropic-ratelimit-{kind}-{what}": v for kind, (limit, left, reset) in limits.items()
            for what, v in (("limit", str(limit)), ("remaining", str(left)),
                            ("reset", time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                    time.gmtime(now + reset + 0.999))))}


def _sse_boundary(data):
    """Length of the prefix of `data` made of complete SSE events."""
    a = data.rfind(b"\n\n")
    b = data.rfind(b"\r\n\r\n")
    return max(a + 2 if a >= 0 else 0, b + 4 if b >= 0 else 0)


def _ndjson_boundary(data):
    return data.rfind(b"\n") + 1


class Codec:
    """One dialect, whole. Every field is named here (None where the dialect has no such thing),
    and nothing outside a codec's subsection asks which dialect it is (see DESIGN.md).

    Client side: decode_request(body, **kw) -> neutral request; encode_response(resp, model, req)
      -> JSON object; stream_encoder(model, req, input_estimate), whose encode(event) -> bytes (an
      error event continues the stream's own ids and sequence numbers); encode_error(err) -> bytes;
      stream_type; boundary(bytes) -> the length of the complete events; passthrough: the
      StreamPassthrough class for the same dialect on both sides; list_shape(entries, query) and
      model_shape(entry): the model list its clients read (entry: (name, owner, metadata)).
    Provider side: encode_request(req, model, provider, meta, settings) -> body;
      decode_response(obj, provider) -> neutral response; stream_decoder(provider);
      parse_error(status, body) -> (message, code); structured: the response_format types its
      request can carry natively (json_object, json_schema); carries: the OPTIONAL_FIELDS its
      request has; files: it takes PDF file parts; completes: it takes a neutral completion
      (`completion`) as a text completion of its own; limit_headers(limits, now): a router key's
      rate limits as its clients read them (limits: {"requests"|"tokens": (limit, remaining,
      seconds to reset)}).
    Transport: request_path(provider, model, stream, req, same) (req: the neutral request as
      sent; same: the client's own body goes out, so its endpoint is the client's); auth(provider, key, path, data) -> headers
      (data: the bytes to be sent, for schemes that sign the request);
      root(path) -> the base path as the API wants it; is_stream(content_type); adjust(body,
      provider, req, meta, client_headers, foreign) -> (body, extra headers): the same-dialect
      body as it goes out
      (foreign: the thinking marks to keep when the history holds another provider's, else None).
    Catalogue: list_models(fetch, known) -> {id: metadata}, fetch(path, method, body) being the
      provider's JSON; probe_path: its cheapest list; count_path(provider, model) and
      count_result(obj) for token counting upstream, count_shape(n) the count its clients read;
      free: its models cost nothing (local).
    Embeddings: embed_decode(body) -> neutral embeddings request and embed_encode(vectors, model,
      request, tokens) for its clients; embed_path(provider, model), embed_request(request,
      inputs, model, provider), embed_response(obj) -> (vectors, tokens) and embed_batch (inputs a
      call)
      for its providers.
    Translation: unread(body) -> the client's fields its decoder does not translate; spelling:
      neutral field -> the client's name for it (for X-Router-Dropped).
    Front: client_paths: the POST paths its clients call -> action (generate, count_tokens, show);
      Gemini's, with the model in the path, are matched by the front's GEMINI_CALL."""

    __slots__ = ("name", "decode_request", "encode_response", "stream_encoder",
                 "encode_error", "stream_type",
                 "boundary", "passthrough", "list_shape", "model_shape",
                 "encode_request", "decode_response",
                 "stream_decoder", "parse_error", "request_path", "auth", "root",
                 "is_stream", "adjust",
                 "list_models", "probe_path", "count_path", "count_result", "count_shape",
                 "free", "client_paths", "structured", "carries", "unread", "spelling",
                 "files", "embed_decode", "embed_encode", "embed_path", "embed_request",
                 "embed_response", "embed_batch", "completes", "limit_headers")

    def __init__(self, name, *, decode_request=None, encode_response=None,
                 stream_encoder=None, encode_error=None,
                 stream_type="text/event-stream", boundary=_sse_boundary,
                 passthrough=StreamPassthrough,
                 list_shape=None, model_shape=None, encode_request=None, decode_response=None,
                 stream_decoder=None, parse_error=None, request_path=None, auth=None, root=None,
                 is_stream=_is_stream, adjust=None,
                 list_models=None, probe_path=None, count_path=None,
                 count_result=None, count_shape=None, free=False, client_paths=None,
                 structured=frozenset(), carries=frozenset(), unread=None, spelling=None,
                 files=False, embed_decode=None, embed_encode=None, embed_path=None,
                 embed_request=None, embed_response=None, embed_batch=100, completes=False,
                 limit_headers=None):
        self.name = name
        self.decode_request, self.encode_response = decode_request, encode_response
        self.stream_encoder = stream_encoder
        self.encode_error, self.stream_type, self.boundary = encode_error, stream_type, boundary
        self.passthrough, self.list_shape, self.model_shape = passthrough, list_shape, model_shape
        self.encode_request, self.decode_response = encode_request, decode_response
        self.stream_decoder = stream_decoder
        self.parse_error, self.request_path = parse_error, request_path
        self.auth = auth or (lambda prov, key, path, data: {})
        self.root, self.is_stream, self.adjust = root or (lambda path: path), is_stream, adjust
        self.list_models, self.probe_path = list_models, probe_path
        self.count_path, self.count_result, self.count_shape = count_path, count_result, count_shape
        self.free, self.client_paths = free, client_paths or {}
        self.structured, self.carries = frozenset(structured), frozenset(carries)
        self.unread, self.spelling, self.files = unread, spelling or {}, files
        self.embed_decode, self.embed_encode = embed_decode, embed_encode
        self.embed_path, self.embed_request = embed_path, embed_request
        self.embed_response, self.embed_batch = embed_response, embed_batch
        self.completes = completes
        self.limit_headers = limit_headers or (lambda limits, now: {})


def _root_without_v1(path):
    """APIs that live at the server's root: a base URL ending in /v1 (the OpenAI habit) is tolerated."""
    return path[:-3] if path.endswith("/v1") else path


def decode_client_request(dialect, body, **kw):
    """A client's body -> neutral request through its dialect's codec. The codecs name the field
    they refuse; anything they did not foresee still becomes a 400 (never a 500) that says what."""
    try:
        return CODECS[dialect].decode_request(body, **kw)
    except ApiError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ApiError(400, "invalid_request", f"body: a field has an unexpected type or value "
                       f"({type(e).__name__}: {clean_text(e, 200)})") from None


def _carried(table, *more):
    """The OPTIONAL_FIELDS a provider dialect's request carries: its sampling table's, and more."""
    return {f for f, _target, _limit in table if f in OPTIONAL_FIELDS} | set(more)


#: The fields each client dialect's decoder translates (the rest is named in X-Router-Dropped
#: when the request is translated): top level, and the own fields of nested settings objects.
_ROUTING = {"models": None, "provider": None}
OPENAI_READS = dict.fromkeys((
    "model", "messages", "tools", "tool_choice", "parallel_tool_calls", "max_tokens",
    "max_completion_tokens", "temperature", "top_p", "stop", "stream", "stream_options",
    "reasoning_effort", "reasoning", "user", "response_format", "seed", "presence_penalty",
    "frequency_penalty", "n", "logprobs", "top_logprobs"), None) | _ROUTING
COMPLETIONS_READS = dict.fromkeys((
    "model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "stop", "stream",
    "stream_options", "user", "seed", "presence_penalty", "frequency_penalty", "logprobs", "echo",
    "n", "best_of"), None) | _ROUTING
ANTHROPIC_READS = dict.fromkeys((
    "model", "messages", "system", "tools", "tool_choice", "max_tokens", "temperature", "top_p",
    "top_k", "stop_sequences", "stream", "thinking", "metadata", "output_format"), None) \
    | _ROUTING | {"output_config": {"format", "effort"}}
RESPONSES_READS = dict.fromkeys((
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
    "max_output_tokens", "temperature", "top_p", "stream", "reasoning", "user", "store",
    "previous_response_id", "include", "top_logprobs"), None) | _ROUTING | {"text": {"format"}}
GEMINI_READS = dict(dict.fromkeys(("contents", "systemInstruction", "tools", "toolConfig", "model",
                                   "generateContentRequest"), None),
                    generationConfig={"candidateCount", "maxOutputTokens", "responseJsonSchema",
                                      "responseMimeType", "responseSchema", "stopSequences",
                                      "temperature", "thinkingConfig", "topK", "topP", "seed",
                                      "presencePenalty", "frequencyPenalty", "responseLogprobs",
                                      "logprobs"})
OLLAMA_READS = dict(dict.fromkeys(("model", "messages", "prompt", "system", "images", "tools",
                                   "stream", "think", "format", "logprobs", "top_logprobs",
                                   "suffix", "raw"), None),
                    options={"num_predict", "stop", "temperature", "top_k", "top_p", "seed",
                             "presence_penalty", "frequency_penalty", "num_ctx"})

CODECS = {
    "openai": Codec(
        "openai", decode_request=openai_decode_request, encode_response=openai_encode_response,
        stream_encoder=openai_stream_encoder, encode_error=openai_encode_error,
        passthrough=OpenAIPassthrough, list_shape=openai_list_shape, model_shape=openai_model_shape,
        encode_request=openai_encode_request, decode_response=openai_decode_response,
        stream_decoder=OpenAIStreamDecoder, parse_error=openai_parse_error,
        request_path=lambda prov, mid, stream, req, same: prov.base_path + (
            "/completions" if req.get("completion") else "/chat/completions"),
        auth=openai_auth, adjust=openai_adjust, list_models=openai_list_models,
        probe_path="/models",
        client_paths={"/v1/chat/completions": "generate", "/v1/completions": "complete",
                      "/v1/embeddings": "embed"},
        completes=True,
        embed_decode=openai_embed_decode, embed_encode=openai_embed_encode,
        embed_path=lambda prov, mid: prov.base_path + "/embeddings",
        embed_request=openai_embed_request, embed_response=openai_embed_response,
        embed_batch=512,
        structured=("json_object", "json_schema"), carries=_carried(OPENAI_SAMPLING, "parallel_tool_calls", "logprobs"),
        limit_headers=openai_limit_headers,
        unread=lambda body: unread_fields(body, COMPLETIONS_READS if "prompt" in body
                                          and "messages" not in body else OPENAI_READS),
        files=True),
    "anthropic": Codec(
        "anthropic", decode_request=anthropic_decode_request,
        encode_response=anthropic_encode_response,
        stream_encoder=AnthropicStreamEncoder, encode_error=anthropic_encode_error,
        list_shape=anthropic_list_shape, model_shape=anthropic_model_shape,
        encode_request=anthropic_encode_request, decode_response=anthropic_decode_response,
        stream_decoder=AnthropicStreamDecoder, parse_error=anthropic_parse_error,
        request_path=lambda prov, mid, stream, req, same: prov.base_path + "/v1/messages",
        auth=anthropic_auth, root=_root_without_v1, adjust=anthropic_adjust,
        list_models=anthropic_list_models, probe_path="/v1/models?limit=1",
        count_path=lambda prov, mid: prov.base_path + "/v1/messages/count_tokens",
        count_result=lambda obj: obj.get("input_tokens"), count_shape=lambda n: {"input_tokens": n},
        client_paths={"/v1/messages": "generate", "/v1/messages/count_tokens": "count_tokens"},
        limit_headers=anthropic_limit_headers,
        structured=("json_schema",), carries=_carried(ANTHROPIC_SAMPLING, "parallel_tool_calls"),
        unread=lambda body: unread_fields(body, ANTHROPIC_READS), files=True,
        spelling={"stop": "stop_sequences", "parallel_tool_calls": "tool_choice.disable_parallel_tool_use"}),
    "openai-responses": Codec(
        "openai-responses", decode_request=responses_decode_request,
        encode_response=responses_encode_response,
        stream_encoder=ResponsesStreamEncoder, encode_error=openai_encode_error,
        passthrough=ResponsesPassthrough,
        list_shape=openai_list_shape, model_shape=openai_model_shape,
        encode_request=responses_encode_request, decode_response=responses_decode_response,
        stream_decoder=ResponsesStreamDecoder, parse_error=openai_parse_error,
        request_path=lambda prov, mid, stream, req, same: prov.base_path + "/responses",
        auth=openai_auth, list_models=responses_list_models, probe_path="/models",
        client_paths={"/v1/responses": "generate"}, structured=("json_object", "json_schema"),
        limit_headers=openai_limit_headers,
        carries=_carried(RESPONSES_SAMPLING, "parallel_tool_calls", "logprobs"),
        unread=_responses_unread, files=True,
        spelling={"logprobs": "include." + RESPONSES_LOGPROBS}),
    "gemini": Codec(
        "gemini", decode_request=gemini_decode_request, encode_response=gemini_encode_response,
        stream_encoder=GeminiStreamEncoder, encode_error=gemini_encode_error,
        list_shape=gemini_list_shape, model_shape=gemini_model_shape,
        encode_request=gemini_encode_request, decode_response=gemini_decode_response,
        stream_decoder=GeminiStreamDecoder, parse_error=gemini_parse_error,
        request_path=lambda prov, mid, stream, req, same: _gemini_model_path(prov, mid) + (
            ":streamGenerateContent?alt=sse" if stream else ":generateContent"),
        auth=gemini_auth, adjust=gemini_adjust, list_models=gemini_list_models,
        probe_path="/models?pageSize=1",
        count_path=lambda prov, mid: _gemini_model_path(prov, mid) + ":countTokens",
        count_result=lambda obj: obj.get("totalTokens"), count_shape=lambda n: {"totalTokens": n},
        embed_decode=gemini_embed_decode, embed_encode=gemini_embed_encode,
        embed_path=lambda prov, mid: _gemini_model_path(prov, mid) + ":batchEmbedContents",
        embed_request=gemini_embed_request, embed_response=gemini_embed_response,
        embed_batch=100,
        structured=("json_object", "json_schema"), carries=_carried(GEMINI_SAMPLING, "logprobs"),
        unread=lambda body: unread_fields(body, GEMINI_READS, _gkeys), files=True,
        spelling={"top_k": "generationConfig.topK", "stop": "generationConfig.stopSequences",
                  "seed": "generationConfig.seed", "presence_penalty": "generationConfig.presencePenalty",
                  "frequency_penalty": "generationConfig.frequencyPenalty",
                  "logprobs": "generationConfig.responseLogprobs"}),
    "ollama": Codec(
        "ollama", decode_request=ollama_decode_request, encode_response=ollama_encode_response,
        stream_encoder=OllamaStreamEncoder, encode_error=ollama_encode_error,
        stream_type="application/x-ndjson", boundary=_ndjson_boundary,
        list_shape=ollama_list_shape, model_shape=ollama_model_shape,
        encode_request=ollama_encode_request, decode_response=ollama_decode_response,
        stream_decoder=OllamaStreamDecoder, parse_error=ollama_parse_error,
        request_path=lambda prov, mid, stream, req, same: prov.base_path + (
            "/api/generate" if req.get("completion") or same and req["extra"].get("ollama_generate")
            else "/api/chat"), completes=True,
        auth=None, root=_root_without_v1, adjust=ollama_adjust, list_models=ollama_list_models,
        probe_path="/api/tags", free=True,
        client_paths={"/api/chat": "generate", "/api/generate": "generate", "/api/show": "show",
                      "/api/embed": "embed", "/api/embeddings": "embed"},
        embed_decode=ollama_embed_decode, embed_encode=ollama_embed_encode,
        embed_path=lambda prov, mid: prov.base_path + "/api/embed",
        embed_request=ollama_embed_request, embed_response=ollama_embed_response,
        embed_batch=256,
        structured=("json_object", "json_schema"), carries=_carried(OLLAMA_SAMPLING, "logprobs"),
        unread=lambda body: unread_fields(body, OLLAMA_READS),
        spelling={f: "options." + f for f in ("top_k", "stop", "seed", "presence_penalty",
                                               "frequency_penalty")}),
}


# =================================================================================================
# 3. Catalogue
# =================================================================================================

_TRUE = ("1", "true", "yes", "on")


class Provider:
    """One configured provider: where it is, how to authenticate, which models it serves."""

    def __init__(self, name, cfg, env, settings):
        self.name = name
        self.api = cfg["api"]
        self.enabled = True
        self.disabled_reason = None
        self.keys = []
        self.key_vars = []
        self.headers = {}
        self.models = {}
        models = cfg.get("models") or {}
        for mid in models:
            self.models[mid] = dict(models[mid]) if isinstance(models, dict) else {}
        try:
            enabled, used = cfg.get("enabled", True), []
            if isinstance(enabled, str):
                enabled = expand_vars(enabled, env, used).strip().lower() in _TRUE
            if not enabled:
                self._disable("turned off" + (f" (set {used[0]}=1 to turn it on)" if used else
                                              " (\"enabled\": false in the config)"))
            self.base_url = expand_vars(cfg["base_url"], env).rstrip("/")
            for h, v in (cfg.get("headers") or {}).items():
                self.headers[h] = expand_vars(str(v), env)
        except MissingVar as e:
            self.base_url = cfg["base_url"]
            self._disable(f"{e.args[0]} is not set")
        self.keyless = cfg.get("api_key") is None
        if not self.keyless:
            self._collect_keys(cfg["api_key"], env)
            if not self.keys:
                want = self.key_vars[0] if self.key_vars else f"{self.env_prefix}_API_KEY"
                self._disable(f"no API key (set {want} in the environment or .env)")
        url = urllib.parse.urlsplit(self.base_url)
        # what /health and the log may show: the configured ${VAR} template (a URL built from
        # variables may hold a secret), else the URL without user info or query
        self.base_url_shown = shown_url(cfg["base_url"] if "${" in str(cfg["base_url"])
                                        else self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError("providers.json", f"providers.{name}.base_url",
                              f"an http:// or https:// URL (got {self.base_url_shown!r}"
                              + (", from variables" if "${" in str(cfg["base_url"]) else "") + ")")
        self.scheme, self.host = url.scheme, url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.base_path = CODECS[self.api].root(url.path.rstrip("/"))
        self.memo = {}         # per-provider protocol state (Gemini thought signatures by call id)
        self.verify_tls = cfg.get("verify_tls", settings["verify_tls"])
        self.ca_file = cfg.get("ca_file")
        self.connect_timeout = cfg.get("connect_timeout", settings["connect_timeout"])
        self.first_byte_timeout = cfg.get("first_byte_timeout", settings["first_byte_timeout"])
        self.idle_timeout = cfg.get("idle_timeout", settings["idle_timeout"])
        quirks = set(cfg.get("quirks") or ()) | set(HOST_QUIRKS.get(self.host, ()))
        if cfg.get("max_tokens_field") == "max_completion_tokens":
            quirks.add("max_completion_tokens")
        self.quirks = frozenset(quirks)
        self.discover = cfg.get("discover", True)
        self.discover_interval = cfg.get("discover_interval", settings["discovery_interval"])
        self.anthropic_version = cfg.get("anthropic_version", "2023-06-01")
        self._ssl_context = None
        #: What a reload compares: a changed entry or key resets the provider's breakers.
        self.fingerprint = hashlib.sha256(dumps([cfg, self.keys,
                                                 self.base_url, self.headers]).encode()).hexdigest()

    @property
    def ssl_context(self):
        """Made on first use: loading the system CA store costs memory that disabled and plain-HTTP
        providers should not pay. TLS is verified unless verify_tls is false."""
        if self._ssl_context is None:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            if not self.verify_tls:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl_context = ctx
        return self._ssl_context

    @property
    def env_prefix(self):
        return re.sub(r"[^A-Z0-9]", "_", self.name.upper())

    def _disable(self, reason):
        if self.enabled:
            self.enabled, self.disabled_reason = False, reason

    def _collect_keys(self, raw, env):
        """Keys from api_key (a string or list, ${VAR}-expanded) plus key-pool variables:
        NAME_API_KEYS=k1,k2 for the provider, and VAR_KEYS / VARS for each VAR referenced."""
        used = []
        for item in raw if isinstance(raw, list) else [raw]:
            try:
                val = expand_vars(item, env, used)
            except MissingVar:
                continue
            self.keys += [k.strip() for k in val.split(",") if k.strip()]
        self.key_vars = used
        pools = [f"{self.env_prefix}_API_KEYS"] + [v + "S" for v in used if v.endswith("_KEY")]
        for var in pools:
            self.keys += [k.strip() for k in env.get(var, "").split(",") if k.strip()]
        self.keys = list(dict.fromkeys(clean_key(k, f"provider {self.name}: a key (from "
                                                    f"{', '.join(self.key_vars) or 'api_key'})")
                                        for k in self.keys))

    def auth_headers(self, key, path="", data=b""):
        """The headers of a call to this provider: the dialect's auth for `key` (it sees the path and
        the bytes to be sent, for schemes that sign them) and the configured extra headers."""
        h = {"Content-Type": "application/json", "User-Agent": f"sage-router/{__version__}"}
        h.update(CODECS[self.api].auth(self, key, path, data))
        h.update(self.headers)
        return h

    def public(self):
        """What /health may show: never a key."""
        return {"name": self.name, "api": self.api, "base_url": self.base_url_shown,
                "enabled": self.enabled, "disabled_reason": self.disabled_reason}


#: Capabilities by model name, for models without explicit metadata (explicit metadata in
#: providers.json always wins). The first rule that sets a field wins; unset fields keep the
#: defaults below. context_window/max_output None means "unknown": never used to skip a model.
MODEL_RULES = [
    (EMBEDDING_RE.pattern, {"embedding": True, "chat": False, "tools": False}),
    (r"embed|rerank|whisper|tts|dall-e|gpt-image|moderation", {"tools": False, "chat": False}),
    (r"claude-opus-4-[01]\b|claude-opus-4$|claude-opus-4-2025", {"max_output": 32000}),
    # Anthropic's output_config.format: the 4.5 models and later; older Claude: the forced tool
    (r"claude-(?:opus|sonnet|haiku)-(?:4-[5-9]|4\.[5-9]|[5-9])", {"structured": "native"}),
    (r"claude", {"structured": "tool"}),
    (r"claude-(?:opus|sonnet|haiku)-[4-9]|claude-[4-9]|claude-3-7",
     {"context_window": 200000, "max_output": 64000, "input": ["text", "image", "pdf"],
      "reasoning": True}),
    (r"claude", {"context_window": 200000, "max_output": 8192, "input": ["text", "image", "pdf"]}),
    (r"gpt-5", {"context_window": 400000, "max_output": 128000, "input": ["text", "image", "pdf"],
                "reasoning": True}),
    (r"gpt-4\.1", {"context_window": 1047576, "max_output": 32768, "input": ["text", "image", "pdf"]}),
    (r"gpt-4o|chatgpt-4o",
     {"context_window": 128000, "max_output": 16384, "input": ["text", "image", "pdf"]}),
    (r"(?:^|/)o[1-9](?:-|$)",
     {"context_window": 200000, "max_output": 100000, "input": ["text", "image", "pdf"],
                              "reasoning": True}),
    (r"gemini-(?:1|2)", {"structured_tools": False}),
    # fill-in-the-middle: the templates of the code model families; chat-only families
    (r"qwen[-.\d]*-?coder|qwen2\.5-coder|qwen3-coder", {"fim": "qwen"}),
    (r"codellama|code-llama", {"fim": "codellama"}),
    (r"starcoder|santacoder|stable-?code", {"fim": "starcoder"}),
    (r"deepseek-coder", {"fim": "deepseek"}),
    (r"codegemma", {"fim": "codegemma"}),
    (r"gpt-(?:4|5)|chatgpt|(?:^|/)o[1-9](?:-|$)|claude|gemini|grok", {"completions": "chat"}),
    (r"gemini-(?:2\.5|[3-9])",
     {"context_window": 1048576, "max_output": 65536, "input": ["text", "image", "pdf"],
                                "reasoning": True}),
    (r"gemini", {"context_window": 1048576, "max_output": 8192, "input": ["text", "image", "pdf"]}),
    (r"deepseek-r1|[-/]r1(?:[-:]|$)|qwq|reason|thinking", {"reasoning": True, "tools": False}),
    (r"deepseek", {"context_window": 131072, "max_output": 8192}),
    (r"vision|[-_]vl\b|vl[-_:]|llava|pixtral|gemma-?3|minicpm-v|moondream|llama-?4|mistral-small-3",
     {"input": ["text", "image"]}),
    (r"llama-?3\.[1-3]|llama3\.[1-3]|llama-?4|nemotron", {"context_window": 131072}),
    (r"qwen-?3|qwen3", {"context_window": 40960, "reasoning": True}),
    (r"qwen", {"context_window": 32768}),
    (r"mistral|mixtral|ministral|codestral|devstral", {"context_window": 32768}),
    (r"gemma-?2|gemma:|gemma$|phi-?[1-3]|tinyllama", {"context_window": 8192, "tools": False}),
]
_MODEL_RULES = [(re.compile(p, re.I), caps) for p, caps in MODEL_RULES]
CAPABILITY_DEFAULTS = {"context_window": None, "max_output": None, "input": ["text"], "tools": True,
                       "reasoning": False, "chat": True, "structured": "native"}


INTENT_NAMES = ("code", "creative", "reasoning", "general")
_CODE_MODEL_RE = re.compile(r"coder|codestral|devstral|starcoder|codegemma|codellama|code-|-code|"
                            r"codex|claude|gpt-4\.1|gpt-5", re.I)


def infer_capabilities(model_id, explicit=None):
    """Model metadata: explicit keys first, then name rules, then defaults; plus the intents the
    model suits (every chat model suits general; code models and the strong generalists code;
    reasoning models reasoning; generalists that are not code-only models creative)."""
    caps = dict(explicit or {})
    for rx, rule in _MODEL_RULES:
        if rx.search(model_id):
            for k, v in rule.items():
                caps.setdefault(k, v)
    for k, v in CAPABILITY_DEFAULTS.items():
        caps.setdefault(k, v)
    if "intents" not in caps:
        coder = bool(_CODE_MODEL_RE.search(model_id))
        only_code = coder and re.search(r"coder|codestral|devstral|starcoder|codegemma|codellama",
                                        model_id, re.I)
        caps["intents"] = (["general"] + (["code"] if coder else [])
                           + (["reasoning"] if caps["reasoning"] else [])
                           + ([] if only_code else ["creative"]))
    return caps


def version_key(model_id):
    """Sort key for "newest version first": the version numbers in the name, then a date stamp
    (claude-sonnet-4-5-20250929 > claude-sonnet-4-20250514; llama3.2 > llama3.1)."""
    nums = [int(n) for n in re.findall(r"\d+", model_id)]
    dates = [n for n in nums if n > 19000000]
    return (tuple(n for n in nums if n <= 19000000), max(dates) if dates else 0)


class Catalogue:
    """Providers, their models with capabilities, routes (globs expanded), aliases. Built once per
    (re)load; read-only afterwards, so requests read it without a lock."""

    def __init__(self, cfg, env, source="providers.json", discovered=None):
        self.source = source
        self.settings = dict(DEFAULT_SETTINGS, **cfg.get("settings", {}))
        self.providers = {}
        for name, pcfg in cfg.get("providers", {}).items():
            try:
                self.providers[name] = Provider(name, pcfg, env, self.settings)
            except ConfigError as e:
                raise ConfigError(source, e.key, e.expected)
        for pname, models in (discovered or {}).items():   # explicit metadata wins over discovered
            prov = self.providers.get(pname)
            if prov is not None:
                for mid, meta in models.items():
                    prov.models[mid] = dict(meta, **prov.models.get(mid, {}))
        for entries in cfg.get("routes", {}).values():   # exact route entries name models too
            for entry in route_entries(entries):
                pname, mid = entry.split("/", 1)
                if pname in self.providers and not _is_glob(mid):
                    self.providers[pname].models.setdefault(mid, {})
        self.caps = {}
        self.bare = {}
        for prov in self.enabled:
            for mid, meta in prov.models.items():
                self.caps[(prov.name, mid)] = infer_capabilities(mid, meta)
                self.bare.setdefault(mid, []).append((prov.name, mid))
        self.routes = {name: self.expand(route_entries(entries), name)
                       for name, entries in cfg.get("routes", {}).items()}
        # embeddings routes whose candidates may be different models (vectors that do not mix)
        self.mix_models = {name for name, entries in cfg.get("routes", {}).items()
                           if isinstance(entries, dict) and entries.get("mix_models")}
        self.aliases = list(cfg.get("aliases", {}).items())
        self.strict = cfg.get("strict", False)

    def expand(self, entries, route=None):
        """Route entries -> candidates: exact PROVIDER/MODEL, or globs over the catalogue that
        expand to the matching chat models, newest version first; in a route named after an intent,
        the models that suit it come first. Disabled providers are left out."""
        out = []
        for entry in entries:
            pname, mid = entry.split("/", 1)
            if not _is_glob(entry):
                if (pname, mid) in self.caps:
                    out.append((pname, mid))
                continue
            # (chat models, and embedding models for an embeddings route's globs)
            hits = [c for c, caps in self.caps.items()
                    if (caps.get("chat", True) or caps.get("embedding")) and
                    fnmatch.fnmatchcase(f"{c[0]}/{c[1]}".lower(), entry.lower())]
            hits.sort(key=lambda c: version_key(c[1]), reverse=True)
            if route in INTENT_NAMES:
                hits.sort(key=lambda c: route not in self.caps[c]["intents"])
            out += hits
        return list(dict.fromkeys(out))

    def known(self, name):
        """Whether a model name resolves without aliases: a route, auto, a bare id, or a model
        a provider lists."""
        if name in self.routes or name in AUTO_NAMES or name in self.bare:
            return True
        pname, _, mid = name.partition("/")
        return pname in self.providers and mid in self.providers[pname].models

    @property
    def enabled(self):
        return [p for p in self.providers.values() if p.enabled]

    def meta(self, pname, mid):
        """Capabilities of a model; a model the provider does not list gets name-based ones."""
        caps = self.caps.get((pname, mid))
        return caps if caps is not None else infer_capabilities(mid)

    def closest(self, name, n=3):
        """The known model names most like `name` (for a 404 that helps with a typo)."""
        names = self.model_names()
        low = {x.lower(): x for x in names}
        return [low[x] for x in difflib.get_close_matches(name.lower(), list(low), n=n, cutoff=0.0)]

    def alias(self, model):
        """The alias target for an unknown model name, else None."""
        low = model.lower()
        for pat, target in self.aliases:
            if fnmatch.fnmatchcase(low, pat.lower()):
                return target
        return None

    def listing(self):
        """The served model list: [(name, owner, metadata)] for every route (its first candidate's
        metadata, with "route"), every PROVIDER/MODEL, and every bare id (one that several
        providers have carries "shared": their names; most shapes leave those out)."""
        entries = [self.entry(name) for name, cands in self.routes.items() if cands]
        for p in self.enabled:
            entries += [(f"{p.name}/{mid}", p.name, self.meta(p.name, mid)) for mid in p.models]
        for mid, where in self.bare.items():
            if mid not in self.routes:
                meta = self.meta(*where[0])
                entries.append((mid, where[0][0], meta if len(where) == 1 else
                                dict(meta, shared=[p for p, _m in where])))
        return entries

    def entry(self, name):
        """One name a client may ask for, as a listing entry, or None."""
        if self.routes.get(name):
            cands = self.routes[name]
            return name, "sage-router", dict(self.meta(*cands[0]),
                                             route=[f"{p}/{m}" for p, m in cands])
        if "/" in name and tuple(name.split("/", 1)) in self.caps:
            return name, name.split("/", 1)[0], self.meta(*name.split("/", 1))
        if name in self.bare:
            return name, self.bare[name][0][0], self.meta(*self.bare[name][0])
        return None

    def model_names(self):
        """Every name a client may ask for: routes, provider/model, and bare ids."""
        names = [r for r, c in self.routes.items() if c]
        for p in self.enabled:
            names += [f"{p.name}/{m}" for m in p.models]
        names += [m for m in self.bare if m not in self.routes]
        return list(dict.fromkeys(names))


# -------------------------------------------------------------------------------- discovery --
#
# Each provider's own model list, fetched on the maintenance thread (never on a request's path
# except the rate-limited refresh for an unknown model name), merged into a new Catalogue.

DISCOVERY_TIMEOUT = 5.0
# per source, for the refresh a request with an unknown model triggers
REQUEST_DISCOVERY_TIMEOUT = 2.0
def _fetch_json(prov, path, method="GET", body=None, timeout=DISCOVERY_TIMEOUT,
                key_index=0, base=True):
    """One small JSON call to a provider's own API, on a short-lived connection (`path` is below
    the provider's base path unless base is False)."""
    if prov.scheme == "https":
        conn = http.client.HTTPSConnection(prov.host, prov.port, timeout=timeout,
                                           context=prov.ssl_context)
    else:
        conn = http.client.HTTPConnection(prov.host, prov.port, timeout=timeout)
    try:
        full = (prov.base_path if base else "") + path
        data = dumps(body).encode() if body is not None else None
        key = prov.keys[key_index] if prov.keys and key_index is not None else None
        headers = prov.auth_headers(key, full, data or b"")
        conn.request(method, full, data, headers)
        resp = conn.getresponse()
        data = resp.read(16 << 20)
        if resp.status != 200:
            raise DiscoveryError(f"HTTP {resp.status}: "
                                 f"{CODECS[prov.api].parse_error(resp.status, data)[0]}")
        return loads(data)
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise DiscoveryError(f"{type(e).__name__}: {e}") from None
    finally:
        conn.close()


def discover_models(prov, known=None, timeout=DISCOVERY_TIMEOUT):
    """The provider's current chat models -> {model_id: metadata}. `known` (the last list) saves
    Ollama's per-model /api/show calls for models already seen. Raises DiscoveryError."""
    out = CODECS[prov.api].list_models(
        lambda path, method="GET", body=None: _fetch_json(prov, path,
                                                          method, body, timeout), known or {})
    # what a client could not ask for either (a buggy or hostile list): never into headers or logs
    return {k: v for k, v in out.items()
            if isinstance(k, str) and k and len(k) <= MAX_MODEL_NAME and not _CONTROL_RE.search(k)}


PROBE_TIMEOUT = 10.0


def probe(prov, key_index, model=None, settings=None):
    """A cheap call with one key -> (ok, detail). Without a model: the provider's model list
    (is it up, does the key work?). With one: the smallest generation the dialect allows (a
    16-token reply to "ping"), for a model whose failures the list cannot tell apart."""
    if model is None:
        try:
            data = _fetch_json(prov, CODECS[prov.api].probe_path, key_index=key_index)
        except DiscoveryError as e:
            return False, str(e)[:120]
        n = len(data.get("data") or data.get("models") or []) if isinstance(data, dict) else 0
        return True, f"ok ({n} model{'s' if n != 1 else ''} listed)" if n else "ok"
    try:
        complete(prov, model, key_index, None, "ping", 16, settings, PROBE_TIMEOUT)
    except DiscoveryError as e:
        return False, str(e)[:120]
    return True, "ok (answered a 16-token probe)"


def complete(prov, model, key_index, system, text, max_tokens, settings, timeout):
    """One small whole (not streamed) generation in the provider's own dialect, on a short-lived
    connection with an overall timeout: for probes and the intent model. -> the reply's text.
    Raises DiscoveryError."""
    pc = CODECS[prov.api]
    body = {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens}
    if system:
        body["messages"].insert(0, {"role": "system", "content": system})
    req = openai_decode_request(body)
    payload = pc.encode_request(req, model, prov, infer_capabilities(model, prov.models.get(model)),
                                settings or DEFAULT_SETTINGS)
    obj = _fetch_json(prov, pc.request_path(prov, model, False, req, False), "POST", payload, timeout,
                      key_index, base=False)
    try:
        return text_of(pc.decode_response(obj, prov)["content"])
    except (KeyError, TypeError, ValueError, AttributeError, ApiError) as e:
        raise DiscoveryError(f"unreadable reply ({type(e).__name__})") from None


class Discovery:
    """What each provider's own list said, kept between refreshes (one lock; fetching is done
    outside it). A model leaves after it was missing from two successful refreshes in a row; a
    source that fails keeps its last good list and is retried after 5 s, 10 s, 20 s ... up to its
    normal interval."""

    def __init__(self):
        self.lock = threading.Lock()
        self.models = {}      # provider -> {model: meta}
        self.missing = {}     # provider -> {model: refreshes missed in a row}
        self.state = {}       # provider -> {"fails", "next", "error", "ok"}

    def due(self, prov, now, interval):
        st = self.state.get(prov.name)
        return st is None or now >= st["next"]

    def refresh(self, prov, interval, timeout=DISCOVERY_TIMEOUT):
        """Fetch one provider's list; True when the catalogue changed."""
        with self.lock:
            known = dict(self.models.get(prov.name, {}))
        st = self.state.setdefault(prov.name, {"fails": 0, "next": 0.0, "error": None, "ok": None})
        try:
            got = discover_models(prov, known, timeout)
        except DiscoveryError as e:
            st["fails"] += 1
            st["error"] = str(e)[:300]
            # 5 s, 10 s, ...
            st["next"] = time.monotonic() + min(interval, 5.0 * 2 ** min(st["fails"] - 1, 10))
            if st["fails"] == 1:
                log.warning("discovery: %s: %s (keeping its last list; retrying with backoff)",
                            prov.name, st["error"])
            return False
        st.update(fails=0, error=None, ok=time.time(), next=time.monotonic() + interval)
        with self.lock:
            current = self.models.setdefault(prov.name, {})
            missing = self.missing.setdefault(prov.name, {})
            changed = False
            for mid, meta in got.items():
                missing.pop(mid, None)
                if current.get(mid) != meta:
                    current[mid] = meta
                    changed = True
            for mid in [m for m in current if m not in got]:
                missing[mid] = missing.get(mid, 0) + 1
                if missing[mid] >= 2:
                    del current[mid]
                    del missing[mid]
                    changed = True
        return changed

    def snapshot(self):
        with self.lock:
            return {p: dict(m) for p, m in self.models.items()}

    def report(self):
        return {p: {"models": len(self.models.get(p, {})), "last_ok": st["ok"],
                    "error": st["error"]}
                for p, st in self.state.items()}


def _json5_to_json(text):
    """Just enough JSON5 for OpenClaw's config: comments, unquoted keys, single-quoted strings,
    trailing commas."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            buf = []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    buf.append(text[j:j + 2])
                    j += 2
                    continue
                buf.append('\\"' if text[j] == '"' else text[j])
                j += 1
            body = "".join(buf)
            if c == "'":
                body = body.replace("\\'", "'")
            out.append('"' + body + '"')
            i = j + 1
        elif text.startswith("//", i):
            i = text.find("\n", i) if text.find("\n", i) >= 0 else n
        elif text.startswith("/*", i):
            i = text.find("*/", i) + 2 if text.find("*/", i) >= 0 else n
        else:
            m = re.match(r"[A-Za-z_$][\w$]*(?=\s*:)", text[i:])
            if m and (not out or out[-1].rstrip()[-1:] in "{,"):
                out.append('"' + m.group(0) + '"')
                i += m.end()
            else:
                out.append(c)
                i += 1
    return re.sub(r",(\s*[}\]])", r"\1", "".join(out))


OPENCLAW_APIS = {"openai-completions": "openai", "openai-responses": "openai-responses",
                 "anthropic-messages": "anthropic",
                 "google-generative-ai": "gemini", "ollama": "ollama"}


def openclaw_providers(path, env):
    """Providers and models configured in OpenClaw (`models.providers` of ~/.openclaw/openclaw.json),
    as provider entries of ours named `openclaw-NAME`. Keys as OpenClaw resolves them: the
    entry's apiKey (with ${VAR} from the environment), else NAME_API_KEY."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.loads(_json5_to_json(f.read()))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("openclaw: cannot read %s (%s); its providers are not imported", path, e)
        return {}
    out = {}
    for name, p in ((cfg.get("models") or {}).get("providers") or {}).items():
        api = OPENCLAW_APIS.get(p.get("api", "openai-completions")) if isinstance(p, dict) else None
        if api is None or not isinstance(p.get("baseUrl"), str):
            continue
        key = p.get("apiKey")
        var = re.sub(r"[^A-Z0-9]", "_", name.upper()) + "_API_KEY"
        if not (isinstance(key, str) and key):
            key = "${" + var + "}" if var in env else None     # no key: a local server
        models = {}
        for m in p.get("models") or []:
            if not isinstance(m, dict) or not isinstance(m.get("id"), str):
                continue
            cost = m.get("cost") if isinstance(m.get("cost"), dict) else {}
            models[m["id"]] = _clean({
                "context_window": (m.get("contextWindow")
                                   if isinstance(m.get("contextWindow"), int) else None),
                "max_output": m.get("maxTokens") if isinstance(m.get("maxTokens"), int) else None,
                "input": [x for x in m.get("input") or [] if x in ("text", "image", "pdf")] or None,
                "reasoning": m.get("reasoning") if isinstance(m.get("reasoning"), bool) else None,
                "cost": _clean({"input": cost.get("input"), "output": cost.get("output"),
                                "cached": cost.get("cacheRead"),
                                "cache_write": cost.get("cacheWrite")}) or None})
        entry = {"api": api, "base_url": p["baseUrl"], "models": models, "api_key": key,
                 "description": f"imported from {path}"}
        if isinstance(p.get("headers"), dict):
            entry["headers"] = {k: str(v) for k, v in p["headers"].items()}
        out["openclaw-" + re.sub(r"[^A-Za-z0-9_.-]", "-", name)] = entry
    return out


def with_imports(cfg, env):
    """The config plus the providers of the user's OpenClaw config (when import_openclaw)."""
    if not dict(DEFAULT_SETTINGS, **cfg.get("settings", {}))["import_openclaw"]:
        return cfg
    path = env.get("OPENCLAW_CONFIG_PATH") or os.path.join(env.get("HOME") or os.path.expanduser("~"),
                                                            ".openclaw", "openclaw.json")
    path = os.path.expanduser(path)
    extra = {}
    for name, entry in openclaw_providers(path, env).items():
        if name in cfg.get("providers", {}):
            continue
        try:
            validate_config({"providers": {name: entry}}, path)
            Provider(name, entry, env, DEFAULT_SETTINGS)
        except ConfigError as e:
            log.warning("openclaw: skipping provider %s from %s: %s: expected %s", name,
                        path, e.key, e.expected)
            continue
        extra[name] = entry
    if not extra:
        return cfg
    log.info("openclaw: imported %d provider(s) from %s: %s", len(extra), path, ", ".join(extra))
    return dict(cfg, providers={**cfg.get("providers", {}), **extra})


NO_PROVIDER_HELP = ("No provider is configured yet. Put a key in .env beside router.py "
                    "(for example OPENAI_API_KEY=sk-... or ANTHROPIC_API_KEY=sk-ant-...), "
                    "or add a provider to providers.json; the router picks the change up "
                    "by itself within a second.")


# =================================================================================================
# 4. Routing
# =================================================================================================

# ------------------------------------------------------------------------------ intent rules --
#
# Intent detection weighs cues; it does not just match them. Every cue below is data: a name, the
# intent it speaks for, a weight, a cap, and what it matches. A cue's score in one text is its
# weight times the number of its distinct hits, at most `cap` hits (so "docker compose nginx"
# counts more than "docker", and no list can swamp the others). Negative weights take back what
# a word seemed to say ("area code", "the story behind"). A request's score per intent is the
# sum over its turns: the latest user turn counts 1, the one before 0.4, the one before that
# 0.16, and the assistant's last reply 0.25 (a follow-up such as "now add tests" leans on what
# came before). General starts at 1: another intent must say more than that to win. The
# confidence is the margin between the two best scores relative to the best (0..1); with no cue
# at all the answer is general with confidence 0, and below UNSURE_BELOW it is "unsure".
#
# System prompts and tool schemas are never read, but the tools a request offers are a signal
# (a coding agent's Bash/Edit/Read/Write/apply_patch tools mean code). Each text is read within
# a bounded window (the first 800 and last 400 characters of the latest turn, the first 300 of
# earlier ones), so a 50 KB conversation costs a fraction of a millisecond.
#
# Words match whole tokens (lower case; a word inside another word is no match); phrases match
# whole-token sequences; patterns are regular expressions on the lower-cased text (with a
# newline in front, so "\n" also matches the start).

#: name -> (intent, weight, cap, words, phrases)
INTENT_CUES = {
    # --- code ------------------------------------------------------------------------------------
    "code_language": ("code", 2.5, 2,
        "js ts python python3 javascript typescript java kotlin swift ruby php perl lua dart "
        "scala haskell elixir erlang clojure golang rust c++ c# f# fortran cobol matlab julia "
        "bash zsh powershell sql html css scss sass yaml toml xml graphql regex regexp vba "
        "vbscript jsx tsx wasm solidity groovy nim zig ocaml lisp racket arduino verilog vhdl "
        "assembly asm latex markdown",
        "node.js|node js|c sharp|objective-c|shell script|bash script|apps script|google apps "
        "script|visual basic"),
    "code_tool": ("code", 2.5, 3,
        "axios httpclient mysqldump innodb ggplot resample alembic workmanager discord.py "
        "firewalld dkim dmarc flexbox sverweis xverweis wverweis vergleich summewenn zählenwenn "
        "buscarv buscarx sumar.si contar.si recherchev recherchex somme.si nb.si procv procx "
        "somase cont.se uuid uuids webpack tsconfig eslintrc nginx.conf htaccess mod_rewrite "
        "wordpress woocommerce shopify-cli jinja jinja2 handlebars flutter swiftui jetpack "
        "android-studio iptables ufw nftables certbot letsencrypt dax bigquery snowflake redshift "
        "athena cloudformation cdk pulumi route53 gsutil rclone restic fstab nfs samba ldap "
        "powerquery tableau looker dplyr ggplot2 tidyverse rstudio shiny plotly streamlit gradio "
        "huggingface openai langchain pydantic celery gunicorn uvicorn wsgi asgi nodemon pm2 "
        "supervisor netplan openssl wireguard openvpn nmap tcpdump wireshark bind9 dnsmasq pihole "
        "proxmox esxi vmware virtualbox qemu podman buildah skaffold istio envoy prometheus "
        "grafana loki kibana logstash datadog sentry laravel's django's npm's chatgpt-api "
        "xcodebuild cocoapods gradlew apk ipa electron tauri groupby dataframe dataframes git "
        "github gitlab bitbucket docker dockerfile kubernetes k8s kubectl helm minikube kustomize "
        "terraform ansible vagrant nginx apache2 caddy haproxy traefik systemd systemctl "
        "journalctl cron crontab ssh scp sftp rsync curl wget jq sed awk gawk grep egrep ripgrep "
        "xargs chmod chown sudo tmux vim neovim emacs vscode intellij pycharm xcode homebrew brew "
        "wsl npm npx pnpm pip pip3 pipx conda venv virtualenv poetry rustc maven gradle cmake "
        "makefile gcc g++ clang llvm gdb valgrind jvm dotnet nuget composer bundler rubygems "
        "webpack vite babel eslint prettier tsc jest mocha vitest pytest junit rspec selenium "
        "playwright cypress postman react reactjs vue vuejs angular svelte sveltekit nextjs nuxt "
        "django flask fastapi rails laravel symfony spring springboot express nestjs deno jquery "
        "bootstrap tailwind redux numpy pandas matplotlib seaborn scipy sklearn scikit tensorflow "
        "pytorch keras jupyter notebook ipython sqlalchemy hibernate prisma sequelize mongoose "
        "lodash rxjs asyncio aiohttp httpx beautifulsoup scrapy boto3 postgres postgresql psql "
        "mysql mariadb sqlite mongodb redis elasticsearch kafka rabbitmq dynamodb graphql grpc "
        "protobuf kubeadm argocd jenkins circleci openshift heroku vercel netlify firebase "
        "supabase cloudflare lambda ec2 s3 iam gcloud aws azure linux ubuntu debian centos fedora "
        "alpine macos powershell cmd.exe bashrc zshrc ffmpeg imagemagick pandoc opencv pyspark "
        "spark hadoop airflow dbt excel vlookup xlookup hlookup sumif sumifs countif countifs "
        "averageif averageifs iferror ifs arrayformula importrange importxml textjoin concatenate "
        "xmatch sumproduct datedif networkdays eomonth vba macro macros",
        "google sheets|pivot table|conditional formatting|power query|power bi|github actions|"
        "gitlab ci|docker compose|docker-compose|index match|index/match|visual studio|stack "
        "overflow|dns record|a record|cname record|mx record|txt record|firewall rule|security "
        "group|load balancer|api gateway|active directory|group policy|power automate|power apps|m "
        "code|ssl certificate|tls certificate|service worker|web worker|local storage|session "
        "storage|cron expression|crontab entry|virtual machine|reverse proxy|port forwarding|ssh "
        "key|ssh keys|private key|public key|git log|git push|git pull|git reset|git rebase|git "
        "merge|git stash|git clone|git commit"),
    "code_concept": ("code", 1.5, 3,
        "tuple tuples tupel liste memory-leak gc sidecar gitflow asterisk notepad++ blame upsert "
        "cookie cookies endian stateless locking monad monads runner runners coverage useeffect "
        "usestate usememo usecallback microtask microtasks macrotask idempotent idempotency "
        "hashing bcrypt argon2 salting gitignore array arrays dict dictionary hashmap hashtable "
        "struct structs enum enums interface interfaces inheritance polymorphism encapsulation "
        "recursion recursive closure closures callback callbacks promise promises async await "
        "coroutine coroutines thread threads threading multithreading mutex semaphore deadlock "
        "concurrency concurrent goroutine goroutines iterator iterators generator generators "
        "decorator decorators pointer pointers segfault exception exceptions runtime compile "
        "compiler compiling compiled interpreter syntax parser parsing serialize deserialize "
        "serialization api apis endpoint endpoints restful http https webhook webhooks websocket "
        "websockets oauth jwt cors csrf xss localhost database databases schema migration "
        "migrations orm repo repos repository commit commits rebase stash checkout refactor "
        "refactoring debug debugging debugger breakpoint stacktrace traceback codebase framework "
        "frameworks dependency dependencies import imports scripting program programs programming "
        "programmer algorithm algorithms boolean integer integers float floats string strings "
        "substring substrings bytes utf-8 utf8 unicode ascii base64 sha256 md5 hash backend "
        "frontend microservice microservices serverless memoization memoize cache caching null "
        "nullptr undefined nan typeerror valueerror keyerror indexerror attributeerror importerror "
        "syntaxerror referenceerror nullpointerexception modulenotfounderror oop stdin stdout "
        "stderr argv env cli css selector selectors dom props hook hooks middleware router routing "
        "query queries subquery join joins regex lookahead lookbehind linter linting unittest "
        "unittests mock mocks mocking fixture fixtures pipeline pipelines container containers pod "
        "pods namespace namespaces configmap ingress deployment deployments statefulset daemonset "
        "replicaset cronjob manifest manifests kubeconfig vm vms virtualenv docker-compose yml csv "
        "tsv xml utf-16 binary hex bitwise bitmask spreadsheet spreadsheets worksheet worksheets "
        "workbook cell cells compiler linker segmentation overflow underflow heap malloc "
        "typescript's null's sdk sdks cdn dns tls ssl https port ports socket sockets tcp udp ip "
        "regexes regexps server servers client-side server-side redeploy ",
        "unit test|unit tests|integration test|regular expression|data structure|linked list|"
        "binary search|binary tree|hash map|hash table|time complexity|space complexity|source "
        "code|stack trace|sql query|pull request|merge request|merge conflict|big o|race "
        "condition|event loop|garbage collection|type hint|type hints|error message|exit code|exit "
        "status|status code|command line|command-line|environment variable|environment variables|"
        "env var|env vars|config file|log file|cron job|file descriptor|permission denied|no such "
        "file or directory|command not found|not recognized as|is not defined|cannot read "
        "property|cannot find module|object-oriented|object oriented|design pattern|dependency "
        "injection|access token|refresh token|api key|rate limit|query string|http request|post "
        "request|get request|abstract class|base class|child class|data type|data types|lambda "
        "function|arrow function|for loop|while loop|if statement|else if|switch statement|try "
        "catch|try except|run the tests|the tests|failing tests|failing test|tests fail|tests "
        "pass|test suite|lance les tests|tests unitaires|roda os testes|ejecuta los tests|führe "
        "die tests|corrige ceux|fix what fails|expresión regular|expressão regular|expression "
        "régulière|regulärer ausdruck|memory leak|garbage collected|garbage collector|chat "
        "completion|token by token|streaming response|who changed|works on my machine|same "
        "environment|rows where|records where|group by|order by|inner join|left join|pattern that "
        "matches|pattern that catches|pattern to match|pattern for|regex for|in the terminal|no "
        "terminal|en la terminal|dans le terminal|im terminal|page refreshes|page reload|page "
        "reloads|the button|submit button|contact form|the form|logged in|log in form|double "
        "click|double-click|design patterns|code review|edge case|edge cases|test case|test cases|"
        "what does this do|what does this code|what does this line|what does this command|what "
        "does this regex|this code|my code|the code|this script|my script|this function|my "
        "function|this query|my query|this formula|my formula|this regex|my regex|the regex|my "
        "macro|this macro|the macro|the formula|the script|new branch|local branch|remote branch|"
        "main branch|the repo|my repo|this repo|column a|column b|column c|column d|column e|"
        "column f|cell a1|each column|every column|blank cells|empty cells|my loop|the loop|"
        "infinite loop|single threaded|single-threaded|head detached|detached head|whole suite|"
        "test passes|tests pass|cap theorem|the sheet|each sheet|every sheet|each worksheet|every "
        "worksheet|second column|third column|2nd column|3rd column|first column"),
    "code_intl": ("code", 2.0, 2,
        "rama ramas mergear commitear pushear hacer-merge código codigo programmieren "
        "programmation programación programação quellcode fehlermeldung bogue depurar débogage "
        "débogueur variablen variável variáveis objektorientiert orientée orientada orientado "
        "abstraite abstrakte schleife boucle bucle laço rekursion recursividad recursividade "
        "récursivité récursion datenbank requête abfrage skript befehl fórmula formule formel "
        "planilha zelle célula cellule spalte coluna columna verzeichnis diretório directorio",
        "base de datos|banco de dados|base de données|hoja de cálculo|feuille de calcul|"
        "línea de comandos|ligne de commande|linha de comando"),
    "code_ambiguous": ("code", 0.8, 3,
        "fonction funktion función função programme programa programm klasse banco consulta "
        "comando commande hoja feuille tabelle zeile colonne ordner dossiers function functions "
        "formula formulas script scripts txt fetch suite node sessions session connections secret "
        "secrets branch branches merge merging pull push origin upstream fork forks clone cloned "
        "cargo module modules yarn rollback rollout release releases version versions component "
        "components build builds deploy deploying variable variables certificate element elements "
        "attribute attributes json method methods index indexes process trigger cursor code coding "
        "coder bug bugs library libraries package packages class classes object objects table "
        "tables column columns row rows image images shell terminal console compile parse token "
        "tokens model models test tests testing install installed config configuration error "
        "errors crash crashes crashed log logs loop loops file files folder directory path output "
        "input print returns return value values list lists key keys type types macro template "
        "templates upload download api sheet sheets sort filter filtering timeout latency memory "
        "cpu processes service services request requests response app apps website webpage site "
        "frontend backend login password regex",
        ""),
    "not_code": ("code", -2.5, 2, "",
        "area code|dress code|zip code|postal code|post code|pin code|promo code|discount code|"
        "coupon code|código qr|code qr|qr-code|code of conduct|morse code|qr code|bar code|"
        "barcode|tax code|highway code|code word|da vinci code|function room|bed bug|bed bugs|"
        "stomach bug|bug bite|bug bites|bug spray|library card|public library|tv program|tv show|"
        "loyalty program|training program|exercise program|degree program|table manners|periodic "
        "table|dinner table|class action|yoga class|cooking class|ruby anniversary|ruby wedding|"
        "ball python|python snake|java coffee|rust stain|rust on|branch office|bank branch|tree "
        "branch|sales pipeline|pull up|push up|pull ups|push ups|push-ups|pull-ups|my password|"
        "forgot password|reset password|log in|login to|printer|wifi|wi-fi|router|phone|tire|tyre|"
        "garage door|smart lock|alarm"),

    # --- creative --------------------------------------------------------------------------------
    "creative_form": ("creative", 3.0, 2,
        "epigram epigrams décima espinela ghasel zine twist hashtag hashtags dactyl dactyls chant "
        "chants drabble drabbles microfiction micro-fiction memoir cordel quadra quadras cumbia "
        "fic fics pov tongue-twister tattoo shanty shanties whodunnit whodunit crossover "
        "commandments skit skits play monolog monólogo monologo satire satirical satírica satírico "
        "satirischer satirique parodia parodie spoof horóscopo horoscope horoscopes improv "
        "impression impressions imitation imitate imita imite narrating narrate narration "
        "commentator commentary zork textadventure poem poems poetry haiku haikus tanka sonnet "
        "sonnets limerick limericks villanelle sestina pantoum ghazal cinquain clerihew ode odes "
        "ballad ballads elegy acrostic couplet couplets quatrain quatrains verse verses stanza "
        "stanzas lyrics lyric song songs jingle jingles rap raps chorus story stories tale tales "
        "fable fables parable novel novella screenplay monologue soliloquy vignette fanfic "
        "fanfiction parody parodies skit joke jokes pun puns punchline one-liners riddle riddles "
        "slogan slogans tagline taglines motto mottos catchphrase headline headlines caption "
        "captions toast toasts eulogy roast blurb blurbs limmerick storyline screenplay teleplay "
        "sitcom anecdote bedtime fairytale dialogue rhyme rhymes rhyming alliteration",
        "short story|fairy tale|bedtime story|flash fiction|fan fiction|love letter|knock knock|"
        "opening line|opening lines|first line|first chapter|next chapter|plot twist|plot "
        "twists|ad copy|marketing copy|hero copy|product description|product descriptions|"
        "listing description|menu descriptions|menu description|description for our|description "
        "for my|amazon description|etsy listing|sound premium|more premium|wikipedia article "
        "about|opening chapter|subject line|subject lines|band name|team name|birthday card|"
        "greeting card|thank you card|thank-you card|get well|sympathy card|valentine's card|"
        "card message|wedding speech|best man|maid of honor|maid of honour|father of the bride|"
        "retirement speech|farewell speech|graduation speech|a speech|toast for|roast for|"
        "instagram caption|ig caption|ig captions|tiktok caption|radio ad|facebook ad|theme "
        "song|love song|drinking song|lullaby|nursery rhyme|spoken word|free verse|iambic "
        "pentameter|haiku sequence|once upon a time|build me a world|create a world|imagine a "
        "world|invent a world|rewrite the words|rewrite the lyrics|new lyrics|movie trailer|"
        "trailer voiceover|voiceover|without using the word|without using the words|personality "
        "description|a sign for|sign for my|sign for our|argument between|debate between|i'm "
        "naming|naming my|tongue twister|six word|six-word|opening paragraph|first paragraph|bit "
        "of personality|make light of|future self|to my future|16 bars|8 bars|bars about|sea "
        "shanty|narrating my|narrate my|in his voice|in her voice|in their voice|your best|do "
        "your best|do a|as if they were|as if it were|as if he were|as if she were|but as|but "
        "written by|written by a pirate|talk to me like|speak as|you're a|you're my|you're "
        "captain|you are captain|let's play|let's do a|text adventure|you narrate|point of view|"
        "tweets from|series of tweets|fake dictionary|the card|card from|card for|for the card|a "
        "card|plaque|the label|labels for|label for|on the wall|the back of|the bag|bags|the "
        "box|jars|a little something|something i can say|something to read|read out|few "
        "sentences for|a few sentences|two-line|one-liner for|couple of lines|a line for|rename|"
        "rebrand|rebranding|pet name|new name for|continue this|continue the story|continue it|"
        "what happens next|next scene|the ending|write the ending|text adventure|interactive "
        "fiction|choose your own adventure|rap battle|diss track|press release|fortune cookie|"
        "fortune cookies|dating profile|tinder bio|about us page|wine label|diary entry|journal "
        "entry|obituary for|a few lines|few lines for|something to say|to say at|words for my|a "
        "few words|a message for|message for my|note for my|wishes for|sign-off|sign off line|"
        "toast to|speech for|for a 5-year-old|for a five year old|bedtime|in a fun way|a fun "
        "way|a creative way|a clever way|a cute way|with personality|give it personality|sound "
        "fun|sound exciting|sound magical|like shakespeare|like a pirate|like yoda|like a "
        "cowboy|like a noir|like a sports commentator|like a nature documentary|song parody|word "
        "play|wordplay|youtube video|podcast script|video script|script for a youtube|script for "
        "a video|script for a podcast|script for an episode|commercial script|ad script|radio "
        "script|movie script|film script|travel blog|product launch|launch announcement"),
    "creative_intl": ("creative", 3.0, 2,
        "weltenbau disfraz déguisement kostüm verkleidung aufpeppen percutant accrocheur knackiger "
        "reviravolta rebondissement wendung escena diálogo dialogo gutenachtgeschichte erfinden "
        "enredo produktbeschreibung anzeige werbetext anúncio anuncio publicité geschenkideen "
        "akrostichon acróstico acrostiche accroche spruch sprüche glückskeks gancho campaña "
        "aventura narrador narrateur narra mensagens palavras rebatizar umbenennen reescreve "
        "reescribe réécris envolvente trauzeugin trauzeuge brindis discurso formulier mj scénario "
        "szenario raconte racontez cuéntame cuenta conte-moi erzähl erzähle dichte reimt invente "
        "inventa erfinde legendas bandnamen bandname spitznamen poème poèmes poésie poema poemas "
        "poesía poesia gedicht gedichte lyrik soneto sonett haïku lied liedtext liedtexte chanson "
        "chansons canción canciones canção canções histoire histoires conte contes cuento cuentos "
        "conto contos geschichte geschichten märchen fábula fabel fable blague blagues chiste "
        "chistes piada piadas witz witze devinette adivinanza adivinha slogan eslogan légende "
        "legenda brindis brinde trinkspruch discours discurso festrede rima rimas reim reime "
        "strophe estrofa comptine nana berceuse canto cantiga samba quadrinha trova sketch",
        "carte d'anniversaire|karte für|karte zum|carte pour|tarjeta para|cartão para|nome pra|"
        "nomes pra|pra dormir|mundo de fantasia|mundo de fantasía|monde fantastique|ideas para|"
        "ideias para|idées pour|ideen für|faz de conta|du bist jetzt|tu es maintenant|ahora eres|"
        "agora você é|plus percutant|más atractivo|mais chamativo|carte d'anniv|carta de amor|"
        "lettre d'amour|liebesbrief|letra de una|letra de um|letra pra|letra para|nomes pra|nomes "
        "para|ideas de regalo|ideias de presente|idées cadeau|idées de cadeau|descripción de "
        "producto|descrição de produto|description produit|texto de anúncio|texto publicitario|mit "
        "augenzwinkern|con gracia|con humor|com humor|avec humour|sympathisch klingen|sin sonar a "
        "robot|haz como si|finge que|finja que|fais comme si|jouer le rôle|joue le rôle|tu joues|"
        "spiel die rolle|imaginer un monde|crea un mundo|cria um mundo|un monde où|un mundo donde|"
        "um mundo onde|eine welt in der|toque de humor|mensaje para la tarjeta|tarjeta de|mensagem "
        "para o cartão|mot pour la carte|spruch für die karte|quelques lignes|quelques mots|petit "
        "texte|texte pour|text für|texto para|palavras para|algo bonito|unas palabras|ein paar "
        "worte|ein paar zeilen|was sagen|para decir|pra dizer|biscoito da sorte|galleta de la "
        "suerte|biscuit chinois|hora de dormir|antes de dormir|gute nacht|zum einschlafen|pour "
        "s'endormir|pour dormir|para dormir|continue ce texte|sigue esta historia|continua essa "
        "história|continua esta historia|schreib weiter|weiterschreiben|aventure textuel|jeu "
        "d'aventure|aventura de texto|aventura de texto|im stil|à la manière|estilo de|faux "
        "communiqué|comunicado de prensa falso|notícia satírica|noticia satírica|tu es le "
        "narrateur|você narra|du beschreibst|sprich wie|parle comme|habla como|fala como|lettre "
        "d'excuse|lettre de mon|lettre de ma|carta do meu|carta da minha|carta de mi|carta de "
        "demissão do|brief von meinem|brief von meiner|brief meines|reste dans le personnage|"
        "imagine que tu es|imagina que eres|imagina que você é|imagine que você é|stell dir vor du "
        "bist|actúa como|atue como|aja como|agis comme|tu es un|eres un|você é um|du bist ein|"
        "idées de thème|idées de nom|ideas de nombre|ideias de nome|ideias de tema|namensideen|"
        "legendas pra|legenda pra|légende pour|pie de foto|bildunterschrift|cartão de aniversário|"
        "tarjeta de cumpleaños|mensagem de aniversário|mensaje de cumpleaños|message "
        "d'anniversaire|discurso de padrinho|discours de mariage"),
    "creative_naming": ("creative", 3.0, 1, "",
        "name for|names for|name my|name our|name ideas|naming ideas|what should i call|what "
        "should we call|what to call|call my|call our|good name|cool name|fun name|funny name|"
        "catchy name|new name|nom pour|noms pour|idées de nom|nombre para|nombres para|nome para|"
        "nomes para|name für|namen für|shop name|business name|company name|brand name|store name|"
        "product name|podcast name|channel name|app name|alias for|nickname for|nicknames for|"
        "title for|titles for|working title|hashtags for"),
    "in_character": ("creative", 3.5, 1, "pretend ",
        "speak as|talk like|talk to me like|speak like|in the voice of|in his voice|in her voice|"
        "as yoda|like yoda|actúa como|actua como|atue como|aja como|agis comme|sprich wie|parle "
        "comme|habla como|fala como|pretend you are|pretend you're|pretend to be|pretend yourself|"
        "stay in character|in character|reste dans le personnage|bleib in der rolle|mantente en el "
        "personaje|roleplay|role-play|role play|you are captain|you're captain|embody the|embrace "
        "the role|persona of|do your best|your best impression|do an impression|impression of|"
        "imitation of|imitate|imita a|imite"),
    "creative_request": ("creative", 2.5, 2, "brainstorm brainstorming roleplay role-play fanfic "
                                             "worldbuilding world-building",
        "come up with|make up|punch up|punch this up|punch it up|make it pop|spice up|spice it up|"
        "jazz up|liven up|throw ideas|ideas at me|writing contest|story contest|party invite|"
        "invitation for|invite for|elevator pitch|what would my|if my dog|if my cat|if animals "
        "could|intro speech|good line|line to end|line for the top|closing line|baby names|names "
        "that|pure comedy|just for fun|for fun|as a joke|not a real|not for real|write it as him|"
        "write it as her|write it like|as him talking|as her talking|written like|newsletter "
        "intro|newsletter opener|make it funnier|make it rhymes|make it rhyme|funnier|more funny|"
        "darker ending|happy ending|happier ending|sad ending|twist ending|the ending|alternate "
        "ending|letter from|note from|apology from|apology note from|a letter from|a note from|in "
        "the voice of|from the perspective of|from the point of view of|in the style of|written "
        "as|told as|told by|as a rap|as a haiku|as a limerick|as a sonnet|as a poem|as a song|as a "
        "story|as a fairy tale|as a movie|as a telenovela|as a gossip column|as a news report|as a "
        "shakespearean|pretend to be|pretend you are|pretend you're|you are a pirate|stay in "
        "character|in character|act as a villain|act as a pirate|speak like|talk like|sound like "
        "a|ideas for|themes for|theme ideas|gift ideas|party ideas|party theme|party themes|"
        "costume ideas|date ideas|plot ideas|story ideas|prompt ideas|game ideas|short piece|a "
        "short piece|piece about|a scene|the scene|scene where|scene between|dialogue between|"
        "conversation between|exchange between|make it rhyme|make it catchier|catchier|more "
        "poetic|more dramatic|darker|spookier|creepier|pretend yourself|pretend to be|embody the|"
        "embrace the role|persona of|if you were a|if you were an|imagine yourself as|picture "
        "yourself as|introduce yourself as|imagine you are a|imagine you're a|you are a|you are "
        "an|as if you were|in the role of|take on the role|play the role|act as if"),
    "creative_fiction": ("creative", 2.5, 2,
        "satire satirical spoof mock horoscope horoscopes prophecy manifesto diary adventure "
        "adventures saga epic ballad villainous heroic pirate pirates detective princess prince "
        "witch witches monster monsters made-up fictional brochure mystery cozy chapter fanfiction "
        "d&d dnd dungeon dungeons campaign npc npcs quest quests wizard wizards goblin goblins "
        "dragon dragons fairy fairies elf elves villain villains superhero superheroes protagonist "
        "antagonist backstory lore tavern kingdom sorcerer knight's unicorn mermaid vampire zombie "
        "zombies alien aliens spaceship haunted ghost ghosts fictional imaginary fantasy sci-fi "
        "dystopian utopian horror romance thriller noir whodunit fiction mythical mythology plot "
        "narrator narrative homebrew tabletop worldbuild magic spell spells",
        "dungeon master|game master|magic system|short horror|love story|ghost story|horror story|"
        "alternate history|time traveler|time travel|character sheet|boss room|read-aloud|"
        "session 2|next session|the players|my players|our players|adventuring party"),
    "creative_occasion": ("creative", 1.0, 1,
        "toast speech eulogy wedding anniversary retirement graduation birthday valentine's "
        "valentine condolence farewell",
        ""),
    "creative_style": ("creative", 1.2, 2,
        "cosy chatty cozy cute fun magical mysterious romantic spicy sassy dramatic whimsy "
        "nostalgic inspirational uplifting motivational heartwarming wholesome eerie gothic "
        "lyrical rhythmic punny clever memorable funny humorous witty silly goofy whimsical "
        "playful dramatic poetic heartfelt sappy cheesy catchy punchy quirky spooky creepy dreamy "
        "lyrical rhyming charming hilarious absurd snarky sarcastic cheeky tongue-in-cheek "
        "melancholic bittersweet epic vivid evocative imaginative creative creatively compose "
        "craft captivating engaging compelling intriguing rigolo drôle gracioso engraçado lustig "
        "witzig chistoso divertido divertida marrant humorvoll poétique poético poética",
        "sensory details|tongue in cheek|over the top|a bit poetic|little funny|a little weird"),
    "persona_task": ("creative", -2.5, 1, "",
        "your task is|your job is|your task will be|your role is to|you will be provided|you'll be "
        "provided|i will provide you|i will provide|i will give you|i'll give you|you will need "
        "to|you will be given|i want you to act as a|i want you to act as an|your expertise|tasked "
        "with|your goal is|your duty is"),
    "not_creative": ("creative", -4.0, 1, "",
        "story behind|true story|come from|where did|who started|explain this joke|explain the "
        "joke|get the joke|good books|books like|books for|recommend books|series like|serien wie|"
        "shows like|movies like|films like|the name of that|name of the movie|name of that movie|"
        "is it ok to make a joke|is it appropriate|does a haiku|do haikus|have to be 5-7-5|"
        "l'histoire derrière|histoire de la|geschichte vom|geschichte von|woher kommt|where does "
        "the|the history of|la historia de|a história de|história do|turn on captions|captions on|"
        "closed captions|subtitles|what's the story|what is the story|where does the story|origin "
        "of the story|the story goes|news story|the origin of|origin of the|who wrote|who sang|who "
        "sings|rhyme scheme|what is a sonnet|what is a haiku|what's a haiku|how many lines|meaning "
        "of the song|meaning of the poem|the meaning of|lyrics to|lyrics of|the lyrics|first joke|"
        "called that|knock knock jokes called|quién escribió|qui a écrit|quem escreveu|wer "
        "schrieb|wer hat|synonym|synonyms|antonym|what counts as|counts as a|how many syllables|"
        "syllables in|main characters|poet laureate|famous poem|famous poems|famous poets|best "
        "poems|best novels|recommend a novel|book recommendations|novel recommendations|read next"),

    # --- reasoning -------------------------------------------------------------------------------
    "step_by_step": ("reasoning", 3.0, 1, "reasoning",
        "reason it out|walk me through it|how should i have reasoned|the actual argument|show me "
        "the reasoning|step by step|step-by-step|think carefully|think it through|explain your "
        "reasoning|explain your answer|show your work|show the work|show the steps|show steps|show "
        "your steps|with steps|show the math|show your math|walk me through the math|work it out|"
        "do the math|étape par étape|schritt für schritt|paso a paso|passo a passo|mit begründung|"
        "con razonamiento|justifie|justifica|begründe"),
    "math_words": ("reasoning", 1.5, 3,
        "angle angles pentagon hexagon octagon polygon quersumme trapezium trapezoid parallelogram "
        "cylinder cone sphere pythagoras divisible inequality equation equations algebra geometry "
        "derivative integral perimeter circumference radius diameter hypotenuse arithmetic "
        "quotient fraction fractions variance deviation compounded apr probabilité "
        "wahrscheinlichkeit probabilidad probabilidade résoudre demuestra démontre démontrer "
        "beweise prouve demonstre demostrar moyenne promedio média durchschnitt pourcentage "
        "porcentaje porcentagem prozent",
        "sum of|product of|area of|volume of|prove that|proof that|prove it|show that|demonstrate "
        "that|beweise dass|démontre que|demuestra que|prove que|mostre que|montrer que|mostrar "
        "que|zeigen dass|show why|add up to|how many more|how much more|how much less|what "
        "percent|what percentage|per cent|square root|cube root|prime factor|prime factors|prime "
        "factorization|greatest common|least common|common multiple|common divisor|times as many|"
        "twice as|half as|per hour|per day|per week|per month|per minute|per second|an hour|km/h|"
        "mph|miles per|on average|split the bill|split it|each pay|how much do i owe|how much does "
        "each|how much will|how much would|how much did|how much money|how many will|how many "
        "would|how many did|how many does|how many do i need|how many more|is that right|is this "
        "right|is this correct|is that correct|check my math|check my maths|check his math|check "
        "her math|check the math|did i calculate|double check|my colleague says|after tax|before "
        "tax|per cent off|monthly payment|interest rate|hourly rate|time and a half|how old will|"
        "how old was|years old|born in|what time|time zone|o'clock|wie viel|wie viele|cuánto|"
        "cuántos|quanto|quantos|combien de|combien coûte|combien faut|à quelle heure|um wie viel "
        "uhr|a qué hora|a que horas"),
    "math_everyday": ("reasoning", 1.5, 3,
                      "growth solve calculate calculation compute simplify prove proof derive "
                      "probability percent percentage average remainder ratio altogether triangle "
                      "rectangle multiply multiplied divide divided decimals median combien "
                      "cuántos cuántas quantos quantas calcula calcule calcular calculer rechne "
                      "berechne quadrat cuadrado carré umfang fläche área aire volumen prova", ""),
    "quantities": ("reasoning", 1.0, 3,
                   "kwh mpg psi bar therms l/100km gallon gallons liter litre mondays tuesdays "
                   "wednesdays thursdays fridays saturdays sundays split owe owes discount "
                   "discounts vat tax taxes net gross hourly overtime payroll wage wages salary "
                   "interest rate mortgage loan installment installments monthly velocity speed "
                   "acceleration accelerates distance momentum force joules watts voltage ohms "
                   "kilometers kilometres miles feet inches yards acres hectares litres liters "
                   "gallons ounces grams kilograms pounds cups tablespoons teaspoons ml celsius "
                   "fahrenheit kelvin mph kmh km kg lbs percent% remise rabatt descuento desconto "
                   "facture rechnung factura intérêts zinsen intereses juros vitesse "
                   "geschwindigkeit velocidad velocidade durchschnitt moyenne promedio média "
                   "heures stunden horas minutes minuten minutos", ""),
    "chance_question": ("reasoning", 2.5, 1, "",
        "prob of|the chance|what's the chance|odds of|likelihood of|probability of|chance that|"
        "chances that|chance nobody|chance of|chances of|the odds"),
    "quantity_question": ("reasoning", 1.5, 1, "",
        "how many|how much|how long|how far|how old|in total|altogether|wie viele|wie viel|wie "
        "lange|combien|cuántos|cuántas|cuánto|quantos|quantas|quanto"),
    "number_fact": ("reasoning", 4.0, 1,
                    "mdc mmc pgcd ppcm ggt kgv mcd mcm induction gcd lcm factorial",
        "go into evenly|evenly divisible|divides evenly|smallest number that|is it prime|is prime|"
        "be prime|are prime|primes below|primes under|primes between|primes less|a prime|prime "
        "number|prime numbers|largest prime|smallest prime|divisible by|perfect square|perfect "
        "number|even or odd|odd or even|last digit|digits of|the digit|número primo|nombre "
        "premier|primzahl|números primos|nombres premiers|divisível por|divisible par|teilbar "
        "durch|0.999 repeating|point nine repeating"),
    "puzzle_word": ("reasoning", 1.5, 1, "puzzle puzzles riddle logic logical logically", ""),
    "puzzle": ("reasoning", 3.0, 2,
        "patife patifes cavaleiros caballeros chevaliers ritter schurken mentem mienten mentent "
        "lügen lying irrational infinitely argumento raisonnement schluss barber ladder labelled "
        "labeled wahrscheinlich paradox deduce deduction fermi syllogism syllogisms knave knaves "
        "knights liar liars truth-teller truthteller contrapositive fallacy premise conclude "
        "conclusion inference valid invalid conundrum enigma lógica logique logik rätsel acertijo "
        "enigme énigme charada",
        "brain teaser|brain teasers|lateral thinking|trick question|knights and knaves|always "
        "lies|always tells the truth|tells the truth|tell the truth|relationship between|true, "
        "false, or uncertain|true false or uncertain|does not belong|what is the total|what is the "
        "value|what is the remainder|what is the probability|what are the odds|what are the "
        "chances|monty hall|birthday paradox|river crossing|across the river|across a river|cross "
        "the river|the boat holds|boat holds|boat only|boat can carry|brothers and sisters i have "
        "none|that man's father|baker's dozen|missionaries and cannibals|towers of hanoi|wolf, "
        "goat|goat and cabbage|fox, chicken|hat puzzle|prisoners|can i conclude|can we conclude|"
        "does it follow|it follows|follow that|valid argument|is this valid|is that valid|"
        "logically valid|posso concluir|puedo concluir|podemos concluir|pouvons-nous conclure|"
        "können wir schließen|what position|which position|think of a number|kann ich schließen|"
        "puis-je conclure|peut-on conclure|if all|all of the|none of the|es válido|ist gültig|"
        "argumento válido|schluss gültig|est valide|taller than|shorter than|older than|younger "
        "than|light switches|cross a bridge|one torch|one flashlight|around the equator|fold a "
        "piece of paper|between the hands|everyone plays everyone|round robin|round-robin|qué sale "
        "más|cuál me sale|sale mejor|sai mais barato|only one of them|one of them is lying|one of "
        "them lies|is lying|falam a verdade|sagen die wahrheit|dicen la verdad|disent la vérité|"
        "dit la vérité|sitzen nebeneinander|sits next|sit next|rechts neben|links neben|à droite "
        "de|à gauche de|a la derecha de|à direita de|ganz links|ganz rechts|am rand|not "
        "necessarily in that order|not in that order|pas forcément dans cet ordre|no "
        "necesariamente en ese orden|nicht unbedingt in dieser reihenfolge|não necessariamente "
        "nessa ordem|o que é o que é|qu'est-ce qui a|qu est-ce qui a|was wird immer|qué es lo que|"
        "the more you take|the more of me|what number am i|what can run|what has a|what has teeth|"
        "what gets wetter|what goes up|what has keys|what has hands|tengo agujas|twice her age|"
        "twice his age|twice my age|times as old|so alt wie|mal so alt|viermal so|dreimal so|fois "
        "plus âgé|veces mayor|vezes mais velho|hour and minute hands|minute hand|hour hand|clock "
        "hands|immediately left|immediately right|left of the|right of the|every label|is wrong|"
        "are wrong|different colours|different colors|in a row|each person|who drinks|which gives "
        "more|which is more|is this argument|this argument|est-ce que ce raisonnement|chance de|"
        "qual a chance|quelle est la probabilité|qué probabilidad|wie wahrscheinlich|some of the|"
        "exactly one|at least one|at most one|who is lying|who is telling|who owns|who sits|who "
        "lives|which house|what place|how is that possible|how is this possible"),
    "counting": ("reasoning", 3.0, 2,
        "permutations permutation combinations combinatorics arrangements arrange dice coin coins "
        "flip flips flipped odds expected",
        "how many ways|number of ways|full house|royal flush|poker hand|lottery|lotto|jackpot|"
        "roulette|blackjack|cheapest combination|minimum number|fewest|least number|at least how "
        "many|best order|shortest route|visit each|packs of|boxes of|must be true|could be true|"
        "necessarily|always true|which of them|each have a different|each has a different|each own "
        "a different|each owns a different|each likes a different|each drive a different|each "
        "drives a different|in how many|how many different|how many combinations|at random|"
        "randomly chosen|randomly pick|pick 3|choose 3|expected value|deck of cards|a deck|roll "
        "two|two dice|three dice|3 dice|2 dice|flip a coin|flip two|heads and|de cuántas maneras|"
        "de quantas maneiras|de combien de façons|auf wie viele|wie viele möglichkeiten"),
    "estimate": ("reasoning", 2.5, 2, "estimate estimation ballpark fermi",
        "roughly how many|approximately how many|about how many|how many piano|in a lifetime|"
        "throughout history|rough guess|más o menos|how would you reason|how you'd reason|cómo lo "
        "razonarías|how much space|are there in|does a city|how many windows|how many heartbeats|"
        "rough numbers|ballpark figure|back of the envelope|back-of-the-envelope|order of "
        "magnitude|rough estimate"),
    "time_math": ("reasoning", 3.0, 2, "",
        "days after|days before|days from|days until|days till|days since|weeks after|weeks from|"
        "weeks before|months after|months from|years after|years from|hours after|minutes after|"
        "from now|days between|weeks between|weekdays between|business days|working days|day of "
        "the week|what day|which day|what date|which date|what time will|what time is it in|what "
        "time would|time difference|how many days|how many weeks|how many months|how many hours|"
        "how many minutes|how many seconds|days old|local time|1st of|first of the month|what "
        "dates|which dates|any hour|which hour|a time that works|time that works|that works for "
        "all|fence post|fence posts|what time is it there|que horas|qué hora|quelle heure|wie "
        "spät|daqui a|dias depois|días después|dentro de|jours après|dans combien|tage nach|in wie "
        "vielen|que dia|qué día|quel jour|welcher tag|welchen tag|leap year|leap years"),
    "money_question": ("reasoning", 2.0, 1, "cheapest",
        "cheapest way|cheapest combination|best combination|which combination|best deal|better "
        "deal|cheapest option|how much will|how much would|how much do i|how much does it|how much "
        "money|how much each|how much per|save more|saves more|which saves"),
    "compare_money": ("reasoning", 1.5, 2, "cheaper",
        "better deal|better value|which is cheaper|is it cheaper|would it be cheaper|which is "
        "better|worth it if|which option|payback|lease or buy|rent or buy|buy or lease|buy or "
        "rent|lo más barato|más barato|mais barato|moins cher|billiger|günstiger"),
    "compare_numbers": ("reasoning", 3.0, 2, "heavier lighter",
        "which is heavier|what's heavier|what is heavier|weighs more|weigh more|which is more|"
        "which is bigger|which is larger|which is faster|cheaper per|more per|per square inch|per "
        "kg|per pound|per ounce|per liter|per litre|per unit|unit price|break even|break-even|qué "
        "pesa más|o que pesa mais|was ist schwerer|qu'est-ce qui est plus lourd|plus lourd|pesa "
        "más|pesa mais|un kilo|um quilo|ein kilo|a kilo|a pound of"),
    "plan_constraints": ("reasoning", 2.5, 2,
        "turnos schichten dienstplan horario escala roster schedule scheduling shifts rota "
        "timetable seating constraint constraints optimize optimise optimal maximize "
        "maximise minimize minimise",
        "sit next to|next to each other|can't sit|cannot sit|must sit|has to sit|seating chart|"
        "meeting slot|time slot|works for everyone|fits everyone|everyone's availability|max area|"
        "largest area|maximum area|work together|working together|fill the pool|fill the tank|"
        "how long will it take|how long would it take|how long does it take|how fast|how soon|"
        "what comes next|next number|next in the sequence|next letter|fill the gap|what's that in|"
        "what is that in|that in kwh|how much is that in|"
        "convert|conversion|in km|in miles|to miles|to km|to kg|to lbs|to celsius|to fahrenheit|"
        "in celsius|in fahrenheit|in meters|in feet|to meters|to feet|light year|light years"),
    "not_reasoning": ("reasoning", -2.5, 1, "",
        "how many calories|how much protein|how many carbs|how many days a week|how many times a "
        "week|how much should i tip|how much to tip|to tip|tip in|how much does it cost|how much "
        "is a|how long should|how long does it last|how long did|how long is the|how long do|how "
        "long can|how many people live|how many countries|how many states|how many bones|how many "
        "languages|how many members|how many players|how many episodes|how many seasons|how many "
        "books|how much water|how much sleep|how much coffee|how much caffeine|how old is|how far "
        "is|how many hours of sleep|how many steps|worth it for|is it worth"),

    # --- broad vocabulary per intent (tools, forms, terms in five languages), each entry checked
    # --- against the tuning prompts: one that fired more often for another intent was left out
    "code_vocab": ("code", 2.0, 2,
        "python2 pyhton phyton pytohn javscript javacript typscript ecmascript es6 cpp csharp "
        "rustlang applescript autohotkey postgress postgre nosql plsql tsql mssql neo4j firestore "
        "nodejs angularjs expressjs blazor tailwindcss ipynb pipenv msbuild dockerize dockerized "
        "dockerizing kubernets kubernates jenkinsfile httpd sshd argc printf println sizeof calloc "
        "realloc typedef varchar ndarray jsonl html5 css3 vlookups xlsm nullreferenceexception "
        "segfaults segfaulted nameerror zerodivisionerror runtimeerror indentationerror "
        "stackoverflowerror outofmemoryerror classnotfoundexception illegalargumentexception "
        "arrayindexoutofboundsexception concurrentmodificationexception filenotfounderror "
        "econnrefused enoent eaddrinuse tracebacks coredump ref refactors refactored debugs "
        "debugged debuging compilers recompile transpile transpiler transpiled multithreaded "
        "threadsafe hashset arraylist linkedlist leetcode hackerrank codewars codeforces "
        "stackoverflow monorepo containerize containerized cicd devops gitops oauth2 jdbc odbc "
        "subqueries nullable constructor destructor instantiate instantiation generics iterable "
        "dicts docstring pep8 pylint mypy flake8 init elif iostream stdio innerhtml queryselector "
        "getelementbyid addeventlistener onclick xmlhttprequest localstorage iframe favicon href "
        "semver bytecode jdk jre classpath uikit gdscript shader shaders glsl hlsl opengl vulkan "
        "directx webgl threejs ide jetbrains intellisense breakpoints log4j syslog dmesg regedit "
        "dll endianness deserialization lexer tdd e2e sonarqube rebasing submodule submodules "
        "cloudwatch gcp digitalocean databricks fullstack sourcecode programmatically webdev "
        "kubelet openapi dotenv devtools chromedriver puppeteer bs4 regex101 stackblitz codepen "
        "jsfiddle replit wsl2 powerbi déboguer débogue déboguez débugger débuguer débugué "
        "debugguer bogues compilateur compilateurs recompiler refactoriser refactorisation "
        "refactorer réusiner instancier instanciation polymorphisme itérateur codeur codeuse codez "
        "scripter sgbd bdd commiter committer programmatiquement indentation pointeurs rechercheh "
        "sierreur sommeprod equiv concatener concaténer nbval stxt supprespace programmiere "
        "programmierst programmiert programmierung programmiersprache programmiersprachen "
        "quelltext programmcode codezeile codezeilen codeschnipsel kompilieren kompiliert "
        "kompilierung debuggen debugge gedebuggt laufzeitfehler syntaxfehler kompilierfehler "
        "speicherleck nullzeiger objektorientierte objektorientierten polymorphie kapselung "
        "instanziieren konstruktor rückgabewert rückgabetyp datentyp datentypen zeichenkette "
        "zeichenketten shellskript kommandozeile befehlszeile eingabeaufforderung "
        "umgebungsvariable umgebungsvariablen konfigurationsdatei entwicklungsumgebung "
        "refaktorisieren datenbankabfrage excelformel datenstruktur datenstrukturen binärbaum "
        "primärschlüssel fremdschlüssel webanwendung ausnahmebehandlung codebasis summewenns "
        "zaehlenwenn zählenwenns zaehlenwenns wennfehler mittelwertwenn summenprodukt verketten "
        "textverketten anzahl2 teilergebnis istfehler istleer debuguear debugear debuggear "
        "depurador compilador compiladores recompilar refactorizar refactorización refactoricé "
        "indentación instanciar polimorfismo encapsulamiento encapsulación subrutina subrutinas "
        "codear codeando deployar punteros iterador buscarh concatenar sumaproducto unircadenas "
        "bdsuma codar codando codei debugar debugando debuguei refatorar refatoração refatorando "
        "indentação identação encapsulamento ponteiros commitar commitei deployei buildar proch "
        "somases seerro corresp médiase mediase somarproduto unirtexto datadif",
        "pl sql|t sql|react js|vue js|next js|asp net|scikit learn|apt get|console log|n a|div 0|"
        "thread safe|ci cd|127 0 0 1|requirements txt|package json|node modules|z index|pom xml|"
        "three js|d3 js|cherry pick|front end|back end|full stack|github com|repl it|compile time|"
        "if else|async await|somme si ens|nb si ens|moyenne si|joindre texte|si conditions|sous "
        "total|nb vide|bash skript|python skript|sql abfrage|excel formel|vba makro|for schleife|"
        "while schleife|if abfrage|merge konflikt|rest schnittstelle|sumar si conjunto|contar si "
        "conjunto|si error|promedio si|promedio si conjunto|si conjunto|cont ses|cont valores|ext "
        "texto|cont núm|código fonte"),
    "code_vocab_phrases": ("code", 1.5, 2,
        "",
        "ruby on rails|spring boot|unreal engine|react native|segmentation fault|core dumped|stack "
        "overflow error|null pointer|null reference|syntax error|type error|runtime error|compile "
        "error|compilation error|build failed|build error|non zero exit|returned non zero|internal "
        "server error|500 internal server|404 not found|502 bad gateway|bad gateway|connection "
        "refused|module not found|undefined reference|unexpected token|cannot read properties|"
        "index out of range|out of bounds exception|no such file|group by clause|order by clause|"
        "off by one error|integer overflow|floating point precision|pip install|npm install|npm "
        "run|yarn add|git revert|git checkout|git branch|docker run|docker build|kubectl apply|"
        "sudo apt|apt install|brew install|chmod x|ls la|rm rf|cd into|ssh into|pull requests|"
        "powershell script|python script|batch file|regular expressions|regex to match|capture "
        "group|in python|in javascript|in java|in c++|in c#|in rust|in golang|in go lang|in "
        "typescript|in php|in kotlin|in swift code|in sql|in vba|in bash|using python|using "
        "javascript|sql queries|excel formula|excel formulas|formula in excel|google sheets "
        "formula|sheets formula|spreadsheet formula|vba macro|excel macro|vba code|excel vba|"
        "nested if|nested ifs|web app|web application|web scraper|web scraping|scrape a website|"
        "rest api|api endpoint|api call|api request|http requests|json file|parse json|yaml file|"
        "configuration file|env variable|terminal command|shell command|linux command|test "
        "coverage|code coverage|data structures|binary search tree|big o notation|object oriented "
        "programming|singleton pattern|factory pattern|compile time|dynamic programming|switch "
        "case|list comprehension|anonymous function|callback function|async await|event listener|"
        "dom element|type annotation|virtual function|return value|return type|function signature|"
        "method overloading|operator overloading|pass by reference|pass by value|global variable|"
        "local variable|fix my code|debug my code|debug this|refactor this|optimize this code|"
        "explain this code|my code doesn t|this code doesn t|code doesn t work|code is not "
        "working|code snippet|boilerplate code|write a function|write a program|program that "
        "takes|function that takes|function that returns|takes an array|returns an array|array of "
        "objects|list of dicts|hello world program|programming language|programming languages|"
        "front end developer|full stack|single page application|html page|html and css|css file|"
        "media query|css grid|develop an app|app development|game engine|chrome extension|browser "
        "extension|jupyter notebook|google colab|ci pipeline|ci cd pipeline|docker container|"
        "docker image|kubernetes cluster|helm chart|s3 bucket|aws lambda|ec2 instance|bearer "
        "token|stored procedure|foreign key|primary key|outer join|select statement|where clause|"
        "alter table|drop table|sql server|database schema|ms sql|oracle database|package manager|"
        "http status|langage de programmation|langages de programmation|en ligne de commande|"
        "invite de commandes|requête sql|requêtes sql|code source|bout de code|morceau de code|"
        "extrait de code|ce bout de code|erreur de syntaxe|erreur de compilation|fichier de "
        "configuration|variable d environnement|variables d environnement|boucle for|boucle while|"
        "instruction if|structure de données|structures de données|liste chaînée|arbre binaire|"
        "table de hachage|programmation orientée objet|orientée objet|orienté objet|classe "
        "abstraite|expressions régulières|formule excel|formule dans excel|macro vba|macro excel|"
        "code vba|script python|script bash|script shell|en python|en javascript|en java|en c++|en "
        "php|en sql|développement web|application web|appli web|api rest|requête http|fichier "
        "json|test unitaire|revue de code|conflit de merge|conflit de fusion|faire un commit|"
        "écrire une fonction|écris une fonction|écrire un programme|écris un programme|écris un "
        "script|un script qui|corrige mon code|déboguer ce code|optimiser ce code|explique ce "
        "code|que fait ce code|mon code ne|ce code ne marche|complexité algorithmique|complexité "
        "temporelle|fuite mémoire|fuite de mémoire|pointeur null|pointeur nul|dépassement de pile|"
        "erreur 404|erreur 500|serveur web|clé primaire|clé étrangère|jointure sql|procédure "
        "stockée|langage c|index equiv|commande linux|commande git|dépôt git|dev web|développeur "
        "web|tableur excel|ein programm schreiben|schreibe ein programm|schreib ein programm|eine "
        "funktion schreiben|schreibe eine funktion|schreib eine funktion|mein code funktioniert|"
        "code funktioniert nicht|code debuggen|code optimieren|code erklären|erkläre diesen code|"
        "was macht dieser code|fehler im code|regulären ausdruck|reguläre ausdrücke|sql abfrage|"
        "excel formel|vba makro|excel makro|for schleife|while schleife|if abfrage|if anweisung|"
        "verkettete liste|binärer baum|hash tabelle|objektorientierte programmierung|abstrakte "
        "klasse|merge konflikt|git befehl|linux befehl|auf der kommandozeile|json datei|yaml "
        "datei|app entwickeln|eine app programmieren|website programmieren|html und css|"
        "gespeicherte prozedur|index außerhalb|index vergleich|mit python|mit javascript|lenguaje "
        "de programación|lenguajes de programación|código fuente|símbolo del sistema|consulta sql|"
        "consultas sql|script de python|script en python|script de bash|un script que|escribe una "
        "función|escribir una función|escribe un programa|hacer un programa|el código no funciona|"
        "mi código no|depurar código|depurar mi código|corregir mi código|optimizar este código|"
        "explica este código|qué hace este código|error de sintaxis|error de compilación|archivo "
        "de configuración|variable de entorno|variables de entorno|bucle for|bucle while|ciclo "
        "for|ciclo while|sentencia if|estructura de datos|estructuras de datos|lista enlazada|"
        "árbol binario|tabla hash|programación orientada a objetos|orientada a objetos|clase "
        "abstracta|expresiones regulares|fórmula de excel|fórmula en excel|macro de excel|macro en "
        "vba|código vba|desarrollo web|aplicación web|petición http|solicitud http|archivo json|"
        "prueba unitaria|pruebas unitarias|revisión de código|conflicto de merge|hacer commit|"
        "hacer un commit|clave primaria|clave foránea|procedimiento almacenado|fuga de memoria|"
        "desbordamiento de pila|puntero nulo|complejidad temporal|índice coincidir|base de datos "
        "relacional|comando de linux|comandos de git|hoja de google sheets|repositorio git|"
        "sintaxis de python|programador web|linguagem de programação|linguagens de programação|"
        "código fonte|prompt de comando|em python|em javascript|em java|em c++|em php|em sql|"
        "script em python|um script que|escreva uma função|escrever uma função|escreva um "
        "programa|fazer um programa|código não está funcionando|corrigir meu código|debugar o "
        "código|depurar o código|otimizar esse código|explique esse código|erro de sintaxe|erro de "
        "compilação|arquivo de configuração|variável de ambiente|variáveis de ambiente|laço for|"
        "loop for|laço while|loop infinito|estrutura de dados|estruturas de dados|lista encadeada|"
        "lista ligada|árvore binária|tabela hash|programação orientada a objetos|orientação a "
        "objetos|classe abstrata|expressões regulares|fórmula do excel|fórmula no excel|macro do "
        "excel|desenvolvimento web|aplicação web|requisição http|arquivo json|teste unitário|"
        "testes unitários|revisão de código|conflito de merge|fazer commit|fazer um commit|chave "
        "primária|chave estrangeira|procedimento armazenado|vazamento de memória|estouro de pilha|"
        "ponteiro nulo|complexidade de tempo|o que esse código|meu código não|esse código não|"
        "índice corresp|banco de dados relacional|google planilhas|comando linux|comandos do git|"
        "repositório git|desenvolvedor web"),
    "code_vocab_weak": ("code", 0.6, 2,
        "stack queue hexadecimal encoding plugin deprecated parameter snippet automate "
        "programmeur développeur algorithme algorithmique dépôt paramètre chaîne héritage "
        "bibliothèque serveur tableur plantage syntaxe implémenter récursif programmierer "
        "entwickler softwareentwicklung webentwicklung skripte endlosschleife methode zeiger "
        "vererbung ganzzahl gleitkommazahl konsole makro makros tabellenkalkulation "
        "arbeitsmappe schnittstelle bibliothek implementieren algorithmus rekursiv programar "
        "programador desarrollador algoritmo arreglo servidor consola celda sintaxis "
        "depuración compilar compilación herencia excepción puntero recursión repositorio "
        "codificar programando desenvolvedor vetor sintaxe depuração herança exceção ponteiro "
        "recursão repositório bugado",
        ""),
    "creative_vocab": ("creative", 2.5, 2,
        "poetically peom peoms poim poetize versify rhymer wordsmith sonneteer minstrel hiaku "
        "haiko senryu renga haibun limrick limerik sonet sonnett villanelles rondeau rondel "
        "triolet cinquains acrostics tercet tercets elegies doggerel epitaph epitaphs dirge "
        "kenning kennings calligram iambic pentameter tetrameter trochaic anapestic dactylic "
        "alliterative rhymed rhymey ryhme ryme rhym rhymming ryming lirics lyrcis lyircs "
        "songwriting lullabies lullabye serenade ditty ditties libretto singalong jokey punchlines "
        "punning oneliner quip quips quippy zinger zingers parodic parodying satirize satirise "
        "lampoon comedic humourous humorously wittier wittiest dadjoke dadjokes copypasta "
        "spoonerism spoonerisms madlibs fanfics fanfictions ficlet headcanon headcanons fanon "
        "novelette fairytales folktale folktales creepypasta creepypastas storytime screenplays "
        "screenwriting monologues soliloquies subplot subplots backstories worldbuilder "
        "cliffhanger cliffhangers retelling retell reimagine reimagined reimagining storywriting "
        "fictionalize fictionalise fictionalized novelize novelization litrpg grimdark isekai "
        "logline roleplays roleplaying roleplayed roleplayer rolplay rolepaly roleply rollplay "
        "larp larping ttrpg ttrpgs dungeonmaster questline conlang sloagan slogen slogon "
        "catchphrases strapline straplines copywriting adcopy infomercial brandable catchiest "
        "punchier snappy snappier zippy nickname nicknames portmanteau eulogies vows valentines "
        "ecard zhuzh zhush jazzier snazzy snazzier pizzazz pizazz whimsically shakespearean "
        "rhapsodic brainstormed brainstrom brianstorm brainstorms poeme poemes poesie poetique "
        "poétiques poétiquement versifier haïkus alexandrin alexandrins strophes rime rimes rimé "
        "rimée rimés rimées rimer rimant acrostiches ballade ballades élégie elegie sextine "
        "épigramme calligramme lipogramme épitaphe epitaphe comptines berceuses chansonnette "
        "ritournelle calembour calembours humoristique humoristiques parodier pastiche pastiches "
        "satiriques sketchs saynète saynètes soliloque surnom surnoms sobriquet sobriquets "
        "uchronie virelangue virelangues accrocheuse accrocheurs accrocheuses scénariser gedichts "
        "gedichtes poetisch poetische poetischen sonette balladen strophen reimen gereimt reimende "
        "reimenden reimschema reimwörter kreuzreim paarreim umarmender elfchen vierzeiler "
        "zweizeiler schüttelreim schüttelreime rondell songtext songtexte schlaflied wiegenlied "
        "kinderreim abzählreim werbeslogan werbeslogans werbespruch werbesprüche werbetexte "
        "wortspiel wortspiele kalauer flachwitz flachwitze pointe pointen parodien satirisch "
        "satirische sketche rollenspiel rollenspiele fabeln kurzgeschichte kurzgeschichten "
        "gruselgeschichte geistergeschichte kindergeschichte drehbuch drehbücher hörspiel monologe "
        "spitzname kosename kosenamen künstlername hochzeitsrede trauzeugenrede trinksprüche "
        "glückwunschkarte geburtstagsgedicht geburtstagsspruch geburtstagssprüche grabrede "
        "trauerrede abschiedsgedicht liebesgedicht weihnachtsgedicht muttertagsgedicht "
        "zungenbrecher anmachspruch anmachsprüche disstrack gedichtform märchenhaft poemita "
        "poetico poetica haikú sonetos copla coplas estrofas verso versito versitos rimar rimado "
        "rimada rimen acrostico oda odas balada elegía elegia cuarteta redondilla quintilla "
        "endecasílabo octosílabo octosílabos caligrama greguería greguerías estribillo villancico "
        "villancicos payada calaverita calaveritas eslóganes eslogans chistecito albur albures "
        "piropo piropos trabalenguas parodias parodiar sátira satira satirico rolear fabula "
        "fábulas fabulas microrrelato microrrelatos minicuento minicuentos monólogos apodo apodos "
        "sobrenombre epitafio humorístico humoristico humorística humoristica pegadizo pegadiza "
        "pegadizos pegadizas poeminha poeminhas poesias haicai haicais limerique estrofe estrofes "
        "versinho versinhos rimando trovas quadrinhas repentista cantigas acalanto refrão refrao "
        "marchinha marchinhas piadinha piadinhas trocadilho trocadilhos paródia paródias esquete "
        "esquetes microconto microcontos historinha historinhas continho apelido apelidos epitáfio "
        "xaveco xavecos cantadas",
        "non rhyming|sing along|punch line|tongue twisters|mad libs|self insert|fairy tales|back "
        "story|make believe|role playing|tag line|tag lines|catch phrase|eye catching|attention "
        "grabbing|nick name|e card|remue méninges|gute nacht geschichte|trava língua|trava línguas"),
    "creative_vocab_phrases": ("creative", 2.5, 2,
        "",
        "write a poem|a poem about|poem about|short poem|funny poem|love poem|birthday poem|"
        "rhyming poem|haiku about|write a limerick|a limerick about|write a sonnet|sonnet about|"
        "ode to|an ode to|rhyming couplets|blank verse|slam poetry|acrostic poem|in verse|in "
        "rhyme|write a song|write me a song|song lyrics|lyrics for|lyrics about|a song about|song "
        "about|write a rap|rap verse|write a jingle|parody song|parody of|weird al|tell a joke|"
        "jokes about|dad jokes|knock knock joke|puns about|pun about|pick up line|pickup line|"
        "pickup lines|pick up lines|chat up line|roast me|stand up routine|comedy sketch|sketch "
        "comedy|comedy skit|write a skit|comedy bit|witty reply|witty comeback|clever comeback|a "
        "short story|tell me a story|fan fic|alternate universe|story idea|writing prompt|writing "
        "prompts|creative writing|character backstory|character arc|fantasy world|fictional world|"
        "fictional country|fictional city|alien species|write a scene|a scene where|write a "
        "monologue|villain monologue|dramatic monologue|scary story|adventure story|detective "
        "story|origin story|villain origin story|alternative ending|rewrite the ending|deleted "
        "scene|crossover fanfic|x reader|reader insert|kids story|story for kids|fairy tales|fable "
        "about|children s book|picture book|movie pitch|premise for|a premise for|logline for|make "
        "up a story|make up a song|invent a word|invent a language|write a riddle|make up a "
        "riddle|create a riddle|you are now a|you are now an|from now on you|slogan ideas|tagline "
        "ideas|roleplay as|role play as|let s roleplay|lets roleplay|imagine you re|talk like a|"
        "speak like a|talk like a pirate|in shakespearean english|dungeons and dragons|dungeons "
        "dragons|d d campaign|dnd campaign|tabletop campaign|npc dialogue|text based adventure|"
        "murder mystery|murder mystery party|scavenger hunt clues|treasure hunt clues|mad libs|"
        "would you rather|truth or dare|tongue twisters|slogan for|tagline for|catchy slogan|"
        "catchy title|catchy tagline|catchy headline|motto for|tv commercial|name for my|names for "
        "my|team names|business name ideas|character names|villain name|fantasy names|superhero "
        "name|stage name|pen name|rap name|drag name|tavern name|wifi name|wifi names|username "
        "ideas|gamertag ideas|title ideas|book title ideas|instagram captions|caption ideas|"
        "caption for my|funny caption|witty caption|maid of honor speech|maid of honour speech|"
        "wedding toast|wedding vows|birthday toast|a toast to|toast for my|write a eulogy|eulogy "
        "for|anniversary message|anniversary card|christmas card|valentine card|valentine s day "
        "card|get well soon message|farewell message|retirement card|mother s day card|father s "
        "day card|thank you card message|write a love letter|letter to santa|letter from santa|"
        "funny letter|humorous letter|fictional letter|diary entry from|journal entry from|jazz "
        "this up|jazz it up|spice this up|liven it up|zhuzh up|make it more poetic|more whimsical|"
        "more playful|make it catchy|make it sound epic|add some flair|brainstorm ideas|brainstorm "
        "names|help me brainstorm|come up with names|rallying cry|battle cry|war cry|team chant|"
        "fortune cookie messages|écris un poème|ecris un poeme|écrire un poème|un poème sur|poème "
        "sur|poème d amour|petit poème|écris une chanson|paroles de chanson|une chanson sur|"
        "chanson d anniversaire|raconte moi une histoire|écris une histoire|une histoire courte|"
        "histoire pour enfants|histoire du soir|conte de fées|il était une fois|il etait une fois|"
        "raconte une blague|raconte moi une blague|une blague sur|jeu de mots|jeux de mots|jeu de "
        "rôle|jeux de rôle|fais semblant d être|comme si tu étais|incarne un|dans le style de|à la "
        "manière de|trouve un nom|idées de noms|un nom pour|trouve un slogan|un slogan pour|phrase "
        "d accroche|texte publicitaire|discours de témoin|éloge funèbre|meilleurs vœux|carte de "
        "vœux|message pour une carte|discours de départ|légende instagram|rends le plus drôle|plus "
        "poétique|en vers|en rimes|qui rime|rimes croisées|écriture créative|atelier d écriture|"
        "univers fantastique|monde imaginaire|chute inattendue|sketch humoristique|phrase de "
        "drague|phrases de drague|nouvelle fantastique|petit texte humoristique|schreib ein "
        "gedicht|schreibe ein gedicht|schreib mir ein gedicht|ein gedicht über|gedicht über|"
        "gedicht zum geburtstag|gedicht zur hochzeit|gedicht zum muttertag|gedicht für meine|"
        "schreib einen songtext|ein lied über|schreib ein lied|schreib mir ein lied|erzähl mir "
        "eine geschichte|erzähl eine geschichte|schreib eine geschichte|eine kurze geschichte|es "
        "war einmal|geschichte für kinder|gute nacht geschichte|märchen über|eine fabel über|"
        "erzähl einen witz|ein witz über|witze über|tu so als|tu so als wärst|schlüpf in die "
        "rolle|in der rolle von|im stil von|im stile von|ein name für|namen für mein|namen für "
        "meine|slogan für|ein slogan für|werbetext für|rede zur hochzeit|rede für die hochzeit|"
        "rede zum geburtstag|rede zum abschied|text für eine karte|text für die karte|glückwünsche "
        "zum geburtstag|mach es lustiger|lustiger formulieren|in reimform|in versform|das sich "
        "reimt|die sich reimen|kreatives schreiben|fiktive welt|fantasy welt|für ein rollenspiel|"
        "lass uns ein rollenspiel|lustige sprüche|frecher spruch|witzige bildunterschrift|escribe "
        "un poema|escríbeme un poema|escribeme un poema|un poema sobre|poema sobre|poema de amor|"
        "escribe una canción|escribe una cancion|letra de una canción|letra para una canción|una "
        "canción sobre|canción de cuna|cuéntame un cuento|cuentame un cuento|cuéntame una "
        "historia|cuentame una historia|escribe una historia|un cuento sobre|cuento corto|cuento "
        "para niños|cuento infantil|cuento para dormir|historia para dormir|había una vez|habia "
        "una vez|érase una vez|erase una vez|cuéntame un chiste|cuentame un chiste|un chiste "
        "sobre|chistes de|un corrido|corrido sobre|juego de palabras|juegos de palabras|juego de "
        "rol|juegos de rol|haz de cuenta que|finge que eres|finge ser|actúa como si fueras|ahora "
        "eres un|ahora eres una|al estilo de|ideas de nombres|un nombre para|nombres para mi|"
        "nombre para mi|eslogan para|un eslogan para|frase publicitaria|discurso de boda|brindis "
        "de boda|discurso para una boda|palabras para un brindis|discurso de despedida|"
        "felicitación de navidad|tarjeta de navidad|mensaje para una tarjeta|dedicatoria para|que "
        "rime|que rimen|en verso|en rima|hazlo más divertido|más poético|escritura creativa|lluvia "
        "de ideas|mundo ficticio|crea un personaje|inventa una historia|inventa un cuento|inventa "
        "un nombre|frases para ligar|frase para ligar|piropos para|caption para instagram|frases "
        "para instagram|escreva um poema|escreve um poema|me escreva um poema|faça um poema|um "
        "poema sobre|escreva uma música|escreva uma canção|letra de música|uma música sobre|uma "
        "canção sobre|me conta uma história|me conte uma história|conte uma história|escreva uma "
        "história|escreva um conto|um conto sobre|conto curto|história para crianças|história "
        "infantil|história para dormir|conte uma piada|me conta uma piada|me conte uma piada|uma "
        "piada sobre|jogo de palavras|vamos fazer um roleplay|finja que você é|finja ser|faça de "
        "conta que|você agora é|no estilo de|à maneira de|ideias de nomes|um nome para|nome para "
        "meu|nome para minha|slogan para|um slogan para|texto publicitário|frase de efeito|frases "
        "de efeito|discurso de casamento|brinde de casamento|cartão de natal|mensagem de natal|"
        "mensagem para cartão|que rimem|em versos|com rimas|mais engraçado|mais poético|escrita "
        "criativa|chuva de ideias|tempestade de ideias|mundo fictício|crie um personagem|invente "
        "uma história|cantada para|cantadas para|legenda para instagram|legenda para foto|conto de "
        "fadas|canção de ninar|literatura de cordel|poema de cordel"),
    "creative_vocab_weak": ("creative", 0.8, 2,
        "character legend prologue epilogue humor comedy flirty anthem advertisement mascot "
        "tribute metaphors imagery prose ideas impersonate rp plotline storytelling scene poet "
        "steampunk freestyle improvise récit nouvelle personnage personnages intrigue fictif "
        "fictive paroles anniversaire vœux voeux inventer idées créatif créative erzählung fiktiv "
        "fiktive fiktiven kreativ ideen humorvolle rede hochzeit geburtstag karte werbung "
        "überschrift dialog figur charakter handlung bösewicht held relato personaje trama "
        "ficticio ficticia lema broma bromas graciosa guion guión rol dedicatoria cumpleaños "
        "creativo ingenioso personagem personagens fictício fictícia fantasia música bordão "
        "engraçada criativo cantada crônica dedicatória casamento aniversário rpg",
        ""),
    "reasoning_vocab": ("reasoning", 2.0, 2,
        "arithmetics arithmatic algebraic algebraically algerbra equasion equasions quadratic "
        "quadratics quadractic polynomials polynominal polynomal binomial trinomial monomial "
        "divisable divisors remainders remainer numerator denominator denominators denominater "
        "multiplying multiplcation multipication subtracting subtracted subtraction substract "
        "substraction substracting substracted squared cubed exponent exponents exponet logarithm "
        "logarithms logarithmic logarithim logarythm antiderivative antiderivatives integrand "
        "calculus precalculus calculas differentiable trigonometry trigonometric trignometry "
        "trigonometery trig sine cosine sines cosines secant cosecant cotangent arcsin arccos "
        "arctan radians radian hypotenus hypothenuse pythagorus pythagorian theorems theorum lemma "
        "corollary axiom axioms axiomatic biconditional syllogistic deductive tautology "
        "tautologies entailment disjunction perimiter circumfrence circumferance quadrilateral "
        "paralellogram parallelagram trapezoids rhombus isosceles isoceles equilateral scalene "
        "congruent congruence congruences perpendicular heptagon decagon polyhedron polyhedra "
        "tetrahedron dodecahedron icosahedron circumscribed bisector circumcircle incircle "
        "eigenvalue eigenvalues eigenvector eigenvectors maclaurin asymptote asymptotes convergent "
        "converges diverges summation telescoping coprime hcf factorization factorisation "
        "factorize factorise factoring diophantine goldbach riemann bijection bijective injective "
        "surjective googolplex probabilities probabilty probablity probabilites coinflip coinflips "
        "tosses martingale permutaion combinatorial combinatoric derangement derangements "
        "pigeonhole ncr npr bayes hypergeometric urn marbles brainteaser brainteasers sudokus "
        "sudoko soduku sodoku suduko kakuro kenken nonogram nonograms picross futoshiki hitori "
        "slitherlink nurikabe kakurasu pentomino pentominoes polyomino tangram tangrams "
        "cryptarithm cryptarithms cryptarithmetic alphametic alphametics truthtellers hanoi "
        "sorites guesstimate guesstimates guestimate kph knapsack optimality maximin lagrangian "
        "qed iff disprove disproved provable unprovable interquartile timestable timestables "
        "multiplications subtractions quotients numerators reciprocals π arithmétique arithmetique "
        "algèbre algebre algébrique équation équations inéquation inéquations polynôme polynômes "
        "polynome trinôme discriminant divisibilité diviseur diviseurs numérateur numerateur "
        "dénominateur denominateur soustraction soustractions soustraire exposant logarithme "
        "logarithmes intégrale intégrales integrale trigonométrie trigonometrie cosinus hypoténuse "
        "pythagore théorème théorèmes theoreme lemme corollaire axiome axiomes syllogisme "
        "contraposée contraposition tautologie périmètre perimetre circonférence parallélogramme "
        "trapèze losange isocèle isocele équilatéral équilatérale octogone polygone polyèdre "
        "géométrie geometrie factoriser probabilités probabilite dés combinatoire dénombrement "
        "dénombrer binomiale billes menteurs hanoï récurrence recurrence démonstrations "
        "factorielle proportionnalité proportionnel proportionnelle bissextile dérivable "
        "barycentre médiatrice bissectrice colinéaires arithmetik algebraisch gleichung "
        "gleichungen ungleichung ungleichungen polynom teilbar teilbarkeit teiler nenner "
        "multiplikation subtraktion subtrahieren multiplizieren dividieren logarithmus logarithmen "
        "stammfunktion integralrechnung differentialrechnung differenzialrechnung sinus kosinus "
        "tangens kathete katheten pytagoras korollar syllogismus kontraposition parallelogramm "
        "trapez gleichschenklig gleichschenkliges gleichseitig gleichseitiges rechtwinklig "
        "rechtwinkliges sechseck achteck fünfeck vieleck primzahlen primfaktorzerlegung "
        "primfaktoren faktorisieren wahrscheinlichkeiten warscheinlichkeit "
        "wahrscheinlichkeitsrechnung würfeln gewürfelt münzwurf münzwürfe permutationen "
        "kombinatorik binomialverteilung binomialkoeffizient knobelaufgabe knobelei "
        "denksportaufgabe denkaufgabe logikrätsel zahlenrätsel größenordnung überschlagsrechnung "
        "zinseszins zinseszinsen dreisatz antiproportional bruchrechnung bruchrechnen kopfrechnen "
        "textaufgabe textaufgaben sachaufgabe matheaufgabe matheaufgaben mathehausaufgaben "
        "rechenaufgabe rechenaufgaben rechenweg schaltjahr mitternachtsformel diskriminante "
        "induktionsbeweis widerspruchsbeweis quadratwurzel kubikwurzel erwartungswert "
        "flächeninhalt kreisumfang kreisfläche winkelsumme innenwinkel nullstelle nullstellen "
        "extremstellen kurvendiskussion grenzwert grenzwerte konvergiert divergiert "
        "optimierungsproblem spieltheorie gefangenendilemma wahrheitstabelle wahrheitstafel "
        "schubfachprinzip einmaleins fangfrage trickfrage stundenkilometer aritmética aritmetica "
        "álgebra algebraica ecuación ecuacion inecuación inecuaciones cuadrática cuadratica "
        "polinomio polinomios trinomio discriminante divisibilidad divisores cociente numerador "
        "denominador multiplicación multiplicacion sustracción sustraccion exponente logaritmo "
        "logaritmos antiderivada integrales trigonometría trigonometria coseno hipotenusa "
        "pitágoras pitagoras teorema teoremas corolario axioma axiomas silogismo contrarrecíproco "
        "contrarreciproco tautología tautologia perímetro perimetro circunferencia paralelogramo "
        "trapecio rombo isósceles equilátero escaleno hexágono octágono polígono poliedro "
        "geometría geometria factorización factorizacion factorizar probabilidades ruleta "
        "permutación permutaciones permutacion combinatoria canicas hanói bisiesto "
        "proporcionalidad inversamente sumatoria sumatorio asíntota asintota derivable mediatriz "
        "bisectriz primalidad algébrica equações equacao equacoes inequação inequações quadrática "
        "polinômio polinómio polinômios trinômio bhaskara báskara baskara divisível divisivel "
        "divisibilidade quociente multiplicação multiplicacao subtração subtracao subtracção "
        "subtrair expoente integrais cosseno corolário contrapositiva circunferência trapézio "
        "losango octógono fatoração fatoracao factorização fatorar roleta permutação permutações "
        "permutacao combinatória bissexto proporcionalidade tabuada somatório somatorio assíntota "
        "bissetriz primalidade",
        "pre calculus|l hopital|l hôpital|l hospital|coin flip|truth tellers|n queens|zeno "
        "s|y mx+ b|dy dx|casse tête|casse tete|pq formel|nash gleichgewicht|tabela "
        "verdade|caixeiro viajante"),
    "reasoning_vocab_phrases": ("reasoning", 2.0, 2,
        "",
        "solve for y|solve for n|find the value of|value of x|what s the probability|whats the "
        "probability|probability of getting|probability that|chances of rolling|chance of rolling|"
        "rolling a six|roll two dice|rolling two dice|roll a die|pair of dice|flipping a coin|toss "
        "a coin|coin toss|coin flips|heads in a row|tails in a row|without replacement|with "
        "replacement|drawn at random|randomly selected|chosen at random|standard deck|52 card "
        "deck|52 cards|full house probability|gambler s fallacy|law of large numbers|conditional "
        "probability|bayes theorem|mutually exclusive events|independent events|prove by "
        "induction|proof by induction|proof by contradiction|by contradiction|for all integers|for "
        "every integer|for all n|if and only if|is divisible by|greatest common divisor|greatest "
        "common factor|least common multiple|lowest common multiple|highest common factor|square "
        "root of|to the power of|raised to the power|the nth term|nth term|arithmetic sequence|"
        "geometric sequence|arithmetic progression|geometric progression|geometric series|infinite "
        "series|sum of the first|sum of all integers|sum of the digits|sum of digits|consecutive "
        "integers|consecutive numbers|consecutive even|consecutive odd|perfect squares|rational "
        "number|times table|times tables|multiplication table|long division|long multiplication|"
        "mental math|mental maths|word problems|maths problem|math question|maths question|maths "
        "homework|math puzzle|algebra problem|algebra homework|geometry problem|logic puzzles|"
        "logic problem|logic riddle|logical puzzle|solve this riddle|answer this riddle|solve this "
        "puzzle|solve the riddle|guess the number|liar paradox|zebra puzzle|einstein s riddle|"
        "einstein puzzle|tower of hanoi|magic square|eight queens|knight s tour|seven bridges|"
        "killer sudoku|verbal arithmetic|24 game|traveling salesman|travelling salesman|knapsack "
        "problem|linear programming|integer programming|maximize profit|minimize cost|maximise "
        "profit|minimise cost|optimal strategy|game theory|prisoner s dilemma|nash equilibrium|"
        "zero sum game|how many days since|how many days left|how many weeks until|how many weeks "
        "between|how many months until|how many hours between|how many minutes between|days from "
        "today|days from now|weeks from now|months from now|what day will it|what date will|what "
        "time will it|hours from now|minutes from now|is a leap year|years older than|twice as "
        "old|ballpark estimate|fermi problem|fermi estimate|fermi question|orders of magnitude|"
        "piano tuners|how many golf balls|golf balls fit|estimate how many|convert celsius|celsius "
        "to fahrenheit|miles to km|km to miles|kilometers to miles|miles to kilometers|pounds to "
        "kg|kg to pounds|kg to lbs|lbs to kg|feet to meters|meters to feet|inches to cm|cm to "
        "inches|how many ounces in|how many grams in|how many cups in|how many teaspoons in|how "
        "many tablespoons in|how many inches in|how many feet in|how many meters in|how many "
        "seconds in|how many minutes in|how many hours in|miles per hour|kilometers per hour|km "
        "per hour|average speed|at a speed of|trains leave|two trains|leaves the station|drain the "
        "tank|dig a hole|hen and a half|simple interest|compounded annually|compounded monthly|"
        "interest compounded|percent increase|percentage increase|percent decrease|percentage "
        "decrease|percent change|percentage change|is what percent|percent off|after a discount|"
        "ratio of|in the ratio|directly proportional|inversely proportional|rate of change|is my "
        "math right|is my maths right|is my math correct|check my calculation|check my "
        "calculations|double check my math|am i calculating|step by step solution|show your "
        "working|area of a circle|area of a triangle|area of the triangle|volume of a sphere|"
        "volume of a cylinder|surface area of|right triangle|right angled triangle|interior "
        "angles|exterior angle|angles of a triangle|slope of the line|equation of the line|system "
        "of equations|simultaneous equations|linear equations|quadratic equation|quadratic "
        "formula|completing the square|complete the square|derivative of|integral of|limit as x|"
        "differential equation|differential equations|taylor series|dot product of|cross product "
        "of|truth table|modus ponens|modus tollens|affirming the consequent|denying the "
        "antecedent|is this argument valid|necessary and sufficient|necessary condition|sufficient "
        "condition|all men are mortal|in how many ways|how many different ways|how many "
        "permutations|how many possible|n choose k|handshake problem|how many handshakes|"
        "pigeonhole principle|inclusion exclusion principle|how many squares|how many triangles|"
        "hands of a clock|angle between the hands|complete the sequence|missing number|number "
        "pattern|number sequence|odd one out|which weighs more|pound of feathers|kilogram of "
        "feathers|bat and a ball|bat and ball|lily pads|lily pad|5 machines|widgets in 5|two "
        "doors|one always lies|three light switches|three switches|burning ropes|two ropes|water "
        "jugs|gallon jug|wolf goat cabbage|fox chicken grain|cheryl s birthday|blue eyed "
        "islanders|100 prisoners|12 coins|twelve coins|counterfeit coin|balance scale|months have "
        "28 days|moses take on|bury the survivors|how many sisters|each brother has|brothers each "
        "have|how many r s|9 11 or 9 9|which number is larger|fewest number of|smallest possible|"
        "greatest possible|no two adjacent|seating arrangement|round robin tournament|without "
        "conflicts|no overlapping|non overlapping shifts|significant figures|sig figs|scientific "
        "notation|simplest form|lowest terms|improper fraction|mixed number|résoudre l équation|"
        "résous l équation|resous l equation|résoudre pour x|trouver x|trouve x|la valeur de x|"
        "quelle probabilité|quelles sont les chances|probabilité que|lancer un dé|lancer de dé|"
        "deux dés|pile ou face|jeu de 52 cartes|jeu de cartes|sans remise|avec remise|tiré au "
        "hasard|espérance mathématique|loi binomiale|théorème de bayes|démontrer que|démontrez "
        "que|montrez que|par récurrence|démonstration par récurrence|par l absurde|raisonnement "
        "par l absurde|si et seulement si|est il premier|plus grand commun diviseur|plus petit "
        "commun multiple|racine carrée|racine cubique|suite arithmétique|suite géométrique|somme "
        "des premiers|nombres consécutifs|entiers consécutifs|problème de maths|exercice de maths|"
        "devoir de maths|problème mathématique|calcul mental|table de multiplication|énigme "
        "logique|casse tête logique|problème de logique|question piège|résous cette énigme|"
        "résoudre cette énigme|devine le nombre|tour de hanoï|tours de hanoï|carré magique|"
        "chevaliers et fripons|combien de jours entre|combien de jours avant|combien de jours "
        "reste t il|dans combien de jours|quel jour tombe|quel jour serons nous|quelle heure sera "
        "t il|année bissextile|ans de plus que|quel âge aura|ordre de grandeur|estimation "
        "grossière|à vue de nez|au doigt mouillé|en gros combien|en degrés fahrenheit|en "
        "fahrenheit|en celsius|miles en km|livres en kilos|pieds en mètres|pouces en cm|kilomètres "
        "par heure|vitesse moyenne|à la vitesse de|un train part|remplir la baignoire|remplir le "
        "réservoir|intérêts composés|intérêt simple|pourcentage d augmentation|augmentation en "
        "pourcentage|pourcentage de réduction|règle de trois|produit en croix|proportionnel à|"
        "inversement proportionnel|mon calcul est juste|mon calcul est il correct|vérifier mon "
        "calcul|vérifie mon calcul|j ai bien calculé|aire d un cercle|aire du triangle|volume d "
        "une sphère|théorème de pythagore|triangle rectangle|système d équations|équation du "
        "second degré|table de vérité|condition nécessaire|condition suffisante|combien de façons|"
        "nombre de façons|combien de combinaisons|principe des tiroirs|suite logique|nombre "
        "manquant|nombre suivant|trouver l intrus|aiguilles d une horloge|dilemme du prisonnier|"
        "théorie des jeux|voyageur de commerce|programmation linéaire|maximiser le profit|"
        "minimiser le coût|chiffres significatifs|paradoxe de monty|löse die gleichung|löse nach "
        "x|nach x auflösen|nach x umstellen|groß ist die wahrscheinlichkeit|hoch ist die "
        "wahrscheinlichkeit|mit welcher wahrscheinlichkeit|wahrscheinlichkeit dafür|zwei würfel|"
        "mit zurücklegen|ohne zurücklegen|zufällig gezogen|kopf oder zahl|kartenspiel mit 52|"
        "beweisen sie dass|zeige dass|zeigen sie dass|durch vollständige induktion|vollständige "
        "induktion|genau dann wenn|größter gemeinsamer teiler|kleinstes gemeinsames vielfaches|die "
        "wurzel aus|hoch zwei|zum quadrat|arithmetische folge|geometrische folge|geometrische "
        "reihe|summe der ersten|aufeinanderfolgende zahlen|ist meine rechnung richtig|stimmt meine "
        "rechnung|prüfe meine rechnung|rechne bitte nach|habe ich richtig gerechnet|wie viele tage "
        "bis|wie viele tage zwischen|tage sind es bis|wie viele wochen bis|welcher wochentag|an "
        "welchem wochentag|in wie vielen tagen|tage ab heute|uhr ist es dann|ist ein schaltjahr|"
        "jahre älter als|mal so alt wie|doppelt so alt|über den daumen gepeilt|grob geschätzt|pi "
        "mal daumen|ungefähr wie viele|schätze wie viele|meilen in kilometer|pfund in kilogramm|"
        "fuß in meter|zoll in zentimeter|kilometer pro stunde|durchschnittliche geschwindigkeit|"
        "ein zug fährt|ein zug verlässt|mit einer geschwindigkeit|zusammen arbeiten|das becken "
        "füllen|den tank füllen|prozentuale veränderung|prozentuale steigerung|um wie viel "
        "prozent|umgekehrt proportional|direkt proportional|fläche eines kreises|volumen einer "
        "kugel|satz des pythagoras|rechtwinkliges dreieck|lineares gleichungssystem|quadratische "
        "gleichung|quadratische ergänzung|auf wie viele arten|wie viele möglichkeiten gibt|anzahl "
        "der möglichkeiten|wie viele kombinationen|welche zahl kommt|setze die reihe fort|setze "
        "die zahlenreihe fort|fehlende zahl|was passt nicht|zeiger einer uhr|winkel zwischen den "
        "zeigern|logisches rätsel|löse das rätsel|löse dieses rätsel|wer lügt|ritter und schurken|"
        "türme von hanoi|magisches quadrat|hinreichende bedingung|notwendige bedingung|problem des "
        "handlungsreisenden|lineare optimierung|gewinn maximieren|kosten minimieren|mentale "
        "arithmetik|signifikante stellen|resolver la ecuación|resuelve la ecuación|resuelve la "
        "ecuacion|resuelve para x|despejar x|despeja x|despejar la x|halla x|hallar x|encuentra x|"
        "el valor de x|cuál es la probabilidad|cual es la probabilidad|qué probabilidad hay|"
        "probabilidad de que|lanzar un dado|lanzar dos dados|dos dados|lanzar una moneda|cara o "
        "cruz|cara o sello|águila o sol|baraja de 52|baraja española|sin reemplazo|con reemplazo|"
        "sin reposición|con reposición|valor esperado|esperanza matemática|distribución binomial|"
        "teorema de bayes|demostrar que|demuestre que|por inducción|inducción matemática|reducción "
        "al absurdo|por el absurdo|si y solo si|si y sólo si|máximo común divisor|mínimo común "
        "múltiplo|raíz cuadrada|raíz cúbica|raiz cuadrada|al cuadrado|progresión aritmética|"
        "progresión geométrica|sucesión aritmética|suma de los primeros|números consecutivos|"
        "problema de matemáticas|problema matemático|ejercicio de matemáticas|tarea de "
        "matemáticas|cálculo mental|tabla de multiplicar|problema de lógica|acertijo lógico|"
        "acertijo de lógica|pregunta trampa|pensamiento lateral|resuelve este acertijo|resuelve la "
        "adivinanza|adivina el número|torre de hanói|torres de hanói|cuadrado mágico|caballeros y "
        "bribones|cuántos días faltan|cuantos dias faltan|cuántos días hay entre|cuántos días "
        "pasan|dentro de cuántos días|qué día será|qué hora será|año bisiesto|años mayor que|veces "
        "la edad|el triple de edad|el doble de edad|orden de magnitud|ojo de buen cubero|"
        "estimación aproximada|más o menos cuántos|a celsius|a fahrenheit|en grados fahrenheit|"
        "millas a kilómetros|kilómetros a millas|libras a kilos|pies a metros|pulgadas a "
        "centímetros|kilómetros por hora|velocidad media|velocidad promedio|a una velocidad de|un "
        "tren sale|sale de la estación|trabajando juntos|llenar el tanque|llenar la piscina|"
        "interés compuesto|interés simple|porcentaje de aumento|porcentaje de descuento|qué "
        "porcentaje es|por ciento de|regla de tres|directamente proporcional|inversamente "
        "proporcional|está bien mi cálculo|revisa mi cálculo|revisa mis cuentas|comprueba mi "
        "resultado|lo calculé bien|hice bien la cuenta|área de un círculo|área del triángulo|"
        "volumen de una esfera|teorema de pitágoras|triángulo rectángulo|sistema de ecuaciones|"
        "ecuación cuadrática|ecuación de segundo grado|tabla de verdad|condición necesaria|"
        "condición suficiente|de cuántas formas|cuántas combinaciones|número de combinaciones|"
        "principio del palomar|qué número sigue|sigue la serie|número que falta|agujas del reloj|"
        "dilema del prisionero|teoría de juegos|problema del viajante|programación lineal|"
        "maximizar la ganancia|minimizar el costo|minimizar el coste|cifras significativas|"
        "resolver a equação|resolva a equação|resolve a equação|isolar o x|ache x|encontre x|o "
        "valor de x|qual a probabilidade|qual é a probabilidade|probabilidade de sair|lançar um "
        "dado|dois dados|jogar uma moeda|lançamento de moeda|cara ou coroa|baralho de 52|sem "
        "reposição|com reposição|distribuição binomial|demonstre que|provar que|por indução|"
        "indução matemática|por absurdo|redução ao absurdo|se e somente se|se e só se|máximo "
        "divisor comum|mínimo múltiplo comum|raiz quadrada|raiz cúbica|ao quadrado|progressão "
        "aritmética|progressão geométrica|soma dos primeiros|problema de matemática|exercício de "
        "matemática|questão de matemática|dever de matemática|lição de matemática|conta de cabeça|"
        "questão de lógica|desafio de lógica|charada de lógica|pergunta capciosa|pensamento "
        "lateral|resolva esta charada|resolva o enigma|adivinhe o número|quadrado mágico|"
        "cavaleiros e patifes|quantos dias faltam|quantos dias entre|quantos dias até|daqui a "
        "quantos dias|que dia da semana|qual dia da semana|que horas serão|ano bissexto|anos mais "
        "velho|o triplo da idade|o dobro da idade|ordem de grandeza|estimativa aproximada|mais ou "
        "menos quantos|para celsius|para fahrenheit|em fahrenheit|milhas para km|milhas em "
        "quilômetros|libras para kg|pés para metros|polegadas para cm|quilômetros por hora|"
        "quilómetros por hora|velocidade média|a uma velocidade de|um trem sai|um comboio parte|"
        "trabalhando juntos|encher o tanque|encher a piscina|juros compostos|juros simples|aumento "
        "percentual|variação percentual|qual a porcentagem|qual a percentagem|por cento de|regra "
        "de três|diretamente proporcional|minha conta está certa|meu cálculo está certo|confere "
        "minha conta|confira meu cálculo|calculei certo|área de um círculo|área do triângulo|"
        "volume de uma esfera|triângulo retângulo|sistema de equações|equação do segundo grau|"
        "fórmula de bhaskara|tabela verdade|condição necessária|condição suficiente|de quantas "
        "formas|quantas combinações|análise combinatória|casa dos pombos|qual o próximo número|"
        "complete a sequência|ponteiros do relógio|dilema do prisioneiro|teoria dos jogos|"
        "programação linear|maximizar o lucro|minimizar o custo|algarismos significativos"),
    "reasoning_vocab_weak": ("reasoning", 0.8, 2,
        "prime primes proportion chance chances likelihood toss poker approximately roughly infer "
        "trick consecutive profit fortnight elapsed inequalities nim countable contradiction "
        "calcul décimal urne primitives estimer convertir optimiser maximiser minimiser "
        "contraintes démonstration paradoxe mathématiques ausrechnen würfel münze bruch brüche "
        "schätzen schätzung ungefähr optimieren maximieren minimieren beweis beweisen paradoxon "
        "mathe mathematik wochentag fakultät wurzel umrechnen umrechnung cálculo resolver logica "
        "rompecabezas fracción dados moneda estimar estimación aproximadamente optimizar maximizar "
        "minimizar restricciones demostración paradoja matemáticas adivinha pegadinha percentagem "
        "fração frações estimativa converter otimizar demonstrar paradoxo matemática",
        "quebra cabeça"),

    # --- general ---------------------------------------------------------------------------------
    "general_question": ("general", 1.0, 1, "",
        "difference between|the difference|pros and cons|why is|why are|why do|why does|who is|who "
        "was|who were|when was|when did|where is|where was|what causes|how do i|how can i|how "
        "should i|what should i|how does|what happens if|is it true|recommend|recommendations|any "
        "recommendations|what do you think|letter to|an email|the email|this email|email to|emails "
        "to|email my|email for|email asking|email saying|e-mail|courriel|correo|email"),
    "general_task": ("general", 2.5, 2,
        "memo translate translation translated summarize summarise summary summarizing proofread "
        "proofreading grammar spelling typos rephrase reword paraphrase extract classify "
        "categorize categorise sentiment advice tips definition define korrigieren corriger "
        "corregir corrigir traduis traduire traduce traducir traduz traduzir übersetze "
        "übersetzen übersetzung traducción tradução résume résumé resumen resumo resume "
        "zusammenfassung zusammenfassen corrige corrija korrigiere consejo conseil conselho "
        "ratschlag tipps dicas consejos conseils",
        "json format|named entities|lesson plan|key points|main points|bullet points|in bullets|"
        "tl;dr|tldr|more professional|more formal|less formal|sound more|polite way|politely|cover "
        "letter|what does it mean|what does this mean|what is the meaning|meaning of|is it safe|is "
        "it normal|is it bad|is it ok|is it okay|how do i get rid|how to get rid|best way to|how "
        "do you say|how to say|in french|in spanish|in german|in english|in portuguese|in italian|"
        "into english|into french|into spanish|into german|explain like|eli5|what happened|what "
        "are the symptoms|recipe for|how do i cook|how to cook|how do i clean|how to clean|how do "
        "i remove|how to remove|what should i do|any tips|any advice|can you recommend|suggest a|"
        "suggest some|book recommendation|write an email|a persuasive email|professional email|"
        "formal email|follow-up email|email asking|email to my|email to our|email to the|write a "
        "letter to|letter to my|email to my|reply to this|respond to this|resignation letter|"
        "recommendation letter|reference letter|formal letter|complaint letter|letter of|extract "
        "the|pull out|classify these|categorize these|is this review|positive or negative|what's "
        "the capital|what is the capital|the capital of"),
}

#: Cues that count only in a text with a number in it (units and money words are everyday words).
NUMERIC_CUES = frozenset(("math_everyday", "quantities", "quantity_question", "money_question",
                          "chance_question", "formula", "number_question"))

#: Numeric cues that say nothing when the text holds code (a definition or a fence).
CODE_NUMBERS = ("formula", "number_question", "word_problem")

#: Structural cues: (name, intent, weight, cap, regular expression on the lower-cased text).
INTENT_PATTERNS = [
    ("code_fence", "code", 4.0, 1, r"```"),
    ("code_definition", "code", 6.0, 1, r"\n[ \t]*(?:(?:def|class|async def|function|fn|func|"
                                        r"public|private|static|#include|import|package|using "
                                        r"namespace|const|let|var) [\w{<*(\"'$]|from [\w.]+ "
                                        r"import|#!/|select [\w*, .()]+ from|insert into|create "
                                        r"table|update \w+ set|(?:private |public )?sub \w+\(|dim "
                                        r"\w+ as|for \w+ in [^\n]*:|(?:if|while|elif) [^\n]*:\n|"
                                        r"echo [$\"']|export \w+=)"),
    ("doctest", "code", 3.0, 1, r"\n[ \t]*>>> "),
    ("stack_trace", "code", 4.0, 1, r"traceback \(most recent call last\)|(?:error|exception|"
                                    r"warning|fatal|panic)(?:\[\w+\])?: |panicked at|"
                                    r"segmentation fault|undefined reference|npm err!|\n[ \t]+at "
                                    r"[\w$.<>]+ ?\(|\n\s*file \"[^\"]+\", line \d+|exited with|"
                                    r"exit code \d|errno|\[error\]|\[warn\]|error \d{3,5}|#n/a|"
                                    r"#ref!|#value!|#div/0!|#name\?|#spill!|crashloopbackoff|"
                                    r"imagepullbackoff|oomkilled|run-time error|compile error|"
                                    r"build failed|failed to compile"),
    ("diff", "code", 4.0, 1, r"\n(?:\+\+\+|---) [ab]/|\n@@ -\d"),
    ("file_path", "code", 2.5, 2, r"\.(?:py|js|mjs|cjs|jsx|ts|tsx|go|rs|java|kt|cpp|cc|hpp|cs|rb|"
                                  r"php|swift|sh|bash|zsh|ps1|bat|sql|ya?ml|toml|ini|cfg|conf|env|"
                                  r"json|xml|csv|tsv|log|gradle|vue|svelte|tf|lock|txt|xlsx|xlsm|"
                                  r"ipynb|dockerfile|service|desktop|plist|gitignore|bashrc|"
                                  r"zshrc)\b|/(?:etc|var|usr|home|opt|tmp|dev|proc|srv|mnt|bin|"
                                  r"sys)\b|:\\|dockerfile|makefile|package\.json|requirements\.txt"),
    ("test_output", "code", 3.0, 1,
     r"assertionerror|pytest|unittest|cargo test|go test|npm test| passed in | passed, | failed in "
     r"| failed, "),
    ("shell_command", "code", 2.5, 1, r"\n[ \t]*(?:\$ |# |sudo |git |npm |npx |pip3? |docker |"
                                      r"kubectl |helm |curl |make |cargo |chmod |ls |cd |cat |echo "
                                      r"|export |ssh |scp |rsync |find |grep |sed |awk |python3? |"
                                      r"node |brew |apt(?:-get)? |yum |systemctl |journalctl )"),
    ("code_syntax", "code", 2.0, 3, r"==|!=|&&|\|\||=>|->|\+=|::|;\n|\{\n|\(\)|\$[({a-z_]|\[\d*\]|"
                                    r"</?[a-z]+[ >]| --[a-z][\w-]+| -[a-z]\b| \| ?(?:grep|awk|sed|"
                                    r"sort|uniq|head|tail|xargs|wc|jq|tee)|\.[a-z_]\w*\(|_[a-z]"),
    ("in_language", "code", 3.0, 1, r" (?:in|with|using|via|for|en|em|mit|com|avec|con) "
                                    r"(?:python3?|javascript|js|typescript|ts|bash|zsh|"
                                    r"powershell|sql|postgres|mysql|sqlite|rust|go|golang|java|"
                                    r"kotlin|swift|c|c\+\+|c#|ruby|php|perl|lua|r|excel|vba|"
                                    r"sheets|google sheets|pandas|numpy|react|node|django|flask|"
                                    r"docker|kubernetes|regex|awk|sed|jq|css|html)\b(?! "
                                    r"(?:major|minor|sharp|flat))"),
    ("html_tag", "code", 3.0, 1, r"<(?:div|span|p|a|img|video|audio|input|button|form|table|tr|"
                                 r"td|ul|ol|li|script|style|head|body|html|section|header|"
                                 r"footer|nav|h[1-6]|select|option|label|canvas|svg|iframe|"
                                 r"template|slot)\b[^>\n]*>"),
    ("assignment", "code", 2.5, 1,
     r"\n[ \t]*[a-z_][\w.\[\]]*(?:, ?[a-z_][\w.]*)* ?[+:]?= ?[\w\[{(\"'$-]"),
    ("tool_table", "code", 3.0, 1, r"----+  +---"),
    ("inline_code", "code", 2.5, 1,
     r"`[^`\n]{2,80}`|\bdef [a-z_]+\(|\bconst \{|\bconst [a-z_]+ ?=|\.\.\.[a-z]|=> ?\{"),
    ("regex_syntax", "code", 3.0, 1,
     r"\(\?[=!<:]|\.\*|\.\+\?|\\[dswb][+*?]|\[\^|\[a-z|\[0-9|\{[0-9]+,[0-9]*\}"),
    ("css_declaration", "code", 3.0, 1, r"(?:position|display|overflow(?:-[xy])?|z-index|"
                                        r"margin(?:-\w+)?|padding|height|width|flex(?:-\w+)?|"
                                        r"grid(?:-\w+)?|transform|font-size|align-items|"
                                        r"justify-content|box-sizing): ?[\w#%(-]"),
    ("sheet_reference", "code", 3.0, 1, r"![$a-z]"),
    ("spreadsheet_syntax", "code", 3.0, 1,
     r"=[a-z]+\(|:[a-z]{1,2}[0-9]|col(?:umn)? [a-z]\b|cells? [a-z]{1,2}[0-9]"),
    ("roleplay_frame", "creative", 3.0, 1, r"\nas an? [a-z][\w -]{1,40}, (?:how|what|describe|"
                                           r"tell)|\nimagine you(?:'re| are) an? [\w "
                                           r"-]{2,40}[.,] |\nyou are an? [\w -]{2,40}[.,] "
                                           r"(?:describe|tell|what|how)|\nbe [a-z]+ (?:and|who|"
                                           r"while) | act as an? [\w -]{1,30}(?:who|that|"
                                           r"monologu|and (?:tell|describe))"),
    ("counterfactual", "creative", 3.0, 1, r"\nwhat if (?!it |i |we |they |the file|the input)|"
                                           r"what would (?:have )?happen(?:ed)? if"),
    ("write_creative", "creative", 2.5, 1, r"(?:write|compose|pen|draft|give me|need|want|"
                                           r"create|make me|tell me|escreve|escreva|escribe|"
                                           r"écris|écrivez|schreib|schreibe|invente|inventa|"
                                           r"erfinde) [^.?!\n]{0,40}\b(?:poem|story|song|rap|"
                                           r"limerick|haiku|sonnet|speech|toast|caption|slogan|"
                                           r"tagline|jingle|ad\b|blurb|bio\b|tweet|post|piece|"
                                           r"scene|monologue|script|letter from|note from|"
                                           r"message for|card|riddle|joke|pun|description|"
                                           r"copy\b|names?\b|title|backstory|ode|ballad|"
                                           r"villanelle|vignette|eulogy|review|blog|newsletter|"
                                           r"hook|intro|verse|lyrics)"),
    ("letter_from", "creative", 3.0, 1, r"(?:\A\n|write |draft |compose |a |an |the |uma |um |"
                                        r"une |un |una |ein |eine )(?:[\w-]+ ){0,3}(?:letter|"
                                        r"note|email|message|memo|carta|lettre|brief)(?: of "
                                        r"[\w-]+)? (?:from|written by|by|de|von|do|da) (?:an?|"
                                        r"the|my|our|un|una|um|uma|mon|ma|mi|meu|minha|einem|"
                                        r"einer|meinem|meiner)\b"),
    ("letter_from_not_general", "general", -2.5, 1, r"(?:\A\n|write |draft |compose |a |an |the "
                                                    r")(?:[\w-]+ ){0,3}(?:letter|note|email|"
                                                    r"message|memo)(?: of [\w-]+)? (?:from|written "
                                                    r"by|by) (?:an?|the|my|our)\b"),
    ("naming_question", "creative", 2.5, 1,
     r"\bnames?\s*\?+\s*$|\bnames? ideas?\b|\bnamensideen\b"),
    ("creative_rewrite", "creative", 2.5, 1, r"(?:make|rewrite|reword|rework|turn|translate|"
                                             r"reescreve|reescribe|réécris|umschreiben|schreib) "
                                             r"[^.\n]{0,30}\b(?:funny|funnier|charming|engaging|"
                                             r"envolvente|witty|playful|fun|exciting|poetic|"
                                             r"dramatic|epic|spooky|magical|into an? (?:poem|"
                                             r"song|story|rap|haiku|limerick|sonnet))|sound like "
                                             r"(?:an? |it (?:was|came))"),
    ("formula", "reasoning", 2.5, 2, r"[0-9](?: ?[*×÷^+x] ?[0-9]| / [0-9]| ?- ?[0-9]+ ?=| ?% "
                                     r"(?:of|off|per|a year|annual|interest|tip|discount|raise|"
                                     r"more|less|de|du|von|do|da))|f\(x\)|solve for|[=^] ?-?[0-9]|"
                                     r"[+*] ?[a-z] ?=|²|³|√"),
    ("number_question", "reasoning", 3.0, 1, r"is -?\d[\d,]* (?:a )?(?:prime|divisible|even|odd|a "
                                             r"perfect)|what(?:'s| is) -?\d[\d.,]* ?(?:[*/x×÷^+-]|"
                                             r"times|divided|plus|minus|squared|cubed|percent|%)| "
                                             r"squared\b| cubed\b|(?:sequence|series|comes "
                                             r"next)\W+[\d, ]{5,}|, [0-9]+, [0-9]+, [0-9]|what ?%|"
                                             r"% is that|[0-9](?:st|nd|rd|th) prime|[0-9] est "
                                             r"(?:un nombre )?premier|[0-9] (?:es|é) (?:un "
                                             r")?primo|[0-9] ist (?:eine )?primzahl"),
    ("riddle_question", "reasoning", 3.0, 1, r"what am i\s*(?:[?.!]|$)|qu[ée] soy\s*\?|que sou eu|"
                                             r"qui suis-je|was bin ich\s*\?|\bwho(?:'s| is) "
                                             r"right\b|quem tem razão|wer hat recht|qui a raison|"
                                             r"quién tiene razón|double[sd]? every|every "
                                             r"(?:\d+(?:st|nd|rd|th)|other) (?:day|week|open day)"),
    ("riddle_shape", "reasoning", 3.0, 1, r"what (?:has|have|can|goes|gets|comes|runs|is "
                                          r"full)\b[^?\n]{0,60}\b(?:but|never|without|the more)\b|"
                                          r"\bbut (?:never|can't|cannot) \w+s\b|[0-9], _+|_+, "
                                          r"[0-9]|[0-9] [0-9] [0-9] [0-9] [0-9] [0-9]| [a-z] [a-z] "
                                          r"[a-z] [a-z] [a-z] [a-z]\b"),
    ("lateral", "reasoning", 2.5, 1,
     r"\. (?:how|why)\?\s*$|\. (?:how|why) (?:is that|did|can|could)[^.]*\?\s*$"),
]

#: Verb and artefact within a few words: "write ... function", "fix ... query".
PRODUCE = {
    "code_request": ("code", 3.0, "write implement create develop build fix debug refactor "
                                  "optimize optimise convert port rewrite translate generate make "
                                  "add code automate parse scrape deploy",
                     "function program class method module website webpage app api endpoint "
                     "query regex algorithm cli parser script scripts macro formula bot test "
                     "tests component hook migration dockerfile workflow cronjob unit "
                     "endpoint handler middleware crud schema loop oneliner one-liner "
                     "pipeline backend frontend decorator"),
}
CODE_TOOLS = re.compile(r"(?:bash|shell|exec_command|run_command|terminal|edit|multiedit|write|"
                        r"read|grep|glob|ls|apply_patch|str_replace\w*|create_file|write_file|"
                        r"read_file|edit_file|notebookedit)", re.I)
_DIGIT_RE = re.compile(r"\d")
#: A user correcting themselves mid-message ("a poem... no wait, a script"): the rest is the
#: request.
_CORRECTION_RE = re.compile(r"\b(?:no wait|wait no|wait,? no|actually no|no,? actually|nah,? "
                            r"actually|actually,? (?:i|just)|just kidding|only kidding|kidding|jk|"
                            r"joking|i mean|sorry,? no|no,? sorry|scratch that|never ?mind|forget "
                            r"that|forget it|real question|wrong tab|ach nein|nein,? eigentlich|"
                            r"spa(?:ß|ss) beiseite|non,? en fait|en fait non|non attends|je "
                            r"rigole|je plaisante|no,? espera|mejor dicho|es broma|bromeo|na "
                            r"verdade|brincadeira|não,? espera|actually skip|actually just|eh,? "
                            r"actually|egal|whatever,|anyway,|bref|en fin|enfim)\b")
_NUM_RE = re.compile(r"(?<![\w.,])[0-9]")        # numbers: "3", "600k", "2.80" (once)
# "1. ", "2) ": list numbering, not quantities
_LIST_MARK_RE = re.compile(r"(?:^|\n)[ \t]*\d{1,2}[.)] ")
_WORD_RE = re.compile(r"[^\W_]+[+#]*")
_NUMBER_WORDS = frozenset("two three four five six seven eight nine ten eleven twelve twenty "
                          "thirty forty fifty hundred thousand million half twice double "
                          "triple third quarter dozen".split())
_QUESTION = frozenset("how what whats find calculate determine which when possible enough cuál "
                      "cual quel quelle qual welcher welche wann quand cuándo quando wie "
                      "cuánto quanto combien".split())
INTENTS = ("code", "creative", "reasoning", "general")
UNSURE_BELOW = 0.3      # a detected intent with less confidence than this is "unsure"
GENERAL_PRIOR = 1.0     # another intent must score more than this to win over general


def _compile_cues():
    """word -> [cue], and the first two words of a phrase -> [(phrase, cue)]. A "word" the
    tokenizer splits (role-play, node.js) is matched as a phrase; a one-word phrase as a word."""
    words, phrases = {}, {}
    for name, (_intent, _w, _cap, ws, ps) in INTENT_CUES.items():
        for item in ws.split() + [p for p in ps.split("|") if p]:
            toks = _WORD_RE.findall(item)
            if len(toks) == 1:
                words.setdefault(toks[0], []).append(name)
            elif toks:
                phrases.setdefault((toks[0], toks[1]), []).append((" " + " ".join(toks) + " ", name))
    return words, phrases


def _literal_prefix(branch):
    """(the literal text a regular expression branch must start with, where in the pattern that
    literal ends); ("", 0) if the branch starts with something else."""
    out = []
    i = 2 if branch.startswith("\\b") else 0          # a word boundary is no character
    while i < len(branch):
        at, c = i, branch[i]
        if c == "\\" and i + 1 < len(branch) and not branch[i + 1].isalnum():
            lit, i = branch[i + 1], i + 2
        elif c == "\\" and branch[i + 1:i + 2] == "n":
            lit, i = "\n", i + 2
        elif c in ".^$*+?{}[]|()\\":
            break
        else:
            lit, i = c, i + 1
        if i < len(branch) and branch[i] in "*?{":
            # that character is optional: it cannot be part of the prefix
            return "".join(out), at
        out.append(lit)
    return "".join(out), i


def _group_end(pattern, start):
    """The index of the ")" that closes the group opening at `start`."""
    depth, i, cls = 0, start, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if cls:
            cls = c != "]"
        elif c == "[":
            cls = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unbalanced group in {pattern!r}")


def _split_top(pattern):
    """A regular expression's top-level alternatives."""
    parts, depth, cls, cur, esc = [], 0, False, "", False
    for c in pattern:
        if esc:
            cur, esc = cur + c, False
            continue
        if c == "\\":
            cur, esc = cur + c, True
            continue
        if cls:
            cls = c != "]"
        elif c == "[":
            cls = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += c
    parts.append(cur)
    return parts


def _expand(branch):
    """"ab(?:c|d)e" -> ["abce", "abde"], so each branch starts with a longer literal (when the group
    follows the branch's literal start and is neither repeated nor optional)."""
    lit, at = _literal_prefix(branch)
    if len(lit) > 2 or not branch.startswith("(?:", at):
        return [branch]                    # a literal of 3 or more characters is rare enough
    end = _group_end(branch, at)
    rest, alts = branch[end + 1:], _split_top(branch[at + 3:end])
    if rest[:1] in ("*", "?", "{", "+") or len(alts) > 16:
        return [branch]
    return [x for alt in alts for x in _expand(branch[:at] + alt + rest)]


class _LazyRe:
    """A regular expression compiled when first used (the intent tables' 400 branches would
    take a fifth of the start-up; the maintenance thread warms them up once the router serves)."""

    __slots__ = ("pattern", "rx")

    def __init__(self, pattern):
        self.pattern, self.rx = pattern, None

    def findall(self, text):
        if self.rx is None:
            self.rx = re.compile(self.pattern)
        return self.rx.findall(text)


def _branches(pattern):
    """A pattern split into branches that each start with a literal where possible, compiled on
    their own with that literal, so a scan is a substring test first (re tries every branch of an
    alternation at every position, which is many times slower)."""
    return [(_literal_prefix(b)[0], _LazyRe(b)) for p in _split_top(pattern) for b in _expand(p)]


def warm_intent_tables():
    """Compile every branch of the intent tables now (not on the first requests that meet them)."""
    for _n, _i, _w, _cap, brs in _PATTERNS:
        for _prefix, rx in brs:
            rx.findall("")


_CUE_WORDS, _CUE_PHRASES = _compile_cues()
_PHRASE_KEYS = frozenset(_CUE_PHRASES)
_PATTERNS = [(n, i, w, cap, _branches(p)) for n, i, w, cap, p in INTENT_PATTERNS]
#: The branches by the first character of their literal prefix (a text is only tested against
#: branches whose first character it contains), and the few that have no literal prefix.
_BRANCHES_BY_CHAR, _UNPREFIXED = {}, []
for _n, _i, _w, _cap, _brs in _PATTERNS:
    for _prefix, _rx in _brs:
        if _prefix:
            _BRANCHES_BY_CHAR.setdefault(_prefix[0], []).append((_n, _prefix, _rx))
        else:
            _UNPREFIXED.append((_n, "", _rx))
_PATTERN_CUES = {n: (i, w, cap) for n, i, w, cap, _b in _PATTERNS}
_PRODUCE = {n: (i, w, frozenset(v.split()),
                frozenset(a.split())) for n, (i, w, v, a) in PRODUCE.items()}


@functools.lru_cache(maxsize=4096)
def _earlier_signals(text):
    """_signals of a text that is not the latest turn: in a conversation it was the latest turn of
    an earlier request, so it is remembered (a pure function of the text; bounded)."""
    return _signals(text)


def _signals(text):
    """Cues that fire in one (lower-cased, bounded) text: {name: (intent, score)}."""
    hits = {}
    tokens = _WORD_RE.findall(text)
    for t in set(tokens):
        for name in _CUE_WORDS.get(t, ()):
            hits.setdefault(name, set()).add(t)
    joined = None
    for pair in _PHRASE_KEYS.intersection(zip(tokens, tokens[1:])):
        joined = joined or " " + " ".join(tokens) + " "
        for phrase, name in _CUE_PHRASES[pair]:
            if phrase in joined:
                hits.setdefault(name, set()).add(phrase)
    nums = (len(_NUM_RE.findall(text)) + sum(map(_NUMBER_WORDS.__contains__, tokens))
            - len(_LIST_MARK_RE.findall(text)))
    fired = {}
    for name, found in hits.items():
        intent, w, cap, _ws, _ps = INTENT_CUES[name]
        if nums or name not in NUMERIC_CUES:
            fired[name] = (intent, w * min(cap, len(found)))
    padded = "\n" + text
    digits = _DIGIT_RE.search(text) is not None
    counts = {}
    for c in set(padded):
        for name, prefix, rx in _BRANCHES_BY_CHAR.get(c, ()):
            if prefix in padded:
                counts[name] = counts.get(name, 0) + len(rx.findall(padded))
    for name, _p, rx in _UNPREFIXED:
        if digits or name not in NUMERIC_CUES:
            counts[name] = counts.get(name, 0) + len(rx.findall(padded))
    for name, n in counts.items():
        if n and (digits or name not in NUMERIC_CUES):
            intent, w, cap = _PATTERN_CUES[name]
            fired[name] = (intent, w * min(cap, n))
    for name, (intent, w, verbs, artefacts) in _PRODUCE.items():
        if artefacts.isdisjoint(tokens) or verbs.isdisjoint(tokens):
            continue
        for i, t in enumerate(tokens):
            if t in artefacts and not verbs.isdisjoint(tokens[max(0, i - 5):i]):
                fired[name] = (intent, w)
                break
    if nums >= 2 and ("?" in text or _QUESTION.intersection(tokens)):
        fired["word_problem"] = ("reasoning", min(5.0, float(nums)) - 1.0)
    if "code_definition" in fired or "code_fence" in fired:
        for name in CODE_NUMBERS:      # numbers inside code are not a maths question
            fired.pop(name, None)
    return fired


def user_turns(req):
    """The user turns' text, oldest first (tool results count: they are what the user sent)."""
    out = []
    for m in req["messages"]:
        if m["role"] != "user":
            continue
        parts = []
        for p in m["content"]:
            if p["type"] == "text":
                parts.append(p["text"])
            elif p["type"] == "tool_result":
                parts.append(text_of(p["content"]))
        if parts:
            out.append("\n".join(parts))
    return out


def _last_reply(req):
    """The text of the assistant's last reply before the latest user turn, if any."""
    seen_user = False
    for m in reversed(req["messages"]):
        if m["role"] == "user":
            seen_user = True
        elif m["role"] == "assistant" and seen_user:
            return text_of(m["content"])
    return ""


def detect_intent(req):
    """Neutral request -> (intent, confidence 0..1, signals that fired)."""
    scores = dict.fromkeys(INTENTS, 0.0)
    signals = []
    turns = user_turns(req)[-3:]
    texts = [(t, w) for t, w in zip(reversed(turns), (1.0, 0.4, 0.16))]
    if texts:
        # "write a story... no wait, a Python script": what comes after the correction counts.
        latest = texts[0][0][:2000].lower()
        cut = None
        for cut in _CORRECTION_RE.finditer(latest):
            pass
        if cut is not None and len(latest) - cut.end() > 8:
            texts[0:1] = [(latest[cut.end():], 1.0), (latest[:cut.start()], 0.2)]
    reply = _last_reply(req)
    if reply:
        texts.append((reply, 0.25))
    head, tail = 800, 400
    for text, weight in texts:
        if len(text) > head + tail:
            text = text[:head] + "\n" + text[-tail:] if tail else text[:head]
        found = (_signals if weight == 1.0 else _earlier_signals)(text.lower())
        for name, (intent, s) in found.items():
            scores[intent] += s * weight
            if name not in signals:
                signals.append(name)
        head, tail = 300, 0
    if any(CODE_TOOLS.fullmatch(t["name"]) for t in req.get("tools") or ()):
        scores["code"] += 3.0
        signals.append("coding_tools")
    scores["general"] += GENERAL_PRIOR
    # ties: general
    best = max(("general", "code", "creative", "reasoning"), key=scores.__getitem__)
    top, second = sorted((max(0.0, s) for s in scores.values()), reverse=True)[:2]
    confidence = round((top - second) / top, 2) if signals and top > 0 else 0.0
    return best, confidence, signals


# ------------------------------------------------------------------------------------ health --

class Breaker:
    """One circuit breaker. cause: what set the cooldown: "error" (doubling cooldowns), "quota"
    (quota_cooldown_seconds) or "retry_after" (a Retry-After or rate-limit reset header: exact).
    retry_at: until when a provider's Retry-After or reset header asked us to wait (0: none)."""

    __slots__ = ("fails", "opens", "until", "retry_at", "trial", "latency", "error",
                 "cause", "probe_at", "probe_step", "probe_error")

    def __init__(self):
        self.fails = self.opens = 0
        self.until = self.retry_at = self.trial = self.probe_at = self.probe_step = 0.0
        self.latency = self.error = self.cause = self.probe_error = None


class Health:
    """Circuit breakers for providers, models (provider/model) and keys, guarded by one lock that
    is never held during I/O. Keys of breakers: ("provider", name), (name, model), ("key", name,
    index); model breakers exist only for models the catalogue knows (the router checks).

    `breaker_threshold` consecutive failures open a closed breaker for `cooldown_seconds`. When the
    cooldown runs out the breaker is half-open: one request may try (others keep treating it as
    cooling for a moment); its success closes the breaker, its failure opens it again for twice
    as long, up to `max_cooldown_seconds`. A request that tries a candidate while it is still
    cooling (because everything is) never lengthens the cooldown. Retry-After and rate-limit reset
    headers set the cooldown exactly; quota or billing errors set `quota_cooldown_seconds`. While a
    provider or model breaker is open the maintenance thread probes it (probes_due / probed) and a
    good probe closes it. Keys answered with 401/403 are dead until a reload or a reset."""

    TRIAL_SECONDS = 60.0

    def __init__(self, settings):
        self.lock = threading.Lock()
        self.state = {}
        self.dead_keys = {}     # (provider, key index) -> why it was rejected
        # candidate -> when it refused a completion on its native or template path
        self.completions_refused = {}
        self.dirty = False
        # shared with the router's other workers or boxes (see SharedState): key -> when (wall
        # time) a breaker here opened or closed; `wake` is set at each such change
        self.changed, self.wake = {}, None
        self.reconfigure(settings)

    def reconfigure(self, settings):
        """New settings after a reload; keys rejected with 401/403 get another chance."""
        with self.lock:
            self.base = settings["cooldown_seconds"]
            self.cap = settings["max_cooldown_seconds"]
            self.quota = settings["quota_cooldown_seconds"]
            self.threshold = max(1, int(settings["breaker_threshold"]))
            self.probe_first = settings["probe_seconds"]
            self.dead_keys.clear()

    def _cooldown(self, b):
        return min(self.cap, self.base * 2 ** min(b.opens - 1, 30))

    def left(self, key, now):
        """Seconds until the breaker lets a request through (0: closed, or a half-open trial is free)."""
        b = self.state.get(key)
        if b is None:
            return 0.0
        if b.until > now:
            return b.until - now
        if b.trial and now - b.trial < self.TRIAL_SECONDS:
            return 0.5          # a trial is under way: count it as cooling for a moment
        return 0.0

    def begin(self, key, now):
        """A request is about to try this: if the breaker is half-open, this is its trial."""
        b = self.state.get(key)
        if b is not None and b.opens and b.until <= now:
            with self.lock:
                b.trial = now

    def fail(self, key, retry_after=None, quota=False, error=None):
        with self.lock:
            now = time.monotonic()
            b = self.state.get(key)
            if b is None:
                b = self.state[key] = Breaker()
            cooling = b.opens and b.until > now     # tried as a last resort while it cools
            b.trial = 0.0
            b.error = error
            self.dirty = True
            if retry_after is not None:
                b.retry_at = max(b.retry_at, now + retry_after)
            if cooling:       # never lengthened, but for the provider's own word
                if retry_after is not None and b.retry_at > b.until:
                    b.until, b.cause = b.retry_at, "retry_after"
                    self._mark(key)
                return
            if quota:
                length, b.cause = max(self.quota, retry_after or 0.0), "quota"
            elif retry_after is not None:
                length, b.cause = retry_after, "retry_after"
            else:
                b.fails += 1
                if not b.opens and b.fails < self.threshold:
                    return
                length, b.cause = None, "error"
            b.opens += 1          # the first opening, or a half-open trial failed
            b.until = now + (length if length is not None else self._cooldown(b))
            b.probe_step = self.probe_first
            b.probe_at = now + self.probe_first
            self._mark(key)

    def _mark(self, key):
        """A breaker opened or closed here (under the lock): the others are told (SharedState)."""
        if self.wake is not None:
            self.changed[key] = time.time()
            self.wake.set()

    def ok(self, key, latency=None):
        """A success closes the breaker; returns its (fails, opens) before, for `undo_ok`."""
        b = self.state.get(key)
        if b is None and latency is None:
            return (0, 0)
        with self.lock:
            b = self.state.get(key)
            if b is None:
                b = self.state[key] = Breaker()
            before = (b.fails, b.opens)
            self._close(b)
            if before[1]:
                self._mark(key)
            if latency is not None:
                b.latency = latency if b.latency is None else 0.8 * b.latency + 0.2 * latency
            self.dirty = self.dirty or any(before)
            return before

    def undo_ok(self, key, before):
        """A success that turned out not to be one (a stream that broke after it started): the
        failure counts are back, so the failure that follows opens and doubles as it should."""
        with self.lock:
            b = self.state.get(key)
            if b is not None:
                b.fails, b.opens = before

    @staticmethod
    def _close(b):
        b.fails = b.opens = 0
        b.until = b.retry_at = b.trial = b.probe_at = b.probe_step = 0.0
        b.cause = b.error = b.probe_error = None

    REFUSED_SECONDS = 3600.0

    def completion_refused(self, cand):
        """Whether the candidate refused a completion call within the hour (then: chat turns)."""
        at = self.completions_refused.get(cand)
        return at is not None and time.monotonic() - at < self.REFUSED_SECONDS

    def refuse_completion(self, cand):
        with self.lock:
            if len(self.completions_refused) > 1000:
                self.completions_refused.clear()
            self.completions_refused[cand] = time.monotonic()

    def kill_key(self, pname, idx, reason):
        with self.lock:
            self.dead_keys[(pname, idx)] = reason

    def failed(self, cand, idx, f, known, keys, done):
        """The health policy after a failed attempt (Failover f with key `idx`), in one place.
        The key: a rejected one (401/403) is dead until a reload or a reset; a rate-limited or
        out-of-quota one cools down on its own. Then, when the candidate is `done` (no other key
        will be tried), the provider for a connection failure, else the model (only one the
        catalogue knows: made-up names grow no state). A quota error on a provider with keys, or a
        429 without Retry-After on one with several (one client's burst), cools only the keys."""
        pname = cand[0]
        if f.kind == "auth" and idx is not None:
            self.kill_key(pname, idx, f.reason)
            log.warning("provider %s: key #%d rejected (%s); disabled until a reload or a reset",
                        pname, idx + 1, f.reason)
        # a provider without keys (behind an auth proxy) said 401/403
        elif f.kind == "auth":
            self.fail(("provider", pname), error=f.reason)
        elif (f.status in (402, 429) or f.quota) and idx is not None:
            self.fail(("key", pname, idx), f.retry_after, f.quota, f.reason)
        if (not done or f.kind in ("context", "auth", "input", "format") or (f.quota and keys)
                or (f.kind == "missing" and f.status != 404)
                or (f.status == 429 and f.retry_after is None and keys > 1)):
            # (a 400 that names the model is about this request, not the model's health)
            return
        if f.kind == "connect":
            self.fail(("provider", pname), f.retry_after, error=f.reason)
        elif known:
            self.fail(cand, f.retry_after, f.quota, f.reason)

    def cand_left(self, cand, now, prov=None):
        """Seconds until a candidate may be tried: its provider's and model's breakers, and, for a
        provider with keys, the soonest of its live keys."""
        left = max(self.left(("provider", cand[0]), now), self.left(cand, now))
        if prov is not None and prov.keys:
            keys = [self.left(("key", prov.name, i), now) for i in range(len(prov.keys))
                    if (prov.name, i) not in self.dead_keys]
            left = max(left, min(keys, default=0.0))
        return left

    def usable_keys(self, prov, now):
        """Indexes of the provider's keys to try in order: live ones, cooled-down ones first."""
        if prov.keyless:
            return [None]
        idx = [i for i in range(len(prov.keys)) if (prov.name, i) not in self.dead_keys]
        return sorted(idx, key=lambda i: self.left(("key", prov.name, i), now))

    # -- probes (run by the maintenance thread) -------------------------------------------------
    def probes_due(self, now):
        """[(key, opens)] of open provider and model breakers whose next probe is due; never one
        while a Retry-After or reset time a provider gave is still in the future."""
        if not self.probe_first:
            return []
        with self.lock:
            return [(k, b.opens) for k, b in self.state.items()
                    if k[0] != "key" and b.opens and now >= b.probe_at and now >= b.retry_at]

    def probed(self, key, opens, good, detail=None):
        """A probe's outcome: a good one closes the breaker at once; a failed one only moves the
        next probe back (5 s, 10 s, 20 s, ... up to the breaker's cooldown); it never lengthens
        the cooldown itself. `opens`: the breaker's openings when the probe started (if a request
        opened it again meanwhile, the probe's answer is stale)."""
        with self.lock:
            b = self.state.get(key)
            if b is None or not b.opens or b.opens != opens:
                return
            self.dirty = True
            if good:
                self._close(b)
                self._mark(key)
                return
            b.probe_error = detail
            b.probe_step = min(2 * max(b.probe_step, self.probe_first),
                               max(self.probe_first, self._cooldown(b)))
            b.probe_at = time.monotonic() + b.probe_step

    # -- by hand, and after a reload ---------------------------------------------------------------
    def reset(self, provider=None, model=None, share=True):
        """Close breakers by hand: all of them (and revive rejected keys), one provider's (its own,
        its keys' and its models'), or one model's. Returns the names of what was open or
        failing."""
        with self.lock:
            names = self._reset(provider, model)
            if self.wake is not None and share:     # (the other workers and boxes do it too)
                self.changed[("reset", provider, model)] = time.time()
                self.wake.set()
        return names

    @staticmethod
    def resets(reset_name, name):
        """Whether the shared reset `reset_name` covers the shared breaker `name` (as _reset)."""
        try:
            _r, provider, model = loads(reset_name)
            key = loads(name)
        except (ValueError, TypeError):
            return False
        if not isinstance(key, list) or len(key) < 2 or key[0] == "reset":
            return False
        return Health._hit(tuple(key), provider, model)

    @staticmethod
    def _hit(key, provider, model):
        """Whether a reset of `provider` (all: None) and `model` covers breaker `key`."""
        owner = key[1] if key[0] in ("provider", "key") else key[0]
        return provider is None or (key == (provider, model) if model else owner == provider)

    def _reset(self, provider, model, mark=True):
        """reset's work, under the lock: here, or told by another worker or box (adopt: then the
        breakers it closes are not told again)."""
        names = []
        for key, b in self.state.items():
            if self._hit(key, provider, model) and (b.opens or b.fails):
                names.append(breaker_name(key))
                self._close(b)
                if mark:
                    self._mark(key)
        dead = [k for k in self.dead_keys
                if model is None and (provider is None or k[0] == provider)]
        for k in dead:
            del self.dead_keys[k]
            names.append(breaker_name(("key",) + k))
        for cand in [c for c in self.completions_refused
                     if provider is None or (c == (provider, model) if model
                                             else c[0] == provider)]:
            del self.completions_refused[cand]
            names.append(f"{cand[0]}/{cand[1]} (completions asked as chat)")
        self.dirty = self.dirty or bool(names)
        return names

    def forget(self, keep):
        """Drop the state of breakers whose provider or model left the catalogue (keep(key) says)."""
        with self.lock:
            gone = [k for k in self.state if not keep(k)]
            for k in gone:
                del self.state[k]
            self.dirty = self.dirty or bool(gone)

    # -- what a person or a dashboard sees -------------------------------------------------------
    def view(self, key, now, wall=None):
        """{"state": "ok" | "cooling", "until": ISO 8601 UTC, "reason", "latency_ms"} of one
        breaker (a half-open breaker is "ok": the next request tries it)."""
        b = self.state.get(key)
        out = {"state": "ok"}
        if b is None:
            return out
        probe = f" (last probe: {b.probe_error})" if b.probe_error else ""
        if b.opens and b.until > now:
            out.update(state="cooling", until=iso_time((wall or time.time()) + b.until - now),
                       reason=(b.error or "failed") + probe)
        elif b.opens:
            out["reason"] = f"recovering: the next request tries it (last error: {b.error}){probe}"
        if b.latency is not None:
            out["latency_ms"] = round(b.latency * 1000, 1)
        return out

    # Persistence: a small JSON file in the data directory, so a restart keeps what it learnt.
    def snapshot(self, fingerprints):
        now, wall = time.monotonic(), time.time()
        with self.lock:
            items = list(self.state.items())
            self.dirty = False
        out = []
        for key, b in items:
            if key[0] == "key":
                fp = fingerprints.get((key[1], key[2]))
                if fp is None:
                    continue
                key = ("key", key[1], fp)
            out.append({"key": list(key), "fails": b.fails, "opens": b.opens, "cause": b.cause,
                        "until": wall + (b.until - now) if b.until > now else 0,
                        "retry_at": wall + (b.retry_at - now) if b.retry_at > now else 0,
                        "latency": b.latency, "error": b.error})
        return {"version": 2, "saved": wall, "breakers": out}

    def restore(self, data, fingerprints):
        """Breakers from a snapshot. A cooldown a header set keeps its time; one that came from an
        error restarts half-open (the next request, or the first probe, decides). Entries of the
        wrong shape are skipped."""
        now, wall = time.monotonic(), time.time()
        by_fp = {(p, fp): i for (p, i), fp in fingerprints.items()}
        entries = data.get("breakers") if isinstance(data, dict) else None
        n = 0
        with self.lock:
            for e in entries if isinstance(entries, list) else []:
                try:
                    key = tuple(e["key"])
                    if key[0] == "key":
                        if (key[1], key[2]) not in by_fp:
                            continue
                        key = ("key", key[1], by_fp[(key[1], key[2])])
                    elif len(key) != 2 or not all(isinstance(k, str) for k in key):
                        continue
                    b = Breaker()
                    b.fails, b.opens = int(e.get("fails") or 0), int(e.get("opens") or 0)
                    b.latency = float(e["latency"]) if e.get("latency") is not None else None
                    b.error = str(e["error"]) if e.get("error") is not None else None
                    b.cause = e.get("cause") if e.get("cause") in ("error",
                                                                   "quota", "retry_after") else "error"
                    until, retry_at = float(e.get("until") or 0), float(e.get("retry_at") or 0)
                except (TypeError, ValueError, KeyError, IndexError, AttributeError):
                    continue
                # the provider's own time is kept; an error's restarts half-open
                if retry_at > wall:
                    b.retry_at = now + (retry_at - wall)
                    if b.cause == "retry_after" and until > wall:
                        b.until = now + (until - wall)
                b.probe_step = self.probe_first
                # staggered: not all on the first tick
                b.probe_at = now + self.probe_first + 0.5 * n
                self.state[key] = b
                n += 1
        return n


    # -- shared with the router's other workers or boxes (SharedState) --------------------------
    @staticmethod
    def _shared_key(key, fingerprints):
        """A breaker's name between processes: JSON of its key, a provider key by fingerprint."""
        if key[0] == "key":
            fp = fingerprints.get((key[1], key[2]))
            return None if fp is None else dumps(["key", key[1], fp])
        return dumps(list(key))

    def changes(self, fingerprints):
        """({shared key: entry}, what was taken) of the breakers that opened or closed here since
        the last call."""
        now, wall = time.monotonic(), time.time()
        out = {}
        with self.lock:
            changed, self.changed = self.changed, {}
            for key, at in changed.items():
                if key[0] == "reset":
                    out[dumps(list(key))] = {"opens": 0, "at": at, "reset": True}
                    continue
                name = self._shared_key(key, fingerprints)
                b = self.state.get(key)
                if name is None or b is None:
                    continue
                out[name] = {"opens": b.opens, "at": at, "cause": b.cause, "error": b.error,
                             "until": wall + b.until - now if b.opens else 0,
                             "retry_at": wall + b.retry_at - now if b.retry_at > now else 0}
        return out, changed

    def unpublished(self, taken):
        """Changes `changes` took that could not be told: told at the next call."""
        with self.lock:
            for key, at in taken.items():
                self.changed.setdefault(key, at)

    def adopt(self, entries, fingerprints):
        """Breakers that another worker or box opened or closed ({shared key: entry}, the last
        change of each to reach the store); a breaker changed here and not told yet keeps its own
        state (it is told next, and so wins). An adopted open breaker is probed
        here later than by the one that opened it (whose good verdict comes back the same way),
        after two to three probe_seconds, then less and less often: so it is probed also when its
        opener is gone (a replaced worker, a box that went down). Returns how many changed."""
        now, wall = time.monotonic(), time.time()
        by_fp = {(p, fp): i for (p, i), fp in fingerprints.items()}
        n = 0
        with self.lock:
            for name, e in entries.items():
                try:
                    key = tuple(loads(name))
                    if key[0] == "reset":          # (a reset by hand elsewhere: done here too)
                        if len(key) == 3:
                            n += bool(self._reset(*key[1:], mark=False))
                        continue
                    opens = int(e["opens"])
                    until, retry_at = float(e["until"] or 0), float(e["retry_at"] or 0)
                    if key[0] == "key":
                        key = ("key", key[1], by_fp[(key[1], key[2])])
                    elif len(key) != 2:
                        continue
                except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                    continue
                if key in self.changed:       # (changed here since: told next, and wins)
                    continue
                b = self.state.get(key)
                if opens:
                    if b is None:
                        b = self.state[key] = Breaker()
                    b.fails, b.opens, b.trial = 0, opens, 0.0
                    b.cause = e.get("cause") if e.get("cause") in ("quota",
                                                                  "retry_after") else "error"
                    b.error = clean_text(e.get("error") or "failed", 2000)
                    b.until = now + (until - wall)
                    b.retry_at = now + (retry_at - wall) if retry_at > wall else 0.0
                    b.probe_step = 2 * self.probe_first
                    b.probe_at = now + self.probe_first * (2 + secrets.randbelow(1000) / 1000)
                elif b is not None and b.opens:
                    self._close(b)
                else:
                    continue
                n += 1
            self.dirty = self.dirty or bool(n)
        return n


def breaker_name(key):
    """A breaker's key as people read it: "provider NAME", "NAME key #2", "NAME/MODEL"."""
    if key[0] == "provider":
        return f"provider {key[1]}"
    if key[0] == "key":
        return f"{key[1]} key #{(key[2] or 0) + 1}"
    return f"{key[0]}/{key[1]}"


def iso_time(wall):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


# ---------------------------------------------------------------------------------- affinity --

class Affinity:
    """Conversation -> the model that served each name it asked for, so later turns that ask for
    the same name stay there (provider prompt caches and thinking signatures stay valid), and the
    marks of the thinking blocks each provider made in it (a block signed by one provider must
    not be sent to another). A conversation is named by its system prompt, its first user
    message and the credential the client sent (hashed). Bounded LRU in memory; with `store` (a
    SharedState: the router's other workers or boxes take turns of the same conversations) every
    lookup asks the store, and every change is written to it before the client sees the end."""

    NAMES = 8     # names remembered per conversation
    MARKS = 256   # thinking marks remembered per provider and conversation
    REFRESH = 3600.0   # an unchanged pin is written to the store again this often (it expires)

    def __init__(self, size=10000):
        self.lock = threading.Lock()
        self.size = size
        # conversation -> {"names": {requested name: candidate}, "marks": {provider: set}}
        self.map = {}
        self.store = None

    @staticmethod
    def key(req, headers=None):
        first = next((m for m in req["messages"] if m["role"] == "user"), None)
        if first is None:
            return None
        headers = headers or {}
        who = headers.get("x-api-key") or headers.get("authorization") or ""
        return "%016x" % stable_hash("\x00".join((text_of(req.get("system") or []),
                                                  text_of(first["content"]),
                                                  str(len(first["content"])), who)))

    def get(self, key, name, shared=True):
        """-> (the candidate that served `name` in this conversation or None, {provider: the marks
        of the thinking blocks it made}); `shared`: ask the store (else memory answers)."""
        if key and shared and self.store is not None:
            got = self.store.affinity_get(key)
            if got is not None:          # (None: the store cannot be reached; memory answers)
                names, marks = got
                marks = {p: set(sorted(m)[-self.MARKS:]) for p, m in marks.items()}
                with self.lock:          # (what set and add_marks compare with)
                    entry = self._entry(key)
                    entry["names"], entry["marks"] = dict(names), {p: set(m) for p, m in
                                                                   marks.items()}
                return names.get(name), {p: frozenset(m) for p, m in marks.items()}
        entry = self.map.get(key) if key else None
        if entry is None:
            return None, {}
        with self.lock:
            return entry["names"].get(name), {p: frozenset(m) for p, m in entry["marks"].items()}

    def _entry(self, key):
        entry = self.map.pop(key, None) or {"names": {}, "marks": {}}
        self.map[key] = entry
        if len(self.map) > self.size:
            del self.map[next(iter(self.map))]
        return entry

    def set(self, key, name, cand, shared=True):
        if not key:
            return
        with self.lock:
            entry = self._entry(key)
            names, written = entry["names"], entry.setdefault("written", {})
            same = names.pop(name, None) == cand
            names[name] = cand
            if len(names) > self.NAMES:
                del names[next(iter(names))]
            now = time.monotonic()
            due = not same or now - written.get(name, -1e9) > self.REFRESH
            if due:
                written[name] = now
        if self.store is not None and shared and due:
            self.store.affinity_pin(key, name, cand)

    def add_marks(self, key, provider, marks):
        """The thinking blocks of an answer `provider` gave in this conversation."""
        if not key or not marks:
            return
        with self.lock:
            have = self._entry(key)["marks"].setdefault(provider, set())
            new = set(marks) - have
            have.update(marks)
            while len(have) > self.MARKS:
                have.pop()
        if self.store is not None and new:
            self.store.affinity_marks(key, provider, new)


# -------------------------------------------------------------------------------------- plan --

def key_allows(globs, cand):
    """Whether a key whose model globs are `globs` may use the candidate (provider, model): a glob
    matches PROVIDER/MODEL or the bare model id, case-insensitively."""
    full, bare = f"{cand[0]}/{cand[1]}".lower(), cand[1].lower()
    return any(fnmatch.fnmatchcase(full, g.lower()) or fnmatch.fnmatchcase(bare, g.lower())
               for g in globs)


def plan_for_key(plan, key):
    """The plan left with the candidates a personal key may use (its `models` globs): a name it
    may not use, or a route with none it may, is a 403 that quotes the globs."""
    if not (key and key.get("models")):
        return plan
    kept = key_candidates(key, plan.candidates, plan.asked, plan.route)
    plan.skipped = plan.skipped + [(c, "not one of this key's models")
                                   for c in plan.candidates if c not in kept]
    if plan.pinned is not None and plan.pinned not in kept:
        plan.pinned = None
    plan.candidates = kept
    return plan


def key_candidates(key, cands, asked=(), route=None):
    """The candidates the key's model globs allow, or the 403 that quotes them."""
    globs = key["models"]
    said = f"key {key['name']} may use only {', '.join(globs)}"
    if asked and not any(key_allows(globs, c) for c in asked):
        c = sorted(asked)[0]
        raise ApiError(403, "permission", f"{said}, not {c[0]}/{c[1]}", param="model")
    kept = [c for c in cands if key_allows(globs, c)]
    if not kept:
        raise ApiError(403, "permission", f"{said}: {route or 'the route'} has none of them",
                       param="model")
    return kept


class Intent:
    """A request's intent by the rules, detected when first asked for (get)."""

    __slots__ = ("req", "found")

    def __init__(self, req):
        self.req, self.found = req, None

    def get(self):
        if self.found is None:
            self.found = detect_intent(self.req) + ("rules",)
            self.req = None
        return self.found


class Plan:
    """Where a request goes: the route, the intent, the candidates to try in order, and the ones
    left out with the reason. `asked`: the candidates an explicit name stands for (the `default`
    route after them is only a fallback); `pinned`: the candidate put first because it served the
    conversation's previous turn; `unknown`: the name was not known and went through aliases or
    auto; `by_intent`: the route was chosen by the detected intent (`auto`). The intent is
    `intent`'s (intent, confidence, signals, decided_by), detected on first use when it is an
    Intent: a plan that named its model leaves it to the request log's writer."""

    __slots__ = ("route", "_intent", "candidates", "skipped", "asked", "pinned", "unknown",
                 "by_intent")

    def __init__(self, route, intent, candidates, skipped, asked=(), pinned=None,
                 unknown=False, by_intent=False):
        self.route, self._intent = route, intent
        self.candidates, self.skipped = candidates, skipped
        self.asked, self.pinned = frozenset(asked), pinned
        self.unknown, self.by_intent = unknown, by_intent

    def _get(self, i):
        return (self._intent.get() if isinstance(self._intent, Intent) else self._intent)[i]

    intent = property(lambda self: self._get(0))
    confidence = property(lambda self: self._get(1))
    signals = property(lambda self: self._get(2))
    decided_by = property(lambda self: self._get(3))

    @property
    def detected(self):
        """Whether the intent is known yet (the planning needed it, or it was asked for)."""
        return not isinstance(self._intent, Intent) or self._intent.found is not None

    def explain(self):
        out = [{"provider": p, "model": m, "skip": None} for p, m in self.candidates]
        if self.pinned is not None:
            out[self.candidates.index(self.pinned)]["pinned"] = "previous turn"
        out += [{"provider": p, "model": m, "skip": why} for (p, m), why in self.skipped]
        return {"intent": self.intent, "confidence": self.confidence,
                "unsure": self.confidence < UNSURE_BELOW,
                "signals": self.signals, "decided_by": self.decided_by,
                "route": self.route, "candidates": out}


def plan_embeddings(cat, name):
    """An embeddings request's candidates: a route (`auto`: the route "embed"), PROVIDER/MODEL or
    a bare id, embedding models only, and only those that serve the first one's model: vectors
    of different models cannot share an index, so failover keeps the model and changes the
    provider or key. -> [(provider, model)]"""
    route, cands = _route_of(cat, "embed" if name in AUTO_NAMES else name, "general")
    if cands is None:
        target = cat.alias(name)
        route, cands = _route_of(cat, target, "general") if target else (None, None)
    if not cands:
        known = sorted(f"{p}/{m}" for (p, m), caps in cat.caps.items() if caps.get("embedding"))
        listed = ", ".join(known) or '(none: mark one in providers.json with "embedding": true)'
        only = {p.api for p in cat.enabled} <= {"anthropic"} and cat.enabled
        raise ApiError(404, "not_found", f"model {name!r}: no such embedding model or route. "
                       + ("Anthropic has no embeddings API: add a provider that has one "
                          "(OpenAI, Gemini, Ollama, ...). " if only else "")
                       + f"Embedding models: {listed}", param="model")
    chat = [c for c in cands if c in cat.caps and not cat.caps[c].get("embedding")]
    cands = [c for c in cands if c not in chat]
    if not cands:
        raise ApiError(400, "invalid_request", f"model {name!r}: {chat[0][0]}/{chat[0][1]} is a "
                       "chat model, not an embedding model", param="model")
    if route in cat.mix_models:         # the route says its models' vectors may differ
        return cands
    return [c for c in cands if c[1] == cands[0][1]]


def _route_of(cat, name, intent):
    """A model name -> (route label, candidates) when it names a route, alias or provider/model
    (`intent`: an Intent, or (intent, confidence, signals, decided_by), or the intent's name)."""
    if name in AUTO_NAMES:
        intent = (intent.get() if isinstance(intent, Intent) else intent)
        intent = intent if isinstance(intent, str) else intent[0]
        route = intent if cat.routes.get(intent) else "default"
        return route, list(cat.routes.get(route, []))
    if name in cat.routes:
        return name, list(cat.routes[name])
    pname, _, rest = name.partition("/")
    if (pname, rest) in cat.caps:
        return "explicit", [(pname, rest)]
    # before PROVIDER/unlisted-model: OpenRouter ids like anthropic/claude-x
    if name in cat.bare:
        return "explicit", list(cat.bare[name])
    prov = cat.providers.get(pname) if rest else None
    if prov is not None:
        if not prov.enabled:
            raise ApiError(404, "not_found", f"model {name!r}: provider {pname!r} is disabled: "
                                             f"{prov.disabled_reason}")
        return "explicit", [(pname, rest)]
    return None, None


def _needs(req):
    """What a request needs of a model: tools, images (or PDFs), tokens (estimated input +
    output). -> (tools?, {"image", "pdf"} it holds, tokens)"""
    kinds = set()
    for m in req["messages"]:
        for p in m["content"]:
            for q in p["content"] if p["type"] == "tool_result" else (p,):
                if q["type"] in ("image", "file"):
                    kinds.add("image" if q["type"] == "image" else "pdf")
    return bool(req.get("tools")), kinds, estimate_tokens(req)


def _skip_reason(caps, tools, images, tokens, max_tokens):
    if not caps.get("chat", True):
        return "not a chat model"
    if tools and not caps["tools"]:
        return "no tool calling"
    if "image" in images and "image" not in caps["input"]:
        return "no image input"
    if "pdf" in images and "pdf" not in caps["input"]:
        return "no PDF input"
    window = caps.get("context_window")
    out = max_tokens or min(caps.get("max_output") or 4096, 4096)
    if window and tokens + out > window:
        return f"context window {window} < {tokens} input + {out} output tokens"
    return None


def guess_dialect(body, headers):
    """The dialect of a request body seen without its path (for POST /v1/route)."""
    if not isinstance(body, dict):
        return "openai"         # its decoder names what is wrong
    msgs = body.get("messages") if isinstance(body.get("messages"), list) else []
    if "input" in body and "messages" not in body:
        return "openai-responses"
    if "contents" in body and "messages" not in body:
        return "gemini"           # (its model, which Gemini puts in the path, in "model")
    if "prompt" in body or "options" in body or any(
            isinstance(m, dict) and "images" in m for m in msgs):
        return "ollama"
    blocks = [b for m in msgs if isinstance(m, dict) and isinstance(m.get("content"), list)
              for b in m["content"] if isinstance(b, dict)]
    if "anthropic-version" in headers or {"system", "stop_sequences", "thinking"} & set(body) or any(
            b.get("type") in ("tool_use", "tool_result")
            or b.get("type") == "image" and "source" in b for b in blocks):
        return "anthropic"
    return "openai"


#: Request fields that steer the router (OpenRouter's); consumed here, never sent on.
ROUTING_FIELDS = ("models", "provider")


def plan_request(cat, health, req, body=None, headers=None, pin=None, intent=None):
    """Requested model -> ordered candidates (no I/O).

    Names: a route; `auto` (the detected intent's route); PROVIDER/MODEL or a bare model id (that
    model, then the route `default`); an unknown name through `aliases` (else `auto`, or a 404
    when `strict`). OpenRouter-style `models: [...]` and `provider: {order, only, ignore,
    allow_fallbacks}` in the body, and the header X-Router-Route, refine it. Then capability filters
    (tools, images, context window) leave out models that cannot serve the request (unless none
    can), reasoning models go first when thinking is asked for, in a route or `auto` plan the
    candidate that served the conversation's previous turn for the same name (`pin`) first, and
    candidates cooling down go last, the soonest to recover first. `intent`: (intent, confidence,
    signals, decided_by) when the caller already knows it (else the rules decide)."""
    body, headers = body or {}, headers or {}
    intent = intent or Intent(req)
    pref = body.get("provider") if isinstance(body.get("provider"), dict) else {}
    model, route, route_cands, cands, unknown, by_intent = _plan_names(cat, req,
                                                                       body, headers, intent)
    asked = set(cands) if route == "explicit" else ()
    if asked and all(cat.meta(*c).get("embedding") for c in asked):
        raise ApiError(400, "invalid_request", f"model {model!r} is an embedding model: it makes "
                       "vectors, not replies (POST /v1/embeddings or /api/embed)", param="model")
    if route == "explicit" and pref.get("allow_fallbacks", True) is not False:
        cands += cat.routes.get("default", [])
    cands, skipped = _plan_filter(cat, req, list(dict.fromkeys(cands)), asked, pref)
    if not cands:
        enabled = ", ".join(p.name for p in cat.enabled)
        raise ApiError(404, "not_found",
                       f"model {model!r}: route {route!r} has no model from an enabled provider "
                       f"({'enabled: ' + enabled if enabled else NO_PROVIDER_HELP})", param="model")
    cands, pin = _plan_order(cat, health, req, cands, route, route_cands, pin)
    return Plan(route, intent, cands, skipped, asked.intersection(cands) if asked else (),
                pin, unknown, by_intent)


def _plan_names(cat, req, body, headers, intent):
    """Stage 1: the names asked for (the model, X-Router-Route, OpenRouter's `models`) -> the route
    that decides and every candidate, through routes, aliases and auto. -> (model, route, the
    deciding route's candidates, candidates, unknown name?, chosen by intent?)"""
    model = req["model"]
    route_header = headers.get("x-router-route")
    if route_header:
        if route_header not in cat.routes and route_header not in AUTO_NAMES:
            raise ApiError(404, "not_found", f"X-Router-Route: unknown route {route_header!r}; "
                           f"routes: {', '.join(sorted(cat.routes)) or '(none)'}")
        model = route_header
    names = [model]
    extra = body.get("models")
    if isinstance(extra, list) and all(isinstance(x, str) for x in extra) and not route_header:
        names = [m for m in [model] + extra if m]
    route, route_cands, cands, unknown, by_intent = None, set(), [], False, False
    for name in dict.fromkeys(names):
        r, c = _route_of(cat, name, intent)
        auto = name in AUTO_NAMES
        if c is None:
            unknown = unknown or name == model
            target = cat.alias(name)
            if target is not None:
                r, c = _route_of(cat, target, intent)
                r, auto = (r if r != "explicit" else target), target in AUTO_NAMES
            if not c and not cat.strict and cat.enabled:
                r, c = _route_of(cat, "auto", intent)
                auto = True
        if c is None:
            continue
        by_intent = by_intent or (auto and route is None)
        if route is None:
            route, route_cands = r, set(c)      # the name that decides; later names are fallbacks
        cands += c
    if not cands and route is None:
        avail = cat.model_names()
        hint = (", ".join(avail[:60]) + (" ..." if len(avail) > 60 else "")
                if avail else NO_PROVIDER_HELP)
        raise ApiError(404, "not_found",
                       f"model {model!r} is not available. Available: {hint}", param="model")
    return model, route, route_cands, cands, unknown, by_intent


def _plan_filter(cat, req, cands, asked, pref):
    """Stage 2: OpenRouter's provider preferences (only, ignore, order, allow_fallbacks), then the
    capability filters (tools, images, context window; unless no candidate passes them).
    -> (candidates, [(candidate, why it was left out)])"""
    skipped = []
    only, ignore, order = pref.get("only"), pref.get("ignore"), pref.get("order")
    if isinstance(only, list):
        skipped += [(c, "not in provider.only") for c in cands if c[0] not in only]
        cands = [c for c in cands if c[0] in only]
    if isinstance(ignore, list):
        skipped += [(c, "in provider.ignore") for c in cands if c[0] in ignore]
        cands = [c for c in cands if c[0] not in ignore]
    if isinstance(order, list):
        rank = {p: i for i, p in enumerate(order)}
        cands.sort(key=lambda c: rank.get(c[0], len(rank)))
        if pref.get("allow_fallbacks") is False:
            skipped += [(c, "allow_fallbacks is false") for c in cands if c[0] not in rank]
            cands = [c for c in cands if c[0] in rank]
    # embedding models make vectors, never replies: left out of every chat plan
    vectors = [c for c in cands if cat.meta(*c).get("embedding")]
    skipped += [(c, "an embedding model") for c in vectors]
    cands = [c for c in cands if c not in vectors]
    tools, images, tokens = _needs(req)
    strict = (req.get("response_format") or {}).get("strict")
    able, unable = [], []
    for c in cands:
        # a model the catalogue does not know has only guessed capabilities: the provider decides
        why = None if c in asked and c not in cat.caps else \
            _skip_reason(cat.meta(*c), tools, images, tokens, req.get("max_tokens"))
        if why is None and strict and structured_path(
                req, cat.meta(*c), CODECS[cat.providers[c[0]].api]) == "prompt":
            why = "strict JSON asked: this model gives JSON by instruction only"
        (unable if why else able).append((c, why))
    if able:
        return [c for c, _ in able], skipped + unable
    # none fits: let the providers say so rather than guess
    return [c for c, _ in unable], skipped


def _plan_order(cat, health, req, cands, route, route_cands, pin):
    """Stage 3: reasoning models first when thinking is asked for, the conversation's pinned
    candidate first in a route or auto plan (an explicit name is never reordered), and candidates
    cooling down last, the soonest to recover first. -> (candidates, the pin if it was used)"""
    if req.get("reasoning") and req["reasoning"].get("enabled"):
        cands.sort(key=lambda c: not cat.meta(*c).get("reasoning"))
    if pin in cands and pin in route_cands and route != "explicit":
        cands.remove(pin)
        cands.insert(0, pin)
    else:
        pin = None
    now = time.monotonic()
    left = {c: health.cand_left(c, now, cat.providers[c[0]]) for c in cands}
    healthy = [c for c in cands if left[c] == 0]
    cooling = sorted((c for c in cands if left[c] > 0), key=left.__getitem__)
    if pin is not None and left[pin] > 0:
        pin = None
    return healthy + cooling, pin


# =================================================================================================
# 5. Transport and dispatch
# =================================================================================================

class RequestHeaders(http.client.HTTPMessage):
    """A client request's headers: fast_parse_headers reads them strictly (RFC 9112 5.1, 5.2)."""


class BadHeader(http.client.HTTPException):
    """A request header line that is not `token: value` (answered 400, the connection closed)."""


_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def fast_parse_headers(fp, _class=http.client.HTTPMessage):
    """A drop-in for http.client.parse_headers without the email package's FeedParser, which is
    about half of the router's CPU per request. Same limits (100 headers of 64 KiB), same result
    type (an HTTPMessage built with the public set_raw). A provider's response headers are read
    leniently (obsolete line folding joined by a space, lines without a colon skipped); a
    client's request headers (_class RequestHeaders) strictly: a name that is not a token (a
    space before the colon), a line without a colon or a folded line is BadHeader, since a proxy
    in front might read such a header differently and smuggle a request past the router's
    framing. Installed for the whole process by main(); see install_fast_header_parser."""
    strict = _class is RequestHeaders
    pairs = []
    while True:
        line = fp.readline(65537)
        if len(line) > 65536:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            break
        if len(pairs) >= 100:
            raise http.client.HTTPException("got more than 100 headers")
        text = line.decode("iso-8859-1").rstrip("\r\n")
        if text[:1] in (" ", "\t"):
            if strict:
                raise BadHeader("a folded header line (starting with a space or tab)")
            if pairs:
                pairs[-1][1] += " " + text.strip()
            continue
        name, sep, value = text.partition(":")
        if strict and not sep:
            raise BadHeader("a header line without a colon")       # never echoed: it may hold a key
        if strict and not _TOKEN_RE.fullmatch(name):
            raise BadHeader(f"the header name {safe_text(name, 40)} is not a token (a space before "
                            "the colon?)")
        if sep and name:
            pairs.append([name, value.strip(" \t")])
    msg = _class()
    for name, value in pairs:
        msg.set_raw(name, value)
    return msg


def install_fast_header_parser():
    """Use fast_parse_headers for http.server and http.client in this process (the router is the
    process; call this from a program, not from a library import)."""
    http.client.parse_headers = fast_parse_headers


class Pool:
    """Upstream keep-alive connections, per provider origin. A connection goes back to the pool
    only after its response was read to the end and the provider did not ask to close it."""

    def __init__(self, max_idle=32):
        self.lock = threading.Lock()
        self.idle = {}
        self.max_idle = max_idle
        self.opened = 0

    @staticmethod
    def _origin(prov):
        return (prov.name, prov.scheme, prov.host, prov.port, prov.verify_tls)

    def get(self, prov, fresh=False):
        if not fresh:
            with self.lock:
                lst = self.idle.get(self._origin(prov))
                if lst:
                    return lst.pop(), True
        if prov.scheme == "https":
            conn = http.client.HTTPSConnection(prov.host, prov.port, timeout=prov.connect_timeout,
                                               context=prov.ssl_context)
        else:
            conn = http.client.HTTPConnection(prov.host, prov.port, timeout=prov.connect_timeout)
        with self.lock:
            self.opened += 1
        return conn, False

    def put(self, prov, conn):
        with self.lock:
            lst = self.idle.setdefault(self._origin(prov), [])
            if len(lst) < self.max_idle:
                lst.append(conn)
                return
        conn.close()

    def close_all(self):
        with self.lock:
            conns = [c for lst in self.idle.values() for c in lst]
            self.idle.clear()
        for c in conns:
            c.close()


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def _reset_seconds(value):
    """A rate-limit reset header: a Go duration ("6m0s", "20ms"), RFC 3339 time, or epoch (s/ms)."""
    value = value.strip()
    parts = _DURATION_RE.findall(value)
    if parts and "".join(n + u for n, u in parts) == value:
        return sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)
    try:
        n = float(value)
        if n > 1e12:
            return n / 1000 - time.time()
        return n - time.time() if n > 1e9 else n
    except ValueError:
        pass
    try:
        from datetime import datetime
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() - time.time()
    except ValueError:
        return None


RESET_HEADERS = ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens", "x-ratelimit-reset",
                 "anthropic-ratelimit-requests-reset", "anthropic-ratelimit-tokens-reset",
                 "anthropic-ratelimit-input-tokens-reset",
                 "anthropic-ratelimit-output-tokens-reset")


def retry_after_seconds(headers, status=None):
    """Seconds until a provider wants to hear from us again: Retry-After (seconds or an HTTP
    date), retry-after-ms, or, on a 429, the latest of the providers' rate-limit reset headers."""
    ra = _retry_after(headers)
    if ra is None and status == 429:
        resets = [_reset_seconds(headers[h]) for h in RESET_HEADERS if headers.get(h)]
        resets = [r for r in resets if r is not None]
        if resets:
            ra = max(0.0, max(resets))
    return ra


def _retry_after(headers):
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime
        return max(0.0, parsedate_to_datetime(ra).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


_QUOTA_RE = re.compile(r"quota|billing|credit balance|insufficient "
                       r"(?:funds|balance|credits)|payment required", re.I)
_MISSING_RE = re.compile(r"not found|does not exist|doesn't exist|(?:unknown|invalid|no such) "
                         r"model|is not available|not loaded", re.I)


def model_missing(message, code, model):
    """Whether a 400/422 says the model asked for does not exist (OpenRouter, LM Studio, vLLM and
    others answer so; a 404 from a generation endpoint always means it). The message must name
    the model: "invalid model parameter 'temperature'" is about the request."""
    low = message.lower()
    return code == "model_not_found" or "not a valid model" in low or (
        bool(model) and model.lower() in low and _MISSING_RE.search(low) is not None)
_CONTEXT_RE = re.compile(r"context[ _-]?(length|window)|maximum context|too many tokens|prompt is "
                         r"too long|input is too long|reduce the length|token limit", re.I)


#: A provider's refusal of a completion call itself (not of the request's content): the endpoint,
#: `suffix` or `insert` unsupported (vLLM, llama.cpp, Ollama models without insert), a chat model
#: on /completions (OpenAI, OpenRouter).
_COMPLETION_REFUSED_RE = re.compile(
    r"suffix|insert|not (?:currently )?supported|unsupported|chat model|completions? endpoint|"
    r"unrecognized request argument|no such endpoint|not found: /|unknown (?:url|path|endpoint)|"
    r"^\W*(?:404\W*)?(?:page )?not found\W*$", re.I)


class Context:
    """One inbound generation request on its way through decode, plan and dispatch. Who writes what:
    the front the request; the response store may widen `req` and clear `passthrough`; `generate`
    the plan and the conversation's marks; the dispatcher the answer; `record` reads it all."""

    __slots__ = ("dialect", "body", "req", "headers", "writer", "stream", "model",
                 "started", "collect",
                 "passthrough", "plan", "estimate", "history_marks", "provider_marks", "attempts",
                 "provider", "upstream_model", "same", "structured", "dropped", "ttfb", "usage",
                 "usage_estimated", "out_chars", "made_marks", "broken", "status", "error",
                 "completion", "endpoint", "key", "ticket", "limits")

    def __init__(self, dialect, body, req, headers, writer):
        # the request, as the front decoded it
        self.dialect, self.body, self.req = dialect, body, req
        self.headers, self.writer = headers, writer
        self.stream = req["stream"]
        self.model = req["model"]
        self.started = time.monotonic()
        # a list when the answer's events are kept (the store, log_prompts)
        self.collect = None
        self.passthrough = True    # False when the router had to change the request's history
        # the plan (generate)
        self.plan, self.estimate = None, 0
        self.history_marks = frozenset()   # marks of the thinking blocks in the request's history
        # provider -> marks of the thinking blocks it made in this conversation
        self.provider_marks = {}
        self.attempts = []         # Failover records of the failed attempts, in order
        # the answer (the dispatcher)
        self.provider = self.upstream_model = self.ttfb = self.usage = None
        self.same = False          # answered on the same-dialect passthrough
        self.structured = None     # the response_format's path (native, tool, prompt), if one
        self.completion = None     # a completion's path (native, template, chat), if one
        # what was asked: chat, completions (req has a completion) or embeddings
        self.endpoint = "completions" if req.get("completion") else "chat"
        # the personal key the request came with (its `keys` row), its ticket, its rate limits
        self.key = self.ticket = None
        self.limits = {}
        self.dropped = []          # the client's fields the translation left out
        self.usage_estimated = False
        # streamed output, for a usage estimate when the provider gives none
        self.out_chars = 0
        self.made_marks = []       # marks of the thinking blocks the answer carries
        self.broken = None         # a Failover when the stream broke after the client's first byte
        self.status, self.error = 200, None


class Dispatcher:
    """Sends a planned request to its candidates in order and pipes the first good answer to the
    client. It decides nothing about which candidates: that is plan_request's job."""

    def __init__(self, pool):
        self.pool = pool

    # -- sending --------------------------------------------------------------------------------
    def send(self, prov, path, headers, payload):
        for fresh in (False, True):
            conn, reused = self.pool.get(prov, fresh)
            try:
                if conn.sock is None:
                    conn.connect()
            except (TimeoutError, socket.timeout):
                conn.close()
                raise Failover("connect",
                               f"no connection within {prov.connect_timeout:g} s", next_key=False)
            except OSError as e:
                conn.close()
                raise Failover("connect",
                               f"cannot connect to {prov.host}:{prov.port} ({e.strerror or e})",
                               next_key=False)
            conn.sock.settimeout(prov.first_byte_timeout)
            try:
                conn.request("POST", path, payload, headers)
                return conn, conn.getresponse()
            except (TimeoutError, socket.timeout):
                conn.close()
                raise Failover("timeout",
                               f"no response within {prov.first_byte_timeout:g} s", next_key=False)
            except (http.client.HTTPException, OSError) as e:
                conn.close()
                if reused:
                    continue   # a pooled connection the provider had closed: retry once, fresh
                raise Failover("connect",
                               f"connection failed ({type(e).__name__}: {e})", next_key=False)
        raise AssertionError("unreachable")

    def release(self, prov, conn, resp):
        if resp.isclosed() and not resp.will_close:
            self.pool.put(prov, conn)
        else:
            conn.close()

    def _classify(self, ctx, prov, status, headers, body, same):
        """An upstream error reply -> a Failover, or the client's own error: an ApiError to
        translate, or (the same dialect on both sides) None, for the provider's reply as it is."""
        message, code = CODECS[prov.api].parse_error(status, body)
        reason = f"HTTP {status}: {message}"[:300]
        if ctx.completion in ("native", "template") and (
                status in (405, 501) or status in (400, 404, 422)
                and _COMPLETION_REFUSED_RE.search(message) and not _CONTEXT_RE.search(message)):
            return Failover("completion", f"{reason} (on the {ctx.completion} completion path); "
                                          "asked again as a chat turn", status, next_key=False)
        ra = retry_after_seconds(headers, status)
        quota_said = _QUOTA_RE.search(message) or "quota" in str(code)
        if status == 402 or (status in (403, 429) and quota_said):
            return Failover("status", reason, status, retry_after=ra, quota=True)
        if status in (401, 403):
            return Failover("auth", reason, status)
        if status in (408, 409, 429, 529) or status >= 500:
            return Failover("status", reason, status, retry_after=ra)
        if status == 404 or (status in (400, 422) and model_missing(message, code,
                                                                    ctx.upstream_model)):
            return Failover("missing", reason, status, next_key=False)
        if status in (400, 413, 422) and (code == "context_length_exceeded"
                                          or _CONTEXT_RE.search(message)):
            return Failover("context", reason, status, next_key=False)
        if same:
            return None
        return ApiError(status, STATUS_ERROR_TYPE.get(status, "invalid_request"),
                        f"provider {prov.name}: {message}")

    @staticmethod
    def _route_headers(ctx, prov):
        tried = {a.cand for a in ctx.attempts} | {(prov.name, ctx.upstream_model)}
        h = {"X-Router-Provider": prov.name, "X-Router-Model": header_value(ctx.upstream_model),
             "X-Router-Attempts": str(len(tried))}
        if ctx.plan is not None:
            h["X-Router-Route"] = ctx.plan.route
            if ctx.plan.detected:
                h["X-Router-Intent"] = ctx.plan.intent
        if ctx.structured:
            h["X-Router-Structured"] = ctx.structured
        if ctx.completion:
            h["X-Router-Completion"] = ctx.completion
        if ctx.dropped:
            h["X-Router-Dropped"] = ", ".join(header_value(f) for f in ctx.dropped)
        if ctx.limits:
            h.update(ctx.limits)
        return h

    # -- one attempt ----------------------------------------------------------------------------
    def attempt(self, ctx, cat, health, prov, mid, key_idx, on_commit=None, on_complete=None):
        """Try one candidate with one key. Returns when the client has its answer; raises Failover
        (nothing was sent to the client yet) or ApiError (the client's own fault, translated).
        A completion the provider refused on its native or template path is asked again as a
        chat turn (and that candidate is sent chat turns from then on)."""
        cand = (prov.name, mid)
        refused = health.completion_refused(cand)
        try:
            return self._attempt(ctx, cat, prov, mid, key_idx, refused, on_commit, on_complete)
        except Failover as f:
            if f.kind != "completion":
                raise
            f.cand = cand
            ctx.attempts.append(f)
            health.refuse_completion(cand)
            if ctx.writer.gone():
                raise ClientGone("the client left before the completion was asked again")
            return self._attempt(ctx, cat, prov, mid, key_idx, True, on_commit, on_complete)

    def _attempt(self, ctx, cat, prov, mid, key_idx, refused, on_commit, on_complete):
        same = ctx.dialect == prov.api
        pc = CODECS[prov.api]
        meta = cat.meta(prov.name, mid)
        ctx.completion = completion_path(ctx.req, meta, pc, refused)
        keep = ctx.provider_marks.get(prov.name, frozenset())
        # the history holds thinking another provider signed
        moved = not ctx.history_marks <= keep
        # (JSON asked of a model that cannot give it natively: translated, for its own path,
        # unless the request holds what only its own dialect carries)
        same = ctx.same = same and ctx.passthrough and ctx.completion in (None, "native") and (
            not ctx.req.get("response_format") or ctx.req["extra"].get("same_dialect_only")
            or structured_path(ctx.req, meta, pc) == "native")
        if same:
            body = dict(ctx.body)
            body["model"] = mid
            for k in ROUTING_FIELDS:
                body.pop(k, None)
            extra = {}
            if pc.adjust is not None:
                body, extra = pc.adjust(body, prov, ctx.req, meta, ctx.headers,
                                        keep if moved else None)
            ctx.structured = "native" if ctx.req.get("response_format") else None
            ctx.dropped = []
        else:
            ctx.dropped = dropped_fields(CODECS[ctx.dialect], ctx.body, ctx.req, pc)
            ctx.structured = structured_path(ctx.req, meta, pc)
            req = completion_request(structured_request(ctx.req, ctx.structured), ctx.completion,
                                     meta)
            body = pc.encode_request(drop_thinking(req, keep) if moved else req, mid,
                                     prov, meta, cat.settings)
        path = pc.request_path(prov, mid, ctx.stream, ctx.req if same else req, same)
        data = dumps(body).encode()
        headers = prov.auth_headers(prov.keys[key_idx] if key_idx is not None else None, path, data)
        if same:
            headers.update(extra)
        ctx.upstream_model = mid
        t0 = time.monotonic()
        conn, resp = self.send(prov, path, headers, data)
        if resp.status >= 300:
            try:
                data = resp.read(1 << 20)
            except (OSError, http.client.HTTPException):
                data = b""
            conn.close()
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
            outcome = self._classify(ctx, prov, resp.status, hdrs, data, same)
            if outcome is not None:
                raise outcome
            # the client's own error, in its own dialect already: passed on as the provider said it
            ctx.status = resp.status
            ctx.error = CODECS[prov.api].parse_error(resp.status, data)[0][:300]
            ctx.writer.send(resp.status, {"Content-Type": "application/json",
                                          **self._route_headers(ctx, prov)}, data)
            return
        try:
            self._pipe(ctx, prov, conn, resp, same, t0, cat.settings["max_body_bytes"],
                       on_commit, on_complete, None if same else req)
        except BaseException:
            conn.close()
            raise

    def _source(self, prov, conn, resp, pc, limit):
        """Upstream reply -> (raw bytes, neutral events) as they arrive; SSE or a whole JSON body
        (at most `limit` bytes: a whole reply is held in memory). Read errors and stalls become an
        error event, so the caller decides what they mean."""
        if not pc.is_stream(resp.getheader("content-type") or ""):
            try:
                data = resp.read(limit + 1)
                if len(data) > limit:
                    raise ValueError(f"larger than max_body_bytes ({limit} bytes)")
                obj = loads(data)
                if not isinstance(obj, (dict, list)):
                    raise ValueError("not a JSON object")
            except (OSError, http.client.HTTPException, ValueError) as e:
                yield b"", [("error", ApiError(502, "api_error",
                                               f"unreadable reply from the provider ({e})"))]
                return
            yield data, list(response_events(pc.decode_response(obj, prov)))
            return
        decoder = pc.stream_decoder(prov)
        while True:
            try:
                chunk = resp.read1(65536)
            except (TimeoutError, socket.timeout):
                waited = conn.sock.gettimeout() if conn.sock else 0
                yield b"", [("error", ApiError(504, "timeout",
                                               f"the provider sent nothing for {waited:g} s"))]
                return
            except (OSError, http.client.HTTPException) as e:
                yield b"", [("error", ApiError(502, "api_error",
                                               "connection to the provider was lost "
                                               f"({type(e).__name__})"))]
                return
            if not chunk:
                yield b"", decoder.close()
                return
            try:
                evs = decoder.feed(chunk)
            except ValueError as e:
                yield b"", [("error", ApiError(502, "api_error",
                                               f"the provider's stream is malformed ({e})"))]
                return
            yield chunk, evs

    def _pipe(self, ctx, prov, conn, resp, same, t0, limit, on_commit=None, on_complete=None,
              sent=None):
        """`sent`: the neutral request as translated for the provider (None on the passthrough),
        whose stop sequences the reply is held to."""
        pc = CODECS[prov.api]
        source = self._source(prov, conn, resp, pc, limit)
        rf = ctx.req.get("response_format")
        if ctx.structured == "tool":
            source = structured_source(source, format_name(rf))
        if ctx.completion == "chat":
            source = unfenced_source(source)
        stops = [x for x in (sent or {}).get("stop") or () if isinstance(x, str) and x]
        if stops and ctx.structured != "tool":
            source = stop_source(source, stops)
        # a structured reply is checked when it is whole: always when not streamed, and streams
        # are held to their end when the client asked for strict
        check = rf is not None and (not ctx.stream or rf["strict"])
        held_raw, held, held_bytes = [], [], 0
        committed = False
        for raw, evs in source:
            held_raw.append(raw)
            held_bytes += len(raw)
            if held_bytes > limit:        # pings or empty deltas without end, before any content
                raise Failover("stream",
                               f"more than max_body_bytes ({limit} bytes) before any content")
            for ev in evs:
                k = ev[0]
                # (also after content in this piece: the client has no byte yet)
                if k == "error":
                    raise Failover("stream",
                                   f"error before the reply reached the client: {ev[1].message}",
                                   ev[1].status)
                held.append(ev)
                if k == "end":
                    # (a completion may be empty: nothing belongs in the gap)
                    if not ctx.req.get("completion") and not any(e[0] in CONTENT_EVENTS
                                                                  for e in held):
                        raise Failover("empty", "empty reply",
                                       fallback=(prov, ctx.upstream_model, same,
                                                 b"".join(held_raw), held))
                    if check:
                        held = self._checked(held, ctx.structured)
                    committed = True
                elif k in CONTENT_EVENTS and ctx.stream and not check:
                    committed = True
            if committed:
                break
        if not committed:
            raise Failover("empty", "the provider closed the stream without an answer")
        ctx.ttfb = time.monotonic() - t0
        if on_commit is not None:
            on_commit()           # the candidate answered: record it before the client hears it
        if conn.sock:
            conn.sock.settimeout(prov.idle_timeout)
        self._deliver(ctx, prov, same, b"".join(held_raw), held, source, on_complete)
        self.release(prov, conn, resp)

    @staticmethod
    def _checked(events, path):
        """The events of a whole structured reply, if its text is JSON (a fenced answer on the
        prompt path unwrapped); else a Failover, so the next candidate answers."""
        resp = fold_events(events)
        said = "".join(p["text"] for p in resp["content"] if p["type"] == "text")
        if not structured_text_ok(resp, path):
            raise Failover("format", f"the reply is not the JSON asked for ({path} path): "
                                     f"{said[:80]!r}", next_key=False)
        text = "".join(p["text"] for p in resp["content"] if p["type"] == "text")
        if text == said:
            return events
        return [e for e in events if e[0] not in ("text", "end")] + [("text", text)] + \
            [e for e in events if e[0] == "end"]

    def _deliver(self, ctx, prov, same, raw, events, source=(), on_complete=None):
        """Write the committed answer: held bytes/events first, then the rest of the source."""
        cc = CODECS[ctx.dialect]
        w = ctx.writer
        hdrs = self._route_headers(ctx, prov)
        if not ctx.stream:
            for raw_more, evs in source:
                raw += raw_more
                events += evs
            err = next((e[1] for e in events if e[0] == "error"), None)
            if err is not None:
                raise Failover("stream", err.message, err.status)
            if ctx.collect is not None:
                ctx.collect.extend(events)
            ctx.made_marks = [stable_hash(e[1]) for e in events if e[0] in MARK_EVENTS]
            resp = fold_events(events)
            if not _counted(resp["usage"]):
                ctx.out_chars = sum(len(p.get("text") or "") + (len(dumps(p["arguments"]))
                                                                if p["type"] == "tool_call" else 0)
                                    for p in resp["content"])
                resp["usage"] = self.estimated_usage(ctx)
                if same:                                    # the client is told, in its own shape
                    raw = cc.passthrough.body(raw, resp["usage"])
            ctx.usage = resp["usage"]
            if on_complete is not None:
                on_complete()
            if same:
                w.send(200, {"Content-Type": "application/json", **hdrs}, raw)
            else:
                w.send(200, {"Content-Type": "application/json", **hdrs},
                       dumps(cc.encode_response(resp, ctx.model, ctx.req)).encode())
            return
        w.start(200, {"Content-Type": cc.stream_type, "Cache-Control": "no-cache",
                      "X-Accel-Buffering": "no", **hdrs})
        enc = None if same else cc.stream_encoder(ctx.model, ctx.req, ctx.estimate)
        pt = cc.passthrough(cc, ctx, prov) if same else None

        def emit(raw_chunk, evs):
            """Write one piece of the stream; True once it is over for the client (an error went out)."""
            err = next((i for i, ev in enumerate(evs) if ev[0] == "error"), None)
            if err is not None:
                # nothing after an error reaches the client
                err, evs = evs[err][1], evs[:err + 1]
            ended = False
            for i, ev in enumerate(evs):
                if ev[0] in ("text", "thinking", "args"):
                    ctx.out_chars += len(ev[1])
                elif ev[0] in MARK_EVENTS:
                    ctx.made_marks.append(stable_hash(ev[1]))
                elif ev[0] == "end":
                    if not _counted(ev[2]):     # estimated once this piece's output is counted
                        evs = evs[:i] + [("end", ev[1],
                                          self.estimated_usage(ctx), ev[3])] + evs[i + 1:]
                        if pt is not None:
                            pt.usage(evs[i][2])
                    ctx.usage, ended = evs[i][2], True
            if ctx.collect is not None:
                ctx.collect.extend(evs)
            if ended and on_complete is not None:
                on_complete()                  # before the client can read the end and ask again
            if pt is not None:
                pt.observe(evs)
                out = pt.feed(raw_chunk) if err is None else pt.fail(raw_chunk, err)
            else:
                out = b"".join(enc.encode(ev) for ev in evs)
            if out:
                w.write(out)
            if err is not None:
                self._broke(ctx, prov, err)
            return err is not None

        if not emit(raw, events):
            for raw_chunk, evs in source:
                if emit(raw_chunk, evs):
                    break
            else:
                rest = pt.close() if pt is not None else b""
                if rest:
                    w.write(rest)
        w.finish_stream()

    def embed(self, ctx, prov, mid, idx, ereq, limit):
        """All of a request's inputs from one candidate with one key, in batches. -> (vectors,
        tokens: the provider's count, else estimated)."""
        pc = CODECS[prov.api]
        key = prov.keys[idx] if idx is not None else None
        vectors, tokens, said = [], 0, True
        for chunk in embed_batches(ereq, pc.embed_batch):
            path = pc.embed_path(prov, mid)
            data = dumps(pc.embed_request(ereq, chunk, mid, prov)).encode()
            conn, resp = self.send(prov, path, prov.auth_headers(key, path, data), data)
            try:
                raw = resp.read(limit + 1)
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise Failover("stream", f"the reply broke off ({type(e).__name__})")
            if len(raw) > limit:                # (this request's size, not the provider's health)
                conn.close()
                raise Failover("input", f"the vectors are larger than max_body_bytes ({limit} "
                                        "bytes): send fewer inputs a request", next_key=False)
            self.release(prov, conn, resp)
            ctx.upstream_model = mid
            if resp.status >= 300:
                out = self._classify(ctx, prov, resp.status,
                                                {k.lower(): v for k, v in resp.getheaders()},
                                                raw, False)
                raise out
            try:
                got, count = pc.embed_response(loads(raw))
            except (ValueError, TypeError, KeyError, AttributeError, struct.error,
                    binascii.Error) as e:
                raise Failover("stream", f"unreadable embeddings reply ({e})")
            got, count = checked_vectors(got, count, len(chunk))
            vectors += got
            if count is None:
                said = False
            tokens += count or 0
        return vectors, tokens if said else embed_tokens(ereq)

    @staticmethod
    def estimated_usage(ctx):
        """Usage for a reply whose provider reported none (servers that ignore include_usage): the
        request's estimate in, 4 characters a token out. The log row says it is an estimate."""
        ctx.usage_estimated = True
        return dict(empty_usage(), input=ctx.estimate,
                    output=max(1, ctx.out_chars // 4) if ctx.out_chars else 0)

    @staticmethod
    def _broke(ctx, prov, err):
        """A stream that failed after the client had its first byte: a failed request (the log, the
        metrics, and the candidate's health through ctx.broken), not a success."""
        ctx.status = err.status
        ctx.error = f"the stream broke after it started: {err.message}"[:2000]
        ctx.broken = Failover("broken", ctx.error, err.status, cand=(prov.name, ctx.upstream_model))
        ctx.attempts.append(ctx.broken)

    def deliver_fallback(self, ctx, fallback, on_complete=None):
        """Every candidate failed, but one gave an empty answer: that answer is the best we have."""
        prov, mid, same, raw, events = fallback
        ctx.provider, ctx.upstream_model = prov.name, mid
        self._deliver(ctx, prov, same, raw, events, on_complete=on_complete)


def _counted(usage):
    """Whether a provider reported usage (a stream that ignored include_usage reports none)."""
    return bool(usage) and bool(usage.get("input") or usage.get("output"))


class ClientGone(Exception):
    """The client closed its connection while we were writing to it."""


# ------------------------------------------------------------------------------ Redis (RESP) --

class RespError(OSError):
    """An error reply of Redis or Valkey (`-ERR ...`, `-OOM ...`, `-READONLY ...`): an OSError, so
    every caller that survives an unreachable server survives a refusing one too."""


class Resp:
    """A small Redis / Valkey client (RESP2, see PROTOCOLS.md section 15): a pool of connections,
    each used by one caller at a time; connect and read timeouts; AUTH and SELECT on every new
    connection. After a failure, calls with `fast` (the request path's) fail at once until a
    call without it (the background thread's, every half second) has reached the server again:
    a request never waits on a server that is down."""

    TIMEOUT = 0.5

    def __init__(self, url, timeout=TIMEOUT):
        self.tls, self.host, self.port, self.db, self.user, self.password = self.parse(url)
        self.timeout = timeout
        self.addr = None             # (host's address as last looked up, see _connect)
        try:                         # (an address needs no lookup)
            self.addr = (str(ipaddress.ip_address(self.host)), self.port)
        except ValueError:
            pass
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.shown = f"redis{'s' * self.tls}://{host}:{self.port}/{self.db}"   # (never the password)
        self.lock = threading.Lock()
        self.idle = []
        self.down = False

    @staticmethod
    def parse(url):
        """redis[s]://[[USER]:PASSWORD@]HOST[:PORT][/DB] -> (tls, host, port, db, user, password),
        by hand: the password (from .env, after ${VAR} expansion) may hold any character, / # ?
        @ and : included (a %XX in it is decoded). ValueError names the part that is wrong, never
        the password."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("redis", "rediss"):
            raise ValueError("it must start with redis:// or rediss://")
        userinfo, at, hostpart = rest.rpartition("@")
        user = password = None
        if at:
            user, colon, password = userinfo.partition(":")
            if not colon:                               # redis://PASSWORD@host
                user, password = None, user
            user = urllib.parse.unquote(user) if user else None
            password = urllib.parse.unquote(password) if password else None
        hostport, _, db = hostpart.partition("/")
        if hostport.startswith("["):
            host, _, port = hostport[1:].partition("]")
            port = port[1:] if port.startswith(":") else port
        else:
            host, _, port = hostport.partition(":")
        if not re.fullmatch(r"[A-Za-z0-9._:-]+", host or ""):
            raise ValueError("its host is missing or not a host name or address")
        if not re.fullmatch(r"\d{0,5}", port) or port and not 0 < int(port) < 65536:
            raise ValueError("its port must be a number from 1 to 65535")
        db = db.strip("/")
        if not re.fullmatch(r"\d{0,2}", db):
            raise ValueError("its database (after the last /) must be a number such as 0")
        return scheme == "rediss", host, int(port or 6379), int(db or 0), user, password

    def _connect(self, fast=False):
        """A new connection. The request path's (`fast`) uses the address the background thread
        last looked up, so it never waits on a resolver that does not answer."""
        addr = self.addr
        if addr is None or not fast:
            if addr is None and fast:
                raise ConnectionError(f"{self.host} has not been looked up yet")
            info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
            addr = self.addr = info[4][:2]
        sock = socket.create_connection(addr, self.timeout)
        conn = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
            conn = (sock, sock.makefile("rb"))
            setup = ([["AUTH"] + ([self.user] if self.user else []) + [self.password]]
                     if self.password else []) + ([["SELECT", self.db]] if self.db else [])
            for reply in self._exchange(conn, setup):
                if isinstance(reply, RespError):
                    raise reply
            return conn
        except BaseException:
            if conn is not None:
                conn[1].close()
            sock.close()
            raise

    @staticmethod
    def _encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    @classmethod
    def _reply(cls, f):
        line = f.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("the connection to Redis closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = f.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("the connection to Redis closed")
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [cls._reply(f) for _ in range(n)]
        raise ConnectionError(f"not a RESP2 reply: {line[:40]!r}")

    def _exchange(self, conn, cmds):
        if not cmds:
            return []
        conn[0].sendall(b"".join(self._encode(c) for c in cmds))
        return [self._reply(conn[1]) for _ in cmds]

    def _take(self, fast):
        """A connection: (conn, whether it came from the pool)."""
        if fast and self.down:
            raise ConnectionError("Redis did not answer a moment ago")
        with self.lock:
            conn = self.idle.pop() if self.idle else None
        if conn is not None:
            return conn, True
        try:
            return self._connect(fast), False
        except (OSError, ValueError, RespError) as e:
            self._broken(None, e)

    def _broken(self, conn, e):
        if conn is not None:
            conn[1].close()
            conn[0].close()
        self.down = True
        if isinstance(e, RespError):
            raise ConnectionError(f"Redis refused the connection: {e}") from None
        raise ConnectionError(str(e) or type(e).__name__) from None

    def _give(self, conn):
        with self.lock:
            self.idle.append(conn)
        self.down = False

    def pipeline(self, cmds, fast=False):
        """Send commands in one write, read their replies in order (an error reply comes back as a
        RespError in the list). Raises OSError when the server cannot be reached. A pooled
        connection that the server (or a restart of it) has closed meanwhile is replaced once by a
        new one (every command sent this way is idempotent, or a whole MULTI ... EXEC)."""
        conn, pooled = self._take(fast)
        while True:
            try:
                out = self._exchange(conn, cmds)
                break
            except (OSError, ValueError, RespError) as e:
                if not pooled or isinstance(e, TimeoutError):   # (a hung server: no second wait)
                    self._broken(conn, e)
                conn[1].close()
                conn[0].close()
                try:
                    conn, pooled = self._connect(fast), False
                except (OSError, ValueError, RespError) as e:
                    self._broken(None, e)
        self._give(conn)
        return out

    @contextlib.contextmanager
    def session(self, fast=False):
        """One connection held for a WATCH ... MULTI ... EXEC exchange: yields send(cmds) ->
        replies. A connection left in the middle of one (an exception) is closed, not pooled. A
        stale pooled connection is replaced on the first send (it starts the exchange)."""
        held = list(self._take(fast)) + [True]      # [conn, pooled, first send]
        done = False

        def send(cmds):
            first, held[2] = held[2], False
            if first and held[1]:
                try:
                    return self._exchange(held[0], cmds)
                except (ConnectionError, ValueError):
                    held[0][1].close()
                    held[0][0].close()
                    try:
                        held[0] = self._connect(fast)
                    except (OSError, ValueError, RespError) as e:
                        held[0] = None
                        self._broken(None, e)
                except (OSError, RespError) as e:
                    conn, held[0] = held[0], None
                    self._broken(conn, e)
            if held[0] is None:
                raise ConnectionError("the connection to Redis closed")
            try:
                return self._exchange(held[0], cmds)
            except (OSError, ValueError, RespError) as e:
                conn, held[0] = held[0], None     # (closed: never back into the pool)
                self._broken(conn, e)
        try:
            yield send
            done = True
        finally:
            if done and held[0] is not None:
                self._give(held[0])
            elif held[0] is not None:
                held[0][1].close()
                held[0][0].close()

    def call(self, *args, fast=False):
        out = self.pipeline([args], fast)[0]
        if isinstance(out, RespError):
            raise out
        return out

    def close(self):
        with self.lock:
            idle, self.idle = self.idle, []
        for sock, f in idle:
            f.close()
            sock.close()



# =================================================================================================
# 6. Observability
# =================================================================================================
#
# Every request becomes one row: queued by the request's thread (a dict, no I/O) and written by one
# writer thread to SQLite (WAL, committed per batch, so a crash loses no committed row), which also
# writes the request's log line and updates the Prometheus metrics.

#: USD per million tokens (input, output, cached input) by model name, for models whose metadata
#: gives no `cost`. First match wins; local models cost nothing.
PRICE_RULES = [
    (r"text-embedding-3-small", (0.02, 0.0, 0.0)), (r"text-embedding-3-large", (0.13, 0.0, 0.0)),
    (r"text-embedding-ada-002", (0.10, 0.0, 0.0)), (r"gemini-embedding", (0.15, 0.0, 0.0)),
    (r"claude-opus-4-[5-9]|claude-opus-[5-9]", (5.0, 25.0, 0.5)),
    (r"claude-opus", (15.0, 75.0, 1.5)),
    (r"claude-sonnet|claude-3-7-sonnet|claude-3-5-sonnet", (3.0, 15.0, 0.3)),
    (r"claude-haiku-4|claude-haiku-[5-9]", (1.0, 5.0, 0.1)),
    (r"claude-3-5-haiku", (0.8, 4.0, 0.08)),
    (r"gpt-5-nano", (0.05, 0.4, 0.005)), (r"gpt-5-mini", (0.25, 2.0, 0.025)),
    (r"gpt-5", (1.25, 10.0, 0.125)),
    (r"gpt-4\.1-nano", (0.1, 0.4, 0.025)), (r"gpt-4\.1-mini", (0.4, 1.6, 0.1)),
    (r"gpt-4\.1", (2.0, 8.0, 0.5)),
    (r"gpt-4o-mini", (0.15, 0.6, 0.075)), (r"gpt-4o", (2.5, 10.0, 1.25)),
    (r"(?:^|/)o4-mini|(?:^|/)o3-mini", (1.1, 4.4, 0.275)), (r"(?:^|/)o3", (2.0, 8.0, 0.5)),
    (r"gemini-2\.5-pro|gemini-3-pro", (1.25, 10.0, 0.31)),
    (r"gemini-2\.5-flash-lite", (0.1, 0.4, 0.025)),
    (r"gemini-2\.5-flash|gemini-3-flash", (0.3, 2.5, 0.075)),
    (r"deepseek-chat|deepseek-v3", (0.27, 1.1, 0.07)),
    (r"deepseek-reasoner|deepseek-r1", (0.55, 2.19, 0.14)),
]
_PRICE_RULES = [(re.compile(p, re.I), c) for p, c in PRICE_RULES]


def price_of(provider_api, model_id, caps):
    """(input, output, cache read, cache write, reasoning) USD per million tokens: the model's
    `cost` metadata, else the shipped defaults by name; local models (Ollama's) are free. Cache
    writes cost 1.25 times the input for Claude models (Anthropic's five-minute cache), the input
    for others; reasoning costs what output does. Kept in the capabilities once found."""
    if "_price" in caps:
        return caps["_price"]
    caps["_price"] = price = _price_of(provider_api, model_id, caps)
    return price


def _price_of(provider_api, model_id, caps):
    cost = caps.get("cost") if isinstance(caps.get("cost"), dict) else {}
    if not cost and CODECS[provider_api].free:     # a model on this box
        return 0.0, 0.0, 0.0, 0.0, 0.0
    if not cost:
        rule = next((c for rx, c in _PRICE_RULES if rx.search(model_id)), (0.0, 0.0, 0.0))
        cost = dict(zip(("input", "output", "cached"), rule))
    # (OpenRouter says -1 for a price it cannot tell: no price, never a negative cost)
    cost = {k: v for k, v in cost.items() if _num(v) and 0 <= v < float("inf")}
    inp, out = cost.get("input", 0.0), cost.get("output", 0.0)
    write = cost.get("cache_write", inp * (1.25 if "claude" in model_id.lower() else 1.0))
    return inp, out, cost.get("cached", inp), write, cost.get("reasoning", out)


def request_cost(prices, usage):
    """USD for a neutral usage: fresh input, cache reads, cache writes, output and reasoning
    (part of the output) each at its own price."""
    pin, pout, pread, pwrite, preason = prices
    read, write = usage.get("cache_read") or 0, usage.get("cache_write") or 0
    fresh = max(0, (usage.get("input") or 0) - read - write)
    output = usage.get("output") or 0
    reasoning = min(usage.get("reasoning") or 0, output)
    return (fresh * pin + read * pread + write * pwrite + (output - reasoning) * pout
            + reasoning * preason) / 1e6


LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Counters and histograms for GET /metrics, updated by the log writer thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}      # (provider, model, route, status, endpoint) -> n
        self.failovers = {}     # (provider, reason) -> n
        self.tokens = {}        # (provider, model, kind) -> n
        self.cost = {}          # (provider, model) -> USD
        self.keys = {}          # personal key name -> [requests, USD]
        self.latency = {}       # name -> [bucket counts..., +Inf count, sum]
        # set by the HTTP front
        self.connections = {"open": 0, "evicted": 0, "refused": 0, "reaped": 0}

    def _observe(self, name, seconds):
        h = self.latency.setdefault(name, [0] * (len(LATENCY_BUCKETS) + 2))
        for i, b in enumerate(LATENCY_BUCKETS):
            if seconds <= b:
                h[i] += 1
        h[-2] += 1
        h[-1] += seconds

    def add(self, row, attempts):
        """One finished request. Models the catalogue does not know are counted as "other", so
        made-up names cannot grow the series."""
        model = (row["model"] if row["known"] else "other") if row["model"] else ""
        with self.lock:
            key = (row["provider"] or "", model, row["route"] or "", str(row["status"]),
                   row["endpoint"])
            self.requests[key] = self.requests.get(key, 0) + 1
            for a in attempts:
                k = (a["provider"], a["kind"])
                self.failovers[k] = self.failovers.get(k, 0) + 1
            if row["provider"]:
                for kind in ("input", "output", "cached"):
                    n = row[f"{kind}_tokens"] or 0
                    if n:
                        k = (row["provider"], model, kind)
                        self.tokens[k] = self.tokens.get(k, 0) + n
                if row["cost"]:
                    k = (row["provider"], model)
                    self.cost[k] = self.cost.get(k, 0.0) + row["cost"]
            if row["key"]:
                k = self.keys.setdefault(row["key"], [0, 0.0])
                k[0] += 1
                k[1] += row["cost"] or 0.0
            if row["latency_ms"] is not None:
                self._observe("sage_router_request_seconds", row["latency_ms"] / 1000)
            if row["ttfb_ms"] is not None:
                self._observe("sage_router_first_byte_seconds", row["ttfb_ms"] / 1000)

    COUNTERS = ("requests", "failovers", "tokens", "cost", "keys")

    def state(self):
        """The counters as JSON (for the router's other workers: SharedState)."""
        with self.lock:
            out = {k: [[list(lab) if isinstance(lab, tuple) else lab, v]
                       for lab, v in getattr(self, k).items()] for k in self.COUNTERS}
            out["latency"] = {n: list(h) for n, h in self.latency.items()}
            out["connections"] = dict(self.connections)
        return out

    @classmethod
    def merged(cls, states):
        """One Metrics that adds up several workers' `state()`s (counters, histograms and
        connections alike)."""
        m = cls()
        for st in states:
            for k in cls.COUNTERS:
                table = getattr(m, k)
                for lab, v in st.get(k, ()):
                    lab = tuple(lab) if isinstance(lab, list) else lab
                    if isinstance(v, list):
                        have = table.setdefault(lab, [0] * len(v))
                        table[lab] = [a + b for a, b in zip(have, v)]
                    else:
                        table[lab] = table.get(lab, 0) + v
            for n, h in st.get("latency", {}).items():
                have = m.latency.setdefault(n, [0] * len(h))
                m.latency[n] = [a + b for a, b in zip(have, h)]
            for k, v in st.get("connections", {}).items():
                m.connections[k] = m.connections.get(k, 0) + v
        return m

    def render(self, router, workers=None):
        def esc(v):
            return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

        def line(name, labels, value):
            lab = ",".join(f'{k}="{esc(v)}"' for k, v in labels.items())
            return f"{name}{{{lab}}} {value}" if lab else f"{name} {value}"
        out = []
        with self.lock:
            out += ["# HELP sage_router_requests_total Requests by provider, model, route, "
                    "status and endpoint (chat, completions, embeddings).",
                    "# TYPE sage_router_requests_total counter"]
            out += [line("sage_router_requests_total",
                         dict(provider=p, model=m, route=r, status=s, endpoint=e), n)
                    for (p, m, r, s, e), n in sorted(self.requests.items())]
            out += ["# HELP sage_router_failovers_total Failed attempts by provider and reason "
                    "(broken: a stream that failed after it started; every other one moved on to "
                    "the next key or candidate).",
                    "# TYPE sage_router_failovers_total counter"]
            out += [line("sage_router_failovers_total", dict(provider=p, reason=r), n)
                    for (p, r), n in sorted(self.failovers.items())]
            out += ["# HELP sage_router_tokens_total Tokens by provider, model and kind (input, "
                    "output, cached).",
                    "# TYPE sage_router_tokens_total counter"]
            out += [line("sage_router_tokens_total", dict(provider=p, model=m, kind=k), n)
                    for (p, m, k), n in sorted(self.tokens.items())]
            out += ["# HELP sage_router_cost_usd_total Cost in US dollars by provider and model.",
                    "# TYPE sage_router_cost_usd_total counter"]
            out += [line("sage_router_cost_usd_total", dict(provider=p, model=m), round(c, 6))
                    for (p, m), c in sorted(self.cost.items())]
            out += ["# HELP sage_router_key_requests_total Requests by personal key.",
                    "# TYPE sage_router_key_requests_total counter"]
            out += [line("sage_router_key_requests_total", {"key": k}, v[0])
                    for k, v in sorted(self.keys.items())]
            out += ["# HELP sage_router_key_cost_usd_total Cost in US dollars by personal key.",
                    "# TYPE sage_router_key_cost_usd_total counter"]
            out += [line("sage_router_key_cost_usd_total", {"key": k}, round(v[1], 6))
                    for k, v in sorted(self.keys.items())]
            for name, h in sorted(self.latency.items()):
                what = "time to the first byte" if "first_byte" in name else "request duration"
                out += [f"# HELP {name} {what.capitalize()} in seconds.",
                        f"# TYPE {name} histogram"]
                out += [line(name + "_bucket",
                             {"le": b}, h[i]) for i, b in enumerate(LATENCY_BUCKETS)]
                out += [line(name + "_bucket", {"le": "+Inf"}, h[-2]), f"{name}_count {h[-2]}",
                        f"{name}_sum {round(h[-1], 6)}"]
        now = time.monotonic()
        cat = router.catalogue
        out += ["# HELP sage_router_breaker_open Whether a circuit breaker is open (1), half-open "
                "(0.5) or closed (0).",
                "# TYPE sage_router_breaker_open gauge"]
        for key, b in list(router.health.state.items()):
            if key[0] == "key":
                continue
            state = 0 if not b.opens else (1 if b.until > now else 0.5)
            labels = ({"provider": key[1], "model": ""} if key[0] == "provider"
                      else {"provider": key[0], "model": key[1]})
            out.append(line("sage_router_breaker_open", labels, state))
        out += ["# HELP sage_router_models Models in the catalogue per provider.",
                "# TYPE sage_router_models gauge"]
        out += [line("sage_router_models",
                     {"provider": p.name}, len(p.models)) for p in cat.enabled]
        c = self.connections
        out += ["# HELP sage_router_connections Client connections open now.",
                "# TYPE sage_router_connections gauge",
                line("sage_router_connections", {}, c["open"]),
                "# HELP sage_router_connections_closed_total Client connections the router closed: "
                "evicted (the longest-waiting, to make room at max_connections), refused (503, "
                "every connection busy), reaped (headers or body past their deadline).",
                "# TYPE sage_router_connections_closed_total counter"]
        out += [line("sage_router_connections_closed_total",
                     {"reason": k}, c[k]) for k in ("evicted", "refused", "reaped")]
        if workers is not None:
            out += ["# HELP sage_router_workers Worker processes serving (--workers).",
                    "# TYPE sage_router_workers gauge", line("sage_router_workers", {}, workers)]
        return "\n".join(out) + "\n"


USAGE_GROUPS = {"model": "provider || '/' || model", "provider": "provider", "route": "route",
                "day": "date(ts, 'unixepoch')", "intent": "intent", "dialect": "dialect",
                "endpoint": "coalesce(endpoint, 'chat')", "key": "key"}


def parse_since(value, now=None):
    """`since` for /v1/usage: epoch seconds, an ISO date or time, or a span back from now (30m,
    24h, 7d). Default: 24 hours."""
    now = now or time.time()
    if not value:
        return now - 86400
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", value)
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600,
                                          "d": 86400, "w": 604800}[m.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
    from datetime import datetime, timezone
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise bad_request("since",
                          "must be epoch seconds, an ISO date such as 2026-11-01, or a span such "
                          "as 24h or 7d")
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def _storable(v):
    """A value SQLite can store: text that cannot be encoded (a lone surrogate that came some way
    no decoder foresaw) has it replaced, so the row is kept rather than refused."""
    if isinstance(v, str) and not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return v.encode("utf-8", "replace").decode("utf-8")
    return v


# -- team keys ---------------------------------------------------------------------------------
# Personal keys (`router.py keys add NAME`, POST /v1/keys) live in the request log's SQLite file:
# table `keys` (a salted SHA-256 of each key, never the key; its limits) and `key_ledger` (one row
# a key: the requests and tokens of this minute and the last, the spend of this budget period, and
# each process's hold of the largest cost its requests in flight may still add). Every check and
# change is one short transaction there, so several router processes on one data directory agree
# (SQLite does the locking) and a kill -9 loses nothing committed. A request first takes a ticket
# (`admit`: rate limits, budget, a hold of its largest possible cost; from this process's block of
# the key, in memory, when it has one), and settles it as it completes (`settle`: the real cost
# and tokens, booked by the store's next transaction).

KEY_PREFIX = "sk-sage-"
KEY_PERIODS = ("day", "week", "month")
KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
#: A process renews its hold on a key's ledger row at least every HOLD_RENEW_SECONDS while it has
#: requests of the key in flight (the request log writer does it); a hold not renewed for
#: STALE_HOLD_SECONDS belongs to a process that died, and no longer counts.
HOLD_RENEW_SECONDS, STALE_HOLD_SECONDS = 10.0, 60.0
#: A block: a key's room taken by one process in the transaction that admits a request, so that
#: its next requests are admitted in memory: up to BLOCK_MOST more requests (their tokens and
#: largest costs alike), never more than BLOCK_SHARE of what the key has left (the ledger counts
#: the block as used, and holds its USD, until this process gives back what it did not use: at
#: its next transaction on the key, or the request log writer's next batch, within BLOCK_SECONDS
#: when idle; a block is used for BLOCK_SECONDS at most, in its minute only). Near a limit there
#: is no room for a block, and every request is checked in the ledger itself, so the limits hold
#: exactly across processes.
BLOCK_MOST, BLOCK_SHARE, BLOCK_SECONDS = 16, 0.25, 1.0


class LedgerBusy(Exception):
    """The shared ledger's rows kept changing under a transaction (many processes on one key)."""


class LedgerUnsure(ConnectionError):
    """A transaction on the shared ledger whose EXEC was sent but whose outcome could not be read
    (the connection broke just then): `tx` sent `sent` ({name: (USD, created, period_start)}),
    which arrived or did not."""

    def __init__(self, tx, sent):
        super().__init__("the shared ledger's answer was lost")
        self.tx, self.sent = tx, sent


def ledger_history(row):
    """{writer: [when, [its last transaction ids]]} of a shared ledger row (see RedisShare)."""
    h = row[10] if row is not None and len(row) > 10 else None
    return h if isinstance(h, dict) else {}


class KeyLimit(Exception):
    """A request refused by its key's limits: kind rpm, tpm, budget or busy (budget nearly spent
    and another request of the key in flight); `retry_after` seconds."""

    def __init__(self, kind, message, retry_after):
        super().__init__(message)
        self.kind, self.message, self.retry_after = kind, message, retry_after


def period_bounds(period, now):
    """The calendar (UTC) day, week (from Monday) or month around `now`: (start, end) epochs."""
    return _period_bounds(period, int(now // 86400))


@functools.lru_cache(maxsize=64)
def _period_bounds(period, day):
    from datetime import datetime, timedelta, timezone
    now = day * 86400
    t = datetime.fromtimestamp(now, timezone.utc)
    day = datetime(t.year, t.month, t.day, tzinfo=timezone.utc)
    if period == "day":
        start, end = day, day + timedelta(days=1)
    elif period == "week":
        start = day - timedelta(days=t.weekday())
        end = start + timedelta(days=7)
    else:
        start = datetime(t.year, t.month, 1, tzinfo=timezone.utc)
        end = datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=timezone.utc)
    return start.timestamp(), end.timestamp()


def parse_budget(value, field="budget"):
    """"10/month" (or {"usd": 10, "period": "month"}) -> (10.0, "month"); None or "none": none."""
    if value in (None, "", "none", 0):
        return None, None
    if isinstance(value, dict):
        usd, period = value.get("usd"), value.get("period")
    else:
        usd, _, period = str(value).partition("/")
        try:
            usd = float(usd.strip().lstrip("$"))
        except ValueError:
            usd = None
    _need(_num(usd) and 0 < usd < 1e9 and period in KEY_PERIODS, field,
          "must be USD/PERIOD with PERIOD day, week or month, such as 10/month")
    return float(usd), period


def parse_expiry(value, field="expires"):
    """A date or time (UTC), or a span from now (30d, 12h): epoch seconds; never: None."""
    if value in (None, "", "never"):
        return None
    text = str(value).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([mhdw])", text)
    try:
        at = (time.time() + float(m.group(1)) * {"m": 60, "h": 3600, "d": 86400,
                                                  "w": 604800}[m.group(2)]) if m \
            else parse_since(text)
    except ApiError:
        at = None
    _need(at is not None and 0 < at < 253402300799, field,
          "must be a date such as 2027-01-31, a time such as 2027-01-31T18:00:00Z (UTC), a "
          "span from now such as 30d, or never")
    return at


def key_limits(fields, partial=False):
    """A key's limits from the command line or an HTTP body -> the `keys` table's columns; with
    `partial`, only those given (an update)."""
    out = {}
    if not partial or "budget" in fields:
        out["budget"], out["period"] = parse_budget(fields.get("budget"))
    for f in ("rpm", "tpm"):
        if not partial or f in fields:
            v = fields.get(f)
            v = None if v in (None, "", "none", 0, "0") else v
            if isinstance(v, str) and v.isdigit():
                v = int(v)
            _need(v is None or _positive_int(v) and v < 10 ** 12, f,
                  "must be a positive integer below 10^12 (or none)")
            out[f] = v
    if not partial or "models" in fields:
        m = fields.get("models")
        m = [g.strip() for g in m.split(",")] if isinstance(m, str) else m
        _need(m is None or isinstance(m, list) and all(isinstance(g, str) for g in m), "models",
              "must be a list of globs such as [\"ollama/*\", \"*/gpt-4o*\"] (or GLOB,GLOB)")
        out["models"] = dumps([g for g in m if g]) if m and any(m) else None
    if not partial or "expires" in fields:
        out["expires"] = parse_expiry(fields.get("expires"))
    return out


def _slide(prev, cur, at):
    """A sliding minute from two fixed ones: the last minute's count, fading as this one goes."""
    return prev * (1 - at / 60.0) + cur


def _slide_wait(prev, cur, at, room):
    """Seconds until _slide(...) <= room (this minute, else the next, where cur becomes prev)."""
    for wait_base, p, c, t in ((0.0, prev, cur, at), (60.0 - at, cur, 0.0, 0.0)):
        if c <= room:
            need = 60.0 * (1 - (room - c) / p) if p > room - c else t
            return wait_base + max(0.0, need - t)
    return 120.0 - at


def key_row_wins(new, old):
    """Whether `new` (a `keys` row, as a dict) stands over `old` of the same name between boxes: a
    key made later beats an older one of that name; of one key, a revocation beats any change
    without it (revoked anywhere, it stays revoked, whatever was changed elsewhere after); else the
    later change (RedisShare.PUT_KEYS decides the same way in Redis)."""
    if old is None:
        return True
    nc, oc = new.get("created") or 0, old.get("created") or 0
    if nc != oc:
        return nc > oc
    if (new.get("revoked") is None) != (old.get("revoked") is None):
        return new.get("revoked") is not None
    return (new.get("changed") or nc) > (old.get("changed") or oc)


class KeyStore:
    """The team's keys and their ledger (see the comment above); one connection, one lock."""

    COLUMNS = ("name", "prefix", "salt", "hash", "budget", "period", "rpm", "tpm", "models",
               "expires", "created", "revoked", "last_used", "changed", "pushed")
    # (changed: when the row last changed (set by every write); pushed: the `changed` that the
    # shared state (settings.shared_state) has, so only newer rows are sent there)
    LEDGER = ("minute", "requests", "tokens", "prev_requests", "prev_tokens", "period_start",
              "spent", "holds", "last_used", "created")

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.db = None
        self.warned = False
        self.cache, self.version = {}, None    # key -> its `keys` row, as of user_version
        self.clock = threading.Lock()          # (the cache's)
        self.rlock, self.rdb = threading.Lock(), None     # reads: see _read
        # (a file that grows by a line with every change of `keys`: a stat a request, not a
        # query, tells that nothing changed; the database is asked at least once a second all
        # the same, for a change the flag missed)
        self.flag = os.path.join(os.path.dirname(path), "keys.changed")
        self.seen = (None, 0.0)                # (the flag's stat, when the database was asked)
        self.pending = []           # settled requests not booked yet: (ticket, cost, tokens)
        self.blocks = {}            # key name -> this process's block of it (see BLOCK_SHARE)
        # key name -> {"usd": the bounds of its requests in flight here, "gen", "period",
        # "held": when this process last wrote its hold on the key's row}
        self.inflight = {}
        self.hold_id = secrets.randbits(48)   # this process's hold in the ledger's rows
        # the routers of other boxes (settings.shared_state: a RedisShare), which then hold the
        # ledger and receive every key made or changed here (see sync)
        self.shared = None
        self.shared_failing = False
        self.used = {}              # key name -> when (monotonic) this process last used its row
        self.writer = "%012x" % self.hold_id  # (this process in the shared rows' histories)
        self.in_use = None          # called when the ledger is first opened (see idle_wait)
        self.open_claims = set()    # ids of this process's claims not settled yet
        self.lockfile = None        # see _alive
        self.bglock, self.bdb = threading.Lock(), None        # see _bg
        self.copied = 0.0           # when the copies of those rows were last refreshed
        self.cursor = 0             # the shared keys' change counter read up to

    def _conn(self):
        if self.db is None:
            db = open_db(self.path, [
                f"CREATE TABLE IF NOT EXISTS keys ({', '.join(self.COLUMNS)}, PRIMARY KEY (name))",
                "CREATE INDEX IF NOT EXISTS keys_prefix ON keys (prefix)",
                # one row a key (one page a change: the request path's write): the minute's
                # counts, the period's spend, and each process's hold of what its requests in
                # flight may still cost, [[id, USD, since]]; `created`: that of the key the row counts for (a name
                # made again starts a new row)
                # (owed: spend booked here while the shared ledger could not be reached, to be
                # added to it once it can)
                "CREATE TABLE IF NOT EXISTS key_ledger (name TEXT PRIMARY KEY, minute, requests, "
                "tokens, prev_requests, prev_tokens, period_start, spent, holds, last_used, "
                "created, owed) WITHOUT ROWID",
                # spend sent to the shared ledger whose arrival is not known yet: a debt being
                # paid (catch_up), or settlements of a transaction whose answer was lost; `writer`:
                # the process that sent it (alive while it holds its lock file: see _resolve)
                # kind "pay": a debt (in this box's spend already); "sent": a request's
                # settlements (not booked here)
                "CREATE TABLE IF NOT EXISTS ledger_claims (tx TEXT, name TEXT, usd, created, "
                "period_start, writer, pid, at, kind, PRIMARY KEY (tx, name)) WITHOUT ROWID"],
                isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            for table, cols in (("key_ledger", ("created", "owed")), ("ledger_claims", ("kind",)),
                                ("keys", ("changed", "pushed"))):
                have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                for c in cols:
                    if c not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {c}")
            self.db = db
            if self.in_use is not None:
                self.in_use()
            if not os.path.exists(self.flag):
                self._signal()
        return self.db

    def close(self):
        try:
            self.flush()
        except (sqlite3.Error, OSError) as e:
            log.warning("team keys: the spend of %d request(s) was not booked (%s)",
                        len(self.pending), e)
        with self.lock:
            if self.db is not None:
                self.db.close()
                self.db = None
        with self.rlock:
            if self.rdb is not None:
                self.rdb.close()
                self.rdb = None
        with self.bglock:
            if self.bdb is not None:
                self.bdb.close()
                self.bdb = None
        if self.lockfile is not None:          # (its claims, if any, are for others to settle)
            if not self.open_claims:
                try:
                    os.remove(self._lock_path(self.writer))
                except OSError:
                    pass
            os.close(self.lockfile)
            self.lockfile = None

    def _tx(self, fn, keys_changed=False):
        """fn(db) inside one write transaction (BEGIN IMMEDIATE: other processes wait). A change
        of the `keys` table bumps the database's user_version, which every process's cache of
        keys checks (so a revocation takes effect on the very next request, everywhere)."""
        def run(db):
            out = fn(db)
            if keys_changed:
                v = db.execute("PRAGMA user_version").fetchone()[0]
                db.execute(f"PRAGMA user_version = {(v + 1) % (1 << 31)}")
            return out
        with self.lock:
            out = write_tx(self._conn(), run)
        if keys_changed:
            self._signal()
        return out

    def _signal(self):
        """Tell every process's cache of keys (after the commit) that `keys` changed: a line more
        in the flag (its size only grows, so its stat never comes back to one a cache saw; past
        64 KB it starts again as a new file)."""
        try:
            if os.path.exists(self.flag) and os.path.getsize(self.flag) > 65536:
                tmp = f"{self.flag}.{os.getpid()}.tmp"
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
                os.replace(tmp, self.flag)
            fd = os.open(self.flag, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, f"{time.time_ns()} {os.getpid()}\n".encode())
            finally:
                os.close(fd)
        except OSError:
            pass                # (then other processes' caches see the change within a second)

    def _flag_state(self):
        try:
            st = os.stat(self.flag)
            return st.st_ino, st.st_mtime_ns, st.st_size
        except OSError:
            return None

    def _read(self, sql, args=()):
        """A read, on a connection of its own (WAL: never behind a write), under a lock of its
        own: a key's lookup never waits on a transaction of the ledger (a round trip to a shared
        one included)."""
        with self.rlock:
            if self.rdb is None:
                self._conn()                    # (the tables, first)
                self.rdb = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
                self.rdb.row_factory = sqlite3.Row
            return [dict(r) for r in self.rdb.execute(sql, args)]

    def _checked(self, fn, *args):
        """A call on the request path: a key store that cannot be read or written is a 503 (the
        router fails closed: it never lets a request through because it could not check it)."""
        try:
            return fn(*args)
        except (sqlite3.Error, OSError) as e:
            if not self.warned:
                self.warned = True
                log.warning("team keys: cannot use %s (%s)", self.path, e)
            raise ApiError(503, "overloaded", f"the key store cannot be used right now "
                           f"({clean_text(e, 100)}): try again", headers={"Retry-After": "1"})

    # -- managing keys ---------------------------------------------------------------------------
    @staticmethod
    def _new_secret():
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        return key, salt, hashlib.sha256((salt + key).encode()).hexdigest()

    def create(self, name, fields, now=None):
        """A new key NAME with these limits -> (the key, its entry). The key is never stored."""
        _need(isinstance(name, str) and KEY_NAME_RE.fullmatch(name) is not None, "name",
              "must be 1-64 letters, digits or . _ @ - (starting with a letter or digit)")
        limits = key_limits(fields)
        key, salt, digest = self._new_secret()
        now = now or time.time()

        def add(db):
            old = db.execute("SELECT revoked, expires FROM keys WHERE name=?", (name,)).fetchone()
            if old is not None and old["revoked"] is None and (old["expires"] is None
                                                               or old["expires"] > now):
                raise ApiError(409, "invalid_request", f"a key named {name} exists: update, "
                                                       "rotate or revoke it", param="name")
            db.execute("DELETE FROM keys WHERE name=?", (name,))
            db.execute("DELETE FROM key_ledger WHERE name=?", (name,))
            row = dict(limits, name=name, prefix=key[:16], salt=salt, hash=digest, created=now,
                       revoked=None, last_used=None, changed=now, pushed=None)
            db.execute(f"INSERT INTO keys ({', '.join(row)}) VALUES "
                       f"({', '.join('?' * len(row))})", tuple(row.values()))
        self._tx(add, True)
        self._push()
        return key, self.entry(name, now)

    def update(self, name, fields, now=None):
        limits = key_limits(fields, partial=True)
        self._active(name)
        if limits:
            self._change(name, limits)
        return self.entry(name, now)

    def revoke(self, name, now=None):
        self._active(name)
        self._change(name, {"revoked": now or time.time()})
        return self.entry(name, now)

    def rotate(self, name, now=None):
        """A new key for NAME (the old one stops working at once); limits and spend stay."""
        self._active(name)
        key, salt, digest = self._new_secret()
        self._change(name, {"prefix": key[:16], "salt": salt, "hash": digest})
        return key, self.entry(name, now)

    def _change(self, name, values):
        """A change of key `name`, stamped later than the change it was made on (so it wins over
        it on every box, also from a box whose clock is behind)."""
        self._tx(lambda db: db.execute(
            f"UPDATE keys SET {''.join(k + '=?, ' for k in values)}pushed=NULL, "
            "changed=max(?, coalesce(changed, created) + 0.001) WHERE name=?",
            (*values.values(), time.time(), name)), True)
        self._push()

    # -- the same keys on every box (settings.shared_state) ---------------------------------------
    def _push(self):
        """A key made or changed here, to the shared state at once (when that fails, the
        shared-state thread sends it again within a second of the shared state coming back)."""
        if self.shared is not None:
            try:
                self.sync(pull=False)
            except (OSError, sqlite3.Error) as e:
                log.warning("team keys: the change is not in %s yet (%s); it is sent once it can "
                            "be", self.shared.where, e)

    def sync(self, pull=True, quiet=False):
        """The keys made or changed on this box to the shared state, and those made or changed on
        others here (the shared-state thread, every half second), each name's row chosen by
        key_row_wins on both sides: a revocation anywhere stops the key everywhere within a second
        or so, and no later change elsewhere undoes it. `quiet` (the shared-state thread's): a busy
        database here only waits for the next tick (it is not the shared state failing)."""
        if self.shared is None:
            return
        try:
            self._sync(pull)
        except sqlite3.Error as e:
            if not quiet:
                raise
            log.debug("team keys: keys not copied yet (%s)", e)

    def _sync(self, pull):
        rows = self._read("SELECT * FROM keys WHERE pushed IS NULL "
                          "OR pushed < coalesce(changed, created)")
        if rows:
            for r in rows:
                r.pop("pushed")
                r["changed"] = r["changed"] or r["created"]
            refused = self.shared.put_keys(rows)
            self._tx(lambda db: db.executemany(
                "UPDATE keys SET pushed = ? WHERE name = ? AND coalesce(changed, created) = ?",
                [(r["changed"], r["name"], r["changed"]) for r in rows]))
            if refused:                   # (the shared state has a row that wins: take it)
                self._take(self.shared.keys_named(refused))
        if not pull:
            return
        got, cursor = self.shared.keys_since(self.cursor)
        if got is None:          # (the shared state lost its data: every key is sent again)
            self.cursor = 0
            try:
                self._tx(lambda db: db.execute("UPDATE keys SET pushed = NULL"))
            except sqlite3.Error:
                self.shared.epoch = ""        # (not done: so the next tick sees a new epoch)
                raise
            return
        self._take(got)
        self.cursor = cursor

    def _take(self, got):
        """Key rows from the shared state, each kept where it wins over this box's."""
        got = [r for r in got if isinstance(r, dict) and isinstance(r.get("name"), str)
               and _num(r.get("created")) and _num(r.get("changed") or r["created"])
               and all(k in self.COLUMNS for k in r)]
        if not got:
            return
        cols = ", ".join(self.COLUMNS)

        def take(db):
            taken = []
            for r in got:
                old = db.execute("SELECT * FROM keys WHERE name = ?", (r["name"],)).fetchone()
                old = dict(old) if old is not None else None
                if not key_row_wins(r, old):
                    continue
                if old is not None and old["created"] != r["created"] and old["revoked"] is None:
                    log.warning("team keys: a key named %s was made on another box too; the one "
                                "made later (%s) is kept, the other stops working", r["name"],
                                iso_time(max(r["created"], old["created"])))
                row = dict({c: r.get(c) for c in self.COLUMNS}, pushed=r.get("changed"))
                db.execute(f"INSERT OR REPLACE INTO keys ({cols}) VALUES "
                           f"({', '.join('?' * len(self.COLUMNS))})",
                           tuple(row[c] for c in self.COLUMNS))
                taken.append(r["name"])
            return taken
        taken = self._tx(take, True)
        if taken:
            log.info("team keys: %d key(s) made or changed on another box taken from %s",
                     len(taken), self.shared.where)

    def _active(self, name):
        rows = self._read("SELECT revoked FROM keys WHERE name=?", (name,))
        if not rows or rows[0]["revoked"] is not None:
            raise ApiError(404, "not_found", f"no key named {safe_text(name, 80)}"
                           + (" (it was revoked)" if rows else ""), param="name")

    def entry(self, name, now=None):
        out = [e for e in self.entries(now, name) if e["name"] == name]
        if not out:
            raise ApiError(404, "not_found", f"no key named {safe_text(name, 80)}", param="name")
        return out[0]

    def entries(self, now=None, name=None):
        """Every key (or one) as `keys list` and GET /v1/keys show it: never the key or its hash."""
        try:
            self.flush()             # (this process's latest spend, first)
        except (sqlite3.Error, OSError) as e:
            log.warning("team keys: spend not booked yet (%s); tried again later", e)
        now = now or time.time()
        where, args = ("WHERE k.name=?", (name,)) if name else ("", ())
        rows = self._read("SELECT k.*, u.period_start, u.spent, u.last_used AS used FROM keys k "
                          f"LEFT JOIN key_ledger u ON u.name = k.name {where} ORDER BY k.name",
                          args)
        if self.shared is not None and rows:
            try:
                got = self.shared.ledger_get([r["name"] for r in rows])
            except OSError as e:
                log.warning("team keys: cannot read the spend in %s (%s); this box's copy is "
                            "shown", self.shared.where, e)
            else:
                for r in rows:
                    row = got.get(r["name"])
                    if row is not None and row[9] == r["created"]:
                        r["period_start"], r["spent"], r["used"] = row[5], row[6], row[8]
        out = []
        for r in rows:
            start, end = period_bounds(r["period"] or "month", now)
            spent = r["spent"] or 0.0 if (r["period_start"] or 0) >= start else 0.0
            state = ("revoked" if r["revoked"] is not None else
                     "expired" if r["expires"] is not None and r["expires"] <= now else "active")
            out.append({
                "name": r["name"], "prefix": r["prefix"][:12] + "...", "state": state,
                "budget_usd": r["budget"], "period": r["period"],
                "spent_usd": round(spent, 6), "period_start": iso_time(start),
                "resets": iso_time(end) if r["budget"] else None,
                "rpm": r["rpm"], "tpm": r["tpm"], "models": loads(r["models"]) if r["models"] else None,
                "expires": iso_time(r["expires"]) if r["expires"] else None,
                "created": iso_time(r["created"]),
                "last_used": iso_time(r["used"]) if r["used"] else None})
        return out

    # -- the request path ------------------------------------------------------------------------
    def _cached(self, what, load):
        """`load()`'s answer for `what`, kept until the `keys` table changes (user_version)."""
        def look():
            flag, now = self._flag_state(), time.monotonic()
            if flag is None and not os.path.exists(self.path):
                return None                  # (no key was ever made here)
            with self.clock:
                v = self.version
                if flag is None or flag != self.seen[0] or now - self.seen[1] > 1.0:
                    v = self._read("PRAGMA user_version")[0]["user_version"]
                    self.seen = (flag, now)
                if v != self.version:
                    self.cache, self.version = {}, v
                if what in self.cache:
                    return self.cache[what]
            out = load()
            with self.clock:
                # (a key that is not one is not kept: a spray of made-up keys cannot fill it)
                if self.version == v and len(self.cache) < 10000 and out is not None:
                    self.cache[what] = out
            return out
        return self._checked(look)

    def any_keys(self):
        """Whether a personal key was ever made here (then every request needs a key, also once
        all are revoked or expired: the router never opens up again by itself)."""
        return self._cached(None, lambda: bool(self._read("SELECT 1 FROM keys LIMIT 1"))) is True

    def find(self, key):
        """The `keys` row of this key (revoked and expired ones too), or None."""
        if not key.startswith(KEY_PREFIX):
            return None

        def load():
            for r in self._read("SELECT * FROM keys WHERE prefix=?", (key[:16],)):
                if hmac.compare_digest(r["hash"], hashlib.sha256((r["salt"] + key).encode())
                                       .hexdigest()):
                    r["models"] = loads(r["models"]) if r["models"] else None
                    return r
            return None
        return self._cached(key, load)

    @classmethod
    def _rows(cls, db, names, owed=False):
        """The stored ledger rows of these keys (tuples in LEDGER's order, and with `owed` what
        each owes the shared ledger or may have sent it without knowing: see ledger_claims; or
        None)."""
        sql = (f"SELECT {', '.join(cls.LEDGER)}" + (
            ", coalesce(owed, 0) + (SELECT coalesce(sum(c.usd), 0) FROM ledger_claims c WHERE "
            "c.name = key_ledger.name AND c.created IS key_ledger.created AND c.period_start IS "
            "key_ledger.period_start AND c.kind = 'pay')" if owed else "") +
            " FROM key_ledger WHERE name=?")
        out = {}
        for n in names:
            row = db.execute(sql, (n,)).fetchone()
            out[n] = tuple(row) if row is not None else None
        return out

    @staticmethod
    def _usage(row, now, period, gen):
        """The usage of a key (made at `gen`) from its stored row as of `now`: this minute's and
        the last one's counts, the spend of this period (a stored minute or period ahead of `now`
        is another process's clock a moment on: taken as now). A row of an older key of that
        name counts for nothing; None when the row is a newer key's (ours is gone)."""
        start, end = period_bounds(period or "month", now)
        minute, cur, prev = int(now // 60), (0, 0), (0, 0)
        if row is not None and row[9] is not None and gen is not None and row[9] > gen:
            return None
        if row is None or row[9] is not None and row[9] != gen:
            return {"minute": minute, "cur": cur, "prev": prev, "start": start, "end": end,
                    "spent": 0.0, "holds": [], "gen": gen}
        at, requests, tokens, prev_requests, prev_tokens, period_start, spent, holds = row[:8]
        if (at or -1) >= minute:
            cur, prev, minute = (requests, tokens), (prev_requests, prev_tokens), at
        elif at == minute - 1:
            prev = (requests, tokens)
        holds = [h for h in loads(holds) if h[2] > now - STALE_HOLD_SECONDS] \
            if holds and holds != "[]" else []
        return {"minute": minute, "cur": cur, "prev": prev,
                "start": max(start, period_start or 0), "end": end,
                "spent": spent or 0.0 if (period_start or 0) >= start - 1 else 0.0,
                "holds": holds, "gen": gen}

    @staticmethod
    def _row_of(u, now):
        """A usage as the row stored (LEDGER's order)."""
        return (u["minute"], max(0, u["cur"][0]), max(0, u["cur"][1]), max(0, u["prev"][0]),
                max(0, u["prev"][1]), u["start"], u["spent"],
                dumps(u["holds"]) if u["holds"] else "[]", now, u["gen"])

    @classmethod
    def _write(cls, db, rows, owe=False, copy=False):
        """{name: (row, USD booked in it)} into key_ledger; with `owe`, the USD is also owed to the
        shared ledger (booked here while it could not be reached; a debt is of one key's one
        period: a row made again or of a new period starts without). With `copy` (rows of the
        shared ledger), a row that owes something is left as it is (catch_up comes first)."""
        cols = ", ".join(cls.LEDGER)
        db.executemany(
            f"INSERT INTO key_ledger (name, {cols}, owed) VALUES "
            f"(?, {', '.join('?' * len(cls.LEDGER))}, ?) ON CONFLICT (name) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in cls.LEDGER)
            + ", owed = (CASE WHEN created IS excluded.created AND period_start IS "
            "excluded.period_start THEN coalesce(owed, 0) ELSE 0 END) + excluded.owed"
            + (" WHERE coalesce(owed, 0) = 0 AND NOT EXISTS (SELECT 1 FROM ledger_claims c "
               "WHERE c.name = key_ledger.name)" if copy else ""),
            [(n, *row, booked if owe else 0.0) for n, (row, booked) in rows.items()])

    @staticmethod
    def _sig(rec):
        """What a block of the key depends on: its generation and limits."""
        return rec["created"], rec["budget"], rec["period"], rec["rpm"], rec["tpm"]

    def admit(self, rec, tokens, cost):
        """A request of the key `rec` about to go to a provider, with `tokens` in and a largest
        likely `cost`: a ticket to settle, or KeyLimit. The rate limits are a sliding minute; a
        budget refuses once it is spent, and, while a request in flight could spend the rest,
        until it has settled (so a key goes over by one request's worth at most). Far from its
        limits, a request is admitted from this process's block of its key (see BLOCK_SHARE),
        without a transaction."""
        name = rec["name"]
        ticket = {"name": name, "gen": rec["created"], "period": rec["period"], "bound": 0.0,
                  "tokens": tokens, "minute": None, "settled": False, "limits": {}}
        if not (rec["rpm"] or rec["tpm"] or rec["budget"]):
            return ticket                # (nothing to check: counted as it settles)
        with self.lock:
            if self._from_block(rec, ticket, tokens, cost):
                return ticket

        def check(u, now, ours):
            """KeyLimit, or the request counted in `u`: (the block granted beside it or None,
            this request's bound)."""
            at = now % 60 if u["minute"] == int(now // 60) else 0.0
            (cur_r, cur_t), (prev_r, prev_t) = u["cur"], u["prev"]
            limits = ticket["limits"]
            # (tokens: counted as estimated and corrected as they settle; a reply's tokens are
            # more than its input's, hence the room for four times as many)
            more_r, more_t, more_usd = BLOCK_MOST, 4 * BLOCK_MOST * max(1, tokens), None
            if rec["rpm"]:
                used = _slide(prev_r, cur_r, at)
                wait = _slide_wait(prev_r, cur_r, at, rec["rpm"] - 1)
                left = max(0, int(rec["rpm"] - used - 1))
                limits["requests"] = (rec["rpm"], left, wait)
                if used + 1 > rec["rpm"]:
                    return KeyLimit("rpm", f"key {name}: over its {rec['rpm']} requests a minute",
                                    wait)
                more_r = min(more_r, int(left * BLOCK_SHARE))
            if rec["tpm"]:
                used = _slide(prev_t, cur_t, at)
                room = rec["tpm"] - min(tokens, rec["tpm"])
                wait = _slide_wait(prev_t, cur_t, at, room)
                left = max(0, int(rec["tpm"] - used - tokens))
                limits["tokens"] = (rec["tpm"], left, wait)
                if used > room:
                    return KeyLimit("tpm", f"key {name}: over its {rec['tpm']} tokens a minute",
                                    wait)
                more_t = min(more_t, int(left * BLOCK_SHARE))
            if rec["budget"]:
                said = f"${rec['budget']:g} a {rec['period']}"
                if u["spent"] >= rec["budget"]:
                    return KeyLimit("budget", f"key {name}: its budget of {said} is spent "
                                              f"(${u['spent']:.4f}); it resets "
                                              f"{iso_time(u['end'])}", u["end"] - now)
                held = len(u["holds"]) + (ours > 0)
                holds = sum(h[1] for h in u["holds"]) + ours
                if held and u["spent"] + holds + cost > rec["budget"]:
                    return KeyLimit("busy", f"key {name}: its budget of {said} is nearly spent "
                                            f"(${u['spent']:.4f}) and {held} request(s) of it "
                                            "are still running: this one waits until they have "
                                            "settled", 1.0)
                room = rec["budget"] - u["spent"] - holds - cost
                more_usd = min(BLOCK_MOST * cost, room * BLOCK_SHARE) if room > 0 else -1.0
                ticket["bound"] = cost
            block = None
            if more_r >= 1 and more_t >= 1 and (more_usd is None or more_usd >= 0):
                # (a block counts requests and tokens also for a key without rpm or tpm, so
                # every request is counted as it is admitted, whichever way)
                block = {"sig": self._sig(rec), "gen": rec["created"], "period": rec["period"],
                         "minute": u["minute"], "at": time.monotonic(), "requests": more_r,
                         "tokens": more_t, "over": 0, "usd": more_usd,
                         "limits": dict(limits)}
            u["cur"] = (cur_r + 1 + (block["requests"] if block else 0),
                        cur_t + tokens + (block["tokens"] if block else 0))
            ticket["minute"] = u["minute"]
            return block, ticket["bound"]
        out = self._checked(self._ledger_tx, rec, check)
        if isinstance(out, KeyLimit):
            out.limits = ticket["limits"]
        if isinstance(out, (KeyLimit, ApiError)):
            raise out
        return ticket

    def _from_block(self, rec, ticket, tokens, cost):
        """Admit a request from this process's block of its key (under self.lock): True, or
        False when there is none, it is used up, stale (BLOCK_SECONDS, a new minute) or the
        key changed: then the ledger is asked."""
        block = self.blocks.get(rec["name"])
        if (block is None or block["sig"] != self._sig(rec)
                or block["minute"] != int(time.time() // 60)
                or time.monotonic() - block["at"] > BLOCK_SECONDS or block["requests"] < 1
                or rec["tpm"] and block["tokens"] - block["over"] < tokens
                or block["usd"] is not None and block["usd"] < cost):
            return False
        for k, (limit, left, reset) in block["limits"].items():
            block["limits"][k] = (limit, max(0, left - (1 if k == "requests" else tokens)), reset)
        ticket["limits"] = dict(block["limits"])
        block["requests"] -= 1
        block["tokens"] -= tokens
        if block["usd"] is not None:
            block["usd"] -= cost
            ticket["bound"] = cost
            self._inflight(rec["name"], rec["created"], rec["period"])["usd"] += cost
        ticket["minute"] = block["minute"]
        return True

    def _inflight(self, name, gen, period):
        """This process's record of key `name`'s requests in flight (of the key made at `gen`;
        a newer key of that name replaces it)."""
        f = self.inflight.get(name)
        if f is None or f["gen"] != gen and (gen or 0) > (f["gen"] or 0):
            f = self.inflight[name] = {"usd": 0.0, "gen": gen, "period": period, "held": 0.0}
        return f

    def settle(self, ticket, cost, tokens):
        """A request of a key completed (or failed) with this real cost and these tokens: booked
        by this store's next transaction on the ledger (the next request's admission, or the
        request log writer's next batch, within BATCH_SECONDS), so a request pays for one
        transaction at most. Until then this process's hold on the ledger stands for it. Its
        block learns at once what it really used (its tokens past the estimate, its cost)."""
        if ticket is None or ticket["settled"]:
            return
        with self.lock:
            ticket["settled"] = True
            name = ticket["name"]
            f = self.inflight.get(name)
            if ticket["bound"] and f is not None and f["gen"] == ticket["gen"]:
                f["usd"] = max(0.0, f["usd"] - ticket["bound"])
            block = self.blocks.get(name)
            if block is not None and block["gen"] == ticket["gen"]:
                if ticket["minute"] == block["minute"]:
                    block["over"] += tokens - ticket["tokens"]
                if block["usd"] is not None and ticket["bound"]:
                    block["usd"] += ticket["bound"] - max(0.0, cost)
            if len(self.pending) >= 100000:          # (the store has failed for long)
                if not self.warned:
                    self.warned = True
                    log.warning("team keys: %s cannot be written; the spend of the oldest "
                                "requests is dropped", self.path)
                del self.pending[:1000]
            self.pending.append((ticket, cost, tokens))

    def idle_wait(self):
        """How long the request log writer may wait for traffic before calling flush (a block to
        give back, a hold to renew): BLOCK_SECONDS once keys are in use here, else forever (and
        `in_use` tells the writer when they come into use)."""
        return BLOCK_SECONDS if self.db is not None else None

    def flush(self):
        """Book the settled requests not booked yet, give back this process's blocks, renew its
        holds due for it (the writer's batch and idle wake-ups; before a read of the spend)."""
        if self.pending or self.blocks or self._due(time.monotonic()):
            self._ledger_tx()

    def _due(self, now):
        return [k for k, f in self.inflight.items()
                if f["usd"] > 0 and now - f["held"] > HOLD_RENEW_SECONDS]

    def _ledger_tx(self, rec=None, check=None):
        """One write transaction on the ledger (one read and one write a key): every settlement
        of this process booked; without `check`, its blocks given back and its holds due
        renewed; with `check`, a new request of key `rec` checked and counted on the same row
        (its old block given back): check(usage, now, this process's hold) -> (its block or
        None, its bound), or the KeyLimit returned (after the commit). This process's hold on
        every row it writes becomes what its requests in flight there may still cost, and its
        blocks' USD."""
        with self.lock:
            pending, self.pending = self.pending, []
            mono = time.monotonic()
            keys = {}                         # name -> (generation, period, [items])
            if check is None:
                for name, b in self.blocks.items():
                    keys[name] = [b["gen"], b["period"], []]
                for name in self._due(mono):
                    f = self.inflight[name]
                    keys.setdefault(name, [f["gen"], f["period"], []])
            for it in pending:
                t = it[0]
                k = keys.setdefault(t["name"], [t["gen"], t["period"], []])
                if (t["gen"] or 0) > (k[0] or 0):
                    k[0], k[1] = t["gen"], t["period"]
                k[2].append(it)
            name = rec["name"] if rec is not None else None
            if rec is not None:
                k = keys.setdefault(name, [rec["created"], rec["period"], []])
                k[0], k[1] = rec["created"], rec["period"]
            if not keys:
                return None

            def attempt(rows):
                """The transaction's work on the stored rows: ((out, blocks, renewed), {name:
                (row to store, USD booked)}). Run again whole when the shared ledger saw another
                write to a row meanwhile."""
                now = time.time()     # (in the transaction: every process's turn in order)
                out, blocks, renewed, writes = None, dict(self.blocks), [], {}
                for key, (gen, period, items) in keys.items():
                    u = self._usage(rows.get(key), now, period, gen)
                    block = blocks.get(key)
                    if u is None:         # (the key was made again: ours is gone)
                        blocks.pop(key, None)
                        if key == name:
                            out = ApiError(401, "authentication", f"the key {name} was revoked")
                        continue
                    mine = [it for it in items if it[0]["gen"] == gen]
                    self._book(u, mine)
                    if block is not None and (check is None or key == name
                                              or block["gen"] != gen):
                        if block["gen"] == gen:
                            self._give_back(u, block)
                        blocks.pop(key)
                        block = None
                    u["holds"] = [h for h in u["holds"] if h[0] != self.hold_id]
                    f = self.inflight.get(key)
                    ours = f["usd"] if f is not None and f["gen"] == gen else 0.0
                    if key == name:
                        out = check(u, now, ours)
                        if not isinstance(out, KeyLimit):
                            block = blocks[key] = out[0]
                            ours += out[1]
                    ours += (block or {}).get("usd") or 0.0
                    if ours > 0:
                        u["holds"].append([self.hold_id, ours, now])
                    renewed.append(key)
                    writes[key] = (self._row_of(u, now), sum(max(0.0, it[1]) for it in mine))
                return (out, blocks, renewed), writes
            try:
                out, blocks, renewed = self._run_ledger(list(keys), attempt)
            except LedgerUnsure as e:     # (applied or not: told by the rows later, see _resolve)
                tx, sent = e.tx, e.sent
                for n in sent:
                    self.blocks.pop(n, None)       # (given back, maybe: not used again)
                try:
                    write_tx(self._conn(), lambda db: self._claim(db, tx, sent, "sent"))
                except sqlite3.Error:
                    self.pending[:0] = pending    # (booked again: twice, if it was applied)
                raise
            except BaseException:
                self.pending[:0] = pending        # (booked by a later transaction)
                raise
            self.blocks = {k: b for k, b in blocks.items() if b is not None}
            for key in renewed:
                if key in self.inflight:
                    self.inflight[key]["held"] = mono
            if rec is not None and not isinstance(out, (KeyLimit, ApiError)):
                if out[1]:
                    f = self._inflight(name, rec["created"], rec["period"])
                    f["usd"] += out[1]
                    f["held"] = mono
                out = out[0]
            for k in [k for k, f in self.inflight.items() if f["usd"] <= 0]:
                del self.inflight[k]
            return out

    def _run_ledger(self, names, attempt):
        """attempt(rows) on the ledger, in one transaction: the shared one (settings.shared_state)
        when there is one and it answers, else this box's (requests.db; while a shared one is
        configured but cannot be reached, what is booked here is also owed to it: see
        catch_up)."""
        if self.shared is not None:
            mono = time.monotonic()
            for n in names:
                self.used[n] = mono
            try:
                out = self.shared.ledger_run(names, attempt, self._seed_rows, writer=self.writer,
                                             keep=self.open_claims)
            except LedgerUnsure:
                raise                  # (neither booked here nor retried: see _resolve)
            except LedgerBusy:
                raise ApiError(503, "overloaded", "the team keys' shared ledger is too busy right "
                               "now: try again", headers={"Retry-After": "1"}) from None
            except OSError as e:
                if not self.shared_failing:
                    log.warning("team keys: cannot use the shared ledger in %s (%s); this box "
                                "counts its keys' requests and spend on its own until it can, "
                                "then adds the spend of meanwhile to it", self.shared.where, e)
                self.shared_failing = True
            else:
                if self.shared_failing:
                    log.info("team keys: the shared ledger in %s works again", self.shared.where)
                    self.shared_failing = False
                return out

        def local(db):
            out, writes = attempt(self._rows(db, names))
            self._write(db, writes, owe=self.shared is not None)
            return out
        return write_tx(self._conn(), local)

    def _claim(self, db, tx, sent, kind):
        """Spend sent to the shared ledger by transaction `tx`, {name: (USD, created,
        period_start)}, as claims until it is known whether it arrived (see _resolve)."""
        self._alive()
        db.executemany("INSERT OR REPLACE INTO ledger_claims (tx, name, usd, created, "
                       "period_start, writer, pid, at, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [(tx, n, usd, gen, start, self.writer, os.getpid(), time.time(), kind)
                        for n, (usd, gen, start) in sent.items() if usd > 0])
        if any(usd > 0 for usd, _g, _s in sent.values()):
            self.open_claims.add(tx)

    def _lock_path(self, writer):
        return os.path.join(os.path.dirname(self.path), f"claims-{writer}.lock")

    def _alive(self):
        """This process's lock file, held for its life: another process that can lock it knows
        this one is gone (pids say less: containers, reuse)."""
        if self.lockfile is None:
            import fcntl
            fd = os.open(self._lock_path(self.writer), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.lockfile = fd

    def _gone(self, writer):
        """Whether the process `writer` is gone (its lock file can be taken)."""
        import fcntl
        try:
            fd = os.open(self._lock_path(writer), os.O_RDWR)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        finally:
            os.close(fd)
        return True

    def _seed_rows(self, names):
        """This box's copy of ledger rows the shared ledger lacks (a Redis emptied by a restart, a
        key counted here alone so far), without what it owes to the shared ledger (catch_up adds
        that: so it is added once, whichever comes first)."""
        rows = self._rows(self._conn(), names, owed=True)
        return {n: r[:6] + (max(0.0, (r[6] or 0.0) - (r[10] or 0.0)),) + r[7:10]
                for n, r in rows.items() if r is not None}

    COPY_SECONDS = 1.0           # how often the copies of the shared rows used here are refreshed
    COPY_KEEP = 900.0            # ... for keys used here in the last this many seconds

    def catch_up(self):
        """The shared-state thread's work on the ledger, every half second while the shared one
        answers: what this box booked while it could not be reached (key_ledger's owed) is added
        to it (to the same key's row of the same period; a row it lost, or of a period gone by, is
        started again from this box's; spend of an older key of that name is dropped), and, once
        a second, this box's copies of the rows its keys used lately are refreshed (it starts from
        them when the shared ledger cannot be reached). A debt is claimed first (owed ->
        ledger_claims, with the transaction's id, in one short write here), so the workers of a
        box pay it once, and no lock is held across a round trip to Redis; a payment or a
        transaction of the request path whose answer was lost is settled by the rows' ids
        (_resolve). A busy database here only waits for the next tick."""
        if self.shared is None or self.db is None:
            return
        try:
            self._pay()
            self._copy()
        except (sqlite3.Error, LedgerBusy) as e:
            log.debug("team keys: catching up with %s later (%s)", self.shared.where, e)

    def _bg(self):
        """The shared-state thread's own connection (a short busy timeout: it tries again)."""
        with self.bglock:
            if self.bdb is None:
                self._conn()                    # (the tables, first)
                self.bdb = sqlite3.connect(self.path, timeout=1.0, isolation_level=None,
                                           check_same_thread=False)
            return self.bdb

    def _pay(self):
        if not self._read("SELECT 1 FROM key_ledger WHERE owed > 0 UNION ALL "
                          "SELECT 1 FROM ledger_claims LIMIT 1"):
            return
        db = self._bg()
        self._resolve(db)
        tx = secrets.token_hex(6)

        def claim(db):
            owed = {}
            for n, usd in db.execute("SELECT name, owed FROM key_ledger WHERE owed > 0").fetchall():
                r = self._rows(db, [n])[n]
                # (this row, to start a row Redis lost: without other debts still being paid)
                others = self._claimed(db, n, r)
                owed[n] = r[:6] + (max(0.0, (r[6] or 0.0) - others),) + r[7:10] + (usd,)
            self._claim(db, tx, {n: (r[10], r[9], r[5]) for n, r in owed.items()}, "pay")
            db.executemany("UPDATE key_ledger SET owed = 0 WHERE name = ?", [(n,) for n in owed])
            return owed
        owed = write_tx(db, claim)
        if not owed:
            return

        def attempt(rows):
            writes = {}
            for n, here in owed.items():
                row, usd = rows.get(n), here[10]
                if row is None or row[9] != here[9] and (here[9] or 0) > (row[9] or 0) \
                        or row[9] == here[9] and (row[5] or 0) < (here[5] or 0):
                    writes[n] = (here[:10], usd)       # (lost there, or gone by)
                elif row[9] == here[9] and row[5] == here[5]:
                    writes[n] = (row[:6] + ((row[6] or 0.0) + usd,) + row[7:10], usd)
            return None, writes
        try:
            self.shared.ledger_run(list(owed), attempt, lambda ns: {}, tx=tx, writer=self.writer,
                                   keep=self.open_claims)
        except LedgerUnsure:
            raise                         # (the claims stay: _resolve tells, at a later tick)
        except BaseException:
            self._settle(db, tx, False)
            raise
        self._settle(db, tx, True)
        log.info("team keys: the spend booked on this box while %s could not be reached is "
                 "added to it (%d key(s))", self.shared.where, len(owed))

    @staticmethod
    def _claimed(db, name, row):
        """The USD of this row's period and key in debts being paid."""
        return db.execute("SELECT coalesce(sum(usd), 0) FROM ledger_claims WHERE name = ? AND "
                          "created IS ? AND period_start IS ? AND kind = 'pay'",
                          (name, row[9], row[5])).fetchone()[0]

    def _resolve(self, db):
        """Claims whose fate is not known (the shared-state thread's): this process's own, and
        those of processes of this box that are gone. Each transaction's rows tell whether it
        arrived (done) or not (its USD is owed again, to the same key's same period, else
        dropped); rows that cannot be read now leave it for a later tick."""
        txs, gone = {}, {}
        for tx, name, writer in db.execute("SELECT tx, name, writer FROM ledger_claims").fetchall():
            if writer == self.writer or gone.setdefault(writer, self._gone(writer)):
                txs.setdefault((tx, writer), []).append(name)
        for (tx, writer), names in txs.items():
            applied = self.shared.ledger_applied(tx, names, writer)
            if applied is not None:
                self._settle(db, tx, applied)
        for writer, dead in gone.items():
            if dead and not db.execute("SELECT 1 FROM ledger_claims WHERE writer = ?",
                                       (writer,)).fetchone():
                try:
                    os.remove(self._lock_path(writer))
                except OSError:
                    pass

    def _settle(self, db, tx, applied):
        """The claims of transaction `tx` done (it arrived), or owed again (it did not: a debt
        to its key's same period; a request's settlements booked here as a debt, this box's row
        made or moved to that key and period if need be; of an older key or period: dropped)."""
        def settle(db):
            if not applied:
                for name, usd, gen, start, kind in db.execute(
                        "SELECT name, usd, created, period_start, kind FROM ledger_claims WHERE "
                        "tx = ?", (tx,)).fetchall():
                    row = self._rows(db, [name])[name]
                    if row is not None and row[9] == gen and row[5] == start:
                        db.execute("UPDATE key_ledger SET owed = coalesce(owed, 0) + ?, spent = "
                                   "coalesce(spent, 0) + ? WHERE name = ?",
                                   (usd, usd if kind == "sent" else 0.0, name))
                    elif kind == "sent" and (row is None or (gen or 0, start or 0)
                                             > (row[9] or 0, row[5] or 0)):
                        now = time.time()
                        self._write(db, {name: ((int(now // 60), 0, 0, 0, 0, start, usd, "[]",
                                                 now, gen), usd)}, owe=True)
            db.execute("DELETE FROM ledger_claims WHERE tx = ?", (tx,))
        write_tx(db, settle)
        self.open_claims.discard(tx)

    def _copy(self):
        mono = time.monotonic()
        if mono - self.copied < self.COPY_SECONDS:
            return
        self.copied = mono
        with self.lock:
            self.used = {n: t for n, t in self.used.items() if mono - t < self.COPY_KEEP}
            names = list(self.used)
        if names:
            got = self.shared.ledger_get(names)
            write_tx(self._bg(), lambda db: self._write(db, {
                n: (row[:10], 0.0) for n, row in got.items() if row is not None}, copy=True))

    @staticmethod
    def _book(u, items):
        """Settlements into a key's usage: each real cost joins its period's spend; a request
        counted as it was admitted has its estimated tokens replaced by its real ones in the
        minute it was counted in, one admitted without a transaction is counted now."""
        for ticket, cost, tokens in items:
            if ticket["minute"] is None:
                u["cur"] = (u["cur"][0] + 1, u["cur"][1] + tokens)
            elif ticket["minute"] == u["minute"]:
                u["cur"] = (u["cur"][0], u["cur"][1] + tokens - ticket["tokens"])
            elif ticket["minute"] == u["minute"] - 1:
                u["prev"] = (u["prev"][0], u["prev"][1] + tokens - ticket["tokens"])
            u["spent"] += max(0.0, cost)

    @staticmethod
    def _give_back(u, block):
        """A block's unused requests and tokens out of the minute they were counted in (its USD
        leaves with the hold, which is rewritten)."""
        back = (block["requests"], block["tokens"])     # (tokens: less than 0 when overdrawn)
        if block["minute"] == u["minute"]:
            u["cur"] = (u["cur"][0] - back[0], u["cur"][1] - back[1])
        elif block["minute"] == u["minute"] - 1:
            u["prev"] = (u["prev"][0] - back[0], u["prev"][1] - back[1])


KEYS_IN_USE = object()      # (for the request log writer: keys are in use now, see idle_wait)


class RequestLog:
    """The request log: SQLite in WAL mode in the data directory, written by one thread from a
    queue. Prompt and reply text are stored only when `log_prompts` is on. Retention: rows older
    than `log_retention_days`, and beyond the newest `log_retention_rows`, are deleted."""

    BATCH_SECONDS = 0.05
    COLUMNS = ("ts", "dialect", "requested", "intent", "route", "provider", "model",
               "attempts", "status", "latency_ms", "ttfb_ms", "input_tokens", "output_tokens",
               "cached_tokens", "cost", "stream",
               "error", "prompt", "reply", "pinned", "usage_estimated", "structured", "dropped",
               "endpoint", "completion", "key")

    def __init__(self, path, settings, metrics, line_format="text"):
        self.path = path
        self.settings = settings
        self.metrics = metrics
        self.line_format = line_format
        self.queue = queue.SimpleQueue()
        self.thread = None
        self.ok = True
        self.keys = None            # the KeyStore whose settled spend the writer books

    def start(self):
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="sage-router-log", daemon=True)
            self.thread.start()

    def record(self, row, attempts):
        """Called on the request's thread: a queue put, nothing more."""
        self.queue.put((row, attempts))

    def stop(self, timeout=5.0):
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(timeout)
            self.thread = None

    def _connect(self):
        db = open_db(self.path, [f"CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY, "
                                 f"{', '.join(self.COLUMNS)})"], isolation_level=None)
        db.isolation_level = ""             # (rows are inserted in batches: one commit each)
        have = {r[1] for r in db.execute("PRAGMA table_info(requests)")}
        for col in self.COLUMNS:
            if col not in have:          # a log written by an older version: add the new columns
                db.execute(f"ALTER TABLE requests ADD COLUMN {col}")
        db.execute("CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts)")
        return db

    def _run(self):
        try:
            db = self._connect()
        except (OSError, sqlite3.Error) as e:
            self.ok = False
            log.warning("request log: cannot open %s (%s); requests are logged to stderr only",
                        self.path, e)
            db = None
        last_prune = 0.0
        while True:
            try:
                item = self.queue.get(timeout=self.keys.idle_wait() if self.keys else None)
                if item is KEYS_IN_USE:
                    raise queue.Empty        # (the wait before it had no end: now it has one)
            except queue.Empty:           # (no traffic: a key's block or hold needs its turn)
                try:
                    self.keys.flush()
                except Exception as e:
                    log.warning("team keys: spend not booked yet (%s: %s); tried again later",
                                type(e).__name__, e)
                continue
            if item is not None:
                # gather a batch: one commit, one wake-up per 50 ms at most
                time.sleep(self.BATCH_SECONDS)
            batch = [item]
            while len(batch) < 1000:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            batch = [b for b in batch if b is not None and b is not KEYS_IN_USE]
            good = []
            if self.keys is not None:
                try:
                    self.keys.flush()    # (what no admission has booked since)
                except Exception as e:
                    log.warning("team keys: spend not booked yet (%s: %s); tried again with the "
                                "next batch", type(e).__name__, e)
            # one bad row is logged and skipped; the thread never dies
            lines = [] if log.isEnabledFor(logging.INFO) else None
            for row, attempts in batch:
                try:
                    if isinstance(row["intent"], Plan):
                        row["intent"] = row["intent"].intent
                    self.metrics.add(row, attempts)
                    if lines is not None:
                        lines.append(self._log_line(row, len(attempts)))
                    good.append(tuple(_storable(row[c]) for c in self.COLUMNS))
                except Exception as e:
                    log.error("request log: skipping a row that cannot be recorded (%s: %s)",
                              type(e).__name__, e)
            if lines:
                log_lines(lines)
            if db is not None and good:
                try:
                    self._insert(db, good)
                    if time.monotonic() - last_prune > 60:
                        last_prune = time.monotonic()
                        self.prune(db)
                except Exception as e:
                    log.warning("request log: write failed (%s: %s)", type(e).__name__, e)
            if stop:
                if db is not None:
                    db.close()
                return

    def _insert(self, db, rows):
        """Insert a batch in one commit; if the batch fails, row by row, skipping the bad ones."""
        sql = (f"INSERT INTO requests ({', '.join(self.COLUMNS)}) "
               f"VALUES ({', '.join('?' * len(self.COLUMNS))})")
        try:
            db.executemany(sql, rows)
            db.commit()
            return
        except (sqlite3.Error, ValueError) as e:
            db.rollback()
            log.warning("request log: batch refused (%s); writing its rows one by one", e)
        for r in rows:
            try:
                db.execute(sql, r)
            except (sqlite3.Error, ValueError) as e:
                log.error("request log: skipping a row that cannot be stored (%s)", e)
        db.commit()

    def prune(self, db=None):
        """Apply the retention settings (the writer does it every minute)."""
        own = db is None
        db = db or sqlite3.connect(self.path, timeout=10)
        try:
            days = self.settings["log_retention_days"]
            rows = int(self.settings["log_retention_rows"])
            db.execute("DELETE FROM requests WHERE ts < ?", (time.time() - days * 86400,))
            db.execute("DELETE FROM requests WHERE id <= (SELECT id FROM requests ORDER BY id DESC "
                       "LIMIT 1 OFFSET ?)",
                       (rows,))
            db.commit()
        finally:
            if own:
                db.close()

    def _log_line(self, row, attempts):
        """A request's log line: (message, fields for --log-format json)."""
        fields = {k: row[k] for k in ("dialect", "requested", "intent", "route",
                                      "provider", "model", "status",
                                      "latency_ms", "ttfb_ms", "input_tokens",
                                      "output_tokens", "cost", "error")}
        answered = 1 if row["provider"] and row["status"] < 400 else 0
        fields["attempts"] = attempts + answered
        if self.line_format == "json":
            return "request", fields
        where = f"{row['provider']}/{row['model']}" if row["provider"] else "-"
        ttfb = f" ttfb {row['ttfb_ms']:.0f} ms" if row["ttfb_ms"] is not None else ""
        err = f" error: {clean_text(row['error'], 2000)}" if row["error"] else ""
        return ("%s %s -> %s %s %.0f ms%s in %s out %s $%.6f attempts %d intent %s route %s%s" % (
            row["dialect"], clean_text(row["requested"]), where, row["status"],
            row["latency_ms"], ttfb, row["input_tokens"] or 0, row["output_tokens"] or 0,
            row["cost"] or 0, fields["attempts"], row["intent"] or "-", row["route"] or "-",
            err), fields)

    # -- reading (on the request's thread, each call with its own connection) ---------------------
    def _read(self, sql, args=()):
        if not os.path.exists(self.path):
            return []
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(sql, args)]
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):      # the writer is creating the log right now
                return []
            raise
        finally:
            db.close()

    def usage(self, since, group_by, key=None):
        """/v1/usage: totals and groups since `since` (of one personal key's requests only, when
        `key` names one)."""
        expr = USAGE_GROUPS.get(group_by or "model")
        if expr is None:
            raise bad_request("group_by", f"must be one of {', '.join(USAGE_GROUPS)}")
        sums = ("COUNT(*) AS requests, SUM(status >= 400) AS errors, "
                "COALESCE(SUM(input_tokens), 0) AS input_tokens, COALESCE(SUM(output_tokens), "
                "0) AS output_tokens, COALESCE(SUM(cached_tokens), 0) AS cached_tokens, "
                "ROUND(COALESCE(SUM(cost), 0), 6) AS cost, "
                "COALESCE(SUM(usage_estimated), 0) AS estimated")
        order = "grp" if group_by == "day" else "cost DESC, requests DESC"
        where, args = ("ts >= ? AND key = ?", (since, key)) if key else ("ts >= ?", (since,))
        groups = [dict(key=g.pop("grp"), **g) for g in self._read(
            f"SELECT {expr} AS grp, {sums} FROM requests WHERE {where} GROUP BY grp "
            f"ORDER BY {order}", args)]
        total = self._read(f"SELECT {sums} FROM requests WHERE {where}", args)
        if group_by == "key":
            for g in groups:
                g["key"] = g["key"] or "(router key or none)"
        out = {"since": since, "group_by": group_by or "model",
               "totals": total[0] if total else {}, "groups": groups}
        if key:
            out["key"] = key
        return out

    def recent(self, limit=50, key=None):
        rows = self._read("SELECT id, ts, dialect, requested, intent, route, provider, model, "
                          "attempts, status, latency_ms, ttfb_ms, input_tokens, output_tokens, "
                          "cached_tokens, usage_estimated, cost, stream, error, pinned, "
                          "structured, dropped, coalesce(endpoint, 'chat') AS endpoint, "
                          "completion, key FROM requests " + ("WHERE key = ? " if key else "")
                          + "ORDER BY id DESC LIMIT ?",
                          ((key,) if key else ()) + (max(1, min(500, limit)),))
        for r in rows:
            r["attempts"] = json.loads(r["attempts"] or "[]")
        return rows


def log_lines(lines):
    """Request lines [(message, fields)] at INFO, as log.info would write each, but a batch in
    one write: with the handler setup_logging made (and nothing else in the way), they are
    formatted here; else each goes through logging."""
    handlers = logging.getLogger().handlers
    h = handlers[0] if len(handlers) == 1 and not log.handlers and log.propagate else None
    if (h is None or getattr(h, "sage_format", None) is None or h.filters
            or logging.getLogger().filters or log.filters or h.level > logging.INFO):
        for message, fields in lines:
            log.info("%s", message, extra={"fields": fields})
        return
    now = time.time()
    ms = int(now % 1 * 1000)
    if h.sage_format == "json":
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{ms:03d}Z"
        text = "".join(dumps(dict({"time": stamp, "level": "info", "message": m}, **f)) + "\n"
                       for m, f in lines)
    else:
        prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{ms:03d} INFO "
        text = "".join(prefix + m + "\n" for m, _f in lines)
    with h.lock:
        try:
            h.stream.write(text)
            h.flush()
        except (OSError, ValueError):
            pass                     # (stderr closed or full: as logging's own handler would)


class JsonLogFormatter(logging.Formatter):
    """--log-format json: one JSON object a line (time, level, message, and a request's fields)."""

    def format(self, record):
        obj = {"time": time.strftime("%Y-%m-%dT%H:%M:%S",
                                     time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "message": record.getMessage()}
        obj.update(getattr(record, "fields", {}))
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return dumps(obj)


def answer_cost(ctx, catalogue):
    """What a finished request used: (answered, usage, cost in USD). A stream that broke after it
    started used tokens too; usage a provider did not report is estimated, never zero."""
    usage = ctx.usage or {}
    prov = catalogue.providers.get(ctx.provider) if ctx.provider else None
    answered = ctx.status < 400 or ctx.broken is not None
    if answered and prov is not None and not _counted(usage):
        usage = Dispatcher.estimated_usage(ctx)
    cost = request_cost(price_of(prov.api, ctx.upstream_model,
                                 catalogue.meta(ctx.provider, ctx.upstream_model)),
                        usage) if prov is not None and answered and usage else 0.0
    return answered, usage, cost


def request_row(ctx, catalogue, log_prompts, used=None):
    """The log row of a finished request (built on its thread: plain data, no I/O); `used`:
    its answer_cost, if already known."""
    answered, usage, cost = used or answer_cost(ctx, catalogue)
    attempts = [{"provider": a.cand[0], "model": a.cand[1], "kind": a.kind,
                 "reason": a.reason, "status": a.status}
                for a in ctx.attempts]
    row = {"ts": time.time(), "dialect": ctx.dialect, "requested": ctx.model,
           # (a plan that did not need the intent: the writer finds it, off the request's thread)
           "intent": (ctx.plan.intent if ctx.plan.detected else ctx.plan) if ctx.plan else None,
           "route": ctx.plan.route if ctx.plan else None,
           "provider": ctx.provider if answered else None,
           "model": ctx.upstream_model if answered else None,
           "attempts": dumps(attempts), "status": ctx.status,
           "latency_ms": round((time.monotonic() - ctx.started) * 1000, 2),
           "ttfb_ms": round(ctx.ttfb * 1000, 2) if ctx.ttfb is not None and answered else None,
           "input_tokens": usage.get("input"), "output_tokens": usage.get("output"),
           "cached_tokens": usage.get("cache_read"), "cost": round(cost, 8),
           "stream": int(bool(ctx.stream)), "error": ctx.error, "prompt": None, "reply": None,
           "pinned": "/".join(ctx.plan.pinned) if ctx.plan and ctx.plan.pinned else None,
           "usage_estimated": int(ctx.usage_estimated),
           "structured": ctx.structured if answered else None,
           "dropped": ", ".join(ctx.dropped) if answered and ctx.dropped else None,
           "endpoint": ctx.endpoint, "completion": ctx.completion if answered else None,
           "key": ctx.key["name"] if ctx.key else None,
           "known": (ctx.provider, ctx.upstream_model) in catalogue.caps}
    if log_prompts:
        row["prompt"] = "\n".join(user_turns(ctx.req)[-1:])[:100000]
        row["reply"] = (text_of(fold_events(list(ctx.collect))["content"])[:100000]
                        if ctx.collect else None)
    return row, attempts


def health_report(router):
    """GET /health: every provider (never its keys) with its state, its keys' and its models'
    ("ok", "cooling" with "until" and "reason", "key_rejected", "disabled"), routes, discovery."""
    cat, hl = router.catalogue, router.health
    now, wall = time.monotonic(), time.time()
    providers = []
    for p in cat.providers.values():
        entry = p.public()
        if not p.enabled:
            providers.append(dict(entry, state="disabled", reason=p.disabled_reason,
                                  keys=[], models=[]))
            continue
        keys = []
        for i in range(len(p.keys)):
            dead = hl.dead_keys.get((p.name, i))
            keys.append(dict({"key": f"#{i + 1}"},
                             **({"state": "key_rejected", "reason": dead} if dead else
                                                      hl.view(("key", p.name, i), now, wall))))
        models = [dict({"id": mid},
                       **hl.view((p.name, mid), now, wall)) for mid in sorted(p.models)]
        state = hl.view(("provider", p.name), now, wall)
        if state["state"] == "ok" and keys and all(k["state"] == "key_rejected" for k in keys):
            state = {"state": "key_rejected", "reason": "every key was rejected (401/403): "
                                                        "fix it in .env (picked up at once) "
                                                        "or reset the provider"}
        elif state["state"] == "ok" and keys and all(k["state"] != "ok" for k in keys):
            state = {"state": "cooling", "until": min(k["until"] for k in keys if "until" in k),
                     "reason": "every key is cooling down"}
        elif state["state"] == "ok" and models and all(m["state"] == "cooling" for m in models):
            state = {"state": "cooling", "until": min(m["until"] for m in models),
                     "reason": "every model is cooling down"}
        providers.append(dict(entry, **state, keys=keys, models=models))
    out = {"status": "ok", "version": __version__, "providers": providers,
           "routes": {r: [f"{p}/{m}" for p, m in c] for r, c in cat.routes.items()},
           "aliases": dict(cat.aliases), "strict": cat.strict,
           "discovery": router.discovery.report()}
    if router.shared is not None:
        out.update(router.shared.report())
    if not cat.enabled:
        out["message"] = NO_PROVIDER_HELP
    return out


# =================================================================================================
# 7. The router
# =================================================================================================

class SqliteShare:
    """What the workers of one router (--workers) share through the data directory's database:
    breakers, each worker's metrics, conversation affinity. One connection, one lock; every call
    is one short statement or transaction, and an error is the caller's to take (SharedState
    falls back on this process's own state)."""

    SCHEMA = [
        # (seq: the order in which changes reached the table, what readers read on from; `at`,
        # a wall clock's, only says when: clocks of several boxes need not agree)
        "CREATE TABLE IF NOT EXISTS shared_breakers (key TEXT PRIMARY KEY, data, at, seq) "
        "WITHOUT ROWID",
        "CREATE TABLE IF NOT EXISTS shared_metrics (worker TEXT PRIMARY KEY, run, at, data) "
        "WITHOUT ROWID",
        "CREATE TABLE IF NOT EXISTS affinity_names (conv TEXT, name TEXT, cand, at, "
        "PRIMARY KEY (conv, name)) WITHOUT ROWID",
        "CREATE TABLE IF NOT EXISTS affinity_marks (conv TEXT, provider TEXT, mark INTEGER, at, "
        "PRIMARY KEY (conv, provider, mark)) WITHOUT ROWID",
        "CREATE INDEX IF NOT EXISTS affinity_names_at ON affinity_names (at)",
        "CREATE INDEX IF NOT EXISTS affinity_marks_at ON affinity_marks (at)"]
    KEEP_SECONDS = 86400.0       # affinity of a conversation idle this long is forgotten
    FAST_BUSY_MS = 50            # how long a request waits for a write lock another holds

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.db = None
        # the request path's own connection (affinity): a short busy timeout, and after a
        # failure none is tried for a second, so a database someone holds locked (a VACUUM, a
        # shell) costs a request 50 ms at most, never the 10 s the background waits
        self.fast_lock = threading.Lock()
        self.fast_db = None
        self.fast_down = 0.0

    def _run(self, fn):
        with self.lock:
            if self.db is None:
                db = open_db(self.path, self.SCHEMA, isolation_level=None,
                             check_same_thread=False)
                if "seq" not in {r[1] for r in db.execute("PRAGMA table_info(shared_breakers)")}:
                    db.execute("ALTER TABLE shared_breakers ADD COLUMN seq")
                self.db = db
            return fn(self.db)

    def _fast(self, fn, write=False):
        if time.monotonic() < self.fast_down:
            raise sqlite3.OperationalError("the database was locked a moment ago")
        if self.db is None:
            self._run(lambda db: None)              # (the tables, first)
        if not self.fast_lock.acquire(timeout=self.FAST_BUSY_MS / 1000):
            raise sqlite3.OperationalError("the database is busy")     # (others wait on it)
        try:
            if time.monotonic() < self.fast_down:
                raise sqlite3.OperationalError("the database was locked a moment ago")
            try:
                if self.fast_db is None:
                    self.fast_db = sqlite3.connect(self.path, timeout=self.FAST_BUSY_MS / 1000,
                                                   isolation_level=None, check_same_thread=False)
                return write_tx(self.fast_db, fn) if write else fn(self.fast_db)
            except sqlite3.Error:
                self.fast_down = time.monotonic() + 1.0
                raise
        finally:
            self.fast_lock.release()

    def _tx(self, fn):
        return self._run(lambda db: write_tx(db, fn))

    def close(self):
        for lock, attr in ((self.lock, "db"), (self.fast_lock, "fast_db")):
            with lock:
                if getattr(self, attr) is not None:
                    getattr(self, attr).close()
                    setattr(self, attr, None)

    # breakers: {shared key: entry}; the last change of a key to reach the store wins, and gets
    # the next number (seq)
    def put_breakers(self, entries):
        self._tx(lambda db: db.executemany(
            "INSERT INTO shared_breakers (key, data, at, seq) VALUES (?, ?, ?, (SELECT "
            "coalesce(max(seq), 0) + 1 FROM shared_breakers)) ON CONFLICT (key) DO UPDATE SET "
            "data = excluded.data, at = excluded.at, seq = excluded.seq",
            [(k, dumps(e), e["at"]) for k, e in entries.items()]))

    def breakers(self, since=0):
        """({shared key: entry} of the changes numbered after `since`, in their order, the last
        number read), or (None, 0) when the numbers went back (the store lost its data: read all
        again)."""
        def read(db):
            top = db.execute("SELECT coalesce(max(seq), 0) FROM shared_breakers").fetchone()[0]
            if top < since:
                return None, 0
            return {k: loads(d) for k, d in db.execute(
                "SELECT key, data FROM shared_breakers WHERE seq > ? ORDER BY seq", (since,))}, top
        return self._run(read)

    # metrics: one row a worker of this run (a replaced worker's row stays: its counts count)
    def put_metrics(self, worker, run, data, at, fast=False):
        """A worker's counts as of `at` (a row only ever moves forward); `fast`: a scrape's."""
        (self._fast if fast else self._run)(lambda db: db.execute(
            "INSERT INTO shared_metrics (worker, run, at, data) VALUES (?, ?, ?, ?) ON CONFLICT "
            "(worker) DO UPDATE SET run = excluded.run, at = excluded.at, data = excluded.data "
            "WHERE excluded.at > at", (worker, run, at, dumps(data))))

    def metrics(self, run, fast=False):
        return (self._fast if fast else self._run)(lambda db: db.execute(
            "SELECT worker, at, data FROM shared_metrics WHERE run = ?", (run,)).fetchall())

    def forget_runs(self, run):
        self._run(lambda db: db.execute("DELETE FROM shared_metrics WHERE run != ?", (run,)))

    # affinity: a conversation's pins {name: candidate} and thinking marks {provider: {mark}}
    def affinity_get(self, conv):
        def get(db):
            names = {n: tuple(loads(c)) for n, c in db.execute(
                "SELECT name, cand FROM affinity_names WHERE conv = ?", (conv,))}
            marks = {}
            for p, m in db.execute("SELECT provider, mark FROM affinity_marks WHERE conv = ?",
                                   (conv,)):
                marks.setdefault(p, set()).add(m)
            return names, marks
        return self._fast(get)

    def affinity_pin(self, conv, name, cand):
        self._fast(lambda db: db.execute(
            "INSERT OR REPLACE INTO affinity_names (conv, name, cand, at) VALUES (?, ?, ?, ?)",
            (conv, name, dumps(list(cand)), time.time())))

    def affinity_marks(self, conv, provider, marks):
        now = time.time()

        def put(db):
            db.executemany("INSERT OR REPLACE INTO affinity_marks (conv, provider, mark, at) "
                           "VALUES (?, ?, ?, ?)", [(conv, provider, m, now) for m in marks])
            db.execute("DELETE FROM affinity_marks WHERE conv = ? AND provider = ? AND mark NOT IN "
                       "(SELECT mark FROM affinity_marks WHERE conv = ? AND provider = ? ORDER BY "
                       "at DESC LIMIT ?)", (conv, provider, conv, provider, Affinity.MARKS))
        self._fast(put, write=True)

    def prune(self):
        old = time.time() - self.KEEP_SECONDS

        def prune(db):
            db.execute("DELETE FROM affinity_names WHERE at < ?", (old,))
            db.execute("DELETE FROM affinity_marks WHERE at < ?", (old,))
            db.execute("DELETE FROM shared_breakers WHERE at < ? AND seq < (SELECT max(seq) "
                       "FROM shared_breakers)", (old,))     # (the top number stays)
        self._tx(prune)


class RedisShare:
    """What routers on several boxes share through Redis or Valkey (settings.shared_state): the
    breakers, conversation affinity and stored Responses, under keys `sage:...` that all expire
    (a day; a Response after the store's ttl). Each call is one round trip; no lock is held across
    a provider call. Keys of one conversation share a {hash tag} (Redis Cluster)."""

    # the last change of a breaker to arrive wins and gets the counter's next number: KEYS =
    # entries, numbers, counter; ARGV = name, entry, name, entry ...
    PUT_BREAKERS = ("for i = 1, #ARGV, 2 do local n = redis.call('INCR', KEYS[3]) "
                    "redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) "
                    "redis.call('HSET', KEYS[2], ARGV[i], n) end "
                    "for j = 1, 3 do redis.call('EXPIRE', KEYS[j], 86400) end return 1")
    BREAKERS = ("sage:{breakers}:data", "sage:{breakers}:seq", "sage:{breakers}:count")
    KEEP_SECONDS = 86400

    def __init__(self, url):
        self.r = Resp(url)
        self.where = self.r.shown
        self.epoch = None           # the keys' epoch there (a new one: the server lost its data)

    def ping(self):
        self.r.call("PING")

    def put_breakers(self, entries):
        args = [x for k, e in entries.items() for x in (k, dumps(e))]
        self.r.call("EVAL", self.PUT_BREAKERS, len(self.BREAKERS), *self.BREAKERS, *args)

    def breakers(self, since=0):
        """As SqliteShare.breakers: the changes numbered after `since`."""
        count, flat = self.r.pipeline([["GET", self.BREAKERS[2]], ["HGETALL", self.BREAKERS[1]]])
        for reply in (count, flat):
            if isinstance(reply, RespError):
                raise reply
        top = int(count or 0)
        if top < since:
            return None, 0
        names = [k for n, k in sorted((int(n), k) for k, n in zip(flat[::2], flat[1::2]))
                 if n > since]
        out = {}
        if names:
            for k, v in zip(names, self.r.call("HMGET", self.BREAKERS[0], *names)):
                e = loads(v) if v else None
                if isinstance(e, dict):
                    out[k.decode()] = e
        return out, top

    def prune(self):
        flat = self.r.call("HGETALL", self.BREAKERS[0]) or []
        old = []
        for k, v in zip(flat[::2], flat[1::2]):
            e = loads(v)
            if not isinstance(e, dict) or not _num(e.get("at")) \
                    or e["at"] < time.time() - self.KEEP_SECONDS:
                old.append(k)
        if old:
            self.r.pipeline([["HDEL", self.BREAKERS[0], *old], ["HDEL", self.BREAKERS[1], *old]])

    # affinity: a hash of pins and a set of "provider<TAB>mark"
    def affinity_get(self, conv):
        names, marks = self.r.pipeline([["HGETALL", f"sage:aff:{{{conv}}}:n"],
                                        ["SMEMBERS", f"sage:aff:{{{conv}}}:m"]], fast=True)
        pins, out = {}, {}
        for k, v in zip((names or [])[::2], (names or [])[1::2]):
            pins[k.decode()] = tuple(loads(v))
        for m in marks or []:
            p, _, mark = m.decode().rpartition("\t")
            out.setdefault(p, set()).add(int(mark))
        return pins, out

    def affinity_pin(self, conv, name, cand):
        key = f"sage:aff:{{{conv}}}:n"
        self.r.pipeline([["HSET", key, name, dumps(list(cand))],
                         ["EXPIRE", key, self.KEEP_SECONDS]], fast=True)

    def affinity_marks(self, conv, provider, marks):
        key = f"sage:aff:{{{conv}}}:m"
        _added, _ttl, size = self.r.pipeline([["SADD", key, *(f"{provider}\t{m}" for m in marks)],
                                              ["EXPIRE", key, self.KEEP_SECONDS],
                                              ["SCARD", key]], fast=True)
        if isinstance(size, int) and size > 4 * Affinity.MARKS:     # (a long agent session)
            self.r.call("SPOP", key, size - 4 * Affinity.MARKS, fast=True)

    # stored Responses, for previous_response_id on any box
    def put_response(self, rid, entry, ttl):
        self.r.call("SET", f"sage:resp:{rid}", dumps(entry), "EX", max(1, int(ttl)), fast=True)

    def get_response(self, rid):
        got = self.r.call("GET", f"sage:resp:{rid}", fast=True)
        return None if got is None else loads(got)

    # team keys: the ledger (a row a key: JSON in KeyStore.LEDGER's order, under one {hash tag}
    # so that one transaction may write several), and the keys' definitions
    LEDGER_KEY = "sage:{ledger}:"
    LEDGER_SECONDS = 40 * 86400      # (longer than a budget's longest period)
    LEDGER_TRIES = 100
    # per key name, the row that wins (as key_row_wins: a later key, a revocation, a later
    # change) is kept and gets the next number of a counter (what the other boxes read on from):
    # KEYS = rows, order, counter, epoch; ARGV = name, row, name, row ...; returns the names
    # whose row lost (the row is only read here, never encoded again: its numbers stay exact)
    PUT_KEYS = ("local refused = {} for i = 1, #ARGV, 2 do "
                "local new = cjson.decode(ARGV[i + 1]) "
                "local raw = redis.call('HGET', KEYS[1], ARGV[i]) local win = true "
                "if raw then local old = cjson.decode(raw) "
                "local nc, oc = tonumber(new.created) or 0, tonumber(old.created) or 0 "
                "local nr = new.revoked ~= nil and new.revoked ~= cjson.null "
                "local orv = old.revoked ~= nil and old.revoked ~= cjson.null "
                "if nc ~= oc then win = nc > oc elseif nr ~= orv then win = nr "
                "else win = (tonumber(new.changed) or nc) > (tonumber(old.changed) or oc) end end "
                "if win then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) "
                "redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[i]) "
                "else refused[#refused + 1] = ARGV[i] end end "
                "for j = 1, 4 do redis.call('EXPIRE', KEYS[j], 7776000) end return refused")
    KEYS = ("sage:{keys}:rows", "sage:{keys}:order", "sage:{keys}:count", "sage:{keys}:epoch")

    LEDGER_HISTORY = 64      # transaction ids a row keeps (see ledger_run)

    def ledger_run(self, names, attempt, seed, tx=None, writer="-", keep=()):
        """attempt(rows) -> (out, {name: (row, USD)}) as one optimistic transaction: the rows read
        under WATCH, the new ones written in MULTI ... EXEC, the whole tried again when another
        process wrote one of them meanwhile (EXEC answers a null array). A row missing here is
        started from seed(names) (this box's copy). -> out. LedgerBusy when other processes
        kept winning; LedgerUnsure when EXEC was sent and neither its answer nor the rows could
        be read (applied or not: tell later by ledger_applied); another OSError when the
        server cannot be used (nothing was applied)."""
        keys = [self.LEDGER_KEY + n for n in names]
        tx = tx or secrets.token_hex(4)
        for attempt_no in range(self.LEDGER_TRIES):
            if attempt_no:                       # (another process won the row: let it go on)
                time.sleep(random.uniform(0, 0.001 * min(attempt_no, 20)))
            with self.r.session(fast=True) as send:
                watched, got = send([["WATCH", *keys], ["MGET", *keys]])
                for reply in (watched, got):
                    if isinstance(reply, RespError):
                        raise reply
                rows = {n: tuple(loads(v)) if v else None for n, v in zip(names, got)}
                history = {n: self._history(ledger_history(row), writer, tx, keep)
                           for n, row in rows.items()}
                missing = [n for n, row in rows.items() if row is None]
                if missing:
                    rows.update(seed(missing))
                out, writes = attempt(rows)
                # (each row keeps, for each process that writes it, the ids of its last
                # transactions there: when EXEC's answer is lost, the rows tell whether it was
                # applied, so nothing is booked twice, however many others wrote them since)
                try:
                    done = send([["MULTI"]] + [
                        ["SET", self.LEDGER_KEY + n, dumps(list(row[:10]) + [history[n]]), "EX",
                         self.LEDGER_SECONDS] for n, (row, _usd) in writes.items()]
                        + [["EXEC"]])[-1]
                except ConnectionError:
                    applied = self.ledger_applied(tx, list(writes), writer)
                    if applied is None:
                        raise LedgerUnsure(tx, {n: (usd, row[9], row[5]) for n, (row, usd)
                                                in writes.items()}) from None
                    if applied:
                        return out
                    raise
                if isinstance(done, RespError):
                    raise done
                if done is not None:
                    for reply in done:
                        if isinstance(reply, RespError):
                            raise reply
                    return out
        raise LedgerBusy()

    def ledger_get(self, names, fast=True):
        got = self.r.call("MGET", *(self.LEDGER_KEY + n for n in names), fast=fast)
        return {n: tuple(loads(v)) if v else None for n, v in zip(names, got or [])}

    def ledger_applied(self, tx, names, writer):
        """Whether transaction `tx` of `writer` wrote these rows (True/False), or None when they
        cannot be read now."""
        if not names:
            return True
        try:
            rows = self.ledger_get(names, fast=False)
        except OSError:
            return None
        # (EXEC is all or nothing: one row that has it says it was applied, also when the
        # transaction left some of these rows alone)
        return any(tx in ledger_history(rows.get(n)).get(writer, [0, []])[1] for n in names)

    HISTORY_KEEP = 2 * 86400.0      # a writer silent this long leaves the rows' histories

    def _history(self, history, writer, tx, keep=()):
        """A row's history with transaction `tx` of `writer` added (its ids in `keep`, those not
        settled yet, stay whatever else it writes)."""
        now = time.time()
        out = {w: h for w, h in history.items() if isinstance(h, list) and len(h) == 2
               and _num(h[0]) and now - h[0] < self.HISTORY_KEEP}
        mine = list(out.get(writer, [0, []])[1]) + [tx]
        kept = [t for t in mine[:-self.LEDGER_HISTORY] if t in keep]
        out[writer] = [now, kept + mine[-self.LEDGER_HISTORY:]]
        return out

    def put_keys(self, rows):
        """Key rows (dicts, with `changed`) made or changed on this box -> the names refused (the
        row there wins)."""
        args = [x for row in rows for x in (row["name"], dumps(row))]
        got = self.r.call("EVAL", self.PUT_KEYS, len(self.KEYS), *self.KEYS, *args)
        return [n.decode() for n in got or []]

    def keys_named(self, names):
        return [loads(v) for v in self.r.call("HMGET", self.KEYS[0], *names) or [] if v]

    def keys_since(self, cursor):
        """The key rows accepted after number `cursor`: (rows, the number read up to), or (None,
        0) when the server lost its data (a new epoch, or a counter behind the cursor): then
        every box sends all its keys again."""
        epoch = secrets.token_hex(8)
        _set, now, count, flat = self.r.pipeline([
            ["SET", self.KEYS[3], epoch, "NX", "EX", 7776000], ["GET", self.KEYS[3]],
            ["GET", self.KEYS[2]], ["ZRANGEBYSCORE", self.KEYS[1], f"({cursor}", "+inf",
                                    "WITHSCORES"]])
        for reply in (_set, now, count, flat):
            if isinstance(reply, RespError):
                raise reply
        seen, self.epoch = self.epoch, now
        # (the epoch was missing: a new server, or one that lost its data: every box, also one
        # that starts now, sends all its keys again; a row that loses there is refused)
        if _set == "OK" or seen is not None and now != seen or int(count or 0) < cursor:
            return None, 0
        names = flat[::2]
        if not names:
            return [], cursor
        return self.keys_named(names), max(int(float(x)) for x in flat[1::2])

    def close(self):
        self.r.close()


class SharedState:
    """One router made of several processes: its workers on this box (--workers, through the data
    directory's database: SqliteShare), and, with settings.shared_state, the routers of other
    boxes (RedisShare, which then holds the breakers and affinity; the workers' metrics stay in
    the database: each box has its own /metrics). A thread here publishes the breakers that open
    or close in this process at once, takes the others' every half second (so a breaker opened in
    one place is respected everywhere within a second), and writes this worker's metrics every
    second for GET /metrics to add up. Conversation affinity is asked of the store on each request.
    When the store fails, this process keeps going on its own state, says so in its log and in
    /health, and tells what changed meanwhile once the store is back."""

    TICK = 0.5
    METRICS_SECONDS = 1.0
    LIVE_SECONDS = 5.0           # a worker whose metrics are older than this is gone (gauges)

    def __init__(self, router, store, local, worker):
        self.router, self.store, self.local = router, store, local
        self.index, self.count, self.run = worker[:3]
        self.parent = worker[3] if len(worker) > 3 else None    # the supervisor's pid
        self.me = f"{socket.gethostname()}:{self.run}:{self.index}:{os.getpid()}:{secrets.token_hex(4)}"
        self.wake = threading.Event()
        self.thread = None
        self.failing = None          # why the store cannot be used right now, or None
        self.cursors = {}            # id(store) -> [its breaker changes read up to, read once]
        self.owed = {}               # changes told only to the database while Redis was away
        self.last_view = None        # the last whole-router metrics (see metrics_view)
        self.fallback_since = None   # when this outage of Redis began (see tick)
        self.metrics_at = self.prune_at = 0.0
        self.counts_lock, self.counts_at = threading.Lock(), 0.0

    def start(self):
        if self.thread is None:
            self.router.health.wake = self.wake
            self.router.affinity.store = self
            self.thread = threading.Thread(target=self._loop, name="sage-router-shared",
                                           daemon=True)
            self.thread.start()

    def _loop(self):
        parent = self.parent if self.parent is not None else os.getppid()
        if self.local is not None:
            self._side(self.local.forget_runs, self.run)
        while not self.router._stop.is_set():
            self.tick()                  # (at once at the start: Redis's address is looked up)
            if self.count > 1 and os.getppid() != parent:   # the supervisor is gone: as SIGTERM
                log.warning("worker %d: the supervising process is gone; stopping", self.index)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            self.wake.wait(self.TICK)
            self.wake.clear()

    def _call(self, fn, *args):
        try:
            out = fn(*args)
        except Exception as e:
            self._failed(e)
            return None
        if self.failing is not None:
            log.info("shared state: %s works again", self.where)
            self.failing = None
        return True if out is None else out

    @property
    def where(self):
        return getattr(self.store, "where", "the data directory's database")

    def _failed(self, e):
        if self.failing is None:
            log.warning("shared state: cannot use %s (%s: %s); this router process goes on with "
                        "its own breakers and affinity until it can", self.where,
                        type(e).__name__, e)
        self.failing = clean_text(e, 200)

    def tick(self):
        """Publish what changed here, take what changed elsewhere, write the metrics."""
        r, now = self.router, time.time()
        fps = r._fingerprints()
        mine, taken = r.health.changes(fps)
        for e in mine.values():
            e["by"] = self.me
        if mine and self._call(self.store.put_breakers, mine) is None:
            # (Redis cannot be reached: the workers of this box still share through the data
            # directory's database, and Redis is told once it is back)
            if self._fallback() and self._side(self.local.put_breakers, mine):
                self.owed.update(taken)
            else:
                r.health.unpublished(taken)    # (tried again at the next tick)
        seen = self._take(self.store, self._call, fps, now)
        if self.failing is None and self.owed:
            # (back: what changed here meanwhile is told, but not a reset, done long ago, nor a
            # breaker another process changed meanwhile: the store's is the newer word)
            again = {k: at for k, at in self.owed.items() if k[0] != "reset"
                     and r.health._shared_key(k, fps) not in seen}
            self.owed = {}
            if again:
                r.health.unpublished(again)
                self.wake.set()
        if self._fallback():
            if self.fallback_since is None:
                self.fallback_since = now
            # (the database's entries from before this outage are old news)
            self._take(self.local, self._side, fps, now, after=self.fallback_since - 5)
        else:
            self.fallback_since = None
        if r.keys.shared is not None and self._call(r.keys.sync, True, True):
            self._call(r.keys.catch_up)
        if self.local is not None and now - self.metrics_at >= self.METRICS_SECONDS:
            self.metrics_at = now
            self._side(self.local.put_metrics, self.me, self.run, *self._counts())
        if now - self.prune_at >= 60:
            self.prune_at = now
            self._call(self.store.prune)
            if self.local is not None and self.local is not self.store:
                self._side(self.local.prune)

    def _take(self, store, call, fps, now, after=None):
        """The breakers the other processes told `store` since this one last read it (those of
        `after` or later only) -> the names read."""
        seen = self.cursors.setdefault(id(store), [0, False])     # [cursor, read once]
        first = not seen[1]
        got = call(store.breakers, seen[0])
        if isinstance(got, tuple) and got[0] is None:        # (the store lost its data)
            first, got = True, call(store.breakers, 0)
        if not (isinstance(got, tuple) and got[0] is not None):
            return set()
        theirs, seen[0] = got
        seen[1] = True
        take = {}
        for k, e in theirs.items():          # (in the store's order)
            if e.get("by") == self.me:
                if e.get("reset"):           # (what came before a reset here is undone by it)
                    take = {n: x for n, x in take.items() if not Health.resets(k, n)}
                continue
            # (a reset by hand is done where it is heard as it happens: not by a process that
            # starts later, on breakers it has opened since)
            if first and e.get("reset") and (not _num(e.get("at")) or now - e["at"] > 10):
                continue
            if after is not None and (not _num(e.get("at")) or e["at"] < after):
                continue
            take[k] = e
        self.router.health.adopt(take, fps)
        return set(theirs)

    def _fallback(self):
        """Whether Redis cannot be reached and the data directory's database stands in."""
        return self.failing is not None and self.local is not None and self.local is not self.store

    def _side(self, fn, *args):
        """A call on the data directory's database beside Redis (its failure is not the shared
        state's: logged, not shown in /health)."""
        if self.local is self.store:
            return self._call(fn, *args)
        try:
            out = fn(*args)
        except Exception as e:
            log.debug("shared state: %s: %s", self.local.path, e)
            return None
        return True if out is None else out

    def _counts(self):
        """This worker's metrics and a time that orders them (the scrape's and the thread's)."""
        with self.counts_lock:
            self.counts_at = max(time.time(), self.counts_at + 1e-6)
            return self.router.metrics.state(), self.counts_at

    def metrics_view(self):
        """The whole router's metrics: every worker's of this run as last written, this one's
        written first (a worker that died and was replaced still counts; a gone worker's open
        connections do not). Only stored rows are added up, so no counter ever goes back from one
        scrape to the next, whichever worker answers each."""
        mine, at = self._counts()
        rows = None
        if self.local is not None and self._side(self.local.put_metrics, self.me, self.run, mine,
                                                 at, True):
            rows = self._side(self.local.metrics, self.run, True)
        if not isinstance(rows, list):
            if self.local is not None and self.last_view is not None:
                return self.last_view         # (the database is busy: the last sum, not less)
            rows = []
        states = [] if any(w == self.me for w, _at, _d in rows) else [mine]
        now, live = time.time(), 0 if not states else 1
        for worker, at, data in rows:
            st = loads(data)
            if now - at > self.LIVE_SECONDS:
                st["connections"] = dict(st.get("connections") or {}, open=0)
            else:
                live += 1
            states.append(st)
        self.last_view = Metrics.merged(states), live
        return self.last_view

    # -- conversation affinity (Affinity.store) -----------------------------------------------
    def affinity_get(self, conv):
        got = self._call(self.store.affinity_get, conv)
        if got is None and self._fallback():
            got = self._side(self.local.affinity_get, conv)
        return got if isinstance(got, tuple) else None

    def affinity_pin(self, conv, name, cand):
        if self._call(self.store.affinity_pin, conv, name, cand) is None and self._fallback():
            self._side(self.local.affinity_pin, conv, name, cand)

    def affinity_marks(self, conv, provider, marks):
        if self._call(self.store.affinity_marks, conv, provider, marks) is None \
                and self._fallback():
            self._side(self.local.affinity_marks, conv, provider, marks)

    def report(self):
        """For /health: {"workers": ..., "shared_state": ...}."""
        state = {"where": self.where, "state": "ok"}
        if self.failing is not None:
            state.update(state="failing", reason=f"cannot use it ({self.failing}): this router "
                                                 "process goes on with its own breakers and "
                                                 "affinity, and catches up when it is back")
        out = {"shared_state": state}
        if self.count > 1:
            out["workers"] = {"count": self.count, "this": self.index, "pid": os.getpid()}
        return out

    def close(self):
        self.wake.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(5)
        if self.thread is None or not self.thread.is_alive():
            self.tick()              # (the last changes and counts)
        for store in (self.store, self.local):
            if store is not None:
                store.close()


class ResponseStore:
    """Responses this router produced, for `previous_response_id`: at most `size` of them, for
    `ttl` seconds and within `budget` bytes (oldest evicted first). A stored entry is the
    conversation so far (system prompt and neutral messages, the answer included). Kept in memory
    for this process, and, with `path`, in the data directory's database (table `responses`), so
    that another router process on the directory (or this one after a restart) can take the
    next turn; it is written before the client sees the answer's end. In memory, entries of one
    conversation share their history, so charging each for the whole over-counts, but an evicted
    entry's history that a newer one still holds is never uncounted. A conversation larger than
    the budget is not kept."""

    def __init__(self, size=1000, ttl=3600.0, budget=32 << 20, path=None):
        self.lock = threading.Lock()
        self.size, self.ttl, self.budget = size, ttl, budget
        self.items = {}        # id -> (time, system, messages, bytes)
        self.bytes = 0
        self.path, self.db, self.writes, self.warned = path, None, 0, False
        self.remote = None      # a RedisShare (settings.shared_state): the routers of other boxes
        self.remote_warned = -1e9

    def prepare(self, ctx):
        """Expand previous_response_id into the request's history. -> the hook that keeps the answer
        once it is complete (the dispatcher's on_complete), or None."""
        req = ctx.req
        pid, store = req["extra"].get("previous_response_id"), req["extra"].get("store")
        if not pid and not store:                 # (only Responses requests carry these)
            return None
        if pid:
            with self.lock:
                entry = self.items.get(pid)
            if entry is None or time.time() - entry[0] > self.ttl:
                entry = self._stored(pid)
            if entry is None:
                raise ApiError(400, "invalid_request", "previous_response_id: unknown response "
                                                       f"{pid!r}. This router keeps the responses "
                                                       f"it produced for {self.ttl / 60:g} minutes "
                                                       f"(the last {self.size}), only when the "
                                                       "request did not say \"store\": false; send "
                                                       "the whole conversation in `input` instead",
                                                       param="previous_response_id")
            _t, system, messages, before = entry
            new = req["messages"]
            ctx.req = req = dict(req, system=req["system"] or system, messages=messages + new)
            ctx.passthrough = False
        else:
            new, before = req["messages"], len(dumps(req["system"]))
        if store:
            ctx.collect = []
            return lambda: self.keep(ctx, new, before)
        return None

    def keep(self, ctx, new, before):
        resp = fold_events(ctx.collect)
        rid = resp["id"] if ctx.same else ctx.req["extra"]["response_id"]
        if not rid:
            return
        turn = {"role": "assistant",
                "content": [p for p in resp["content"] if p["type"] != "redacted_thinking"]}
        size = before + len(dumps(new)) + len(dumps(turn["content"]))     # the whole conversation
        now, gone = time.time(), []
        with self.lock:
            old = self.items.pop(rid, None)
            self.bytes -= old[3] if old else 0
            if size > self.budget:
                return
            self.items[rid] = entry = (now, ctx.req["system"], ctx.req["messages"] + [turn], size)
            self.bytes += size
            while self.items and (len(self.items) > self.size or self.bytes > self.budget):
                _id, (_t, _s, _m, n) = next(iter(self.items.items()))
                del self.items[_id]
                self.bytes -= n
                gone.append(_id)
        self._store(rid, entry, gone)

    # -- the database copy (shared by the router processes on one data directory) -------------
    def _conn(self):
        if self.db is None:
            self.db = open_db(self.path, [
                "CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, at REAL, "
                "system TEXT, messages TEXT, bytes INTEGER)",
                "CREATE INDEX IF NOT EXISTS responses_at ON responses (at)"],
                isolation_level=None, check_same_thread=False)
        return self.db

    def _failed(self, e):
        if not self.warned:
            self.warned = True
            log.warning("responses: cannot use %s (%s); previous_response_id works only on "
                        "this router process meanwhile", self.path, e)

    def _store(self, rid, entry, gone=()):
        """Write an entry (and delete those this process's memory just evicted); every 50th
        write, the database's oldest go too, past the same age, count and bytes. With a shared
        state, the entry goes there too, for the ttl."""
        at, system, messages, size = entry

        def write(db):
            db.execute("INSERT OR REPLACE INTO responses (id, at, system, messages, bytes) "
                       "VALUES (?, ?, ?, ?, ?)", (rid, at, dumps(system), dumps(messages), size))
            db.executemany("DELETE FROM responses WHERE id=?", [(g,) for g in gone])
            self.writes += 1
            if self.writes % 50 == 1:
                db.execute("DELETE FROM responses WHERE at < ?", (at - self.ttl,))
                total, kept = 0, 0
                for r_at, n in db.execute("SELECT at, bytes FROM responses "
                                          "ORDER BY at DESC").fetchall():
                    total, kept = total + n, kept + 1
                    if total > self.budget or kept > self.size:
                        db.execute("DELETE FROM responses WHERE at <= ?", (r_at,))
                        break
        if self.remote is not None:
            try:
                self.remote.put_response(rid, [at, system, messages, size], self.ttl)
            except OSError as e:
                if time.monotonic() - self.remote_warned > 60:
                    self.remote_warned = time.monotonic()
                    log.warning("responses: cannot keep them in %s (%s); a next turn works on "
                                "this box only meanwhile", self.remote.where, e)
        if self.path is None:
            return
        try:
            with self.lock:
                write_tx(self._conn(), write)
        except (sqlite3.Error, OSError) as e:
            self._failed(e)

    def _stored(self, rid):
        """An entry another process (or this one before a restart) kept, or None."""
        if self.remote is not None:
            try:
                got = self.remote.get_response(rid)
                if isinstance(got, list) and len(got) == 4 and time.time() - got[0] <= self.ttl:
                    return tuple(got)
            except (OSError, ValueError) as e:
                if time.monotonic() - self.remote_warned > 60:
                    self.remote_warned = time.monotonic()
                    log.warning("responses: cannot ask %s (%s)", self.remote.where, e)
        if self.path is None or not os.path.exists(self.path):
            return None
        try:
            with self.lock:
                row = self._conn().execute("SELECT at, system, messages, bytes FROM responses "
                                           "WHERE id=?", (rid,)).fetchone()
        except (sqlite3.Error, OSError) as e:
            self._failed(e)
            return None
        if row is None or time.time() - row[0] > self.ttl:
            return None
        return row[0], loads(row[1]), loads(row[2]), row[3]

    def close(self):
        with self.lock:
            if self.db is not None:
                self.db.close()
                self.db = None


class Router:
    """The composition root: config and catalogue, health table, connection pool, dispatcher.
    Everything mutable lives here (never in module globals), so tests can run several routers."""

    def __init__(self, cfg, env, source="providers.json", data_dir=None, log_format="text",
                 worker=None):
        self.cfg, self.env, self.source = with_imports(cfg, env), env, source
        self.data_dir = data_dir or default_data_dir()
        self.discovery = Discovery()
        self.load_catalogue_cache()
        self.catalogue = None
        self.catalogue = self._build()
        self.settings = self.catalogue.settings
        self.health = Health(self.settings)
        self.pool = Pool()
        self.dispatcher = Dispatcher(self.pool)
        self.router_key = clean_key(env.get("SAGE_ROUTER_API_KEY") or "",
                                    "the router key (SAGE_ROUTER_API_KEY)") or None
        self.affinity = Affinity()
        self._warned = set()       # unknown model names already logged
        self._intent_cache = {}    # latest user turn -> the intent model's answer (LRU)
        self._intent_lock = threading.Lock()
        self._discover_lock = threading.Lock()
        self._forced_at = -1e9
        self.responses = ResponseStore(budget=int(self.settings["response_store_mb"] * (1 << 20)),
                                       path=os.path.join(self.data_dir, "requests.db"))
        self.metrics = Metrics()
        self.log = RequestLog(os.path.join(self.data_dir, "requests.db"), self.settings,
                              self.metrics, log_format)
        self.keys = self.log.keys = KeyStore(os.path.join(self.data_dir, "requests.db"))
        self.keys.in_use = lambda: self.log.queue.put(KEYS_IN_USE)
        # (index, count, run) of this worker of `--workers N`: then state is shared with the rest,
        # and with other boxes through settings.shared_state
        local = None if worker is None else SqliteShare(os.path.join(self.data_dir, "requests.db"))
        url = self.settings["shared_state"]
        try:
            remote = RedisShare(expand_vars(url, env)) if url else None
        except MissingVar as e:
            raise ConfigError(source, "settings.shared_state",
                              f"${{{e.args[0]}}} set in .env or the environment") from None
        except ValueError as e:       # (the expanded URL is not shown: it holds the password)
            raise ConfigError(source, "settings.shared_state",
                              f"redis://[:PASSWORD@]HOST[:PORT][/DB] once ${{VAR}} is expanded "
                              f"({e})") from None
        self.shared = None if local is None and remote is None else SharedState(
            self, remote or local, local, worker or (0, 1, "single"))
        self.responses.remote = self.keys.shared = remote
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._reload_asked = False
        # () -> (cfg, env, source): set by main() so the config can be reloaded
        self.loader = None
        # file -> mtime, for reloading when providers.json or .env changes
        self.watch = {}
        self._thread = None
        self._save_warned = False
        self.load_state()

    # -- the catalogue: config, imports, discovery
    # ---------------------------------------------------
    def _build(self, cfg=None, env=None, source=None):
        """A new catalogue from the config (by default the current one) and what discovery found;
        per-provider protocol state such as Gemini thought signatures carries over."""
        cat = Catalogue(self.cfg if cfg is None else cfg, self.env if env is None else env,
                        source or self.source, self.discovery.snapshot())
        if self.catalogue is not None:
            for name, prov in cat.providers.items():
                old = self.catalogue.providers.get(name)
                if old is not None:
                    prov.memo = old.memo
        return cat

    def discover(self, force=False, wait=None, timeout=DISCOVERY_TIMEOUT):
        """Refresh the model lists that are due (all when forced); a changed list rebuilds the
        catalogue and rewrites its cache. Returns whether anything changed. `wait`: how long to
        wait for a refresh already under way (None: as long as it takes)."""
        if not self._discover_lock.acquire(timeout=-1 if wait is None else wait):
            return False
        try:
            changed = False
            now = time.monotonic()
            for prov in self.catalogue.enabled:
                if prov.discover and (force or self.discovery.due(prov, now,
                                                                  prov.discover_interval)):
                    changed |= self.discovery.refresh(prov, prov.discover_interval, timeout)
            if changed:
                self.catalogue = self._build()
                self.health.forget(self._known_breaker)
                self.save_catalogue_cache()
            return changed
        finally:
            self._discover_lock.release()

    def _known_breaker(self, key):
        """Whether a breaker belongs to something the catalogue still has."""
        cat = self.catalogue
        return key[1] in cat.providers if key[0] in ("provider", "key") else key in cat.caps

    def refresh_for(self, name):
        """A request named a model nobody lists: refresh once (at most every 30 s) before the
        router answers with aliases, auto or a 404."""
        now = time.monotonic()
        if now - self._forced_at < 30:
            return False
        self._forced_at = now
        return self.discover(force=True, wait=REQUEST_DISCOVERY_TIMEOUT,
                             timeout=REQUEST_DISCOVERY_TIMEOUT)

    @property
    def catalogue_file(self):
        return os.path.join(self.data_dir, "catalogue.json")

    def load_catalogue_cache(self):
        try:
            with open(self.catalogue_file, encoding="utf-8") as f:
                data = json.load(f)
            models = data.get("providers") if isinstance(data, dict) else None
            if not isinstance(models, dict):
                raise ValueError("no \"providers\" object in it")
            cached = {p: {mid: clean_model_meta(meta) for mid, meta in m.items()
                          if isinstance(mid, str) and mid}
                      for p, m in models.items() if isinstance(p, str) and isinstance(m, dict)}
            with self.discovery.lock:
                self.discovery.models = cached
            log.info("discovery: %d model(s) from the cache %s",
                     sum(len(m) for m in cached.values()), self.catalogue_file)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.warning("discovery: ignoring unreadable cache %s (%s)", self.catalogue_file, e)

    def save_catalogue_cache(self):
        self._write(self.catalogue_file,
                    {"version": 1, "saved": time.time(), "providers": self.discovery.snapshot()})

    def _write(self, path, obj):
        tmp = f"{path}.{os.getpid()}.tmp"          # (workers may write the same file at once)
        try:
            private_dir(self.data_dir)
            with os.fdopen(open_private(tmp), "w", encoding="utf-8") as f:
                f.write(dumps(obj))
            os.replace(tmp, path)
        except OSError as e:
            if not self._save_warned:
                self._save_warned = True
                log.warning("cannot write %s (%s); state will not survive a restart",
                            path, e.strerror or e)

    # -- state that survives a restart ------------------------------------------------------------
    def _fingerprints(self):
        """Keys are remembered by a short hash, never by their text."""
        return {(p.name, i): hashlib.sha256(k.encode()).hexdigest()[:12]
                for p in self.catalogue.providers.values() for i, k in enumerate(p.keys)}

    @property
    def state_file(self):
        return os.path.join(self.data_dir, "health.json")

    def load_state(self):
        try:
            with open(self.state_file, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict) or not isinstance(data.get("breakers", []), list):
                raise ValueError("expected an object with a \"breakers\" list")
            n = self.health.restore(data, self._fingerprints())
            self.health.forget(self._known_breaker)
            log.info("health: restored %d breaker(s) from %s", n, self.state_file)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.warning("health: ignoring unreadable state file %s (%s); starting with no breakers",
                        self.state_file, e)

    def save_state(self):
        self._write(self.state_file, self.health.snapshot(self._fingerprints()))

    def start(self):
        """The one background thread: model discovery, and saving health when it changed."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._maintain,
                                            name="sage-router-maintenance", daemon=True)
            self._thread.start()
        self.log.start()
        if self.shared is not None:
            self.shared.start()

    def admit(self, ctx, cat, cands, tokens):
        """A personal key's ticket for this request (its rate limits and budget), holding the
        largest cost it may have on any of its candidates. A key with a budget has its output
        capped as the hold assumes (default_max_tokens, when the request sets no max_tokens), so
        the hold is a bound. A limit it is over is a 429 in the client's dialect, with
        Retry-After and the rate-limit headers its SDK reads."""
        if ctx.key["budget"] and not ctx.req.get("max_tokens") and ctx.endpoint != "embeddings":
            ctx.req["max_tokens"] = self.settings["default_max_tokens"]
            ctx.passthrough = False      # (the client's own body would go out uncapped)
        most = max(request_cost(price_of(cat.providers[c[0]].api, c[1], cat.meta(*c)), {
            "input": tokens, "output": output_limit(ctx.req, cat.meta(*c), self.settings[
                "default_max_tokens"]) or 0}) for c in cands)
        codec = CODECS[ctx.dialect]
        try:
            # (busy: another request of the key may spend the rest; it is likely about to
            # settle, in this process or another one, so the answer waits a moment for it)
            for wait in (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, None):
                try:
                    ctx.ticket = self.keys.admit(ctx.key, tokens, most)
                    break
                except KeyLimit as e:
                    if e.kind != "busy" or wait is None or ctx.writer.gone():
                        raise
                    time.sleep(wait)
        except KeyLimit as e:
            wait = max(1, int(-(-e.retry_after // 1)))
            headers = {"Retry-After": str(wait),
                       "retry-after-ms": str(max(1, int(e.retry_after * 1000)))}
            if e.kind == "budget":
                headers["x-should-retry"] = "false"       # (not before the period turns)
            headers.update(codec.limit_headers(getattr(e, "limits", {}), time.time()))
            err = ApiError(429, "quota" if e.kind == "budget" else "rate_limit", e.message,
                           headers=headers)
            err.code = "insufficient_quota" if e.kind == "budget" else "rate_limit_exceeded"
            raise err from None
        ctx.limits = codec.limit_headers(ctx.ticket["limits"], time.time())

    def record(self, ctx):
        """Hand the finished request to the log writer (a queue put on this thread), and settle
        a personal key's real cost and tokens (booked by the key store's next transaction; its
        bound, should the cost not be known)."""
        used = None
        try:
            used = answer_cost(ctx, self.catalogue)
            row, attempts = request_row(ctx, self.catalogue, self.settings["log_prompts"], used)
        finally:
            if ctx.ticket is not None:
                _answered, usage, cost = used or (False, {}, ctx.ticket["bound"])
                self.keys.settle(ctx.ticket, cost, (usage.get("input") or 0)
                                 + (usage.get("output") or 0))
        self.log.record(row, attempts)

    def _maintain(self):
        warm_intent_tables()           # (the first step: the router already answers meanwhile)
        while True:
            try:
                if self._reload_asked or self._files_changed():
                    self._reload_asked = False
                    self.reload()
                self.discover()
            except Exception:   # a bug here must not stop the thread that saves state
                log.exception("maintenance failed")
            try:
                self.probe_breakers()
            except Exception:
                log.exception("health probes failed")
            if self.health.dirty:
                self.save_state()
            self._wake.wait(min(1.0, max(0.1, self.settings["probe_seconds"] or 1.0)))
            self._wake.clear()
            if self._stop.is_set():
                return

    PROBE_BUDGET_SECONDS = 2.0   # probing per maintenance tick; the rest waits for the next tick

    def probe_breakers(self):
        """Probe the open breakers that are due (maintenance thread): a provider by its model
        list, a model by the smallest generation, each with a key that is not cooling; a good
        probe closes the breaker at once. At most one probe per provider per tick, and none
        started after PROBE_BUDGET_SECONDS, so reloads, discovery and saving never wait long."""
        cat, hl = self.catalogue, self.health
        now = start = time.monotonic()
        probed = set()
        for key, opens in hl.probes_due(now):
            model = None if key[0] == "provider" else key[1]
            pname = key[1] if model is None else key[0]
            prov = cat.providers.get(pname)
            if prov is None or not prov.enabled:
                hl.probed(key, opens, False, "provider disabled")
                continue
            if pname in probed or (model is not None and hl.left(("provider", pname), now)):
                # one probe per provider per tick; a model waits for its provider's probe
                continue
            if time.monotonic() - start > self.PROBE_BUDGET_SECONDS:
                return
            keys = [i for i in hl.usable_keys(prov, now)
                    if i is None or not hl.left(("key", pname, i), now)]
            if not keys:
                hl.probed(key, opens, False, "no usable key")
                continue
            probed.add(pname)
            good, detail = probe(prov, keys[0], model, self.settings)
            hl.probed(key, opens, good, detail)
            if good:
                log.info("health: %s answered a probe; closed", breaker_name(key))

    def reset_health(self, provider=None, model=None):
        """Close breakers by hand (POST /v1/health/reset, `router.py reset`)."""
        if provider is not None and provider not in self.catalogue.providers:
            raise ApiError(404, "not_found", f"provider {safe_text(provider)} is not configured; "
                                             "providers: "
                                             f"{', '.join(self.catalogue.providers) or '(none)'}",
                                             param="provider")
        names = self.health.reset(provider, model)
        log.info("health: reset by hand: %s", ", ".join(names) or "nothing was open")
        return names

    # -- reload -----------------------------------------------------------------------------------
    def ask_reload(self):
        """SIGHUP: reload on the maintenance thread, within a second."""
        self._reload_asked = True
        self._wake.set()

    def _files_changed(self):
        changed = False
        for path, seen in list(self.watch.items()):
            try:
                mtime = os.stat(path).st_mtime_ns
            except OSError:
                mtime = None
            if mtime != seen:
                self.watch[path] = mtime
                changed = True
        return changed

    def reload(self):
        """Read providers.json and .env again and swap in the new catalogue. Requests under way
        finish on the old one (each holds its own snapshot); an invalid config is refused and the
        old one stays."""
        if self.loader is None:
            return False
        try:
            cfg, env, source = self.loader()
            cfg = with_imports(cfg, env)
            cat = self._build(cfg, env, source)
        except ConfigError as e:
            log.error("config reload refused: %s: %s: expected %s; keeping the old config",
                      e.file, e.key, e.expected)
            return False
        if cat.settings["shared_state"] != self.settings["shared_state"]:
            log.warning("settings.shared_state changed: it takes effect after a restart")
        with self._discover_lock:
            before = self.catalogue.providers
            changed = [name for name, prov in cat.providers.items()
                       if name not in before or before[name].fingerprint != prov.fingerprint]
            self.cfg, self.env, self.source = cfg, env, source
            self.catalogue, self.settings = cat, cat.settings
            self.health.reconfigure(cat.settings)
            for name in changed:      # a fixed key or URL gets a fresh start (here: the config
                self.health.reset(name, share=False)     # changed on this box, not on others)
            self.health.forget(self._known_breaker)
            with self._intent_lock:
                self._intent_cache.clear()
            self.responses.budget = int(cat.settings["response_store_mb"] * (1 << 20))
            self.log.settings = cat.settings
            self.router_key = clean_key(env.get("SAGE_ROUTER_API_KEY") or "",
                                        "the router key (SAGE_ROUTER_API_KEY)") or None
        log.info("config reloaded from %s: %d provider(s) enabled", source, len(cat.enabled))
        return True

    def metrics_text(self):
        """GET /metrics: of the whole router (all its workers)."""
        if self.shared is None:
            return self.metrics.render(self)
        merged, live = self.shared.metrics_view()
        return merged.render(self, live)

    def generate(self, ctx):
        """Plan the request and try its candidates in order until one answers."""
        if not self.catalogue.known(ctx.model) and not ctx.headers.get("x-router-route"):
            self.refresh_for(ctx.model)
        # one snapshot per request
        cat, health, affinity = self.catalogue, self.health, self.affinity
        # the hook that keeps the answer, if it is to be kept
        keep = self.responses.prepare(ctx)
        name = ctx.headers.get("x-router-route") or ctx.model
        akey = Affinity.key(ctx.req, ctx.headers)
        ctx.history_marks = thinking_marks(ctx.req)
        # (other workers' or boxes' word on the conversation matters only when the name leaves
        # a choice of model or the history holds signed thinking)
        shared = (bool(ctx.history_marks) or not isinstance(name, str)
                  or tuple(name.split("/", 1)) not in cat.caps)
        pin, ctx.provider_marks = affinity.get(akey, name, shared)
        plan = plan_for_key(self.plan(cat, ctx.req, ctx.body, ctx.headers, pin), ctx.key)
        if plan.unknown:
            self.warn_unknown(ctx.model, plan.route)
        ctx.plan = plan
        ctx.estimate = estimate_tokens(ctx.req)
        if ctx.key is not None and plan.candidates:
            self.admit(ctx, cat, plan.candidates, ctx.estimate)
        fallback = None
        overflowed = 0          # the largest context window that was too small for this request
        missing = set()         # asked-for candidates whose provider said the model does not exist
        for n, cand in enumerate(plan.candidates):
            if n and ctx.writer.gone():
                raise ClientGone("the client left while the router was failing over")
            pname, mid = cand
            prov = cat.providers[pname]
            known = cand in cat.caps
            window = cat.meta(pname, mid).get("context_window") or 0
            now = time.monotonic()
            keys = health.usable_keys(prov, now)
            skip = self._skip(ctx, prov, window, overflowed, keys,
                              completion_path(ctx.req, cat.meta(pname, mid), CODECS[prov.api],
                                              health.completion_refused(cand)))
            if skip is not None:
                skip.cand = cand
                ctx.attempts.append(skip)
                continue
            health.begin(cand, now)
            failed = None
            ctx.provider = pname
            for idx in keys:
                before = []

                def committed(cand=cand, idx=idx, known=known, before=before):
                    if known:
                        before.append(health.ok(cand, ctx.ttfb))
                    health.ok(("provider", cand[0]))
                    if idx is not None:
                        health.ok(("key", cand[0], idx))
                    affinity.set(akey, name, cand, shared)

                def completed(pname=pname):
                    # before the client can read the end: its next turn must find this turn's marks
                    affinity.add_marks(akey, pname, ctx.made_marks)
                    if keep is not None:
                        keep()
                try:
                    self.dispatcher.attempt(ctx, cat, health, prov, mid, idx, committed,
                                            completed)
                    # answered, then broke: the candidate is not well
                    if ctx.broken is not None:
                        # (the blocks the client did get)
                        affinity.add_marks(akey, pname, ctx.made_marks)
                        if before:
                            health.undo_ok(cand, before[0])
                        health.failed(cand, None, ctx.broken, known, len(prov.keys), True)
                except Failover as f:
                    f.cand = cand
                    ctx.attempts.append(f)
                    failed = f
                    if f.fallback and fallback is None:
                        fallback = f.fallback
                    health.failed(cand, idx, f, known, len(prov.keys),
                                  not f.next_key or idx == keys[-1])
                    if f.kind == "context":
                        overflowed = max(overflowed, window or 1)
                    if not f.next_key:
                        break
                    continue
                return
            if failed is None:
                continue
            if failed.kind == "missing" and cand in plan.asked:
                missing.add(cand)
                if missing == plan.asked:     # a typo must not silently bill another model
                    raise self._no_such_model(ctx, cat, failed)
        if fallback is not None:
            self.dispatcher.deliver_fallback(ctx, fallback, keep)
            return
        raise self._all_failed(ctx)

    @staticmethod
    def _skip(ctx, prov, window, overflowed, keys, completion=None):
        """Why a candidate is not tried at all (a Failover to record), or None. `completion`: the
        path it would serve the request's completion by."""
        if overflowed and window and window <= overflowed:
            return Failover("context", f"skipped: context window {window} is not larger than the "
                                       f"{overflowed} that overflowed")
        only = ctx.req["extra"].get("same_dialect_only")
        if only and (prov.api != ctx.dialect or not ctx.passthrough
                     or completion not in (None, "native")):
            parts = ", ".join(only[:3]) + (" ..." if len(only) > 3 else "")
            if prov.api == ctx.dialect and ctx.passthrough:
                return Failover("input", f"skipped: its completions go by the {completion} path, "
                                         f"which cannot carry {parts}")
            return Failover("input", f"skipped: a {prov.api} provider cannot be sent {parts}")
        if not keys:
            return Failover("auth", "every key was rejected (401/403)")
        if not CODECS[prov.api].files and any(p["type"] == "file" for m in ctx.req["messages"]
                                               for p in m["content"]):
            return Failover("input", f"skipped: a {prov.api} provider cannot be sent PDF files")
        return None

    def plan(self, cat, req, body, headers, pin=None):
        """plan_request, and, when the route depends on an intent the rules are unsure of and
        settings.intent_model names a model, that model's answer (planned again with it)."""
        plan = plan_request(cat, self.health, req, body, headers, pin)
        if (plan.by_intent and cat.settings["intent_model"]
                and plan.confidence < cat.settings["intent_model_below"]):
            asked = self.model_intent(cat, req)
            if asked is not None:
                plan = plan_request(cat, self.health, req, body, headers, pin,
                                    (asked, plan.confidence, plan.signals, "model"))
        return plan

    INTENT_PROMPT = ("Classify the user's message by what it asks for. Answer with exactly one "
                     "word: code (writing, fixing or explaining code, commands, SQL, "
                     "spreadsheet formulas, config files, error logs), creative (stories, "
                     "poems, lyrics, jokes, names, slogans, ad copy, speeches, role-play), "
                     "reasoning (maths, puzzles, logic, estimates, date or number arithmetic, "
                     "planning under constraints) or general (facts, advice, how-to, emails, "
                     "summaries, translation).")

    def model_intent(self, cat, req):
        """The intent model's answer for this request (LRU-cached by the latest user turn), or None
        on a timeout, an error or an answer that is not an intent: the rules' answer stands."""
        turns = user_turns(req)
        text = (turns[-1] if turns else "")[:2000]
        key = hash(text)
        with self._intent_lock:
            if key in self._intent_cache:
                self._intent_cache[key] = self._intent_cache.pop(key)
                return self._intent_cache[key]
        pname, _, mid = cat.settings["intent_model"].partition("/")
        prov = cat.providers.get(pname)
        now = time.monotonic()
        keys = self.health.usable_keys(prov, now) if prov is not None and prov.enabled else []
        if not keys or self.health.cand_left((pname, mid), now, prov):
            return None
        try:
            reply = complete(prov, mid, keys[0], self.INTENT_PROMPT, text, 10, cat.settings,
                             cat.settings["intent_model_timeout"])
        except DiscoveryError as e:
            log.info("intent model %s/%s: no answer (%s); the rules decide", pname, mid, e)
            return None
        answer = next((w for w in re.findall(r"[a-z]+", reply.lower()) if w in INTENTS), None)
        with self._intent_lock:
            self._intent_cache[key] = answer
            if len(self._intent_cache) > 1000:
                del self._intent_cache[next(iter(self._intent_cache))]
        return answer

    def warn_unknown(self, name, route):
        """Once per name: a client asked for a model nobody has (Claude Code's dated Claude names
        do this on every request, so the log says it once)."""
        if name in self._warned:
            return
        if len(self._warned) < 1000:
            self._warned.add(name)
        log.warning("unknown model name %s: no provider lists it; served by the route %s (aliases, "
                    "else auto)",
                    safe_text(name), route)

    @staticmethod
    def _no_such_model(ctx, cat, failed):
        close = cat.closest(ctx.model)
        return ApiError(404, "not_found",
                        f"model {safe_text(ctx.model)}: the provider says it does not exist "
                        f"({failed.reason}). Closest known names: {', '.join(close) or '(none)'}",
                        param="model")

    @staticmethod
    def _all_failed(ctx):
        atts = ctx.attempts
        lines = "; ".join(a.line() for a in atts)
        msg = f"every candidate failed ({len(atts)} attempt{'' if len(atts) == 1 else 's'}): {lines}"
        if atts and all(a.status == 429 for a in atts):
            waits = [a.retry_after for a in atts if a.retry_after is not None]
            wait = max(1, int(min(waits) + 0.999)) if waits else 30
            return ApiError(429, "rate_limit", msg, headers={"Retry-After": str(wait)})
        if atts and all(a.kind in ("connect", "timeout") or a.status in (503, 529) for a in atts):
            return ApiError(503, "overloaded", msg)
        if atts and all(a.kind == "input" for a in atts):
            return ApiError(400, "invalid_request",
                            f"no candidate speaks {ctx.dialect}, and only it can take "
                            f"{', '.join(ctx.req['extra']['same_dialect_only'][:3])}: {lines}")
        if atts and all(a.kind == "context" for a in atts):
            # too long for every candidate: the provider's own 400, so the client does not retry it
            said = next((a for a in atts if a.status), atts[0])          # the provider's own words
            rest = "; ".join(a.line() for a in atts if a.cand != said.cand)
            err = ApiError(400, "invalid_request", re.sub(r"^HTTP \d+: ", "", said.reason) +
                           f" ({said.cand[0]}/{said.cand[1]}; no candidate with a larger context "
                           "window"
                           + (f": {rest})" if rest else ")"), param="messages")
            err.code = "context_length_exceeded"
            return err
        return ApiError(502, "api_error", msg)

    def embed(self, dialect, body, headers, writer, key=None, **kw):
        """An embeddings request: planned (plan_embeddings), sent in batches of the provider's
        size, joined back in order, failing over to the next candidate serving the same model.
        -> (the reply in the client's shape, response headers)."""
        cc = CODECS[dialect]
        try:
            ereq = cc.embed_decode(body, **kw)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ApiError(400, "invalid_request", f"body: a field has an unexpected type or value "
                           f"({type(e).__name__}: {clean_text(e, 200)})") from None
        ctx = Context(dialect, body, neutral_request(ereq["model"], [], []), headers, writer)
        ctx.endpoint, ctx.key = "embeddings", key
        try:
            return self._embed(ctx, ereq)
        except ApiError as e:
            ctx.status, ctx.error = e.status, e.message[:2000]
            raise
        except Exception:
            ctx.status, ctx.error = 500, "internal error"
            raise
        finally:
            self.record(ctx)

    def _embed(self, ctx, ereq):
        cat, health = self.catalogue, self.health
        cc = CODECS[ctx.dialect]
        tokens_in = any(isinstance(x, list) for x in ereq["inputs"])
        cands = plan_embeddings(cat, ereq["model"])
        if ctx.key is not None:
            if ctx.key["models"]:
                cands = key_candidates(ctx.key, cands, route=ereq["model"])
            self.admit(ctx, cat, cands, embed_tokens(ereq))
        now = time.monotonic()
        # the same model everywhere: the healthy candidates first, the soonest to recover next
        cands.sort(key=lambda c: health.cand_left(c, now, cat.providers[c[0]]))
        for cand in cands:
            pname, mid = cand
            prov = cat.providers[pname]
            pc = CODECS[prov.api]
            keys = health.usable_keys(prov, time.monotonic())
            skip = ("input", f"skipped: {prov.api} has no embeddings API") if pc.embed_path is None \
                else ("input", "skipped: token-id inputs go to OpenAI-compatible providers only") \
                if tokens_in and pc.embed_request is not openai_embed_request \
                else ("auth", "every key was rejected (401/403)") if not keys else None
            if skip:
                ctx.attempts.append(Failover(*skip, cand=cand))
                continue
            known = cand in cat.caps
            health.begin(cand, time.monotonic())
            for idx in keys:
                t0 = time.monotonic()
                try:
                    vectors, tokens = self.dispatcher.embed(ctx, prov, mid, idx, ereq,
                                                            self.settings["max_body_bytes"])
                except Failover as f:
                    f.cand = cand
                    ctx.attempts.append(f)
                    health.failed(cand, idx, f, known, len(prov.keys),
                                  not f.next_key or idx == keys[-1])
                    if not f.next_key:
                        break
                    continue
                ctx.ttfb = time.monotonic() - t0
                if known:
                    health.ok(cand, ctx.ttfb)
                health.ok(("provider", pname))
                if idx is not None:
                    health.ok(("key", pname, idx))
                ctx.provider, ctx.upstream_model = pname, mid
                ctx.usage = dict(empty_usage(), input=tokens)
                tried = {a.cand for a in ctx.attempts if not a.reason.startswith("skipped")}
                headers = {"X-Router-Provider": pname, "X-Router-Model": header_value(mid),
                           "X-Router-Attempts": str(len(tried | {cand})), **ctx.limits}
                return cc.embed_encode(vectors, mid, ereq, tokens), headers
        if ctx.attempts and all(a.kind == "input" for a in ctx.attempts):
            raise ApiError(400, "invalid_request", "no candidate can make these vectors: " +
                           "; ".join(a.line() for a in ctx.attempts), param="input")
        raise self._all_failed(ctx)

    def count_tokens(self, dialect, body, headers, key=None, **kw):
        """A token count for a client's request (Anthropic's count_tokens): asked of the provider when
        the target speaks the client's dialect and can count, estimated locally otherwise (or when
        the provider cannot answer). -> the reply in the client's shape."""
        cc = CODECS[dialect]
        req = decode_client_request(dialect, body, count_only=True, **kw)
        try:
            plan = plan_request(self.catalogue, self.health, req, body, headers)
        except ApiError:
            plan = None
        if plan and plan.candidates and key is None:     # (a personal key's: estimated here)
            pname, mid = plan.candidates[0]
            prov = self.catalogue.providers[pname]
            pc = CODECS[prov.api]
            keys = self.health.usable_keys(prov, time.monotonic())
            if pc is cc and pc.count_path is not None and keys:
                fwd, extra = dict(body, model=mid), {}
                if pc.adjust is not None:
                    fwd, extra = pc.adjust(fwd, prov, req,
                                           self.catalogue.meta(pname, mid), headers, None)
                path, data = pc.count_path(prov, mid), dumps(fwd).encode()
                key = prov.keys[keys[0]] if keys[0] is not None else None
                hdrs = dict(prov.auth_headers(key, path, data), **extra)
                try:
                    conn, resp = self.dispatcher.send(prov, path, hdrs, data)
                    data = resp.read(1 << 20)          # a count is a few bytes; never buffer more
                    self.dispatcher.release(prov, conn, resp)
                    if resp.status == 200:
                        obj = loads(data)
                        if isinstance(pc.count_result(obj), int):
                            return obj
                except (Failover, OSError, http.client.HTTPException, ValueError, AttributeError):
                    pass
        return cc.count_shape(estimate_tokens(req))

    def models(self, dialect, query=None, key=None):
        """The model list in the shape a client of `dialect` reads (a personal key's: the names
        its model globs allow, routes with at least one such model)."""
        entries = self.catalogue.listing()
        if key and key.get("models"):
            def allowed(entry):
                name, owner, meta = entry
                cands = [tuple(c.split("/", 1)) for c in meta["route"]] if "route" in meta else \
                    [tuple(name.split("/", 1)) if name.startswith(owner + "/") else (owner, name)]
                return any(key_allows(key["models"], c) for c in cands)
            entries = [e for e in entries if allowed(e)]
        out = CODECS[dialect].list_shape(entries, query)
        if not self.catalogue.enabled:
            out["message"] = NO_PROVIDER_HELP
        return out

    def model(self, dialect, name):
        """One model in the shape a client of `dialect` reads (404 if no such name)."""
        entry = self.catalogue.entry(name) if isinstance(name, str) else None
        if entry is None:
            raise ApiError(404, "not_found", f"model {name!r} not found", param="model")
        return CODECS[dialect].model_shape(entry)

    def explain(self, body, headers, key=None):
        """POST /v1/route: where a request would go (for a personal key: among its models),
        without calling a provider."""
        dialect = guess_dialect(body, headers)
        req = decode_client_request(dialect, body)
        pin, _last = self.affinity.get(Affinity.key(req, headers),
                                       headers.get("x-router-route") or req["model"])
        cat = self.catalogue
        out = dict(plan_for_key(self.plan(cat, req, body, headers, pin), key).explain(),
                   dialect=dialect)
        if req.get("response_format"):
            for c in out["candidates"]:
                api = cat.providers[c["provider"]].api
                c["structured"] = structured_path(req, cat.meta(c["provider"], c["model"]),
                                                  CODECS[api])
        return out

    def close(self):
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            # a discovery or probe under way finishes (short timeouts) and saves
            self._thread.join(10)
        if self.shared is not None:
            self.shared.close()
        if self.health.dirty:
            self.save_state()
        self.log.stop()
        self.keys.close()
        self.responses.close()
        self.pool.close_all()


# =================================================================================================
# 8. HTTP front
# =================================================================================================

_REASONS = {s.value: s.phrase for s in __import__("http").HTTPStatus}
_REASONS[529] = "Overloaded"

#: POST paths -> (dialect, action). Paths are also accepted without the /v1 prefix.
#: POST path -> (dialect, action): each codec's own paths, and the router's.
POST_ROUTES = dict({path: (name, action) for name, c in CODECS.items()
                    for path, action in c.client_paths.items()},
                   **{"/v1/route": (None, "explain"), "/v1/health/reset": (None, "reset_health")})
OLLAMA_VERSION = "0.12.0"   # what GET /api/version reports; Ollama clients check for a recent one

ENDPOINTS = ("POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, POST "
             "/v1/responses, POST /v1/messages, POST /v1/messages/count_tokens, POST /v1beta/models/MODEL:generateContent (and "
             ":streamGenerateContent?alt=sse, :countTokens), GET /v1beta/models, GET /v1/models, "
             "POST /v1/route, POST /v1/health/reset, GET /v1/usage, GET /v1/requests, POST "
             "/api/chat, POST /api/generate, POST /api/embed, GET /api/tags, POST /api/show, GET /api/version, GET "
             "/health, GET /metrics, GET / (status page)")


#: The status page (GET /): HTML, CSS and JS in one piece, no external assets. It reads /health,
#: /v1/models, /v1/usage, /v1/requests and POST /v1/route with the router key the user enters
#: (kept in the browser's localStorage; `#key=...` in the URL sets it).
STATUS_PAGE = r'''<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sage Router</title>
<style>
:root{--bg:#f7f7f5;--fg:#1d1d1b;--muted:#6b6b66;--line:#deded8;--ok:#2f7d4f;--bad:#b3362b;--warn:#b7791f;--accent:#3b5bab}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;background:var(--bg);color:var(--fg)}
header{display:flex;gap:1rem;align-items:center;padding:.8rem 1.2rem;border-bottom:1px solid var(--line);background:#fff}
header h1{font-size:1.15rem;margin:0}#version{color:var(--muted)}#auth{color:var(--bad)}header input{margin-left:auto;padding:.3rem .5rem}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,440px),1fr));gap:1rem;padding:1rem 1.2rem}
section{background:#fff;border:1px solid var(--line);border-radius:6px;padding:.8rem 1rem;min-width:0;overflow-x:auto}
section.wide{grid-column:1/-1}h2{font-size:1rem;margin:.1rem 0 .6rem}meter{width:12rem;max-width:100%}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:.25rem .5rem;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--muted);font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td{overflow-wrap:break-word}td.time{white-space:nowrap}
.ok{color:var(--ok)}.bad{color:var(--bad)}.warn{color:var(--warn)}.muted{color:var(--muted)}
.trail{font-size:12px;color:var(--muted)}.small{font-size:12px}button.reset{margin:0 0 0 .4rem;padding:.05rem .5rem;font-size:12px}
.chip{display:inline-block;margin:0 .4rem .2rem 0}svg text{font-size:11px;fill:var(--muted)}svg rect.bar{fill:var(--accent)}
textarea{width:100%;min-height:5rem;font:inherit;padding:.4rem}button{padding:.35rem .9rem;margin-top:.4rem}
pre{background:var(--bg);padding:.6rem;white-space:pre-wrap;overflow-wrap:anywhere;font-size:12px}
svg line{stroke:var(--line)}pre:empty{display:none}
@media (max-width:640px){
 header{flex-wrap:wrap;gap:.3rem 1rem;padding:.6rem .8rem}header input{margin-left:0;width:100%}
 main{padding:.6rem;gap:.6rem}section{padding:.6rem .7rem}
 table.cards,table.cards tbody,table.cards tr,table.cards td{display:block;width:100%}
 table.cards thead{display:none}table.cards tr{border-bottom:1px solid var(--line);padding:.35rem 0;
   display:grid;grid-template-columns:1fr 1fr;column-gap:.8rem}
 table.cards td:first-child,table.cards td.full,table.cards td[colspan]{grid-column:1/-1}
 table.cards td{border:0;padding:.05rem 0;text-align:left;overflow-wrap:anywhere;white-space:normal}
 table.cards td[data-label]:not(:empty)::before{content:attr(data-label) ": ";color:var(--muted);font-weight:600}
 table.cards td:first-child{font-weight:600}table.cards td[data-label]:first-child::before{content:none}
}
</style></head>
<body>
<header><h1>Sage Router</h1><span id="version"></span><span id="auth"></span>
<input id="key" type="password" placeholder="router key (if one is set)" aria-label="router key"></header>
<main>
<section class="wide"><h2>Providers</h2><table id="providers"></table></section>
<section><h2>Usage and cost, last 7 days</h2><div id="chart-cost"></div><div id="chart-requests"></div><div id="usage-total" class="muted"></div></section>
<section><h2>Cost by model, last 7 days</h2><table id="usage-models"></table></section>
<section class="wide" id="keys-box" hidden><h2 id="keys-title">Keys</h2><table id="keys"></table></section>
<section class="wide"><h2>Last requests</h2><table id="requests"></table></section>
<section><h2>Routes</h2><table id="routes"></table></section>
<section><h2>Where would this go?</h2><textarea id="prompt" placeholder="Paste a prompt"></textarea>
<button id="explain">Explain</button><pre id="explain-out"></pre></section>
<section class="wide"><h2>Models</h2><table id="models"></table></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.hash.slice(1));
if (params.get("key")) {            // a link with #key=...: keep the key, then take it out of the address bar
  localStorage.setItem("sage-router-key", params.get("key"));
  params.delete("key");
  history.replaceState(null, "", location.pathname + location.search + (params.toString() ? "#" + params : ""));
}
$("key").value = localStorage.getItem("sage-router-key") || "";
$("key").addEventListener("change", () => { localStorage.setItem("sage-router-key", $("key").value); refresh(); });
function headers() { const k = localStorage.getItem("sage-router-key"); return k ? {"Authorization": "Bearer " + k} : {}; }
async function api(path, opts) {
  const r = await fetch(path, Object.assign({headers: Object.assign({"Content-Type": "application/json"}, headers())}, opts || {}));
  if (r.status === 401) { $("auth").textContent = "This router needs its key: enter it on the right."; throw new Error("401"); }
  $("auth").textContent = "";
  return r.json();
}
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined && text !== null) e.textContent = String(text); if (cls) e.className = cls; return e; }
// A table on a wide screen; on a phone each row is a card whose cells say what they are.
function table(id, head, rows) {
  const t = $(id); t.replaceChildren(); t.classList.add("cards");
  const thead = el("thead"), tbody = el("tbody"), tr = el("tr");
  head.forEach((h) => tr.appendChild(el("th", h))); thead.appendChild(tr); t.append(thead, tbody);
  rows.forEach((cells) => {
    const r = el("tr");
    cells.forEach((c, i) => { const td = c instanceof Node ? c : el("td", c); td.dataset.label = head[i]; r.appendChild(td); });
    tbody.appendChild(r);
  });
  if (!rows.length) { const r = el("tr"); const td = el("td", "nothing yet", "muted"); td.colSpan = head.length; r.appendChild(td); tbody.appendChild(r); }
}
const STATE_WORDS = {ok: "ok", cooling: "cooling", key_rejected: "key rejected", disabled: "off"};
const STATE_CLASS = {ok: "ok", cooling: "warn", key_rejected: "bad", disabled: "muted"};
function when(iso) { return new Date(iso).toLocaleTimeString(); }
function stateCell(s) {
  const td = el("td", null, STATE_CLASS[s.state] + (s.reason ? " full" : ""));
  td.appendChild(el("strong", STATE_WORDS[s.state] + (s.until ? " until " + when(s.until) : "")));
  if (s.reason) td.appendChild(el("div", s.reason, "small"));
  return td;
}
function resetButton(body, label) {
  const b = el("button", label || "reset", "reset");
  b.addEventListener("click", async () => { await api("/v1/health/reset", {method: "POST", body: JSON.stringify(body)}); refresh(); });
  return b;
}
function num(v, digits) { return el("td", v === null || v === undefined ? "" : (digits ? Number(v).toFixed(digits) : v), "num"); }
// The last seven days (UTC, as /v1/usage groups them), oldest first, as "YYYY-MM-DD".
function lastDays(n) { const out = []; for (let i = n - 1; i >= 0; i--) out.push(new Date(Date.now() - i * 86400000).toISOString().slice(0, 10)); return out; }
// The smallest of 1, 2, 5 x 10^k at or above v (the chart's top: its half is a round number too).
function nice(v) { if (!(v > 0)) return 1; const p = Math.pow(10, Math.floor(Math.log10(v))); return [1, 2, 5, 10].find((m) => m * p >= v * 0.9999) * p; }
// A bar chart with one slot per day (empty days stay empty), a value axis and day labels.
function bars(id, days, values, label, fmt) {
  const w = 440, h = 150, left = 52, top = 18, bottom = 22, box = $(id); box.replaceChildren();
  const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
  const add = (tag, attrs, text) => { const e = document.createElementNS(ns, tag); Object.entries(attrs).forEach(([k, v]) => e.setAttribute(k, v));
                                      if (text !== undefined) e.textContent = text; svg.appendChild(e); return e; };
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`); svg.setAttribute("width", "100%"); svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  add("text", {x: 0, y: 11}, label);
  const top_ = nice(Math.max(0, ...days.map((d) => values[d] || 0))), ph = h - top - bottom, slot = (w - left) / days.length;
  [0, 0.5, 1].forEach((f) => {
    const y = top + ph - ph * f;
    add("line", {x1: left, x2: w, y1: y, y2: y});
    add("text", {x: left - 6, y: y + 3, "text-anchor": "end"}, fmt(top_ * f));
  });
  days.forEach((d, i) => {
    const v = values[d] || 0, bh = ph * v / top_, x = left + i * slot;
    if (v > 0) { const r = add("rect", {class: "bar", x: x + slot * 0.15, y: top + ph - bh, width: slot * 0.7, height: bh});
                 const tip = document.createElementNS(ns, "title"); tip.textContent = d + ": " + fmt(v); r.appendChild(tip); }
    const day = new Date(d + "T00:00:00Z");
    add("text", {x: x + slot / 2, y: h - 6, "text-anchor": "middle"},
        day.toLocaleDateString(undefined, {weekday: "short", timeZone: "UTC"}) + " " + day.getUTCDate());
  });
  box.appendChild(svg);
}
async function refresh() {
  const health = await api("/health");
  const shared = health.shared_state && health.shared_state.state === "failing" ?
    " — shared state " + health.shared_state.where + ": " + health.shared_state.reason : "";
  $("version").textContent = "v" + health.version + (health.message ? " — " + health.message : "") + shared;
  table("providers", ["provider", "api", "state", "keys", "models", "discovery"], health.providers.map((p) => {
    const state = stateCell(p);
    if (p.state === "cooling" || p.state === "key_rejected") state.appendChild(resetButton({provider: p.name}, "reset " + p.name));
    const keys = el("td");
    (p.keys || []).forEach((k) => {
      const chip = el("div", `${k.key} ${STATE_WORDS[k.state]}${k.until ? " until " + when(k.until) : ""}`, "chip " + STATE_CLASS[k.state]);
      if (k.state !== "ok") { chip.title = k.reason || ""; chip.appendChild(resetButton({provider: p.name})); }
      keys.appendChild(chip);
    });
    const models = el("td", null, "small full");
    const all = p.models || [], sick = all.filter((m) => m.state !== "ok");
    models.appendChild(el("div", `${all.length} model${all.length === 1 ? "" : "s"}` + (sick.length ? `, ${sick.length} cooling` : ""),
                          sick.length ? "warn" : ""));
    sick.forEach((m) => { const d = el("div", `${m.id}: cooling until ${when(m.until)} (${m.reason})`, "warn");
                          d.appendChild(resetButton({provider: p.name, model: m.id})); models.appendChild(d); });
    const d = (health.discovery || {})[p.name];
    return [el("td", p.name), el("td", p.api), state, keys, models,
            el("td", d ? (d.error ? "failing: " + d.error : d.models + " found") : "", d && d.error ? "bad full" : "muted")];
  }));
  if (health.auth === "required") { $("auth").textContent = "This router needs its key: enter it on the right."; }
  table("routes", ["route", "candidates"], Object.entries(health.routes || {}).map(([r, c]) => [el("td", r), el("td", c.join(", ") || "(no enabled model)", "full")]));
  const models = await api("/v1/models");
  // each model once, under its provider (the list also carries bare ids, the same models again)
  table("models", ["model", "provider", "context", "max output", "input", "tools", "reasoning", "intents"],
    models.data.filter((m) => m.capabilities && m.id.startsWith(m.owned_by + "/")).map((m) => { const c = m.capabilities;
      return [el("td", m.id.slice(m.owned_by.length + 1)), el("td", m.owned_by), num(c.context_window), num(c.max_output), el("td", (c.input || []).join(", ")),
              el("td", c.tools ? "yes" : "no"), el("td", c.reasoning ? "yes" : "no"), el("td", (c.intents || []).join(", "))]; }));
  const week = lastDays(7), days = await api("/v1/usage?since=" + week[0] + "&group_by=day");
  const per = (field) => Object.fromEntries(days.groups.map((g) => [g.key, g[field] || 0]));
  bars("chart-cost", week, per("cost"), "cost per day (USD, days in UTC)", (v) => "$" + (v >= 1 || v === 0 ? v.toFixed(v ? 2 : 0) : Number(v.toPrecision(2))));
  bars("chart-requests", week, per("requests"), "requests per day", (v) => String(Math.round(v)));
  const t = days.totals || {};
  $("usage-total").textContent = `${t.requests || 0} requests, ${t.errors || 0} errors, ${t.input_tokens || 0} tokens in, ` +
    `${t.output_tokens || 0} out, $${(t.cost || 0).toFixed(4)}`;
  const byModel = await api("/v1/usage?since=7d&group_by=model");
  table("usage-models", ["model", "requests", "tokens in", "tokens out", "cost (USD)"],
    byModel.groups.map((g) => [el("td", g.key || "(failed)"), num(g.requests), num(g.input_tokens), num(g.output_tokens), num(g.cost, 4)]));
  // the team's keys (the router key sees them all; a personal key its own); hidden when there are none
  const kr = await fetch("/v1/keys", {headers: headers()}), keys = kr.ok ? (await kr.json()).data : [];
  $("keys-box").hidden = !keys.length;
  $("keys-title").textContent = (localStorage.getItem("sage-router-key") || "").startsWith("sk-sage-") ? "Your key" : "Keys";
  const byKey = {};
  if (keys.length) ((await api("/v1/usage?since=30d&group_by=key")).groups || []).forEach((g) => { byKey[g.key] = g; });
  table("keys", ["name", "key", "state", "spent this period", "requests (30 days)", "limits", "last used"], keys.map((k) => {
    const spend = el("td", null, "full");
    if (k.budget_usd) {
      const m = el("meter"); m.min = 0; m.max = k.budget_usd; m.value = Math.min(k.spent_usd, k.budget_usd);
      m.low = k.budget_usd * 0.7; m.high = k.budget_usd * 0.9; m.optimum = 0; spend.appendChild(m);
      spend.appendChild(el("div", `$${k.spent_usd.toFixed(4)} of $${k.budget_usd} a ${k.period}, resets ${new Date(k.resets).toLocaleDateString()}`, "small"));
    } else spend.appendChild(el("div", `$${k.spent_usd.toFixed(4)} (no budget)`, "small"));
    const limits = [k.rpm && `${k.rpm} requests/min`, k.tpm && `${k.tpm} tokens/min`, k.models && "models " + k.models.join(", "),
                    k.expires && "expires " + new Date(k.expires).toLocaleDateString()].filter(Boolean).join("; ") || "none";
    return [el("td", k.name), el("td", k.prefix, "small"), el("td", k.state, k.state === "active" ? "ok" : "muted"), spend,
            num((byKey[k.name] || {}).requests || 0), el("td", limits, "small full"),
            el("td", k.last_used ? new Date(k.last_used).toLocaleString() : "never", "small")];
  }));
  const recent = await api("/v1/requests?limit=50");
  table("requests", ["time", "client", "asked for", "intent / route", "answered by", "status", "ms", "tokens", "cost", "decision trail"],
    recent.data.map((r) => {
      const trail = (r.pinned ? [`pinned: previous turn (${r.pinned})`] : []).concat(r.attempts.map((a) => `${a.provider}/${a.model}: ${a.reason}`),
                                                                                      r.provider ? [`${r.provider}/${r.model}: answered`] : []);
      // a failure's message lists the attempts the trail already shows: say it once
      const said = r.attempts.length && r.attempts.every((a) => (r.error || "").includes(a.reason));
      const client = r.endpoint && r.endpoint !== "chat" ? `${r.dialect} · ${r.endpoint}` : r.dialect;
      return [el("td", new Date(r.ts * 1000).toLocaleTimeString(), "time"), el("td", client), el("td", r.requested || "—"),
              el("td", [r.intent, r.route].filter(Boolean).join(" / ") || "—"), el("td", r.provider ? r.provider + "/" + r.model : "—"),
              el("td", r.status, r.status < 400 ? "ok" : "bad"), num(Math.round(r.latency_ms)),
              el("td", `${r.input_tokens || 0} / ${r.output_tokens || 0}`, "num"), num(r.cost, 5),
              el("td", trail.join(" → ") + (r.error && !said ? (trail.length ? " — " : "") + r.error : ""), "trail full")];
    }));
}
$("explain").addEventListener("click", async () => {
  const body = {model: "auto", messages: [{role: "user", content: $("prompt").value}]};
  const e = await api("/v1/route", {method: "POST", body: JSON.stringify(body)});
  $("explain-out").textContent = e.error ? e.error.message : `intent ${e.intent} (confidence ${e.confidence}${e.unsure ? ", unsure" : ""}, ` +
    `decided by ${e.decided_by}), signals: ${e.signals.join(", ") || "none"}\n` + `route ${e.route}\n` +
    e.candidates.map((c, i) => `${i + 1}. ${c.provider}/${c.model}${c.pinned ? "  — pinned: " + c.pinned : ""}${c.skip ? "  — skipped: " + c.skip : ""}`).join("\n");
});
if (params.get("prompt")) { $("prompt").value = params.get("prompt"); $("explain").click(); }  // a shareable "where would this go?"
refresh().then(() => { document.body.dataset.refreshed = Date.now(); }, () => {});
setInterval(() => refresh().catch(() => {}), 10000);
</script>
</body></html>
'''.encode()


def parse_json_body(raw):
    """A request body -> JSON, or a 400 that says what is wrong: it must be UTF-8 (RFC 8259; a
    leading byte-order mark is skipped); lone UTF-16 surrogates escaped in it (what a JavaScript
    client sends after cutting a string mid-emoji) become U+FFFD, so no text the router keeps or
    logs can fail to encode; JSON nested too deeply is refused."""
    if not raw:
        raise ApiError(400, "invalid_request", "body: empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_request", f"body: not valid UTF-8 (byte 0x{raw[e.start]:02x} "
                                               f"at {e.start}); JSON must be sent as UTF-8")
    try:
        return loads(text[1:] if text[:1] == "\ufeff" else text)
    except RecursionError:
        raise ApiError(400, "invalid_request", "body: JSON nested too deeply")
    except ValueError as e:
        raise ApiError(400, "invalid_request", f"body: not valid JSON ({e})")


#: The status page may not be framed by other sites, and runs only its own inline code.
PAGE_HEADERS = {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
                "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; img-src 'self' data:; "
                                           "connect-src 'self'; frame-ancestors 'none'; base-uri "
                                           "'none'; form-action 'none'"}
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def host_allowed(host_header, listen, extra):
    """Whether a request's Host names this router: a loopback name, the address it listens on,
    a name in settings.allowed_hosts, or, when it listens on every address, any IP literal or
    this machine's own name. A DNS name an attacker controls is none of these."""
    name = host_header.strip().lower()
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else name[1:]
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    if name in ("localhost", "127.0.0.1", "::1",
                listen.lower()) or name in (h.lower() for h in extra):
        return True
    if listen not in WILDCARD_HOSTS:
        return False
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in name else socket.AF_INET, name)
        return True
    except (OSError, ValueError):
        return name in own_names()


@functools.lru_cache(maxsize=1)
def own_names():
    """This machine's own names, looked up once (getfqdn may ask DNS: never per request)."""
    return {socket.gethostname().lower(), socket.getfqdn().lower()}


#: Gemini's paths, after any base-URL prefix: POST .../v1beta/models/{model}:{method} (the model is
#: everything between "models/" and the last ":"), GET .../v1beta/models[/{model}].
GEMINI_CALL = re.compile(r"(?:/.*)?/(?:v1beta|v1alpha|v1)/models/(.+):(generateContent|"
                         r"streamGenerateContent|countTokens|embedContent|batchEmbedContents)")
GEMINI_LIST = re.compile(r"(?:/.*)?/(?:v1beta|v1alpha|v1)/models(?:/(.+))?")


def client_dialect(path, headers):
    """The dialect to answer in, from the path (and, for shared paths, the headers)."""
    if "/models" in path:         # (the regular expressions only where they can match)
        if GEMINI_CALL.fullmatch(path):
            return "gemini"
        google = "x-goog-api-key" in headers or "x-goog-api-client" in headers
        if GEMINI_LIST.fullmatch(path) and (re.search(r"/v1(?:beta|alpha)/models", path) or google):
            return "gemini"       # (GET /v1/models is OpenAI's, unless a Google SDK asks)
    if path.startswith(("/v1/messages", "/messages")):
        return "anthropic"
    if path.startswith("/api/"):
        return "ollama"
    if path.startswith(("/v1/responses", "/responses")):
        return "openai-responses"
    if "anthropic-version" in headers or ("x-api-key" in headers and "authorization" not in headers):
        return "anthropic"
    return "openai"


def make_handler(router):
    class Handler(RouterHandler):
        pass
    Handler.router = router
    return Handler


class RouterHandler(BaseHTTPRequestHandler):
    """One client connection (HTTP/1.1 keep-alive). Parses, authenticates and limits requests,
    then hands generation to the Router. Also the writer the dispatcher answers through."""

    protocol_version = "HTTP/1.1"
    MessageClass = RequestHeaders          # read strictly (see fast_parse_headers)
    server_version = "sage-router/" + __version__
    router = None

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connection.settimeout(self.router.settings["client_header_timeout"])

    def handle_one_request(self):
        self.server.phase(self.connection, "wait")        # the next request's line and headers
        self.expects_100, self.body_read, self.framing = False, False, ("none", 0)
        super().handle_one_request()

    def log_message(self, fmt, *args):   # no per-request stderr line on the hot path
        pass

    # -- writer used by the dispatcher ---------------------------------------------------------
    def _head(self, status, headers, length=None):
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
        for k, v in headers.items():
            lines.append(f"{k}: {v}")
        if self.cors_origin:
            lines.append(f"Access-Control-Allow-Origin: {header_value(self.cors_origin)}")
            lines.append("Vary: Origin")
        if length is not None:
            lines.append(f"Content-Length: {length}")
        elif self.chunked:
            lines.append("Transfer-Encoding: chunked")
        else:
            self.close_connection = True
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _raw(self, data):
        try:
            self.wfile.write(data)
        except OSError as e:
            self.close_connection = True
            raise ClientGone(str(e))

    def send(self, status, headers, body):
        self.status = status
        if self.unread_body():
            self.close_connection = True        # said in the response: Connection: close
        head = self._head(status, headers, len(body))
        self._raw(head if self.command == "HEAD" else head + body)
        self.sent = True

    def start(self, status, headers):
        self.status = status
        if self.unread_body():
            self.close_connection = True
        self._raw(self._head(status, headers))
        self.sent = True

    def write(self, data):
        if not data:
            return
        self._raw(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def finish_stream(self):
        if self.chunked:
            self._raw(b"0\r\n\r\n")

    def gone(self):
        """Whether the client has closed its side (an EOF is waiting on the socket): checked before
        the router spends another candidate on a request nobody will read."""
        if self.sent:
            return False
        try:
            poll = select.poll()              # not select(): it fails for descriptors past 1023
            poll.register(self.connection, select.POLLIN)
            if not poll.poll(0):
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    # -- request handling ----------------------------------------------------------------------
    def _key(self):
        """The personal key of this request's caller (its `keys` row), or None."""
        return self.caller if isinstance(self.caller, dict) else None

    def _keys(self, method, path, caller):
        """GET/POST /v1/keys, POST/DELETE /v1/keys/NAME (and .../rotate): the team's keys, managed
        with the router key; a personal key may read its own entry."""
        keys = self.router.keys
        name = urllib.parse.unquote(path[len("/v1/keys/"):]) if path != "/v1/keys" else None
        if isinstance(caller, dict) and method == "GET":
            if name not in (None, caller["name"]):
                raise ApiError(403, "permission", "a personal key may read only its own entry")
            return self._json(200, {"object": "list", "data": [keys.entry(caller["name"])]}
                              if name is None else keys.entry(name))
        if caller != "admin":
            raise ApiError(403, "permission", "managing keys needs the router key: set "
                           "SAGE_ROUTER_API_KEY and send it (or use router.py keys on the box)")
        if method == "GET":
            return self._json(200, {"object": "list", "data": keys.entries()}
                              if name is None else keys.entry(name))
        if method == "DELETE" and name:
            return self._json(200, keys.revoke(name))
        if method != "POST":
            raise ApiError(405, "invalid_request", f"{path} takes GET, POST or DELETE")
        if name and name.endswith("/rotate"):
            key, entry = keys.rotate(name[:-len("/rotate")])
            return self._json(200, dict(entry, key=key))
        body = parse_json_body(self._read_body("openai"))
        _need(isinstance(body, dict), "body", "must be a JSON object")
        if name is None:
            key, entry = keys.create(body.get("name"), body)
            return self._json(201, dict(entry, key=key))
        return self._json(200, keys.update(name, {k: v for k, v in body.items() if k != "name"}))

    def _reset(self):
        self.caller = None
        self.sent = False
        self.framing = ("none", 0)
        self.cors_origin = None
        self.chunked = self.request_version != "HTTP/1.0"

    def _refused(self, dialect, body, err, endpoint="chat"):
        """A generation request refused before planning (its body unreadable or invalid): still a
        row in the request log, with the model it named if any."""
        model = body.get("model") if isinstance(body, dict) else None
        ctx = Context(dialect, body,
                      neutral_request(clean_text(model, 256) if isinstance(model, str) else None,
                                                     [], []), {}, self)
        ctx.status, ctx.error, ctx.endpoint = err.status, err.message[:2000], endpoint
        ctx.key = self._key()
        self.router.record(ctx)

    def send_error(self, code, message=None, explain=None):
        """What http.server refuses before the router sees a request (a request line or headers it
        cannot parse: 400, 414, 431, 501, 505): JSON in the dialect of the path, never HTML; the
        connection is closed."""
        self.close_connection = True
        self.sent, self.cors_origin, self.chunked = False, None, False
        path = getattr(self, "path", None)
        path = path if isinstance(path, str) and path.startswith("/") else "/"
        if isinstance(sys.exc_info()[1], BadHeader):          # malformed, not too large
            code, message = 400, f"request headers: {sys.exc_info()[1]}"
        text = {414: "the request line is longer than 64 KiB",
                431: "request headers: more than 100, or a line longer than 64 KiB"}.get(code)
        text = text or message
        try:
            self._error(client_dialect(urllib.parse.urlsplit(path).path, {}),
                        ApiError(code, "invalid_request" if code < 500 else "api_error",
                                 clean_text(text or _REASONS.get(code, "bad request"), 200)))
        except ClientGone:
            pass

    def _error(self, dialect, err):
        if self.sent:
            return
        body = CODECS[dialect].encode_error(err)
        self.send(err.status, {"Content-Type": "application/json", **err.headers}, body)

    def _json(self, status, obj):
        self.send(status, {"Content-Type": "application/json"}, dumps(obj).encode())

    def _identify(self):
        """Who sends this request: ("admin", None) with the router key, (its `keys` row, None)
        with a personal key, ("open", None) when no key is needed (no router key and no personal
        key is set); else (None, the 401 that says what is wrong)."""
        key, keys = self.router.router_key, self.router.keys
        given = self._given_key()
        if key and hmac.compare_digest(given.encode(), key.encode()):
            return "admin", None
        rec = keys.find(given) if given.startswith(KEY_PREFIX) else None
        now = time.time()
        if rec is not None and rec["revoked"] is not None:
            return None, ApiError(401, "authentication", f"the key {rec['name']} was revoked "
                                                         f"{iso_time(rec['revoked'])}")
        if rec is not None and rec["expires"] is not None and rec["expires"] <= now:
            return None, ApiError(401, "authentication", f"the key {rec['name']} expired "
                                                         f"{iso_time(rec['expires'])}")
        if rec is not None:
            return rec, None
        if not key and not keys.any_keys():
            return "open", None
        return None, ApiError(401, "authentication", "missing or wrong key: send the router key "
                                                     "(SAGE_ROUTER_API_KEY) or a personal key "
                                                     "(router.py keys add NAME) as "
                                                     "'Authorization: Bearer KEY' or 'x-api-key: "
                                                     "KEY' ('x-goog-api-key: KEY' or ?key=KEY "
                                                     "from Gemini clients)")

    def _authorized(self):
        """Whether the caller may see everything (/health's details): the router key, or no key
        needed."""
        try:
            return self._identify()[0] in ("admin", "open")
        except ApiError:
            return False

    def _given_key(self):
        given = self.headers.get("x-api-key") or self.headers.get("x-goog-api-key") or ""
        auth = self.headers.get("authorization") or ""
        if auth[:7].lower() == "bearer ":
            given = given or auth[7:].strip()
        if not given and "key=" in self.path:       # Gemini's REST habit: ?key=
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            given = (query.get("key") or [""])[-1]
        return given

    def _framing(self):
        """How the request's body is framed: ("none" | "length" | "chunked", length). Ambiguous
        framing (two Content-Length headers, a Content-Length that is not plain digits, a
        Transfer-Encoding other than exactly "chunked", or both headers) is a 400: a proxy in front
        could read the request differently and smuggle a second one in."""
        lengths = self.headers.get_all("content-length") or []
        codings = self.headers.get_all("transfer-encoding") or []
        if codings:
            if len(codings) > 1 or codings[0].strip().lower() != "chunked":
                raise ApiError(400, "invalid_request",
                               "Transfer-Encoding: only a single 'chunked' is supported")
            if lengths:
                raise ApiError(400, "invalid_request",
                               "Content-Length and Transfer-Encoding: send one of them")
            return "chunked", None
        if not lengths:
            return "none", 0
        if len(lengths) > 1:
            raise ApiError(400, "invalid_request", "Content-Length: given more than once")
        value = lengths[0].strip()
        if not (value.isascii() and value.isdigit()):
            raise ApiError(400, "invalid_request",
                           f"Content-Length: {safe_text(value, 20)} is not a number of bytes")
        return ("length", int(value)) if int(value) else ("none", 0)

    def handle_expect_100(self):
        """`Expect: 100-continue`: the 100 waits until the request passed its checks (_read_body),
        so a refused client learns it before it sends its body."""
        self.expects_100 = True
        return True

    def _read_body(self, dialect):
        limit = self.router.settings["max_body_bytes"]
        self.connection.settimeout(self.router.settings["client_body_timeout"])
        kind, n = self.framing
        if kind == "length" and n > limit:
            self.close_connection = True
            raise ApiError(413, "request_too_large",
                           f"body: {n} bytes is larger than the limit of {limit} bytes")
        if self.expects_100 and kind != "none":
            self.expects_100 = False
            self._raw(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.server.phase(self.connection, "body")
        try:
            data = self._read_framed(kind, n, limit)
        finally:
            self.server.phase(self.connection, "busy")
        self.body_read = True
        return data

    def _linger(self):
        """Close a connection whose request body was not read (an early 401, 404, 413, ...) so the
        client still reads the answer: closing with unread data would reset the connection under
        a client that is still sending, and it would see a broken pipe instead of the error. Stop
        sending, then read and drop what comes for up to two seconds (nginx's lingering close)."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            deadline, dropped = time.monotonic() + 2.0, 0
            while time.monotonic() < deadline and dropped < (64 << 20):
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                dropped += len(chunk)
        except OSError:
            pass

    def _read_framed(self, kind, n, limit):
        if kind == "chunked":
            # Strict chunked framing (RFC 9112 7.1): hex sizes, CRLF line ends, CRLF after each
            # chunk's data. The limit counts the body as sent, framing included, so a body of
            # tiny chunks cannot cost more time or memory than one of the same size on the wire.
            body, wire = bytearray(), 0

            def bad(what):
                self.close_connection = True
                return ApiError(400, "invalid_request",
                                f"body: malformed chunked encoding ({what})")
            while True:
                line = self.rfile.readline(1024)
                wire += len(line)
                size_text = line[:-2].split(b";")[0].strip(b" \t")
                if not line.endswith(b"\r\n") or not size_text or len(size_text) > 16 or \
                        size_text.strip(b"0123456789abcdefABCDEF"):
                    raise bad("a chunk size is hex digits ending in CRLF")
                size = int(size_text, 16)
                wire += size + 2
                if wire > limit:
                    self.close_connection = True
                    raise ApiError(413, "request_too_large",
                                   f"body: larger than the limit of {limit} bytes")
                if size == 0:
                    while True:                      # trailer fields, then the empty line
                        line = self.rfile.readline(1024)
                        wire += len(line)
                        if line == b"\r\n":
                            return body
                        if not line.endswith(b"\r\n") or wire > limit:
                            raise bad("the trailer section ends with an empty line")
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    self.close_connection = True
                    raise ClientGone("body cut short")
                body += chunk
                if self.rfile.read(2) != b"\r\n":
                    raise bad("a chunk's data is followed by CRLF")
        if kind == "none":
            return b""
        data = self.rfile.read(n)
        if len(data) < n:
            self.close_connection = True
            raise ClientGone("body cut short")
        return data

    def _dispatch(self):
        self.server.phase(self.connection, "busy")
        with self.server.active_lock:
            self.server.active += 1
        try:
            self._handle()
        finally:
            with self.server.active_lock:
                self.server.active -= 1

    def _handle(self):
        self._reset()
        path = urllib.parse.urlsplit(self.path).path
        if len(path) > 1:
            path = path.rstrip("/")
        hdrs = {k.lower(): v for k, v in self.headers.items()}
        dialect = client_dialect(path, hdrs)
        self.body_read = False
        try:
            try:
                try:
                    self.framing = self._framing()
                except ApiError:
                    self.close_connection = True
                    raise
                self._route(path, hdrs, dialect)
            finally:
                self.connection.settimeout(self.router.settings["client_header_timeout"])
                if self.unread_body():
                    self.close_connection = True
        except ApiError as e:
            self._error(dialect, e)
        except ClientGone:
            self.close_connection = True
            return
        except (TimeoutError, socket.timeout):
            self.close_connection = True
            self._error(dialect,
                        ApiError(408, "timeout", "the request body did not arrive in time"))
            return
        except Exception:
            log.exception("internal error on %s %s", self.command, path)
            self.close_connection = True
            self._error(dialect,
                        ApiError(500, "api_error", "internal error in the router (see its log)"))
        if self.unread_body():
            self._linger()

    def unread_body(self):
        """Whether the request was answered before its body was read (401, 404, 405, 413, bad
        framing): that body must never be parsed as the next request, so the connection closes."""
        return not self.body_read and self.framing[0] != "none"

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def _check_origin(self, hdrs):
        """Browsers are the danger (a page the user visits can POST here, or reach the router
        under a name of its own by DNS rebinding): without a router key, the Host must be one
        the router answers to, and whatever the key, an Origin other than the router's own (its
        status page) or one in settings.allowed_origins is refused. Clients that are not
        browsers send no Origin, and `curl -d` keeps working whatever its Content-Type; desktop
        apps built on web engines (Electron, browser extensions) do send one: list theirs."""
        s = self.router.settings
        host = hdrs.get("host", "")
        if not self.router.router_key and not host_allowed(host, self.server.server_address[0],
                                                           s["allowed_hosts"]):
            raise ApiError(403, "permission", f"Host {safe_text(host, 80)} is not one this router "
                                              "answers to (it listens on a local address; add the "
                                              "name to settings.allowed_hosts, or set "
                                              "SAGE_ROUTER_API_KEY)")
        origin = hdrs.get("origin")
        if origin is None:
            return
        # The router's own page: its origin names the Host it was loaded from, or, behind a proxy
        # that rewrites Host, the browser says so itself (Sec-Fetch-Site, which no page can set).
        same = origin.lower() != "null" and (
            urllib.parse.urlsplit(origin).netloc.lower() == host.lower()
            or hdrs.get("sec-fetch-site") == "same-origin")
        allowed = {o.lower().rstrip("/") for o in s["allowed_origins"]}
        if same or origin.lower().rstrip("/") in allowed or "*" in allowed:
            self.cors_origin = None if same else origin
            return
        raise ApiError(403, "permission",
                       f"Origin {safe_text(origin, 80)} may not use this router: web pages may "
                       "only use it from its own status page (add the origin to "
                       "settings.allowed_origins)")

    def _route(self, path, hdrs, dialect):
        method = self.command
        self._check_origin(hdrs)
        # a CORS preflight from an allowed origin
        if method == "OPTIONS" and self.cors_origin:
            return self.send(204, {"Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                                   "Access-Control-Allow-Headers":
                                       hdrs.get("access-control-request-headers", "*"),
                                   "Access-Control-Max-Age": "600"}, b"")
        if not path.startswith("/v1/") and "/v1" + path in POST_ROUTES:
            path = "/v1" + path
        if path == "/health" and method in ("GET", "HEAD"):
            report = health_report(self.router)
            if not self._authorized():     # open for health checks; the details need the key
                try:
                    who = "personal key" if isinstance(self._identify()[0], dict) else "required"
                except ApiError:
                    who = "required"
                report = {"status": report["status"],
                          "version": report["version"], "auth": who,
                          "providers": [{"name": p["name"],
                                         "state": p["state"]} for p in report["providers"]]}
            return self._json(200, report)
        if path == "/" and method in ("GET", "HEAD"):
            return self.send(200, {"Content-Type": "text/html; charset=utf-8",
                                   "Cache-Control": "no-cache", **PAGE_HEADERS},
                             STATUS_PAGE)
        caller, refused = self._identify()
        if refused is not None:
            raise refused
        self.caller = caller
        mine = caller["name"] if isinstance(caller, dict) else None    # a personal key's name
        if path == "/v1/keys" or path.startswith("/v1/keys/"):
            return self._keys(method, path, caller)
        if mine and (path == "/metrics" or path == "/v1/health/reset"):
            raise ApiError(403, "permission", f"{path} needs the router key "
                                              "(SAGE_ROUTER_API_KEY), not a personal key")
        if method == "GET" and path == "/metrics":
            return self.send(200, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
                             self.router.metrics_text().encode())
        if method == "GET" and path in ("/v1/usage", "/v1/requests"):
            q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            one = {k: v[-1] for k, v in q.items()}
            if path == "/v1/usage":               # (a personal key sees its own only)
                return self._json(200, self.router.log.usage(parse_since(one.get("since")),
                                                             one.get("group_by"), mine))
            try:
                limit = int(one.get("limit", 50))
            except ValueError:
                raise bad_request("limit", "must be an integer")
            return self._json(200, {"object": "list",
                                    "data": self.router.log.recent(limit, mine)})
        if dialect == "gemini":
            return self._gemini(method, path, hdrs)
        if method == "GET" and path == "/api/tags":
            return self._json(200, self.router.models("ollama", key=self._key()))
        if method == "GET" and path == "/api/version":
            return self._json(200, {"version": OLLAMA_VERSION})
        if method == "GET" and path in ("/v1/models", "/models"):
            shape = "anthropic" if "anthropic-version" in hdrs else "openai"
            return self._json(200, self.router.models(shape, key=self._key()))
        if method == "GET" and path.startswith(("/v1/models/", "/models/")):
            shape = "anthropic" if "anthropic-version" in hdrs else "openai"
            name = urllib.parse.unquote(path.split("/models/", 1)[1])
            return self._json(200, self.router.model(shape, name))
        target = POST_ROUTES.get(path)
        if target is None or method != "POST":
            if target is not None:
                raise ApiError(405, "invalid_request", f"{path} takes POST, not {method}")
            raise ApiError(404, "not_found",
                           f"no such endpoint: {method} {path}. Endpoints: {ENDPOINTS}")
        dialect, action = target
        try:
            body = parse_json_body(self._read_body(dialect))
        except ApiError as e:
            if action in ("generate", "complete"):
                self._refused(dialect, None, e, "completions" if action == "complete" else "chat")
            raise
        if action == "count_tokens":
            return self._json(200, self.router.count_tokens(dialect, body, hdrs, key=self._key()))
        if action == "embed":
            _need(isinstance(body, dict), "body", "must be a JSON object")
            kw = {"legacy": path.endswith("/api/embeddings")} if dialect == "ollama" else {}
            out, extra = self.router.embed(dialect, body, hdrs, self, key=self._key(), **kw)
            return self.send(200, {"Content-Type": "application/json", **extra},
                             dumps(out).encode())
        if action == "explain":
            return self._json(200, self.router.explain(body, hdrs, self._key()))
        if action == "reset_health":
            _need(isinstance(body, dict), "body", "must be a JSON object: {}, {\"provider\": NAME} "
                                                  "or {\"provider\": NAME, \"model\": MODEL}")
            for field in ("provider", "model"):
                _need(body.get(field) is None or isinstance(body[field], str) and body[field],
                      field, "must be a non-empty string")
            _need(body.get("provider") or not body.get("model"), "model", "needs a provider")
            return self._json(200, {"reset": self.router.reset_health(body.get("provider"),
                                                                      body.get("model"))})
        if action == "show":
            name = body.get("model") or body.get("name") if isinstance(body, dict) else None
            _need(isinstance(name, str) and name, "model", "is required and must be a string")
            return self._json(200, self.router.model("ollama", name))
        self._generate(dialect, body, hdrs, **({"completion": True} if action == "complete" else {}))

    def _gemini(self, method, path, hdrs):
        """Gemini's endpoints (the google-genai SDK, Gemini CLI): the model and the method are in
        the path, after any base-URL prefix."""
        query = {k: v[-1]
                 for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).items()}
        listing, calling = GEMINI_LIST.fullmatch(path), GEMINI_CALL.fullmatch(path)
        if method == "GET" and listing:       # (a model name may hold ":", as in llama3.2:latest)
            name = listing.group(1)
            return self._json(200, self.router.model("gemini", urllib.parse.unquote(name))
                              if name else self.router.models("gemini", query, self._key()))
        if method != "POST" or calling is None:
            raise ApiError(405, "invalid_request", f"{method} {path}: Gemini's models are listed "
                                                   "with GET and called with POST "
                                                   ".../models/MODEL:generateContent")
        model, call = calling.groups()
        model = urllib.parse.unquote(model)
        stream = call == "streamGenerateContent"
        _need(not stream or query.get("alt") == "sse", "alt",
              "must be \"sse\": streamGenerateContent is served as server-sent events (?alt=sse), "
              "as the SDKs ask")
        try:
            body = parse_json_body(self._read_body("gemini"))
        except ApiError as e:
            if call != "countTokens":
                self._refused("gemini", None, e)
            raise
        if call == "countTokens":
            return self._json(200, self.router.count_tokens("gemini", body, hdrs, model=model,
                                                            key=self._key()))
        if call in ("embedContent", "batchEmbedContents"):
            _need(isinstance(body, dict), "body", "must be a JSON object")
            out, extra = self.router.embed("gemini", body, hdrs, self, key=self._key(), model=model,
                                           single=call == "embedContent")
            return self.send(200, {"Content-Type": "application/json", **extra},
                             dumps(out).encode())
        self._generate("gemini", body, hdrs, model=model, stream=stream)

    def _generate(self, dialect, body, hdrs, **kw):
        """A client's request for a reply: decode it, let the router answer, record it."""
        try:
            req = decode_client_request(dialect, body, **kw)
        except ApiError as e:
            self._refused(dialect, body, e, "completions" if kw.get("completion") or (
                isinstance(body, dict) and (body.get("suffix") or body.get("raw"))) else "chat")
            raise
        ctx = Context(dialect, body, req, hdrs, self)
        ctx.key = self._key()
        if self.router.settings["log_prompts"] and ctx.collect is None:
            ctx.collect = []
        try:
            self.router.generate(ctx)
        except ApiError as e:
            ctx.status, ctx.error = e.status, e.message[:2000]
            raise
        except ClientGone:
            ctx.status, ctx.error = 499, "the client closed the connection"
            raise
        except Exception:
            ctx.status, ctx.error = 500, "internal error"
            raise
        finally:
            self.router.record(ctx)


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)     # the thread reading it wakes up and ends
    except OSError:
        pass


def default_max_connections():
    """Sized to the process's file limit (each connection may hold an upstream one too), at most 512."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 512
    return 512 if soft == resource.RLIM_INFINITY else max(16, min(512, (soft - 64) // 2))


class RouterServer(ThreadingHTTPServer):
    """Thread per connection, a deep listen backlog, and no tracebacks for clients that hang up.

    Connections are counted (at most settings.max_connections, default sized to the file limit)
    and each is in one phase: "wait" (for its next request's line and headers), "body" or "busy".
    At the cap, the connection that has waited longest is closed to make room; only when every
    connection has a request in flight is a new one answered 503 and closed. A reaper closes
    connections whose headers take longer than client_header_timeout in all, or whose body takes
    longer than client_body_deadline. When the process runs out of file descriptors, accepting
    backs off instead of spinning."""

    daemon_threads = True
    request_queue_size = 512
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address, handler, router, listen=None):
        """`listen`: None (bind the address), "reuseport" (bind it with SO_REUSEPORT, beside the
        router's other workers), or a listening socket to accept from (shared by the workers)."""
        self.router = router
        self.listen = listen
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.conns = {}                 # socket -> [phase, since]
        self.conn_lock = threading.Lock()
        self.active = 0                 # requests being handled right now (for a graceful stop)
        self.active_lock = threading.Lock()
        self._closed = threading.Event()
        self._fd_warned = self._cap_warned = -1e9
        shared = isinstance(listen, socket.socket)
        super().__init__(address, handler, bind_and_activate=not shared)
        if shared:
            self.socket.close()
            self.socket = listen
            self.server_address = listen.getsockname()[:2]
            # (every worker's select wakes for each connection, and all but one find none to
            # accept: a blocking accept would sit there, deaf to a stop, until the next one)
            listen.setblocking(False)
        threading.Thread(target=self._reap, name="sage-router-reaper", daemon=True).start()

    @property
    def max_connections(self):
        return int(self.router.settings["max_connections"]) or default_max_connections()

    def server_bind(self):
        if self.listen == "reuseport":
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def phase(self, sock, phase):
        with self.conn_lock:
            st = self.conns.get(sock)
            # a new connection waits since it was accepted
            if st is not None and st[0] != phase:
                self.conns[sock] = [phase, time.monotonic()]

    def _closed_one(self, why):
        """Count a connection the router closed (evicted, refused, reaped); at the cap, say so in
        the log at most once a minute (under conn_lock)."""
        c = self.router.metrics.connections
        c[why] += 1
        now = time.monotonic()
        if why != "reaped" and now - self._cap_warned > 60:
            self._cap_warned = now
            log.warning("at the connection limit (max_connections %d): %s (so far: %d "
                        "evicted, %d refused); raise settings.max_connections if this "
                        "happens under normal load", self.max_connections,
                        "closed the connection that waited longest" if why == "evicted" else
                        "answered a new one 503: every connection has a request in flight",
                        c["evicted"], c["refused"])

    def get_request(self):
        try:
            conn, addr = super().get_request()
            if self.socket is self.listen:      # (a BSD's accept passes O_NONBLOCK on)
                conn.setblocking(True)
            return conn, addr
        except BlockingIOError:
            raise                       # (another worker took it: socketserver moves on)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                now = time.monotonic()
                if now - self._fd_warned > 60:
                    self._fd_warned = now
                    log.warning("out of file descriptors (%s): accepting slows down; raise the "
                                "limit (LimitNOFILE) or lower settings.max_connections", e.strerror)
                time.sleep(0.1)
            raise

    def process_request(self, request, client_address):
        full = False
        with self.conn_lock:
            if len(self.conns) >= self.max_connections:
                waiting = [(st[1], s) for s, st in self.conns.items() if st[0] == "wait"]
                if waiting:
                    victim = min(waiting, key=lambda w: w[0])[1]
                    del self.conns[victim]
                    _shutdown(victim)
                    self._closed_one("evicted")
                else:
                    full = True
                    self._closed_one("refused")
            if not full:
                self.conns[request] = ["wait", time.monotonic()]
            self.router.metrics.connections["open"] = len(self.conns)
        if full:
            body = dumps({"error": {"message": "the router is at its limit of "
                                               f"{self.max_connections} connections, each with a "
                                               "request in flight; try again in a moment "
                                               "(settings.max_connections)", "type": "server_error",
                                    "code": "too_many_connections"}}).encode()
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\n"
                                b"Content-Type: application/json\r\nRetry-After: 1\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                                % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.conn_lock:
            self.conns.pop(request, None)
            self.router.metrics.connections["open"] = len(self.conns)
        super().shutdown_request(request)

    def _reap(self):
        while not self._closed.wait(0.25):
            s, now = self.router.settings, time.monotonic()
            with self.conn_lock:        # shut down under the lock: no phase can change in between
                for sock, (phase, since) in list(self.conns.items()):
                    if (phase == "wait" and now - since > s["client_header_timeout"]) or \
                            (phase == "body" and now - since > s["client_body_deadline"]):
                        _shutdown(sock)
                        self.conns[sock] = ["closing", since]      # its thread is on its way out
                        self._closed_one("reaped")

    def server_close(self):
        self._closed.set()
        super().server_close()

    def drain(self, grace):
        """Wait until no request is in flight, at most `grace` seconds."""
        deadline = time.monotonic() + grace
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.active == 0

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
            return
        log.error("unexpected error on a connection from %s", client_address[0], exc_info=True)


# =================================================================================================
# 9. Command line and main
# =================================================================================================

LOOPBACK = ("127.0.0.1", "localhost", "::1")


COMMANDS = ("serve", "check", "models", "route", "reset", "keys", "systemd-unit")


def build_parser():
    ap = argparse.ArgumentParser(
        prog="router.py", description="Sage Router: one local endpoint for every model.",
        epilog="commands: serve (the default) runs the router; check validates the config and "
               "probes every provider and key; models lists the catalogue; route \"TEXT\" "
               "explains where a prompt would go; reset [PROVIDER[/MODEL]] closes circuit "
               "breakers by hand (all of them without an argument); keys add|list|update|"
               "revoke|rotate [NAME] manages the team's personal keys; systemd-unit prints a "
               "systemd unit for this install.")
    ap.add_argument("command", nargs="?", default="serve", choices=COMMANDS,
                    help="what to do (default: serve)")
    ap.add_argument("--version", action="version", version=f"Sage Router {__version__}")
    ap.add_argument("text", nargs="*",
                    help="for route: the prompt; for reset: PROVIDER or PROVIDER/MODEL")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    def port(v):
        if not str(v).isdigit() or int(v) > 65535:
            raise argparse.ArgumentTypeError(f"{v!r} is not a port number 0-65535 (from --port or "
                                             "$SAGE_ROUTER_PORT)")
        return int(v)
    env_port = os.environ.get("SAGE_ROUTER_PORT") or ""
    # Kubernetes' link to a Service named sage-router
    if env_port.startswith(("tcp://", "udp://")):
        env_port = ""
    ap.add_argument("--port", type=port, default=env_port or DEFAULT_PORT,
                    help=f"port (default $SAGE_ROUTER_PORT, else {DEFAULT_PORT})")
    def workers(v):
        if not str(v).isdigit() or not 1 <= int(v) <= 64:
            raise argparse.ArgumentTypeError(f"{v!r} is not a number of workers 1-64 (from "
                                             "--workers or $SAGE_ROUTER_WORKERS)")
        return int(v)
    ap.add_argument("--workers", type=workers, default=os.environ.get("SAGE_ROUTER_WORKERS") or 0,
                    help="processes serving the port (default $SAGE_ROUTER_WORKERS, else one a "
                         "core, at most 8; 1: a single process)")
    ap.add_argument("--config", default=None,
                    help="providers.json (default ./providers.json, else beside router.py)")
    ap.add_argument("--env-file", default=None,
                    help=".env file (default ./.env, else beside router.py)")
    ap.add_argument("--data-dir", default=None, help="state directory (default "
                                                     "$XDG_STATE_HOME/sage-router or "
                                                     "~/.local/state/sage-router)")
    ap.add_argument("--allow-no-auth", action="store_true",
                    help="allow a non-loopback --host without SAGE_ROUTER_API_KEY")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--log-format", default="text", choices=["text", "json"],
                    help="log lines as text or JSON")
    ap.add_argument("--model", default="auto",
                    help="for route: the model name to plan for (default auto)")
    ap.add_argument("--user", default=None,
                    help="for systemd-unit: the user to run as (default sage-router)")
    ap.add_argument("--budget", default=None,
                    help="for keys add/update: USD/PERIOD, PERIOD day, week or month (UTC "
                         "calendar), such as 10/month; none removes it")
    ap.add_argument("--rpm", default=None, help="for keys add/update: requests a minute (none: "
                                                "no limit)")
    ap.add_argument("--tpm", default=None, help="for keys add/update: tokens a minute (none: no "
                                                "limit)")
    ap.add_argument("--models", default=None,
                    help="for keys add/update: the models it may use, GLOB,GLOB matching "
                         "PROVIDER/MODEL or the model id (none: all)")
    ap.add_argument("--expires", default=None,
                    help="for keys add/update: a date or time (UTC) it stops working, or never")
    return ap


def make_loader(args):
    """() -> (cfg, env, source), reading the files again each time (reload uses it)."""
    def load():
        env = load_env(args.env_file or ".env", args.env_file is not None)
        cfg, source = load_config(args.config or "providers.json", args.config is not None)
        return cfg, env, source
    return load


def watched_files(args, source):
    """The files whose change reloads the config: providers.json, and the .env that is used or,
    before there is one, both places it may appear (the current folder, beside router.py)."""
    paths = [source] if os.path.exists(source) else []
    if args.env_file:
        paths.append(args.env_file)
    else:
        paths += [".env", _here(".env")]
    return list(dict.fromkeys(os.path.abspath(p) for p in paths))


def load_router(args, worker=None):
    """Environment + config -> Router, set up to reload itself. Raises ConfigError."""
    loader = make_loader(args)
    cfg, env, source = loader()
    router = Router(cfg, env, source, args.data_dir, args.log_format, worker)
    router.loader = loader
    for path in watched_files(args, source):
        try:
            router.watch[path] = os.stat(path).st_mtime_ns
        except OSError:
            router.watch[path] = None
    return router, env


def serve(router, host, port, listen=None):
    """Bind and return the server (not yet serving): tests call this, then serve_forever."""
    server = RouterServer((host, port), make_handler(router), router, listen)
    router.start()
    return server


def _table(rows, head):
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def cmd_check(router):
    """Probe every provider and key; exit 0 when every enabled provider has a working key."""
    cat = router.catalogue
    rows, broken = [], 0
    for p in cat.providers.values():
        if not p.enabled:
            rows.append((p.name, p.api, "-", "off", p.disabled_reason))
            continue
        results = [probe(p, i) for i in range(max(1, len(p.keys)))]
        for i, (ok, detail) in enumerate(results):
            rows.append((p.name, p.api, f"#{i + 1}" if p.keys else "(none)", "OK" if ok else "FAIL",
                         detail if ok else f"{detail} -- check the key or base_url "
                                           f"({p.base_url_shown})"))
        broken += not any(ok for ok, _d in results)
    print(f"config: {cat.source}")
    print(_table(rows, ("provider", "api", "key", "status", "detail")))
    if not cat.enabled:
        print("\n" + NO_PROVIDER_HELP)
        return 1
    print(f"\n{len(cat.enabled) - broken} of {len(cat.enabled)} enabled provider(s) answer.")
    return 1 if broken else 0


def cmd_models(router):
    router.discover(force=True)
    cat = router.catalogue
    rows = []
    for (p, m), c in sorted(cat.caps.items()):
        if not c.get("chat", True):
            continue
        rows.append((f"{p}/{m}", c.get("context_window") or "?", c.get("max_output") or "?",
                     "+".join(c["input"]),
                     "yes" if c["tools"] else "no", "yes" if c["reasoning"] else "no",
                     ",".join(c["intents"])))
    print(_table(rows, ("model", "context", "output", "input", "tools",
                        "reasoning", "intents")) if rows else NO_PROVIDER_HELP)
    print("\nroutes:")
    for name, cands in cat.routes.items():
        names = ", ".join(f"{p}/{m}" for p, m in cands)
        print(f"  {name}: " + (names or "(no model from an enabled provider)"))
    return 0


def keys_shared_state(args):
    """The config's settings.shared_state for `keys` (a RedisShare), or None. The command works on
    the data directory alone: a config that cannot be read is only a warning here."""
    try:
        cfg, env, _source = make_loader(args)()
        url = (cfg.get("settings") or {}).get("shared_state")
        return RedisShare(expand_vars(url, env)) if url else None
    except (ConfigError, MissingVar, OSError, ValueError) as e:
        print(f"sage-router: keys: note: the config's shared_state is not used ({e}); the "
              "change is made on this box only, and reaches the others once its router runs",
              file=sys.stderr)
        return None


def cmd_keys(args, words):
    """router.py keys add|list|update|revoke|rotate [NAME]: on the data directory's database (a
    router running on it sees the change on its next request). A new key is printed once, alone
    on the last line."""
    store = KeyStore(os.path.join(args.data_dir or default_data_dir(), "requests.db"))
    store.shared = keys_shared_state(args)
    action, name = (words + [None, None])[:2]
    fields = {f: getattr(args, f) for f in ("budget", "rpm", "tpm", "models", "expires")
              if getattr(args, f) is not None}
    try:
        if action in (None, "list"):
            rows = [(e["name"], e["prefix"], e["state"],
                     f"${e['spent_usd']:.4f} of ${e['budget_usd']:g}/{e['period']}"
                     if e["budget_usd"] else f"${e['spent_usd']:.4f}",
                     e["rpm"] or "-", e["tpm"] or "-", ",".join(e["models"] or ["*"]),
                     e["expires"] or "never", e["last_used"] or "never")
                    for e in store.entries()]
            print(_table(rows, ("name", "key", "state", "spent this period", "rpm", "tpm",
                                "models", "expires", "last used")) if rows else
                  "no keys yet: router.py keys add NAME [--budget 10/month] [--rpm 60]")
            return 0
        if action not in ("add", "update", "revoke", "rotate") or not name:
            print("sage-router: keys: add NAME, list, update NAME, revoke NAME or rotate NAME",
                  file=sys.stderr)
            return 2
        key = None
        if action == "add":
            key, entry = store.create(name, fields)
        elif action == "rotate":
            key, entry = store.rotate(name)
        elif action == "update":
            entry = store.update(name, fields)
        else:
            entry = store.revoke(name)
    except ApiError as e:
        print(f"sage-router: keys {action}: {e.message}", file=sys.stderr)
        return 1
    except (sqlite3.Error, OSError) as e:
        print(f"sage-router: keys: cannot use {store.path}: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    limits = ", ".join(filter(None, (
        entry["budget_usd"] and f"budget ${entry['budget_usd']:g} a {entry['period']} (resets "
                                f"{entry['resets']})",
        entry["rpm"] and f"{entry['rpm']} requests a minute",
        entry["tpm"] and f"{entry['tpm']} tokens a minute",
        entry["models"] and "models " + ",".join(entry["models"]),
        entry["expires"] and f"expires {entry['expires']}"))) or "no limits"
    print(f"key {entry['name']} ({entry['state']}): {limits}")
    if key:
        print("the key is shown this once; the router keeps only a salted hash of it:")
        print(key)
    return 0


def cmd_route(router, text, model):
    if not text:
        print("usage: router.py route \"TEXT\" [--model NAME]", file=sys.stderr)
        return 2
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    try:
        e = router.explain(body, {})
    except ApiError as err:
        intent, conf, signals = detect_intent(openai_decode_request(body))
        print(f"intent: {intent} (confidence {conf}); signals: {', '.join(signals) or 'none'}")
        print(f"no route: {err.message}")
        return 1
    print(f"intent: {e['intent']} (confidence {e['confidence']}); signals: "
          f"{', '.join(e['signals']) or 'none'}")
    print(f"route: {e['route']}")
    for i, c in enumerate(e["candidates"], 1):
        print(f"  {i}. {c['provider']}/{c['model']}"
              + (f"  -- skipped: {c['skip']}" if c["skip"] else ""))
    return 0


def cmd_reset(args, env, target):
    """Close breakers by hand: through the running router (POST /v1/health/reset on --host and
    --port, with the router key from the environment or .env), or, when none answers there, in
    health.json in the data directory."""
    provider, _, model = target.partition("/") if target else (None, "", "")
    if target and not provider:
        print(f"sage-router: reset {target!r}: expected PROVIDER or PROVIDER/MODEL",
              file=sys.stderr)
        return 2
    body = {k: v for k, v in (("provider", provider), ("model", model)) if v}
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    headers = {"Content-Type": "application/json"}
    key = clean_key(env.get("SAGE_ROUTER_API_KEY") or "", "the router key (SAGE_ROUTER_API_KEY)")
    if key:
        headers["Authorization"] = "Bearer " + key
    conn = http.client.HTTPConnection(host, args.port, timeout=10)
    try:
        conn.request("POST", "/v1/health/reset", dumps(body).encode(), headers)
        resp = conn.getresponse()
        data = json.loads(resp.read() or b"{}")
        if not isinstance(data, dict):
            data = {"error": {"message": str(data)[:200]}}
    except ConnectionRefusedError:
        data = None
    except (OSError, http.client.HTTPException, ValueError) as e:
        print(f"sage-router: no usable answer from http://{host}:{args.port} ({e})",
              file=sys.stderr)
        return 1
    finally:
        conn.close()
    if data is None:
        router, _env = load_router(args)
        try:
            names = router.reset_health(provider, model or None)
            router.save_state()
        except ApiError as e:
            print(f"sage-router: {e.message}", file=sys.stderr)
            return 1
        finally:
            router.close()
        where = f"{router.state_file} (no router answers on {host}:{args.port})"
    elif resp.status != 200:
        print(f"sage-router: the router at {host}:{args.port} said {resp.status}: "
              f"{(data.get('error') or {}).get('message', data)}", file=sys.stderr)
        return 1
    else:
        names, where = data.get("reset", []), f"the router on {host}:{args.port}"
    print(f"reset in {where}: " + (", ".join(names) if names else "nothing was open"))
    return 0


def open_to_all(path, bit):
    """True when every user may use `path`: `bit` (0o001 run, 0o004 read) on the file itself and
    the right to enter each folder above it, on the way as written and on the way its symlinks
    lead (a venv's python links to /usr/bin/python3 but sits in a private home folder)."""
    try:
        if not os.stat(path).st_mode & bit:
            return False
        for way in (os.path.abspath(path), os.path.realpath(path)):
            while way != os.path.dirname(way):
                way = os.path.dirname(way)
                if not os.stat(way).st_mode & 0o001:
                    return False
    except OSError:
        return False
    return True


def service_python(exe):
    """(interpreter for ExecStart, why not `exe` or None): the service's own user must be able to
    run it, which a pyenv or venv python under /root or a home folder often is not."""
    if open_to_all(exe, 0o001):
        return exe, None
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if open_to_all(cand, 0o001):
            try:
                ok = subprocess.run([cand, "-c",
                                     "import sys; sys.exit(sys.version_info < (3, 10))"],
                                    capture_output=True, timeout=20).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
            if ok:
                return cand, f"{exe} cannot be run by other users, so the unit uses {cand}"
    return "/usr/bin/env python3", (f"{exe} cannot be run by other users, so the unit uses the "
                                    "python3 on PATH; it must be Python 3.10 or newer")


def systemd_unit(args, user=None):
    """(A hardened systemd unit for this install, notes for the user): its own user, read-only
    system, state in a 0700 StateDirectory, an interpreter and a router.py that user can reach,
    room for max_connections' files. The router reads the .env beside it itself (no
    EnvironmentFile=: variables systemd put in the environment would win over the file, so a key
    changed in .env would need a restart instead of `systemctl reload`)."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, "router.py")
    user = user or "sage-router"
    python, note = service_python(sys.executable)
    notes = [note] if note else []
    try:          # (systemd waits this long for a stop: the drain, plus the supervisor's 5 s)
        cfg, _env, _source = make_loader(args)()
        grace = float((cfg.get("settings") or {}).get(
            "shutdown_grace_seconds", DEFAULT_SETTINGS["shutdown_grace_seconds"]))
    except (ConfigError, OSError, ValueError, TypeError, AttributeError):
        grace = DEFAULT_SETTINGS["shutdown_grace_seconds"]
    stop_timeout = int(grace) + 10
    import importlib.util
    if not os.path.exists(importlib.util.cache_from_source(script)):
        notes.append(f"there is no bytecode cache of router.py in {here}/__pycache__ and the "
                     f"service cannot write one there (ProtectSystem=strict): run `sudo "
                     f"{python} -m compileall {here}` once after each copy of router.py, or "
                     "every start compiles it again (about 0.2 s)")
    if not open_to_all(script, 0o004):
        notes.append(f"{script} cannot be read by other users (a folder on its way is private), so "
                     f"the service user {user} cannot start it: copy router.py and providers.json "
                     "to a folder such as /opt/sage-router and run systemd-unit from there")
    flags = [f"--host {args.host}", f"--port {args.port}", "--data-dir /var/lib/sage-router"]
    if args.config:
        flags.append(f"--config {os.path.abspath(args.config)}")
    comments = "".join(f"# note: {n}\n" for n in notes)
    unit = f"""# /etc/systemd/system/sage-router.service  (sudo useradd --system --no-create-home {user})
{comments}[Unit]
Description=Sage Router: one local endpoint for every model
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
Group={user}
WorkingDirectory={here}
ExecStart={python} -m router {' '.join(flags)}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2
TimeoutStopSec={stop_timeout}
LimitNOFILE=4096
StateDirectory=sage-router
StateDirectoryMode=0700
UMask=0077
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths=/var/lib/sage-router
PrivateTmp=true
PrivateDevices=true
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectControlGroups=true
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=true
LockPersonality=true
MemoryDenyWriteExecute=true
CapabilityBoundingSet=

[Install]
WantedBy=multi-user.target
"""
    return unit, notes


def setup_logging(level, fmt):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.sage_format = fmt          # (log_lines writes request lines to it directly)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv=None):
    # options may come before or after the text
    args = build_parser().parse_intermixed_args(argv)
    setup_logging(args.log_level if args.command == "serve" else "warning", args.log_format)
    if args.command == "systemd-unit":
        unit, notes = systemd_unit(args, args.user)
        for n in notes:
            print(f"sage-router: note: {n}", file=sys.stderr)
        print(unit, end="")
        return 0
    try:
        # the running router needs only the key: a broken config must not stop this
        if args.command == "reset":
            return cmd_reset(args, load_env(args.env_file or ".env", args.env_file is not None),
                             " ".join(args.text))
        if args.command == "keys":        # (the data directory alone: no config needed)
            return cmd_keys(args, list(args.text))
        if args.command == "serve":
            return serve_command(args)
        router, _env = load_router(args)
    except ConfigError as e:
        return config_refused(e)
    try:
        return {"check": lambda: cmd_check(router), "models": lambda: cmd_models(router),
                "route": lambda: cmd_route(router,
                                           " ".join(args.text), args.model)}[args.command]()
    # `router.py route ... | head -1`: the reader left; so do we
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        router.close()


def config_refused(e):
    print(f"sage-router: invalid config: {e.file}: {e.key}: expected {e.expected}",
          file=sys.stderr)
    return 2


def open_refused(args, router_key):
    """A non-loopback --host without a router key or --allow-no-auth: refused (exit 2)."""
    if args.host in LOOPBACK or router_key or args.allow_no_auth:
        return False
    print(f"sage-router: refusing to listen on {args.host} without a router key: set "
          "SAGE_ROUTER_API_KEY (clients then send it as 'Authorization: Bearer KEY' or "
          "'x-api-key: KEY'), or pass --allow-no-auth if the network is trusted",
          file=sys.stderr)
    return True


def serve_command(args):
    """`serve`: this process alone (--workers 1, or where there is no fork), else a Supervisor
    of workers, once the config and the listening address pass the same checks."""
    workers = args.workers or default_workers()
    if workers == 1 or not hasattr(os, "fork"):
        return serve_main(args)
    _cfg, env, _source = make_loader(args)()
    if open_refused(args, env.get("SAGE_ROUTER_API_KEY")):
        return 2
    return Supervisor(args, workers).run()


def serve_main(args, worker=None, listen=None, ready=None):
    """`serve` in this process: the whole router, or one worker of a Supervisor (`worker`:
    (index, count, run); `listen`: "reuseport" or the shared listening socket; `ready`: the pipe
    to write the worker's index to once it accepts connections)."""
    try:
        router, _env = load_router(args, worker)
    except ConfigError as e:
        return config_refused(e)
    if open_refused(args, router.router_key):
        router.close()
        return 2
    cat = router.catalogue
    say = log.info if worker is None or worker[0] == 0 else log.debug
    say("config: %s", cat.source)
    for p in cat.providers.values():
        if p.enabled:
            say("provider %s: %s %s, %d key(s), %d model(s)", p.name, p.api,
                p.base_url_shown, len(p.keys), len(p.models))
        else:
            say("provider %s: disabled: %s", p.name, p.disabled_reason)
    if not cat.enabled and say is log.info:
        log.warning(NO_PROVIDER_HELP)
    try:
        server = serve(router, args.host, args.port, listen)
    except OSError as e:
        print(f"sage-router: cannot listen on {args.host}:{args.port}: {e.strerror or e}",
              file=sys.stderr)
        router.close()
        return 1

    def stop(_sig, _frm):
        if not server.stopping:
            server.stopping = True
            log.info("stopping%s: no new connections; waiting up to %g s for requests in flight",
                     f" worker {worker[0]}" if worker else "",
                     router.settings["shutdown_grace_seconds"])
            threading.Thread(target=server.shutdown, daemon=True).start()
    server.stopping = False
    signal.signal(signal.SIGTERM, stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda _s, _f: router.ask_reload())
    if worker is not None:            # (Ctrl-C reaches every process: the supervisor stops us)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    install_fast_header_parser()
    if ready is None:
        log.info("Sage Router %s listening on http://%s:%d", __version__, args.host,
                 server.server_address[1])
    else:
        os.write(ready, b"%d\n" % worker[0])
        os.close(ready)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    server.socket.close()            # refuse new connections while the last requests finish
    if not server.drain(router.settings["shutdown_grace_seconds"]):
        log.warning("stopping with %d request(s) still in flight after the grace period",
                    server.active)
    router.close()
    return 0


def default_workers():
    """One worker a core this process may run on, at most 8, and no more than its CPU quota (a
    container's --cpus: cgroup v2 cpu.max, v1 cpu.cfs_quota_us), rounded up."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n, cpu_quota() or n))


def cpu_quota(root="/sys/fs/cgroup"):
    """The cgroup's CPU quota in cores (rounded up), or None when it has none."""
    for path, split in ((f"{root}/cpu.max", lambda t: t.split()),
                        (f"{root}/cpu/cpu.cfs_quota_us", None)):
        try:
            with open(path) as f:
                text = f.read().strip()
            if split:
                quota, period = split(text)[:2]
            else:
                with open(f"{root}/cpu/cpu.cfs_period_us") as f:
                    quota, period = text, f.read().strip()
            if quota in ("max", "-1") or int(quota) <= 0:
                return None
            return max(1, -(-int(quota) // int(period)))
        except (OSError, ValueError):
            continue
    return None


class Supervisor:
    """`serve --workers N` (N > 1): N processes serve one port, forked from this one, which
    serves nothing itself. On Linux each worker listens on its own socket with SO_REUSEPORT (the
    kernel spreads new connections across them; this process holds the port, bound but not
    listening, so a worker that restarts gets it back); elsewhere they share one listening socket.
    A worker that dies is replaced (at once, or after 1, 2, 4 ... 30 s when it keeps dying within
    10 s of its start); SIGHUP is passed on to every worker (each reloads, as each also does when
    providers.json or .env changes); SIGTERM or Ctrl-C drains them all. What they share (keys,
    budgets, the request log, stored responses, breakers, metrics, affinity) lives in the data
    directory's database (SharedState)."""

    QUICK_DEATH = 10.0
    REUSEPORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")

    def __init__(self, args, count):
        self.args, self.count = args, count
        self.run_id = f"{os.getpid()}-{time.time_ns()}"
        self.pid = os.getpid()       # (a worker stops once its parent is no longer this)
        self.reuseport = self.REUSEPORT
        self.pids = {}               # pid -> worker index
        self.ready = set()           # indexes that have accepted connections at least once
        self.due = {}                # index -> when (monotonic) to start it again
        self.quick = {}              # index -> its deaths in a row within QUICK_DEATH
        self.born = {}
        self.flags = set()           # signals seen: "stop", "hup"

    def _bind(self):
        host, port = self.args.host, self.args.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if self.reuseport and port:      # (another router on the port must not join it silently)
            with socket.socket(family) as probe:
                probe.bind((host, port))
        sock = socket.socket(family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if not self.reuseport:
            sock.listen(RouterServer.request_queue_size)
        sock.set_inheritable(True)
        return sock

    SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}

    def _spawn(self, index):
        # (held back across the fork: a SIGTERM in between reaches the worker as its own, with
        # its own handling, not this process's flag in the worker's copy of it)
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        try:
            pid = os.fork()
        except OSError as e:         # (EAGAIN, ENOMEM: tried again like a worker that died)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
            log.error("worker %d: cannot start a process (%s); trying again", index, e)
            self.quick[index] = self.quick.get(index, 0) + 1
            self.due[index] = time.monotonic() + min(30.0, 2.0 ** self.quick[index])
            return
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
            self.pids[pid] = index
            self.born[index] = time.monotonic()
            return
        code = 1
        try:                         # the worker: this process's signals and pipes are not its
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)    # (a reload before it serves: moot)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
            os.close(self.wake_r)
            os.close(self.wake_w)
            os.close(self.ready_r)
            if self.reuseport:
                self.sock.close()
            code = serve_main(self.args, (index, self.count, self.run_id, self.pid),
                              "reuseport" if self.reuseport else self.sock, self.ready_w)
        except BaseException:
            log.exception("worker %d failed", index)
        finally:
            for f in (sys.stdout, sys.stderr):
                try:
                    f.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)

    def _signal(self, sig):
        for pid in list(self.pids):
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def run(self):
        try:
            self.sock = self._bind()
        except OSError as e:
            print(f"sage-router: cannot listen on {self.args.host}:{self.args.port}: "
                  f"{e.strerror or e}", file=sys.stderr)
            return 1
        self.args.port = self.sock.getsockname()[1]
        self.wake_r, self.wake_w = os.pipe()
        self.ready_r, self.ready_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGTERM, lambda _s, _f: self.flags.add("stop"))
        signal.signal(signal.SIGINT, lambda _s, _f: self.flags.add("stop"))
        signal.signal(signal.SIGHUP, lambda _s, _f: self.flags.add("hup"))
        signal.signal(signal.SIGCHLD, lambda _s, _f: None)
        for i in range(self.count):
            self._spawn(i)
        buf = b""
        while "stop" not in self.flags:
            wait = min((t - time.monotonic() for t in self.due.values()), default=1.0)
            readable = select.select([self.wake_r, self.ready_r], [], [],
                                     max(0.0, min(1.0, wait)))[0]
            if self.wake_r in readable:
                os.read(self.wake_r, 512)
            if self.ready_r in readable:
                buf += os.read(self.ready_r, 512)
                *lines, buf = buf.split(b"\n")
                fresh = not self.ready or len(self.ready) < self.count
                self.ready.update(int(x) for x in lines if x.strip().isdigit())
                if fresh and len(self.ready) == self.count:
                    log.info("Sage Router %s listening on http://%s:%d (%d workers)",
                             __version__, self.args.host, self.args.port, self.count)
            code = self._reap()
            if code is not None:
                self.flags.add("stop")
                break
            for index, at in list(self.due.items()):
                if time.monotonic() >= at:
                    del self.due[index]
                    self._spawn(index)
            if "hup" in self.flags:
                self.flags.discard("hup")
                log.info("SIGHUP: every worker reloads its config")
                self._signal(signal.SIGHUP)
        return self._stop(code)

    def _reap(self):
        """Collect dead workers and schedule their replacements; an exit code when the router
        cannot start at all (a worker died before any worker ever accepted a connection)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            index = self.pids.pop(pid, None)
            if index is None or "stop" in self.flags:
                continue
            code = os.waitstatus_to_exitcode(status)
            if not self.ready:
                return code if code > 0 else 1
            quick = time.monotonic() - self.born.get(index, 0.0) < self.QUICK_DEATH
            self.quick[index] = self.quick.get(index, 0) + 1 if quick else 0
            delay = min(30.0, 0.25 * 2 ** self.quick[index]) if self.quick[index] > 1 else 0.0
            log.warning("worker %d (pid %d) %s; starting another%s", index, pid,
                        f"was killed by signal {-code}" if code < 0 else f"exited with {code}",
                        f" in {delay:g} s" if delay else "")
            self.due[index] = time.monotonic() + delay

    def _stop(self, code=None):
        grace = 30.0
        try:
            cfg = make_loader(self.args)()[0]
            grace = float((cfg.get("settings") or {}).get("shutdown_grace_seconds", grace))
        except (ConfigError, TypeError, ValueError, AttributeError):
            pass
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 5
        while self.pids and time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.pids.pop(pid, None)
            else:
                time.sleep(0.05)
        if self.pids:
            log.warning("stopping: %d worker(s) still busy after the grace period; killed",
                        len(self.pids))
            self._signal(signal.SIGKILL)
        self.sock.close()
        return code or 0


def _run_from_bytecode():
    """`python3 router.py` compiles this whole file, and the compiler's memory (about 9 MB) stays
    with the process for its life. So the script hands over, once, to a fresh interpreter that
    imports the file as a module, from its cached bytecode in __pycache__ (written on the first
    run where the folder is writable). Same PID (exec), same arguments and environment."""
    if os.name != "posix" or os.environ.get("SAGE_ROUTER_IMPORTED") == "1":
        return
    os.environ["SAGE_ROUTER_IMPORTED"] = "1"
    try:   # write the bytecode cache here, where compiling costs nothing that lasts
        import importlib.util
        import py_compile
        cached = importlib.util.cache_from_source(os.path.abspath(__file__))
        if not os.path.exists(cached) or os.path.getmtime(cached) < os.path.getmtime(__file__):
            py_compile.compile(__file__, cfile=cached, doraise=True)
    except (OSError, py_compile.PyCompileError, ImportError):
        pass   # read-only folder: the module is compiled in memory instead
    loader = ("import importlib.util, sys; s = "
              "importlib.util.spec_from_file_location('sage_router', sys.argv.pop(1)); m = "
              "importlib.util.module_from_spec(s); sys.modules['sage_router'] = m; "
              "s.loader.exec_module(m); sys.exit(m.main())")
    try:
        os.execv(sys.executable,
                 [sys.executable, "-c", loader, os.path.abspath(__file__)] + sys.argv[1:])
    except OSError:
        pass   # no exec here: run as we are


if __name__ == "__main__":
    if __spec__ is None:         # (`python3 -m router` runs from the bytecode cache already)
        _run_from_bytecode()
    sys.exit(main())
