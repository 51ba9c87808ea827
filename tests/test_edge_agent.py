"""The headless edge agent against the real verifier on loopback: `wisp-edge generate` as other tools
call it, the local OpenAI-compatible API driven by the official OpenAI client, drafting with no
verifier (`--allow-local`), and a storm of 429s survived without losing a token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODELS, ROOT
from tests.live_server import LiveServer, free_port
from wisp_cloud.generate import generate
from wisp_cloud.tokenizer import load_tokenizer
from wisp_edge.health import wait_healthy


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODELS / "target")


def _edge(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    environment["WISP_EDGE_CONFIG"] = os.devnull + ".absent"  # no user config file in tests
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "wisp_edge.cli", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def test_generate_json_continues_raw_text_exactly_as_the_target(verifier, tokenizer, target_model):
    prompt = "The three primary colours are"
    run = _edge("generate", "--server", verifier.url, "--prompt", prompt, "--max-tokens", "24",
                "--temperature", "0", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    ids = tokenizer.encode(prompt).ids  # the target tokenizer's default: no BOS for SmolLM2
    want = generate(target_model, ids, max_new_tokens=24, eos_ids=(2,))
    assert out["token_ids"] == [t for t in want if t != 2]
    assert out["text"] == tokenizer.decode(out["token_ids"])
    assert out["stats"]["rounds"] >= 1 and out["stats"]["new_tokens"] == len(want)


def test_generate_reports_the_stats_of_an_answer_that_ends_with_eos(verifier, q4_pair, target_model):
    """A chat answer ends with EOS before the token budget: the statistics printed are that answer's, and the
    session is closed cleanly (no generator left to be collected after the client is gone)."""
    question = "What is the capital of France?"
    run = _edge("generate", "--server", verifier.url, "--chat", question, "--max-tokens", "64", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    want = generate(target_model, q4_pair.chat_prompt_ids(question), max_new_tokens=64, eos_ids=(2,))
    assert want[-1] == 2 and len(want) < 64  # the target ends this answer itself
    assert out["token_ids"] == want[:-1]
    assert out["stats"]["new_tokens"] == len(want) and out["stats"]["rounds"] >= 1
    assert "Exception ignored" not in run.stderr and "Traceback" not in run.stderr


def test_generate_fails_readably_without_a_verifier():
    run = _edge("generate", "--server", f"http://127.0.0.1:{free_port()}", "--prompt", "Hi", "--max-wait-s", "1",
                "--json")
    assert run.returncode != 0 and "verifier" in run.stderr.lower() and "Traceback" not in run.stderr


def test_allow_local_drafts_alone_and_marks_every_token_unverified():
    run = _edge("generate", "--server", f"http://127.0.0.1:{free_port()}", "--prompt", "Once upon a time",
                "--max-tokens", "12", "--max-wait-s", "1", "--allow-local", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert len(out["token_ids"]) >= 1 and out["stats"]["unverified_tokens"] == out["stats"]["new_tokens"] >= 1


def test_bench_compares_policies_with_the_same_tokens(verifier):
    run = _edge("bench", "--server", verifier.url, "--policies", "wisp,fixed,sled", "--rtt", "0,200",
                "--prompts", "1", "--tokens", "16", "--repeats", "2", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["repeats"] == 2
    assert report["lossless"] and report["drafting_tokens_per_s"] > 0 and report["base_rtt_ms"] > 0
    assert set(report["results"]) == {"0", "200"}
    for extra, by_policy in report["results"].items():
        assert set(by_policy) == {"wisp", "fixed", "sled"}
        for row in by_policy.values():
            assert row["same_output"] and row["tokens"] >= 1 and row["tokens_per_s"] > 0
            assert row["controller_us_per_token"] >= 0 and row["wasted_ms_per_token"] >= 0
            runs = row["tokens_per_s_runs"]  # each policy ran twice, and the row is their median
            assert len(runs) == 2 and min(runs) <= row["tokens_per_s"] <= max(runs)
            assert row["tokens"] == 2 * 16
    # 200 ms more per round trip (several rounds, over a second in all) costs time: the same tokens come slower.
    assert report["results"]["200"]["fixed"]["tokens_per_s"] < report["results"]["0"]["fixed"]["tokens_per_s"]


@pytest.fixture(scope="module")
def edge_api(verifier, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("edge") / "edge.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    env["WISP_EDGE_DECODE_WHILE_PREFILLING"] = "false"  # drafting from the first round, so the counters have drafts
    proc = subprocess.Popen([sys.executable, "-m", "wisp_edge.cli", "serve", "--server", verifier.url,
                             "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if not wait_healthy(url, 120, proc=proc):
        proc.kill()
        pytest.fail("wisp-edge serve did not become healthy")
    yield url
    proc.terminate()
    proc.wait(15)


def test_the_official_openai_client_talks_to_the_edge(edge_api, tokenizer, target_model, q4_pair):
    from openai import OpenAI

    client = OpenAI(base_url=f"{edge_api}/v1", api_key="unused")
    assert client.models.list().data[0].id == "SmolLM2-135M-Instruct"
    prompt = "The capital of Italy is"
    completion = client.completions.create(model="default", prompt=prompt, max_tokens=12, temperature=0)
    want = generate(target_model, tokenizer.encode(prompt).ids, max_new_tokens=12, eos_ids=(2,))
    assert completion.choices[0].text == tokenizer.decode([t for t in want if t != 2], skip_special_tokens=True)

    question = "What is the capital of France?"
    greedy = generate(target_model, q4_pair.chat_prompt_ids(question), max_new_tokens=30, eos_ids=(2,))
    stream = client.chat.completions.create(model="default", messages=[{"role": "user", "content": question}],
                                            max_tokens=30, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == tokenizer.decode(greedy, skip_special_tokens=True)
    assert len([p for p in pieces if p]) > 1

    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{edge_api}/metrics").text)}
    assert all(name.startswith("wisp_edge_") for name in families)
    values = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
    assert values["wisp_edge_drafts_total"] >= 2
    assert values["wisp_edge_draft_tokens_total"] >= values["wisp_edge_accepted_tokens_total"] > 0
    per_position = [s for s in families["wisp_edge_accepted_per_position"].samples if s.name.endswith("_total")]
    assert sum(s.value for s in per_position) == values["wisp_edge_accepted_tokens_total"]


def test_a_429_storm_is_survived_without_losing_a_token(tmp_path, profile_path, q4_pair, target_model):
    from wisp_edge.agent import EdgeAgent
    from wisp_edge.drafters import load_drafter
    from wisp_edge.settings import EdgeSettings

    with LiveServer("--threads", "1", "--profile", str(profile_path), "--max-backlog-ms", "1",
                    "--log-level", "warning", log_path=tmp_path / "log") as server:
        questions = ["Name a fruit.", "Name a colour.", "Name a planet."]
        results: dict[int, list[int]] = {}
        together = threading.Barrier(len(questions))

        def run(i: int) -> None:
            drafter = q4_pair.drafter if i == 0 else load_drafter("q4", n_threads=1)
            agent = EdgeAgent(EdgeSettings(server=server.url, max_wait_s=120), drafter=drafter)
            prompt = agent.chat_ids([{"role": "user", "content": questions[i]}])
            together.wait()  # every session opens at once: the later ones meet a backlog and get 429
            results[i] = [t.id for t in agent.generate(prompt, max_new_tokens=16)]
            agent.close()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rejected = sum(s.value for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
                       for s in f.samples if s.name == "wisp_rejected_requests_total")
        for i, q in enumerate(questions):
            assert results[i] == generate(target_model, q4_pair.chat_prompt_ids(q), max_new_tokens=16, eos_ids=(2,))
        assert rejected >= 1  # the storm happened and was ridden out
