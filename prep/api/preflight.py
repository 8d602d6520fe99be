"""Endpoint preflight: one cheap GET /models that turns a wrong URL, model or key into one sentence before
any paid request."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

from prep.api.endpoint import Attempt, EndpointConnection, error_message, one_line
from prep.api.settings import ClientError, ClientSettings, EndpointSettings, key_source, resolve_api_key

log = logging.getLogger("medkd.client")


# ---- preflight -----------------------------------------------------------------------------------

async def check_endpoint_async(settings: ClientSettings, api_key: str | None = None, attempts: int = 2,
                               endpoint: EndpointSettings | None = None) -> list[str] | None:
    """GET /models once (one retry on a dropped connection): the models served, or None if the endpoint lists none.

    ENDPOINT: one of settings.resolved() (default: the only one). Raises ClientError naming the fix for
    an unreachable endpoint (EndpointUnreachable), a refused key or an unlisted model. The answer is read
    as every answer is (EndpointConnection.exchange): one deadline, at most client.max_response_bytes.
    """
    endpoint = endpoint or settings.resolved()[0]
    url, model = endpoint.base_url, endpoint.model
    secret = api_key if api_key is not None else resolve_api_key(endpoint)
    timeout = min(settings.request_timeout_s, 30.0)
    connection = EndpointConnection(endpoint, dataclasses.replace(
        settings, request_timeout_s=timeout, connect_timeout_s=min(settings.connect_timeout_s, timeout)), secret)
    problem, content, unreachable = None, None, False
    try:
        for attempt in range(attempts):
            try:
                status, _, body = await connection.get("/models", timeout)
            except Attempt as failed:
                if failed.reason in ("connection", "timeout"):
                    problem, unreachable = (f"cannot reach {url} ({failed.message}); check client.base_url and "
                                            f"that the server is running"), True
                else:
                    problem, unreachable = f"{url} sent an unusable answer to GET /models ({failed.message})", False
                    break
            else:
                message = error_message(body, secret)
                if status in (401, 403):
                    problem = (f"{url} refused the API key (HTTP {status}: {message}); "
                               f"check that {key_source(endpoint)} holds a valid key for this endpoint")
                    break
                if status in (404, 405):
                    return None  # some providers do not list models; the first request will tell
                if status < 400:
                    content = body
                    break
                problem = (f"{url} answered HTTP {status} to GET /models ({message}); "
                           f"check client.base_url or try again later")
            if attempt < attempts - 1:
                await asyncio.sleep(1.0)
    finally:
        await connection.close()
    if content is None:
        # Raised outside the except clauses: no chained error carries the server's raw words.
        raise (EndpointUnreachable if unreachable else ClientError)(problem)
    try:
        data = json.loads(content)
        served = [str(item["id"]) for item in data["data"]]
    except (ValueError, KeyError, TypeError):
        return None
    if served and model not in served:
        shown = [one_line(name, secret, 80) for name in served[:10]]
        raise ClientError(f"model '{model}' is not served at {url} (it serves: {', '.join(shown)}); fix client.model")
    return served


class EndpointUnreachable(ClientError):
    """The preflight could not connect (as opposed to a refused key or a missing model)."""


def check_endpoint(settings: ClientSettings, api_key: str | None = None) -> list[str] | None:
    """Synchronous preflight of every endpoint, for callers outside an event loop: the first one's models."""
    endpoints = settings.resolved()
    if len(endpoints) == 1:
        return asyncio.run(check_endpoint_async(settings, api_key))
    return [asyncio.run(check_endpoint_async(settings, endpoint=endpoint)) for endpoint in endpoints][0]


def check_endpoints(settings: ClientSettings, api_keys: dict[str, str]) -> list[str]:
    """Preflight of each endpoint (several): the names of those unreachable now, which join when they answer.

    A refused key or a missing model stops the run (ClientError); so does no endpoint answering.
    """
    down, problems = [], []
    for endpoint in settings.resolved():
        try:
            asyncio.run(check_endpoint_async(settings, api_keys.get(endpoint.name), endpoint=endpoint))
        except EndpointUnreachable as err:
            down.append(endpoint.name)
            problems.append(str(err))
            log.warning("endpoint %s: %s; starting without it, it joins when it answers", endpoint.name, err)
    if len(down) == len(settings.resolved()):
        raise ClientError(problems[0] if len(problems) == 1 else f"no endpoint answers: {'; '.join(problems)}")
    return down


