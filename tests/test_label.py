"""label.py against a loopback OpenAI-compatible stub, on the planted-routing model (tests/planted.py).

The stub's explainer answers "LABEL: letter X" with X the token it sees marked most often; its scorer answers yes
for the windows that contain X. Planted experts receive the letters of one group, so a correct pipeline labels
each with one of its letters and scores near 1, while the same pipeline with the windows shuffled between experts
scores far lower. Nothing here reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import socket

import pandas as pd
import pytest
import torch

import label
from common.analysis import labelling as lab
from common.errors import InputError
from common.llm import ChatClient, RequestError, ResponseCache, TransientError
from tests.llm_stub import Stub
from tests.planted import GROUPS, planted_experts, save_planted, write_domains


@pytest.fixture(scope="module")
def stub():
    server = Stub()
    yield server
    server.close()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted-label")
    return save_planted(root / "model"), write_domains(root)


def _argv(planted, stub, out, *extra):
    model, specs = planted
    return ["--model", str(model), "--data", *specs, "--num_tokens", "300", "--seq_len", "64", "--batch_size", "8",
            "--layer", "1", "--top", "8", "--out", str(out), "--no-progress", "--api-base", stub.url, "--llm", "stub",
            "--api-key-env", "none", "--backoff", "0.01", "--timeout", "0.5", *extra]


def _run_dir(out):
    (folder,) = [p for p in out.glob("label/*/*/*") if p.is_dir()]
    return folder


def _letters(expert: int) -> str:
    """The letters planted on an expert at layer 1 (it is first or second choice of one group)."""
    return next(GROUPS[g] for g in range(len(GROUPS)) if expert in planted_experts(1, g))


# ------------------------------------------------------------------------------------------ end to end


def test_labels_score_far_above_the_shuffled_control_with_retries_and_cache(planted, stub, tmp_path, capsys):
    stub.reset()
    stub.failures = [429, 500, "timeout"]  # the first three requests fail once each; retries recover them
    cache = tmp_path / "cache"
    argv = _argv(planted, stub, tmp_path / "out", "--cache", str(cache))
    assert label.main(argv) == 0
    err = capsys.readouterr().err
    # Said before sending. The two experts of a planted group share their windows, so their prompts are asked once.
    assert (f"explainer: sending 24 windows in 6 requests to {stub.url}/chat/completions (model stub) "
            "(6 identical to another, asked once)") in err
    assert "not described" not in err
    run = _run_dir(tmp_path / "out")
    table = pd.read_csv(run / "labels_layer1.csv")
    assert list(table.columns) == ["layer", "expert", "label", "f1", "accuracy", "windows_explained",
                                   "windows_scored", "malformed", "failed"]
    live = table[table.expert < 12]
    assert len(table) == 14 and len(live) == 12
    assert (live.windows_explained == 4).all() and (live.windows_scored == 8).all()
    assert (live.malformed == 0).all() and (live.failed == 0).all()
    for row in live.itertuples():  # each label names one of the expert's own letters
        assert re.fullmatch(r"letter [a-x]", row.label) and row.label[-1] in _letters(row.expert), row
    assert live.f1.mean() > 0.9 and live.accuracy.mean() > 0.9
    dead = table[table.expert >= 12]  # never chosen: no windows, nothing sent
    assert dead.label.isna().all() and dead.f1.isna().all() and (dead.windows_explained == 0).all()
    info = json.loads((run / "run.json").read_text())
    assert info["llm"]["retries"] == 3 and info["llm"]["failed"] == 0 and info["llm"]["answered_from_cache"] == 0
    assert info["llm"]["requests_sent"] == stub.requests == 6 + 12 + 3  # explainer, scorer, retries

    doc = json.loads((run / "label_layer1_expert5.json").read_text())
    assert doc["label"] == table.set_index("expert").label[5] and doc["f1"] == table.set_index("expert").f1[5]
    explained = doc["explanation"]["windows"]
    assert [w["rank"] for w in explained] == [0, 2, 4, 6] and all(w["expert"] == 5 for w in explained)
    for w in explained:  # the marked tokens are exactly the expert's letters, each with 3 logit-lens tokens
        assert {a["token"] for a in w["active_tokens"]} <= set(_letters(5))
        assert w["marked"].count("<<") == len(w["active_tokens"]) > 0
        assert all(len(a["logit_lens"]) == 3 for a in w["active_tokens"])
        assert w["marked"].replace("\n", "\\n") in doc["explanation"]["prompt"][1]["content"]
    scored = doc["scoring"]["windows"]
    assert sum(w["belongs"] for w in scored) == 4 and len(scored) == 8
    assert all(w["expert"] == 5 for w in scored if w["belongs"])
    assert all(w["expert"] != 5 and "marked" not in w for w in scored if not w["belongs"])
    assert doc["scoring"]["requests"][0]["response"].startswith("1: ")

    # Re-running sends nothing: every answer comes from the cache, and the results are the same.
    before = stub.requests
    assert label.main(_argv(planted, stub, tmp_path / "again", "--cache", str(cache))) == 0
    assert stub.requests == before
    again = _run_dir(tmp_path / "again")
    assert json.loads((again / "run.json").read_text())["llm"]["answered_from_cache"] == 18
    assert (again / "labels_layer1.csv").read_bytes() == (run / "labels_layer1.csv").read_bytes()

    # The control: the same pipeline with the windows dealt to random experts scores far lower.
    assert label.main(_argv(planted, stub, tmp_path / "shuffled", "--cache", str(cache), "--shuffle-windows")) == 0
    shuffled = pd.read_csv(_run_dir(tmp_path / "shuffled") / "labels_layer1.csv")
    shuffled = shuffled[shuffled.expert < 12]
    assert shuffled.f1.mean() < 0.7 and live.f1.mean() - shuffled.f1.mean() > 0.3, (live.f1.mean(), shuffled.f1.mean())


def test_malformed_and_failed_answers_are_recorded(planted, stub, tmp_path):
    stub.reset()
    stub.broken_labels = set(_letters(5))  # expert 5's explainer gets a body that is not a chat completion
    stub.garbage_scorer = True  # expert 7's scorer answers without any yes/no
    assert label.main(_argv(planted, stub, tmp_path / "out", "--experts", "5", "7", "--cache", str(tmp_path / "c"))) == 0
    run = _run_dir(tmp_path / "out")
    table = pd.read_csv(run / "labels_layer1.csv").set_index("expert")
    assert table.failed[5] == 1 and pd.isna(table.label[5]) and pd.isna(table.f1[5])
    assert table.malformed[7] == 1 and table.windows_scored[7] == 0 and pd.isna(table.f1[7])
    five = json.loads((run / "label_layer1_expert5.json").read_text())
    assert "not a chat completion" in five["explanation"]["error"] and five["note"].startswith("the explainer gave no answer: not a chat completion")
    seven = json.loads((run / "label_layer1_expert7.json").read_text())
    assert seven["label"].startswith("letter ") and seven["scoring"]["requests"][0]["malformed"] is True
    assert seven["note"] == "the scorer answered for none of the 8 windows (see scoring.requests)"
    assert seven["scoring"]["requests"][0]["response"] == "I am not sure about any of these."


# ------------------------------------------------------------------------------------------ bad input


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REMOTE = "https://llm.example.com/v1"  # a remote endpoint: refused for its missing key before it is contacted

BAD = {
    "missing key": (["--remote"], "environment variable OPENAI_API_KEY is not set"),
    "empty key": (["--remote", "--api-key-env", "MOESCOPE_TEST_EMPTY_KEY"],
                  "MOESCOPE_TEST_EMPTY_KEY is not set or empty"),
    "no --llm": (["--api-key-env", "none", "--llm", ""], "--api-base needs --llm"),
    "unreachable": (["--api-key-env", "none", "--unreachable"], "cannot be reached"),
    "dense model": (["--api-key-env", "none", "--model", "demo-dense"], "has no MoE layers"),
    "expert out of range": (["--api-key-env", "none", "--experts", "3", "99"], "--experts 99 out of range"),
    "missing local model": (["--local-llm", "/no/such/folder"], "--local-llm /no/such/folder: not a model folder"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case, planted, stub, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("MOESCOPE_TEST_EMPTY_KEY", "")
    extra, message = BAD[case]
    stub.reset()
    argv = _argv(planted, stub, tmp_path / "out", "--cache", str(tmp_path / "cache"))
    for flag in ("--api-key-env", "--llm", "--model"):
        if flag in extra or flag == "--api-key-env":
            i = argv.index(flag)
            del argv[i : i + 2]
    if "--remote" in extra:
        extra = [x for x in extra if x != "--remote"]
        argv[argv.index("--api-base") + 1] = REMOTE
    if "--unreachable" in extra:
        extra = [x for x in extra if x != "--unreachable"]
        argv[argv.index("--api-base") + 1] = f"http://127.0.0.1:{_closed_port()}/v1"
        argv[argv.index("--model") + 1] = str(tmp_path / "no-model")  # refused before the model is looked at
    if "--local-llm" in extra:
        i = argv.index("--api-base")
        del argv[i : i + 2]
        i = argv.index("--llm")
        del argv[i : i + 2]
    before = stub.requests
    assert label.main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    assert stub.requests == before


def _backend_args(api_base: str, *extra: str):
    return label.build_parser().parse_args(["--layer", "1", "--api-base", api_base, "--llm", "stub", *extra])


def test_a_loopback_endpoint_needs_no_key_and_gets_none_when_the_variable_is_unset(stub, monkeypatch):
    """A local server (vLLM, llama.cpp, Ollama on this machine) usually has no key: no --api-key-env none needed."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend = label._backend(_backend_args(stub.url))()  # probed: the stub answered without a key
    assert backend.api_key is None and "Authorization" not in backend._headers()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")  # a key that is set is still sent to a loopback server
    backend = label._backend(_backend_args(stub.url))()
    assert backend._headers()["Authorization"] == "Bearer sk-local"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "LocalHost", "[::1]"])
def test_every_loopback_spelling_skips_the_key_check(host, monkeypatch):
    """A closed port: past the key check, the probe is what refuses (so no key was asked for)."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(InputError, match="cannot be reached"):
        label._backend(_backend_args(f"http://{host}:{_closed_port()}/v1"))


@pytest.mark.parametrize("url", [REMOTE, "http://localhost.example.com/v1", "http://127.0.0.1.nip.io:8000/v1",
                                 "http://10.0.0.5:8000/v1"])
def test_a_remote_endpoint_still_needs_a_key(url, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(InputError, match="OPENAI_API_KEY is not set"):
        label._backend(_backend_args(url))


def test_a_server_that_asks_for_a_key_when_none_was_sent_says_so():
    """A loopback server started with a key (vLLM --api-key) answers 401: the message names the missing key."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    from common.llm import OpenAICompatible

    class Locked(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            self.send_response(401 if self.headers.get("Authorization") != "Bearer right" else 200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Locked)
    Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        with pytest.raises(InputError, match=r"asks for an API key \(HTTP 401\) and none was sent"):
            OpenAICompatible(url, "m", None).probe()
        with pytest.raises(InputError, match=r"rejected the API key \(HTTP 401\)"):
            OpenAICompatible(url, "m", "wrong").probe()
        assert OpenAICompatible(url, "m", "right").probe() is None  # accepted; "{}" lists no models
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------ pieces


def test_window_state_matches_a_direct_computation():
    """Marks, routing and logit lens of every kept window equal a recomputation from the captured batches,
    also for windows kept from an earlier batch while the top list changed."""
    from common.cli.pipeline import captured_batches
    from common.config import ModelSpec
    from common.data import Batch
    from common.model import load_moe

    moe = load_moe(ModelSpec(model="random:olmoe", device="cpu", dtype="float32"))
    layer = moe.layers[1]
    generator = torch.Generator().manual_seed(0)
    batches = []
    for number in range(2):
        ids = torch.randint(0, 256, (2, 24), generator=generator)
        count = torch.ones_like(ids, dtype=torch.bool)
        count[:, :2] = False  # tokens that do not count are never marked
        batches.append(Batch(ids, torch.ones_like(ids), count, torch.zeros(2, dtype=torch.long), torch.zeros_like(ids),
                             number=number))
    acc = lab.LabelWindows(moe, layer, list(range(layer.num_experts)), top_n=3, window=8, lens_experts=[0, 2])
    seen = {}
    for records, batch, _ in captured_batches(moe, iter(batches), [layer], ("topk", "input")):
        rec = records[layer.layer]
        seen[batch.number] = (batch, rec.topk_index.clone(), rec.topk_weight.clone(), rec.expert_input.clone())
        acc.update(rec, batch)
    acc.all_reduce()
    checked = 0
    for c, e in enumerate(acc.experts):
        for r in range(3):
            if not torch.isfinite(acc.activity.best_score[r, c]):
                continue
            key = int(acc.activity.best_key[r, c])
            batch, index, weight, x = seen[key >> 32]
            token = key & 0xFFFFFFFF
            row, pos = divmod(token, 24)
            for p, offset in enumerate(range(-4, 4)):
                at = pos + offset
                want = []
                if 0 <= at < 24 and batch.count_mask[row, at]:
                    flat = row * 24 + at
                    want = [int(i) for i, w in zip(index[flat], weight[flat], strict=True) if w != 0]
                got = [int(i) for i in acc.routed[r, c, p] if i >= 0]
                assert got == want, (e, r, p)
                if e in (0, 2) and e in want:
                    w = float(weight[flat][index[flat] == e].sum())
                    with torch.no_grad():
                        logits = moe.unembed(w * layer.expert_fn(e, x[flat : flat + 1]))[0]
                    assert acc.lens_ids[r, c, p].tolist() == logits.topk(3).indices.tolist()
                    checked += 1
                else:
                    assert (acc.lens_ids[r, c, p] == -1).all()
    assert checked > 0


def test_token_pieces_keep_split_characters_whole(tiny_tokenizer):
    ids = list("aé b".encode())  # the byte-level tokenizer: one token per byte, é is two
    assert lab.token_pieces(tiny_tokenizer, [-1, *ids, tiny_tokenizer.eos_token_id]) == ["", "a", "", "é", " ", "b", ""]


def test_reply_parsers_and_scores():
    assert lab.parse_label("Thinking...\n**Label:** closing brackets in LaTeX\n") == ("closing brackets in LaTeX", False)
    assert lab.parse_label("<think>LABEL: no</think>LABEL: \"digits\"") == ("digits", False)
    assert lab.parse_label("just some words\nmore") == ("just some words", True)
    assert lab.parse_label("  \n") == (None, True)
    assert lab.parse_answers("1: yes\n2: No\n3. yes", 3) == ([True, False, True], False)
    assert lab.parse_answers("Window 1: yes\nWindow 2: no", 3) == ([True, False, None], True)
    assert lab.parse_answers("answers: [1, 0, 1]", 3) == ([True, False, True], False)
    assert lab.parse_answers("no idea", 2) == ([None, None], True)
    scores = lab.detection_scores([True, True, False, False, True], [True, False, False, True, None])
    assert scores["f1"] == 0.5 and scores["accuracy"] == 0.5 and scores["true_positives"] == 1
    assert scores["false_positives"] == 1 and scores["true_negatives"] == 1 and scores["false_negatives"] == 1


def test_client_retries_then_records_failures_without_raising(tmp_path):
    class Flaky:
        concurrency_limit = None

        def __init__(self, plan):
            self.identity = {"backend": "fake", "model": "m"}
            self.plan, self.calls = list(plan), 0

        def complete(self, messages, max_tokens):
            self.calls += 1
            step = self.plan.pop(0) if self.plan else "ok"
            if step == "busy":
                raise TransientError("HTTP 429")
            if step == "bad":
                raise RequestError("HTTP 400")
            return f"answer to {messages[0]['content']}", None

    waits = []
    backend = Flaky(["busy", "busy"])
    client = ChatClient(backend, ResponseCache(tmp_path), retries=2, backoff=1.0, sleep=waits.append)
    assert client.complete([{"role": "user", "content": "q"}], 8).text == "answer to q"
    assert backend.calls == 3 and len(waits) == 2 and 0.75 <= waits[0] <= 1.25 and 1.5 <= waits[1] <= 2.5
    assert client.complete([{"role": "user", "content": "q"}], 8).cached  # from disk now
    given_up = ChatClient(Flaky(["busy"] * 5), ResponseCache(None), retries=1, sleep=waits.append)
    reply = given_up.complete([{"role": "user", "content": "x"}], 8)
    assert reply.text is None and "gave up after 2 attempts" in reply.error
    final = ChatClient(Flaky(["bad"]), ResponseCache(None), sleep=waits.append).complete([{"role": "user", "content": "y"}], 8)
    assert final.text is None and final.error == "HTTP 400" and final.attempts == 1


def test_local_model_answers_greedily_and_cuts_long_prompts():
    from common.llm import LocalModel

    local = LocalModel("random:olmoe", device="cpu", dtype="float32")  # tiny, byte-level, no chat template
    messages = [{"role": "system", "content": "Label it."}, {"role": "user", "content": "x" * 5000}]
    text, note = local.complete(messages, 4)
    assert isinstance(text, str) and text == local.complete(messages, 4)[0]  # greedy: the same answer twice
    assert note is not None and "cut to its last" in note
    assert local.complete([{"role": "user", "content": "hi"}], 4)[1] is None
