"""``trainer serve`` against the real OpenAI Python client: a server process on an ephemeral localhost port
(its first line says which), ready when ``/health`` answers. Completions (one prompt or several, greedy
and seeded) equal the engine's in-process output for the same checkpoint; streamed pieces add up to the
whole text; bad input is HTTP 400 naming the field, and does not disturb a request running beside it;
a client that leaves mid-stream frees its blocks."""

import http.client
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from trainer.infer import Request, SamplingParams, engine_for, inference_state, load_chunk
from trainer.infer.testing import save_checkpoint

openai = pytest.importorskip("openai")

BOUND_S = 600  # generous: a loaded machine starts Python and torch slowly
NAME = "tiny-test"


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=BOUND_S) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)
    except OSError:
        return 0, {}


def health(url: str, deadline: float) -> dict:
    """``/health``'s answer, asked again while the server is too busy to answer (up to ``deadline``)."""
    while True:
        status, body = get(f"{url}/health")
        if status == 200:
            return body
        assert time.monotonic() < deadline
        time.sleep(0.05)  # a poll interval


def post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=BOUND_S) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def reference(path: str, requests: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    """What the engine makes of ``requests`` in this process, as (text, finish_reason)."""
    with inference_state(1) as ps:
        chunk, _, tokenizer = load_chunk(path, ps)
        _, engine = engine_for(chunk, tokenizer)
        done = engine.generate([Request(p, SamplingParams(**kw)) for p, kw in requests])
        return [(c.text, c.finish_reason) for c in done]


@pytest.fixture(scope="module")
def server(tmp_path_factory, rank_harness):
    path = str(tmp_path_factory.mktemp("serve") / "ckpt")
    rank_harness.run(1, save_checkpoint, path, 1, max_seq_len=1024)
    command = [sys.executable, "-m", "trainer", "serve", "--load", path, "--port", "0", "--model-name", NAME]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        url, seen, deadline = None, [], time.monotonic() + BOUND_S
        while url is None:
            line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            seen.append(line)
            if "listening on " in line:
                url = line.split("listening on ")[1].split()[0]
        while get(f"{url}/health")[0] != 200:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            time.sleep(0.05)  # a poll interval, bounded by the deadline
        yield url, path
    finally:
        proc.terminate()
        proc.wait(timeout=BOUND_S)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0, timeout=BOUND_S)


def test_completions_equal_the_engine(run_ranks, server, client):
    path = server[1]
    single = client.completions.create(model=NAME, prompt="def add(a, b):", max_tokens=12, temperature=0)
    several = client.completions.create(
        model=NAME, prompt=["The quick brown", "x"], max_tokens=9, temperature=0.9, top_p=0.95, seed=11
    )
    stopped = client.completions.create(model=NAME, prompt="def add(a, b):", max_tokens=12, temperature=0,
                                        stop=[single.choices[0].text[4:6]])  # fmt: skip
    sampled = dict(max_tokens=9, temperature=0.9, top_p=0.95, seed=11)
    ((greedy, a, b, stop),) = run_ranks(1, reference, path, [
        ("def add(a, b):", dict(max_tokens=12, temperature=0)),
        ("The quick brown", sampled), ("x", sampled),
        ("def add(a, b):", dict(max_tokens=12, temperature=0, stop=(single.choices[0].text[4:6],))),
    ])  # fmt: skip
    assert (single.choices[0].text, single.choices[0].finish_reason) == greedy
    assert single.usage.prompt_tokens == len("def add(a, b):") and single.usage.completion_tokens == 12
    assert [(c.index, c.text, c.finish_reason) for c in several.choices] == [(0, *a), (1, *b)]
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == stop and stop[1] == "stop"
    assert single.model == NAME and single.object == "text_completion"


def test_streaming_adds_up_to_the_whole(client):
    whole = client.completions.create(model=NAME, prompt=["ab", "hello there"], max_tokens=20, temperature=0)
    pieces, finish = {0: "", 1: ""}, {}
    for chunk in client.completions.create(
        model=NAME, prompt=["ab", "hello there"], max_tokens=20, temperature=0, stream=True
    ):
        for choice in chunk.choices:
            pieces[choice.index] += choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert pieces == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}


BAD = [
    ("prompt", dict(prompt="")),
    ("prompt", dict(prompt="x" * 1100)),
    ("temperature", dict(prompt="x", temperature=-1)),
    ("max_tokens", dict(prompt="x", max_tokens=-3)),
    ("max_tokens", dict(prompt="x", max_tokens=10**9)),
    ("top_p", dict(prompt="x", top_p=1.5)),
    ("stop", dict(prompt="x", stop=[""])),
    ("frobnicate", dict(prompt="x", extra_body={"frobnicate": 1})),
]


@pytest.mark.parametrize(("field", "kwargs"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_input_is_400_naming_the_field(client, field, kwargs):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == field and field in err.value.body["message"]


def test_malformed_json_models_and_health(server, client):
    url, _ = server
    status, answer = post(f"{url}/v1/completions", b'{"prompt": "x",')
    assert status == 400 and "JSON" in answer["error"]["message"]
    assert [m.id for m in client.models.list()] == [NAME]
    assert get(f"{url}/health")[1]["status"] == "ok"


def test_a_bad_request_beside_a_good_one(client):
    def good():
        return client.completions.create(model=NAME, prompt="abc", max_tokens=30, temperature=0).choices[0]

    alone = good()
    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(good)
        bad = [pool.submit(client.completions.create, model=NAME, **kw) for _, kw in BAD[:4]]
        for future in bad:
            with pytest.raises(openai.BadRequestError):
                future.result()
        assert running.result() == alone


def test_a_client_that_leaves_frees_its_blocks(server):
    url, _ = server
    deadline = time.monotonic() + BOUND_S
    before = health(url, deadline)
    body = {"model": NAME, "prompt": "long", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=BOUND_S)
    connection.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the first event: the request is running
    connection.close()  # the client leaves
    while (now := health(url, deadline))["aborted"] == before["aborted"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)  # a poll interval, bounded by the deadline
    assert now["aborted"] == before["aborted"] + 1
    while (now := health(url, deadline))["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert now["free_blocks"] == now["total_blocks"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--load", "no-such-dir"], "--load no-such-dir: no complete checkpoint"),
        (["--load", ".", "--port", "70000"], "--port 70000: must be in [0, 65535]"),
        (["--load", ".", "--tp", "0"], "--tp 0: must be >= 1"),
    ],
)
def test_serve_refuses_bad_flags_before_starting(capsys, args, message):
    from trainer.cli import main

    assert main(["serve", *args]) == 2
    assert message in capsys.readouterr().err
