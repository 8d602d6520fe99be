"""Endpoint settings (the `client:` recipe section), the user-facing errors, and API keys: read from the
variable or file a recipe names and scrubbed from every message."""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("medkd.client")


# Statuses worth another try: the request was not served, and may be next time (every 5xx but 501 Not Implemented).
def retryable_status(status: int) -> bool:
    return status in (408, 409, 429) or (status >= 500 and status != 501)


MAX_RETRY_AFTER_S = 600.0     # a server asking for longer than this is treated as down
PLACEHOLDER_KEY = "EMPTY"     # local servers without auth; the SDK refuses an empty key
MAX_RESPONSE_BYTES = 4 * 1024 * 1024   # one answer's body after decompression; a real one is a few KB


# ---- secrets where a name or a URL belongs ---------------------------------------------------------

_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET_QUERY = re.compile(r"key|token|secret|passw|signature|auth", re.IGNORECASE)


def looks_like_key(value: str) -> bool:
    """Whether VALUE looks like an API key rather than an environment variable's name: a provider's "sk-"
    prefix, anything a shell variable cannot be called, or a random-looking token (random_token)."""
    return value.lower().startswith(("sk-", "sk_")) or not _VARIABLE_NAME.fullmatch(value) or random_token(value)


def random_token(value: str) -> bool:
    """A long run (between underscores or dashes) of letters mixed with digits, or of mixed case, as random
    tokens are, or 40 characters without a separator; names are words: DEEPSEEK_API_KEY, MEDKD_KEY_2, key.txt."""
    for part in re.split(r"[_\-]", value):
        if len(part) >= 16 and any(c.isalpha() for c in part) and any(c.isdigit() for c in part):
            return True
        if len(part) >= 20 and any(c.islower() for c in part) and any(c.isupper() for c in part):
            return True
    return len(value) >= 40 and not re.search(r"[_\-./]", value)


def _secret_problems(settings: ClientSettings | EndpointSettings) -> list[tuple[str, bool, str]]:
    """The checks that keep a key out of the recipe's values: each names the key and the fix, never the value."""
    env, key_file, url = settings.api_key_env, settings.api_key_file, settings.base_url
    # A path has a slash or a dot somewhere (key.txt, ~/.keys/deepseek); a bare token is a pasted key.
    file_is_key = key_file is not None and (key_file.lower().startswith(("sk-", "sk_")) or (
        "/" not in key_file and "." not in key_file and random_token(key_file)))
    return [
        ("api_key_env", env is None or not looks_like_key(env),
         "must name an environment variable, not hold the key itself; export the key and name the variable"),
        ("api_key_file", not file_is_key,
         "must name a file holding the key, not hold the key itself; write the key to a file and name the file"),
        ("base_url", url is None or not _url_has_credentials(url),
         "must not hold credentials (user:password@, or a key in the query); export the key and name the "
         "variable in api_key_env"),
    ]


def _url_has_credentials(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "@" in url
    if "@" in parts.netloc:
        return True
    return any(_SECRET_QUERY.search(name) for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))


# ---- settings ------------------------------------------------------------------------------------

@dataclass
class EndpointSettings:
    """One item of `client.endpoints`: an endpoint asked alongside the others (replicas, several keys).

    Keys left unset take the client section's value (model, key variable, concurrency, limits); a
    base_url of null is the server the recipe starts. token_cap is this endpoint's share of a run's spend.
    """

    base_url: str | None = None
    name: str | None = None              # in logs and the summary; default host:port
    model: str | None = None             # the name this endpoint serves; default client.model
    api_key_env: str | None = None
    api_key_file: str | None = None
    concurrency: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    token_cap: int | None = None         # prompt + completion tokens this run may spend here; null = no cap

    def __post_init__(self) -> None:
        checks = [("concurrency", self.concurrency is None or self.concurrency >= 1, "must be at least 1 or null"),
                  ("requests_per_minute", self.requests_per_minute is None or self.requests_per_minute > 0,
                   "must be positive or null"),
                  ("tokens_per_minute", self.tokens_per_minute is None or self.tokens_per_minute > 0,
                   "must be positive or null"),
                  ("token_cap", self.token_cap is None or self.token_cap >= 1, "must be at least 1 or null"),
                  *_secret_problems(self)]
        for name, ok, problem in checks:
            if not ok:
                raise ValueError(f"key '{name}': {problem}")


@dataclass
class ClientSettings:
    """The `client:` section of teacher, soft-label and predict recipes.

    One endpoint: base_url, model, the key and the limits here. Several: list them under `endpoints`
    (base_url stays null); each takes the keys it leaves unset from here.
    """

    base_url: str | None = None          # e.g. https://api.deepseek.com/v1; None when the recipe starts a server
    model: str | None = None             # the name the endpoint serves; None = the started server's served_model_name
    api_key_env: str | None = None       # NAME of the environment variable holding the key (never the key)
    api_key_file: str | None = None      # or a file holding only the key
    concurrency: int = 8                 # requests in flight at once (per endpoint)
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None   # prompt + max_tokens, settled against the usage reported
    request_timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    max_retries: int = 8                 # per request, on 429/5xx/timeouts/dropped connections/garbled bodies
    backoff_base_s: float = 1.0          # first retry waits about this long, doubling up to backoff_max_s
    backoff_max_s: float = 60.0
    transport: Literal["aiohttp", "httpx"] = "aiohttp"   # aiohttp costs half the client CPU per request of httpx
    # Items started per request slot (concurrency): 2 keeps one item queued behind every request in
    # flight, so a slot that frees is refilled at once instead of waiting for the runner's next turn.
    in_flight_per_slot: int = 1
    # Items failing in a row (after their retries) that stop the run: the endpoint is down or refusing
    # everything, and going on would only pay for more failures. null = never stop.
    abort_after_failures: int | None = 50
    endpoints: list[EndpointSettings] | None = None   # several endpoints sharing the work; null = the one above
    token_cap: int | None = None         # prompt + completion tokens this run may spend, all endpoints together
    health_check_s: float = 1.0          # first GET /models after an endpoint failed; doubles up to 16 s
    # Several endpoints: each one with requests in flight is probed (GET /models) this often; two failed
    # probes in a row mark it down and send its in-flight requests to the others at once (a machine that
    # vanished sends no error, so they would wait out request_timeout_s). null = no probes.
    probe_s: float | None = 15.0
    # The most bytes one response body may take, after decompression, counted while it is read: a bigger one
    # (a gzip bomb, a body that never ends, a runaway answer) fails that request, "response over
    # max_response_bytes", and is never cached. Soft labels with many log-probs need more (their recipes say).
    max_response_bytes: int = MAX_RESPONSE_BYTES

    def __post_init__(self) -> None:
        checks = [("concurrency", self.concurrency >= 1, "must be at least 1"),
                  ("requests_per_minute", self.requests_per_minute is None or self.requests_per_minute > 0,
                   "must be positive or null"),
                  ("tokens_per_minute", self.tokens_per_minute is None or self.tokens_per_minute > 0,
                   "must be positive or null"),
                  ("request_timeout_s", self.request_timeout_s > 0, "must be positive"),
                  ("connect_timeout_s", self.connect_timeout_s > 0, "must be positive"),
                  ("max_retries", self.max_retries >= 0, "must be 0 or more"),
                  ("backoff_base_s", self.backoff_base_s > 0, "must be positive"),
                  ("backoff_max_s", self.backoff_max_s >= self.backoff_base_s, "must be at least backoff_base_s"),
                  ("in_flight_per_slot", self.in_flight_per_slot >= 1, "must be at least 1"),
                  ("abort_after_failures", self.abort_after_failures is None or self.abort_after_failures >= 1,
                   "must be at least 1 or null"),
                  ("endpoints", self.endpoints is None or len(self.endpoints) >= 1, "must list at least one or be null"),
                  ("endpoints", not (self.endpoints and self.base_url),
                   "set client.base_url or client.endpoints, not both"),
                  ("token_cap", self.token_cap is None or self.token_cap >= 1, "must be at least 1 or null"),
                  ("health_check_s", self.health_check_s > 0, "must be positive"),
                  ("probe_s", self.probe_s is None or self.probe_s > 0, "must be positive or null"),
                  ("max_response_bytes", self.max_response_bytes >= 1024, "must be at least 1024"),
                  *_secret_problems(self)]
        for name, ok, problem in checks:
            if not ok:
                raise ValueError(f"key 'client.{name}': {problem}")
        if self.endpoints is not None:
            self.endpoints = [_endpoint_item(item, i) for i, item in enumerate(self.endpoints)]
            names = [endpoint.name for endpoint in self.resolved()]
            if len(set(names)) < len(names):
                raise ValueError(f"key 'client.endpoints': two endpoints share a name ({', '.join(names)}); give "
                                 f"each a different base_url or name")

    def resolved(self) -> list[EndpointSettings]:
        """Every endpoint with all its keys filled in (one, from this section, when `endpoints` is null)."""
        items = self.endpoints if self.endpoints is not None else [EndpointSettings(base_url=self.base_url)]
        inherited = {"model": self.model, "api_key_env": self.api_key_env, "api_key_file": self.api_key_file,
                     "concurrency": self.concurrency, "requests_per_minute": self.requests_per_minute,
                     "tokens_per_minute": self.tokens_per_minute}
        out = []
        for i, item in enumerate(items):
            values = {key: getattr(item, key) if getattr(item, key) is not None else default
                      for key, default in inherited.items()}
            if item.api_key_env or item.api_key_file:    # an endpoint naming its own key takes none from above
                values.update(api_key_env=item.api_key_env, api_key_file=item.api_key_file)
            name = item.name or _host(item.base_url) or ("server" if len(items) == 1 else f"endpoint{i}")
            out.append(EndpointSettings(base_url=item.base_url, name=name, token_cap=item.token_cap, **values))
        return out

    @property
    def total_concurrency(self) -> int:
        """Requests in flight at once over every endpoint."""
        return sum(endpoint.concurrency for endpoint in self.resolved())

    def only(self, endpoint: EndpointSettings) -> ClientSettings:
        """This section for one of its resolved endpoints alone (a stage's preflight asks each on its own)."""
        return dataclasses.replace(
            self, endpoints=None, base_url=endpoint.base_url, model=endpoint.model, api_key_env=endpoint.api_key_env,
            api_key_file=endpoint.api_key_file, concurrency=endpoint.concurrency, token_cap=None,
            requests_per_minute=endpoint.requests_per_minute, tokens_per_minute=endpoint.tokens_per_minute)

    def with_server(self, base_url: str) -> ClientSettings:
        """The started server's URL in place of the endpoint(s) without one."""
        if self.endpoints is None:
            return dataclasses.replace(self, base_url=base_url)
        endpoints = [dataclasses.replace(item, base_url=item.base_url or base_url) for item in self.endpoints]
        return dataclasses.replace(self, endpoints=endpoints)


def _host(base_url: str | None) -> str | None:
    if not base_url:
        return None
    netloc = base_url.split("://", 1)[-1].split("/", 1)[0]
    return netloc or None


def _endpoint_item(item: Any, index: int) -> EndpointSettings:
    """A `client.endpoints` item as EndpointSettings; a bad key as a ValueError naming client.endpoints.N.KEY."""
    from prep.config import RecipeError, build

    if isinstance(item, EndpointSettings):
        return item
    if not isinstance(item, dict):
        raise ValueError(f"key 'client.endpoints.{index}': expected a mapping (base_url, api_key_env, ...), "
                         f"got {type(item).__name__}")
    try:
        return build(EndpointSettings, item, "", f"client.endpoints.{index}.")
    except RecipeError as err:
        problem = str(err).removeprefix(": ")
        if err.key is None:   # a range check: "key 'concurrency': ..." from __post_init__
            problem = problem.replace("key '", f"key 'client.endpoints.{index}.", 1)
        raise ValueError(problem) from None


# ---- errors and secrets --------------------------------------------------------------------------

class ClientError(RuntimeError):
    """A problem the user must fix (endpoint, model, key): one sentence, and the run stops."""


class RequestFailed(RuntimeError):
    """One request gave up (retries spent, or refused as bad); the item fails, the run goes on."""

    def __init__(self, message: str, reason: str, retries: int):
        super().__init__(message)
        self.reason, self.retries = reason, retries


def redact(text: str, secret: str | None) -> str:
    if secret and secret != PLACEHOLDER_KEY and len(secret) >= 4:
        text = text.replace(secret, "***")
    return text


def key_source(settings: ClientSettings | EndpointSettings) -> str:
    if settings.api_key_env:
        return f"environment variable {settings.api_key_env}"
    if settings.api_key_file:
        return f"key file {settings.api_key_file}"
    return "no key (set client.api_key_env or client.api_key_file)"


def resolve_api_key(settings: ClientSettings | EndpointSettings) -> str:
    """The key from the variable or file the recipe names; a placeholder for endpoints without auth."""
    if settings.api_key_env:
        value = os.environ.get(settings.api_key_env, "").strip()
        if value:
            return value
        if not settings.api_key_file:
            raise ClientError(f"environment variable {settings.api_key_env} is not set; export the API key for "
                              f"{settings.base_url or 'the endpoint'} in it (or name a key file in "
                              f"client.api_key_file)")
    if settings.api_key_file:
        path = Path(settings.api_key_file).expanduser()
        try:
            value = path.read_text(encoding="utf-8-sig").strip()
        except OSError as err:
            raise ClientError(f"cannot read the API key file {path} ({err.strerror}); fix client.api_key_file") \
                from None
        if not value:
            raise ClientError(f"the API key file {path} is empty; put the key in it or fix client.api_key_file")
        return value
    return PLACEHOLDER_KEY

