"""Endpoint preflight: one cheap GET /models that turns a wrong URL, model or key into one sentence before
any paid request."""
from __future__ import annotations

import asyncio
import json
import logging

from prep.api.endpoint import describe_cause, server_message
from prep.api.settings import ClientError, ClientSettings, EndpointSettings, key_source, redact, resolve_api_key

log = logging.getLogger("medkd.client")


# ---- preflight -----------------------------------------------------------------------------------

async def check_endpoint_async(settings: ClientSettings, api_key: str | None = None, attempts: int = 2,
                               endpoint: EndpointSettings | None = None) -> list[str] | None:
    """GET /models once (one retry on a dropped connection): the models served, or None if the endpoint lists none.

    ENDPOINT: one of settings.resolved() (default: the only one). Raises ClientError naming the fix for
    an unreachable endpoint (EndpointUnreachable), a refused key or an unlisted model.
    """
    import httpx2
    from openai import APIConnectionError, APIStatusError, AsyncOpenAI

    endpoint = endpoint or settings.resolved()[0]
    url, model = endpoint.base_url, endpoint.model
    secret = api_key if api_key is not None else resolve_api_key(endpoint)
    timeout = min(settings.request_timeout_s, 30.0)
    client = AsyncOpenAI(base_url=url, api_key=secret, max_retries=0,
                         timeout=httpx2.Timeout(timeout, connect=min(settings.connect_timeout_s, timeout)))
    problem, response, unreachable = None, None, False
    try:
        for attempt in range(attempts):
            try:
                response = await client.get("/models", cast_to=httpx2.Response)
                break
            except APIStatusError as err:
                status, message = err.status_code, server_message(err, secret)
                if status in (401, 403):
                    problem = (f"{url} refused the API key (HTTP {status}: {message}); "
                               f"check that {key_source(endpoint)} holds a valid key for this endpoint")
                    break
                if status in (404, 405):
                    return None  # some providers do not list models; the first request will tell
                problem = (f"{url} answered HTTP {status} to GET /models ({message}); "
                           f"check client.base_url or try again later")
            except APIConnectionError as err:
                problem, unreachable = (f"cannot reach {url} ({redact(describe_cause(err), secret)}); "
                                        f"check client.base_url and that the server is running"), True
            if attempt < attempts - 1:
                await asyncio.sleep(1.0)
    finally:
        await client.close()
    if response is None:
        # Raised outside the except clauses: no chained SDK error carries the server's raw words.
        raise (EndpointUnreachable if unreachable else ClientError)(problem)
    try:
        data = json.loads(response.content)
        served = [str(item["id"]) for item in data["data"]]
    except (ValueError, KeyError, TypeError):
        return None
    if served and model not in served:
        raise ClientError(f"model '{model}' is not served at {url} (it serves: "
                          f"{', '.join(served[:10])}); fix client.model")
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


