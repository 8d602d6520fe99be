"""prep.api against a real local HTTP server that injects faults: retries, limits, preflight, exactly-once cache."""
import asyncio
import json
import re
import time
import traceback

import pytest

from prep.answers import (
    ANSWER_REGEX,
    Answer,
    StructuredOutput,
    answer_json,
    answer_regex,
    answer_schema,
    parse_answer,
    structured_output_params,
)
from prep.api.cache import load_cache, run_cached
from prep.api.pool import ChatClient, later_than_waiting
from prep.api.preflight import check_endpoint
from prep.api.settings import ClientError, ClientSettings, RequestFailed, resolve_api_key
from prep.testing.fault_server import FaultServer

MESSAGES = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "病例：咽痛伴发热2天。"}]


def settings_for(server: FaultServer, **overrides) -> ClientSettings:
    values = dict(base_url=server.base_url, model=server.model, concurrency=2, request_timeout_s=1.0,
                  max_retries=3, backoff_base_s=0.05, backoff_max_s=0.2)
    return ClientSettings(**{**values, **overrides})


async def ask(settings: ClientSettings, count: int = 1, messages=MESSAGES, **params):
    async with ChatClient(settings) as client:
        results = await asyncio.gather(*(client.chat(messages, max_tokens=50, **params) for _ in range(count)))
        return results, client.stats


# ---- the answer constraint ----------------------------------------------------------------------

def test_unbounded_regex_is_the_answers_module_regex_and_bounds_are_enforced():
    assert answer_regex() == ANSWER_REGEX
    bounded = answer_regex(max_reason_chars=5, max_diseases_chars=3)
    assert re.fullmatch(bounded, answer_json(Answer("1. 发热", "肺炎")))
    assert re.fullmatch(bounded, answer_json(Answer("1. 发热咽痛", "肺炎"))) is None       # reason over 5 chars
    assert re.fullmatch(bounded, answer_json(Answer("发热", "社区获得性肺炎"))) is None      # diseases over 3 chars
    assert re.fullmatch(ANSWER_REGEX, answer_json(Answer("1. 发热咽痛" * 50, "社区获得性肺炎")))


def test_structured_output_params_per_kind():
    regex = structured_output_params(StructuredOutput("regex", 40, 12))
    assert regex == {"extra_body": {"structured_outputs": {"regex": answer_regex(40, 12)}}}
    schema = structured_output_params(StructuredOutput("json_schema", 40, None))["response_format"]
    assert schema["json_schema"]["schema"] == answer_schema(40, None)
    assert schema["json_schema"]["schema"]["properties"]["reason"]["maxLength"] == 40
    assert "maxLength" not in schema["json_schema"]["schema"]["properties"]["diseases"]
    assert structured_output_params(StructuredOutput("json_object")) == {"response_format": {"type": "json_object"}}
    assert structured_output_params(StructuredOutput("none")) == {}


def test_constraint_reaches_the_server_in_the_request_body(fault_server):
    params = structured_output_params(StructuredOutput("regex", 40, 12))
    asyncio.run(ask(settings_for(fault_server), temperature=0.5, seed=7, top_p=None, **params))
    body = fault_server.requests[0]
    assert body["structured_outputs"] == {"regex": answer_regex(40, 12)}
    assert body["temperature"] == 0.5 and body["seed"] == 7 and "top_p" not in body   # None means "not sent"
    assert body["model"] == fault_server.model and body["messages"] == MESSAGES


# ---- one fault at a time --------------------------------------------------------------------------

FAULTS = [  # script item, the retry reason counted
    ("429", "429"),
    ("429 retry-after=1", "429"),
    ("500", "500"),
    ("503", "503"),
    ("504", "504"),
    ("slow 3", "timeout"),
    ("reset", "connection"),
    ("truncated", "connection"),
    ("malformed", "malformed"),
]


@pytest.mark.parametrize("fault,reason", FAULTS, ids=[fault for fault, _ in FAULTS])
def test_each_fault_is_retried_once_and_counted(fault_server, fault, reason):
    fault_server.push(fault)
    (result,), stats = asyncio.run(ask(settings_for(fault_server)))
    gap = fault_server.arrivals[1] - fault_server.arrivals[0]       # the wait before the retry, as the server saw it
    assert parse_answer(result.text).diseases                      # the retry got a valid answer
    assert result.retries == 1 and stats.retries == 1 and dict(stats.retry_reasons) == {reason: 1}
    assert fault_server.received == 2 and stats.requests == 2 and stats.succeeded == 1
    assert result.usage["prompt_tokens"] > 0 and stats.completion_tokens == result.usage["completion_tokens"]
    if "retry-after" in fault:
        assert 1.0 <= gap < 1.5                                    # Retry-After honoured over the 0.05 s backoff
    elif fault == "slow 3":
        assert 1.0 <= gap < 1.5                                    # the 1 s timeout, then the short backoff
    else:
        assert gap < 0.5


def test_retries_give_up_after_the_budget(fault_server):
    fault_server.push(*["503"] * 4)
    with pytest.raises(RequestFailed, match=r"gave up after 4 attempts; last: 503") as caught:
        asyncio.run(ask(settings_for(fault_server, max_retries=3)))
    assert caught.value.reason == "503" and caught.value.retries == 3 and fault_server.received == 4


@pytest.mark.parametrize("status", ["400", "422", "501"])
def test_a_request_refused_as_bad_is_not_retried(fault_server, status):
    fault_server.push(status)
    with pytest.raises(RequestFailed, match=rf"HTTP {status}"):
        asyncio.run(ask(settings_for(fault_server)))
    assert fault_server.received == 1


def test_backoff_doubles_with_jitter_up_to_the_cap():
    client = ChatClient(ClientSettings(base_url="http://127.0.0.1:9/v1", model="m", backoff_base_s=1, backoff_max_s=5), seed=1)
    delays = [[client._delay(retries, None) for _ in range(200)] for retries in range(5)]
    for retries, sample in enumerate(delays):
        ceiling = min(5, 2 ** retries)
        assert ceiling / 2 <= min(sample) and max(sample) <= ceiling and len(set(sample)) > 100
    assert client._delay(0, 7.5) == 7.5                              # Retry-After wins
    asyncio.run(client.close())


def test_a_429_holds_back_every_request_not_only_the_refused_one(fault_server):
    fault_server.push("429 retry-after=1")
    started = time.monotonic()

    async def staggered():
        async with ChatClient(settings_for(fault_server, concurrency=4)) as client:
            first = asyncio.ensure_future(client.chat(MESSAGES))
            deadline = time.monotonic() + 10
            while not client.stats.retry_reasons["429"]:            # until the client has taken the 429 in
                assert time.monotonic() < deadline and not first.done(), "no 429 reached the client"
                await asyncio.sleep(0.005)
            later = await asyncio.gather(*(client.chat(MESSAGES) for _ in range(3)))
            return [await first, *later]

    asyncio.run(staggered())
    after_refusal = [t - started for t in fault_server.arrivals[1:]]
    assert len(after_refusal) == 4 and min(after_refusal) >= 0.95


# ---- rate limits ------------------------------------------------------------------------------------

def test_requests_per_minute_limit_paces_the_requests(fault_server):
    asyncio.run(ask(settings_for(fault_server, concurrency=8, requests_per_minute=600), count=30))  # 10/s, burst 10
    arrivals = [t - fault_server.arrivals[0] for t in fault_server.arrivals]
    assert len(arrivals) == 30 and arrivals[-1] >= 1.8, arrivals      # 20 beyond the burst at 10/s
    for start in arrivals:                                            # no 1-second window over burst + rate
        assert sum(start <= t < start + 1.0 for t in arrivals) <= 21, arrivals


def test_tokens_per_minute_limit_paces_by_tokens_and_settles_on_usage(fault_server):
    results, stats = asyncio.run(ask(settings_for(fault_server, concurrency=8, tokens_per_minute=12000), count=8))
    span = fault_server.arrivals[-1] - fault_server.arrivals[0]
    used = [r.usage["prompt_tokens"] + r.usage["completion_tokens"] for r in results]
    rate = 12000 / 60                                                  # 200 tokens/s, a bucket of 200
    # Each request is charged its estimate (prompt characters + max_tokens 50) up front and settled
    # to the usage reported afterwards, so the requests spread over about (tokens used - bucket) / rate.
    assert stats.prompt_tokens + stats.completion_tokens == sum(used)
    assert (sum(used) - used[0] - rate) / rate * 0.8 <= span <= (sum(used) + 8 * 50) / rate * 1.5, (used, span)


# ---- preflight and fatal errors ------------------------------------------------------------------------

def test_preflight_lists_models_and_names_a_missing_model(fault_server):
    assert check_endpoint(settings_for(fault_server)) == [fault_server.model]
    with pytest.raises(ClientError, match=r"model 'no-such-model' is not served at .* \(it serves: fault-model\); fix client.model"):
        check_endpoint(settings_for(fault_server, model="no-such-model"))
    assert fault_server.received == 0


def test_preflight_names_an_unreachable_endpoint():
    from prep.api.process import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    started = time.monotonic()
    with pytest.raises(ClientError, match=rf"cannot reach {re.escape(url)} \(.*\); check client.base_url"):
        check_endpoint(ClientSettings(base_url=url, model="m"))
    assert time.monotonic() - started < 10


def test_a_wrong_model_mid_run_stops_instead_of_retrying():
    with FaultServer(list_models=False) as server:   # an endpoint that does not list models: preflight passes
        assert check_endpoint(settings_for(server, model="typo")) is None
        with pytest.raises(ClientError, match=r"has no model 'typo'.*check client.model"):
            asyncio.run(ask(settings_for(server, model="typo")))
        assert server.received == 1


def test_a_refused_key_stops_with_a_sentence_that_never_repeats_the_key(monkeypatch):
    wrong = "sk-wrong-0123456789abcdef"
    monkeypatch.setenv("MEDKD_TEST_KEY", wrong)
    with FaultServer(api_key="sk-right") as server:                  # it echoes the key it was given
        settings = settings_for(server, api_key_env="MEDKD_TEST_KEY")
        for attempt in (lambda: check_endpoint(settings), lambda: asyncio.run(ask(settings))):
            with pytest.raises(ClientError) as caught:
                attempt()
            message = str(caught.value)
            assert "refused the API key (HTTP 401" in message and "environment variable MEDKD_TEST_KEY" in message
            assert wrong not in message and "***" in message
            # Nor in any error chained to it: the whole traceback a user would see is free of the key.
            assert wrong not in "".join(traceback.format_exception(caught.value))


def test_api_key_comes_from_the_named_variable_or_file(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDKD_ABSENT_KEY", raising=False)
    with pytest.raises(ClientError, match=r"^environment variable MEDKD_ABSENT_KEY is not set; export the API key"):
        resolve_api_key(ClientSettings(base_url="https://x/v1", model="m", api_key_env="MEDKD_ABSENT_KEY"))
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    assert resolve_api_key(ClientSettings(api_key_env="MEDKD_ABSENT_KEY", api_key_file=str(key_file))) == "sk-from-file"
    monkeypatch.setenv("MEDKD_PRESENT_KEY", "sk-from-env")
    assert resolve_api_key(ClientSettings(api_key_env="MEDKD_PRESENT_KEY")) == "sk-from-env"
    key_file.write_text("  \n")
    with pytest.raises(ClientError, match="is empty"):
        resolve_api_key(ClientSettings(api_key_file=str(key_file)))
    client = ChatClient(ClientSettings(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="MEDKD_PRESENT_KEY"))
    assert "sk-from-env" not in repr(client) and "sk-from-env" not in repr(client.settings)
    asyncio.run(client.close())


def test_the_key_is_sent_as_a_bearer_token(monkeypatch):
    monkeypatch.setenv("MEDKD_TEST_KEY", "sk-right")
    with FaultServer(api_key="sk-right") as server:
        (result,), _ = asyncio.run(ask(settings_for(server, api_key_env="MEDKD_TEST_KEY")))
        assert parse_answer(result.text) and server.received == 1


def test_settings_reject_nonsense_values():
    with pytest.raises(ValueError, match=r"client.concurrency': must be at least 1"):
        ClientSettings(concurrency=0)
    with pytest.raises(ValueError, match=r"client.backoff_max_s': must be at least backoff_base_s"):
        ClientSettings(backoff_base_s=5, backoff_max_s=1)
    with pytest.raises(ValueError, match=r"client.in_flight_per_slot': must be at least 1"):
        ClientSettings(in_flight_per_slot=0)
    with pytest.raises(ValueError, match=r"client.abort_after_failures': must be at least 1 or null"):
        ClientSettings(abort_after_failures=0)


# ---- the exactly-once runner -----------------------------------------------------------------------

def test_run_cached_appends_each_item_once_and_skips_them_on_rerun(tmp_path):
    cache, calls = tmp_path / "cache.jsonl", []

    async def work(item):
        calls.append(item)
        await asyncio.sleep(0.001 * (item % 3))
        return {"item": item}

    items = list(range(20)) + [5, 7]                  # duplicates are asked once
    report = asyncio.run(run_cached(items, str, work, cache, max_in_flight=4, progress=False))
    assert sorted(calls) == list(range(20)) and report.finished == 20 and report.cached == 2
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert sorted(row["item"] for row in rows) == list(range(20)) and all(row["key"] == str(row["item"]) for row in rows)
    calls.clear()
    report = asyncio.run(run_cached(items + [20], str, work, cache, progress=False))
    assert calls == [20] and report.asked == 1 and report.cached == 22


def test_run_cached_drops_a_torn_last_line_and_redoes_that_item(tmp_path):
    cache = tmp_path / "cache.jsonl"
    cache.write_text('{"key":"0","item":0}\n{"key":"1","item":1}\n{"key":"2","it', encoding="utf-8")  # killed mid-write
    calls = []

    async def work(item):
        calls.append(item)
        return {"item": item}

    asyncio.run(run_cached(range(4), str, work, cache, progress=False))
    assert calls == [2, 3]
    assert sorted(load_cache(cache)) == ["0", "1", "2", "3"] and len(cache.read_text().splitlines()) == 4


def test_run_cached_reports_failures_without_caching_them_and_stops_on_fatal_errors(tmp_path):
    cache = tmp_path / "cache.jsonl"

    async def flaky(item):
        if item == 3:
            raise RequestFailed("gave up after 2 attempts; last: 503 (scripted 503)", "503", 1)
        return {"item": item}

    report = asyncio.run(run_cached(range(6), str, flaky, cache, progress=False, label_fn=lambda i: i))
    assert [f["item"] for f in report.failed] == [3] and report.finished == 5 and "3" not in load_cache(cache)

    async def fatal(item):
        raise ClientError("the endpoint refused the API key")

    with pytest.raises(ClientError, match="refused the API key"):
        asyncio.run(run_cached([3], str, fatal, cache, progress=False))

    async def always_failing(item):
        raise RequestFailed("gave up", "503", 1)

    with pytest.raises(ClientError, match=r"^3 items in a row failed"):
        asyncio.run(run_cached(range(100, 110), str, always_failing, cache, progress=False, abort_after_failures=3,
                               max_in_flight=1))
    # Without a limit (the stages pass their recipe's client.abort_after_failures) every item is tried.
    report = asyncio.run(run_cached(range(200, 260), str, always_failing, cache, progress=False, max_in_flight=1))
    assert len(report.failed) == 60 and report.finished == 0


# ---- the end of a run on endpoints of different speeds ---------------------------------------------------------

def test_a_slow_free_slot_is_skipped_only_when_a_faster_endpoint_would_finish_what_is_left_sooner():
    fast = [(0.3, 32)]                                    # bench_teacher's two endpoints: 0.3 s and 0.6 s, 32 slots each
    assert later_than_waiting(0.6, fast, 1)               # the last request: 0.3 s after a fast slot frees beats 0.6 s
    assert later_than_waiting(0.6, fast, 31)              # 31 left: the fast slots answer them all in about 0.59 s
    assert not later_than_waiting(0.6, fast, 32)          # 32 or more: every slot of both is worth filling
    assert not later_than_waiting(0.3, [(0.6, 32)], 1)    # a slower endpoint is never worth waiting for
    assert not later_than_waiting(0.3, [(0.3, 32)], 1)    # nor an equal one
    assert not later_than_waiting(0.6, [], 1)             # nor nothing
    assert later_than_waiting(0.6, [(0.9, 8), (0.1, 2)], 5)   # any faster one counts: 0.1 x (1 + 5/2) = 0.35


def test_a_run_that_tells_the_client_its_backlog_answers_every_item_once_on_both_endpoints(tmp_path):
    cache = tmp_path / "cache.jsonl"

    async def run() -> tuple[dict, ChatClient]:
        endpoints = [{"base_url": fast.base_url, "name": "fast", "concurrency": 2},
                     {"base_url": slow.base_url, "name": "slow", "concurrency": 2}]
        settings = ClientSettings(model=fast.model, endpoints=endpoints, request_timeout_s=5.0)
        async with ChatClient(settings) as client:
            async def ask(item: int) -> dict:
                return {"text": (await client.chat(MESSAGES, max_tokens=5)).text}

            report = await run_cached(range(40), str, ask, cache, max_in_flight=4, progress=False, client=client)
            return report, client

    with FaultServer(latency_s=0.02) as fast, FaultServer(latency_s=0.3) as slow:
        report, client = asyncio.run(run())
    assert report.finished == 40 and not report.failed and client.backlog == 0
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert sorted(int(row["key"]) for row in rows) == list(range(40))
    assert fast.received + slow.received == 40 and slow.received >= 2     # both used, nothing asked twice
    assert client.endpoints[1].latency_s > client.endpoints[0].latency_s
