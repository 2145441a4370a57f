"""URL sources (downloaded once into a checksummed cache, offline-safe, retried or refused when the connection drops),
compressed files, the SQuAD layout, row ranges, the Pile's nested component filter, and presets that match the
studies' own data. A loopback HTTP server in the test stands in for the network; nothing here needs it."""

from __future__ import annotations

import bz2
import gzip
import http.server
import json
import lzma
import threading
import urllib.request
from pathlib import Path

import pytest
import zstandard

import router_decisive
from common.data import resolve_domains
from common.data.documents import iter_documents
from common.data.domains import Domain, check_data, check_hub_sources
from common.data.presets import PRESETS, PROVENANCE
from common.data.urls import cache_path, fetch
from common.errors import InputError


class _Server:
    """Serves a folder on the loopback. `/flaky/NAME` breaks off halfway through its first response (the full
    Content-Length announced), `/broken/NAME` through every one; `requests` counts the requests per path."""

    def __init__(self, root: Path) -> None:
        self.root, self.requests, self.broken_once = root, {}, set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                server.requests[self.path] = server.requests.get(self.path, 0) + 1
                parts = self.path.strip("/").split("/")
                mode, name = (parts[0], parts[1]) if len(parts) == 2 else ("plain", parts[0])
                path = server.root / name
                if not path.is_file():
                    self.send_error(404)
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = mode == "broken" or (mode == "flaky" and self.path not in server.broken_once)
                if cut:
                    server.broken_once.add(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    root = tmp_path / "served"
    root.mkdir()
    monkeypatch.setenv("MOESCOPE_URL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    served = _Server(root)
    yield served
    served.close()


def _documents(source: str) -> list[str]:
    return list(iter_documents(Domain("d", source), shuffle_buffer=0))


RECORDS = [{"text": f"document {i}", "title": f"t{i}"} for i in range(6)]


def _write_jsonl_gz(path: Path) -> Path:
    path.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in RECORDS).encode()))
    return path


def test_url_is_downloaded_once_checksummed_and_read_offline_afterwards(server, monkeypatch):
    _write_jsonl_gz(server.root / "docs.jsonl.gz")
    url = f"{server.url}/docs.jsonl.gz"
    assert _documents(f"{url}#title,text[1:3]") == ["t1\ndocument 1", "t2\ndocument 2"]
    record = json.loads(cache_path(url).with_name(cache_path(url).name + ".json").read_text())
    assert record["url"] == url and record["size"] == (server.root / "docs.jsonl.gz").stat().st_size
    assert _documents(url) == [r["text"] for r in RECORDS]  # from the cache: no second request
    assert server.requests == {"/docs.jsonl.gz": 1}
    server.close()  # the network is gone: the cached copy still serves, offline mode too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _documents(url)[:2] == ["document 0", "document 1"]
    check_hub_sources([Domain("d", url)])


def test_a_damaged_cache_entry_is_fetched_again(server):
    _write_jsonl_gz(server.root / "docs.jsonl.gz")
    url = f"{server.url}/docs.jsonl.gz"
    path = fetch(url)
    path.write_bytes(path.read_bytes()[:-3])  # truncated on disk
    assert fetch(url) == path and _documents(url)[-1] == "document 5"
    assert server.requests["/docs.jsonl.gz"] == 2


def test_a_dropped_connection_is_retried_and_never_cached_half(server):
    _write_jsonl_gz(server.root / "docs.jsonl.gz")
    flaky = f"{server.url}/flaky/docs.jsonl.gz"
    assert _documents(flaky) == [r["text"] for r in RECORDS]  # broke off once, retried whole
    assert server.requests["/flaky/docs.jsonl.gz"] == 2
    broken = f"{server.url}/broken/docs.jsonl.gz"
    with pytest.raises(InputError) as refused:
        fetch(broken)
    message = str(refused.value)
    assert "\n" not in message and "the download broke off 3 times" in message and "nothing was cached" in message
    assert not cache_path(broken).exists()
    assert sorted(p.name for p in cache_path(broken).parent.iterdir()) == sorted(
        [cache_path(flaky).name, cache_path(flaky).name + ".json"])  # no partial file left behind


def test_absent_and_offline_or_unreachable_is_one_line(server, monkeypatch):
    _write_jsonl_gz(server.root / "docs.jsonl.gz")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"not in the download cache .* offline mode is set"):
        fetch(f"{server.url}/docs.jsonl.gz")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(InputError, match=r"cannot download it \(HTTP 404"):
        fetch(f"{server.url}/nothing.jsonl")
    server.close()
    with pytest.raises(InputError, match="cannot download it") as refused:
        fetch(f"{server.url}/docs.jsonl.gz")
    assert "\n" not in str(refused.value)


def test_a_script_reads_a_url_and_refuses_a_bad_one_before_loading(server, tmp_path, capsys):
    (server.root / "prose.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    argv = ["--model", "random:olmoe", "--num_tokens", "100", "--seq_len", "32", "--no-progress", "--no-figures",
            "--out", str(tmp_path / "out")]
    url = f"{server.url}/prose.txt"
    assert router_decisive.main([*argv, "--data", f"prose={url}", "--cache_dir", str(tmp_path / "mine")]) == 0
    info = json.loads(next((tmp_path / "out").rglob("run.json")).read_text())
    assert info["tokens"]["domains"]["prose"]["counted"] == 100
    assert cache_path(url).parent == tmp_path / "mine" and cache_path(url).is_file()
    capsys.readouterr()
    assert router_decisive.main([*argv, "--data", f"x={server.url}/missing.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot download it (HTTP 404" in err[0]
    assert router_decisive.main([*argv, "--data", f"{server.url}/page.html"]) == 2
    assert "is not a supported format" in capsys.readouterr().err


def test_compressed_local_files_of_every_text_format(tmp_path):
    lines = "\n".join(json.dumps(r) for r in RECORDS)
    (tmp_path / "a.jsonl.xz").write_bytes(lzma.compress(lines.encode()))
    (tmp_path / "b.txt.bz2").write_bytes(bz2.compress(b"one whole document"))
    (tmp_path / "c.csv.gz").write_bytes(gzip.compress(b"text,n\nfirst row,1\nsecond row,2\n"))
    (tmp_path / "d.json.zst").write_bytes(zstandard.ZstdCompressor().compress(json.dumps(RECORDS[:2]).encode()))
    assert _documents(str(tmp_path / "a.jsonl.xz")) == [r["text"] for r in RECORDS]
    assert _documents(str(tmp_path / "b.txt.bz2")) == ["one whole document"]
    assert _documents(str(tmp_path / "c.csv.gz")) == ["first row", "second row"]
    assert _documents(str(tmp_path / "d.json.zst")) == ["document 0", "document 1"]
    resolve_domains([str(tmp_path / "a.jsonl.xz") + "#title"])  # checked through the decompressor
    with pytest.raises(InputError, match="no field 'nope'"):
        resolve_domains([str(tmp_path / "a.jsonl.xz") + "#nope"])


def test_the_piles_component_filter_reads_the_nested_meta_field(tmp_path):
    """The Pile's records keep their component in meta.pile_set_name (as the hub copy does)."""
    records = [{"text": f"{name} text {i}", "meta": {"pile_set_name": name}}
               for i, name in enumerate(["ArXiv", "Github", "ArXiv", "Pile-CC", "Gutenberg (PG-19)"])]
    path = tmp_path / "pile.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress("\n".join(json.dumps(r) for r in records).encode()))
    assert _documents(f"{path}?pile_set_name=ArXiv") == ["ArXiv text 0", "ArXiv text 2"]
    assert _documents(f"{path}?meta.pile_set_name=Gutenberg (PG-19)") == ["Gutenberg (PG-19) text 4"]
    assert _documents(f"{path}?pile_set_name=Books3") == []


SQUAD = {"version": "1.1", "data": [
    {"title": "Paris", "paragraphs": [
        {"context": "Paris est la capitale de la France.", "qas": [
            {"id": "1", "question": "Quelle est la capitale ?", "answers": [{"text": "Paris", "answer_start": 0}]},
            {"id": "2", "question": "De quel pays ?", "answers": [{"text": "France", "answer_start": 28}]}]},
        {"context": "La Seine traverse Paris.", "qas": [
            {"id": "3", "question": "Quel fleuve ?", "answers": [{"text": "La Seine", "answer_start": 0}]}]}]}]}
EXPECTED_SQUAD = ["Paris est la capitale de la France.\nQuelle est la capitale ?\nDe quel pays ?",
                  "La Seine traverse Paris.\nQuel fleuve ?"]


def test_squad_layout_reads_each_context_then_its_questions(tmp_path):
    nested = tmp_path / "valid.json"
    nested.write_text(json.dumps(SQUAD))
    assert _documents(f"{nested}#squad") == EXPECTED_SQUAD
    flat = tmp_path / "rows.jsonl"  # the hub's layout: one row per question, the context repeated
    flat.write_text("\n".join(json.dumps({"context": p["context"], "question": qa["question"], "answers": qa["answers"]})
                              for p in SQUAD["data"][0]["paragraphs"] for qa in p["qas"]))
    assert _documents(f"{flat}#squad") == EXPECTED_SQUAD
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "no squad here"}))
    with pytest.raises(InputError, match="#squad needs SQuAD records"):
        resolve_domains([f"{other}#squad"])


def test_moe_lens_french_qa_takes_fquad_from_a_path_and_says_when_piaf_stands_in(tmp_path, recwarn):
    fquad = tmp_path / "valid.json"
    fquad.write_text(json.dumps(SQUAD))
    domains = resolve_domains(["moe-lens", f"french-qa={fquad}"])
    assert [d.name for d in domains] == ["english", "french-qa", "gsm8k", "code"]
    assert domains[1].source == f"{fquad}#squad" and _documents(domains[1].source) == EXPECTED_SQUAD
    assert not [w for w in recwarn if "PIAF" in str(w.message)]
    with pytest.warns(UserWarning, match="french-qa: PIAF stands in for MoE Lens' FQuAD"):
        piaf = resolve_domains(["moe-lens"], domains=["french-qa"])
    assert piaf[0].source == "hf:AgentPublic/piaf:plain_text:train#squad"


@pytest.mark.filterwarnings("ignore::common.data.sources.DataWarning")  # absent Pile components, the PIAF notice
def test_presets_match_the_studies_and_resolve_without_the_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("resolving a preset touched the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    for name in PRESETS:
        domains = resolve_domains([name])
        check_data([name])
        assert all((name, d.name) in PROVENANCE for d in domains), name
    olmoe = {d.name: d.source for d in resolve_domains(["olmoe"])}
    assert olmoe["books"].endswith("allenai/OLMoE/main/scripts/routing_output/text/b3g_texts.txt")
    assert all(source.startswith("https://raw.githubusercontent.com/allenai/OLMoE/") for source in olmoe.values())
    assert {d.name for d in resolve_domains(["olmoe-pile"])} == set(olmoe)  # the old mix, under its new name
    lens = {d.name: d.source for d in resolve_domains(["moe-lens"])}
    assert lens["gsm8k"] == "hf:openai/gsm8k:main:test#question,answer"
    assert lens["english"].endswith("train-00001-of-00037-9f227d74fc154ce9.parquet#TEXT[:5]")
    assert lens["code"].endswith("train-00000-of-01126.parquet#path,code[:200]")
    assert PROVENANCE[("moe-lens", "french-qa")].startswith("stand-in")
    assert all(PROVENANCE[("olmoe", d)].startswith("exact") for d in olmoe)


def test_row_ranges_keep_records_in_file_order(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS))
    assert _documents(f"{path}[:2]") == ["document 0", "document 1"]
    assert _documents(f"{path}#title[4:]") == ["t4", "t5"]
    with pytest.raises(InputError, match=r"empty row range \[3:3\]"):
        resolve_domains([f"{path}[3:3]"])


def test_a_parquet_shard_by_url_keeps_its_first_rows(server):
    """The MoE Lens layout: the first rows of a parquet shard, one column (`...parquet#TEXT[:2]`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"TEXT": [f"book {i}" for i in range(5)], "METADATA": ["{}"] * 5}),
                   server.root / "train-00001-of-00037-abc.parquet")
    url = f"{server.url}/train-00001-of-00037-abc.parquet"
    assert _documents(f"{url}#TEXT[:2]") == ["book 0", "book 1"]
    check_hub_sources([Domain("english", f"{url}#TEXT[:2]")])
    with pytest.raises(InputError, match="no field 'text'"):
        check_hub_sources([Domain("english", url)])
