"""common.data: sources, presets, documents and exact token budgets. Offline: tmp files, fake hub and demo corpus."""

from __future__ import annotations

import json
import types
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from common import data
from common.data import (
    DataWarning,
    Domain,
    HFSpec,
    documents,
    domains,
    iter_documents,
    parse_hf_spec,
    resolve_domains,
    token_batches,
)
from common.errors import InputError

BOS, EOS, PAD = 256, 257, 258


# ------------------------------------------------------------------------------------------------ fixtures
def byte_tokenizer(*, bos: bool = True, pad: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level, no merges: one token per byte (so a document of 'a's is all one token id).

    bos=True follows the Llama convention (BOS prepended by add_special_tokens); pad=False has no pad token.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|bos|>", "<|eos|>", "<|pad|>"])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", BOS)])
    kwargs = {"pad_token": "<|pad|>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", **kwargs)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def docs_of(source: str, **kw) -> list[str]:
    return list(iter_documents(Domain("d", source), shuffle_buffer=0, **kw))


def letter_docs(tmp_path, letters: str = "abcdefgh", length: int = 23) -> str:
    """One document per letter, each made only of that letter, so every token tells its document."""
    return write_jsonl(tmp_path / "letters.jsonl", [{"text": ch * length} for ch in letters])


def collect(batches) -> list[data.Batch]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # a complete run must not warn
        return list(batches)


# ------------------------------------------------------------------------------------------------ local formats
def test_txt_is_one_document_per_file(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n\nstill second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file", encoding="utf-8")
    assert docs_of(str(tmp_path)) == ["first file", "second file\n\nstill second"]


def test_jsonl_field_selection_join_and_filters(tmp_path):
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [
            {"text": "t1", "q": "q1", "a": "a1", "lang": "en", "opts": ["x", "y"]},
            {"text": "  ", "q": "q2", "a": "a2", "lang": "fr", "opts": []},
            {"text": "t3", "q": "q3", "a": None, "lang": "fr", "opts": ["z"]},
        ],
    )
    assert docs_of(path) == ["t1", "t3"]  # default field "text"; the whitespace-only document is skipped
    assert docs_of(path + "#q,a") == ["q1\na1", "q2\na2", "q3"]  # several fields join with newlines
    assert docs_of(path + "#opts") == ["x\ny", "z"]  # a list of strings joins too
    assert docs_of(path + "#q?lang=fr") == ["q2", "q3"]
    assert docs_of(path + "#q?lang=fr&a=a2") == ["q2"]


def test_nested_meta_filter_like_the_pile(tmp_path):
    path = write_jsonl(
        tmp_path / "pile.jsonl",
        [{"text": f"doc{i}", "meta": {"pile_set_name": name}} for i, name in enumerate(["ArXiv", "Github", "ArXiv"])],
    )
    assert docs_of(path + "?pile_set_name=ArXiv") == ["doc0", "doc2"]
    assert docs_of(path + "?meta.pile_set_name=Github") == ["doc1"]


def test_json_parquet_csv(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([{"body": "j1"}, {"body": "j2"}]), encoding="utf-8")
    (tmp_path / "strings.json").write_text(json.dumps(["s1", "s2"]), encoding="utf-8")
    (tmp_path / "one.json").write_text(json.dumps({"text": "single"}), encoding="utf-8")
    pq.write_table(pa.table({"text": ["p1", "p2", "p3"], "n": [1, 2, 1]}), tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text('text,label\n"c1, with comma",x\n"c2\nmultiline",y\n', encoding="utf-8")

    assert docs_of(str(tmp_path / "list.json") + "#body") == ["j1", "j2"]
    assert docs_of(str(tmp_path / "strings.json")) == ["s1", "s2"]
    assert docs_of(str(tmp_path / "one.json")) == ["single"]
    assert docs_of(str(tmp_path / "t.parquet")) == ["p1", "p2", "p3"]
    assert docs_of(str(tmp_path / "t.parquet") + "?n=1") == ["p1", "p3"]
    assert docs_of(str(tmp_path / "t.csv")) == ["c1, with comma", "c2\nmultiline"]
    assert docs_of(str(tmp_path / "t.csv") + "#label?label=y") == ["y"]


def test_folder_and_glob_are_sorted_recursive_and_skip_others(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_text("B", encoding="utf-8")
    (tmp_path / "sub" / "a.txt").write_text("SUB-A", encoding="utf-8")
    (tmp_path / "a.txt").write_text("A", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a source", encoding="utf-8")
    (tmp_path / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "C1"}, {"text": "C2"}])

    assert docs_of(str(tmp_path)) == ["A", "B", "C1", "C2", "SUB-A"]
    assert docs_of(str(tmp_path / "*.txt")) == ["A", "B"]
    assert docs_of(str(tmp_path / "**" / "a.txt")) == ["A", "SUB-A"]
    assert docs_of(str(tmp_path / "?.txt")) == ["A", "B"]  # '?' not followed by key=value is a wildcard
    assert docs_of(str(tmp_path / "*.jsonl") + "?text=C2") == ["C2"]
    [domain] = resolve_domains(str(tmp_path / "*.txt"))
    assert domain.name == tmp_path.name  # a bare-wildcard glob is named after its folder


def test_default_and_explicit_names(tmp_path):
    path = write_jsonl(tmp_path / "code.jsonl", [{"text": "x"}])
    assert [d.name for d in resolve_domains([path, f"mine={path}"])] == ["code", "mine"]
    assert resolve_domains(f"mine={path}")[0].source == path
    assert resolve_domains("hf:openai/gsm8k:main")[0].name == "gsm8k"
    assert resolve_domains("hf:monology/pile-uncopyrighted?pile_set_name=ArXiv")[0].name == "ArXiv"


# ------------------------------------------------------------------------------------------------ order
def test_shuffle_is_seeded_and_bounded(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"text": str(i)} for i in range(50)])
    domain = Domain("n", path)
    source_order = [str(i) for i in range(50)]
    assert list(iter_documents(domain, shuffle_buffer=0)) == source_order
    seed0 = list(iter_documents(domain, seed=0))
    assert seed0 == list(iter_documents(domain, seed=0))
    assert seed0 != list(iter_documents(domain, seed=1))
    assert sorted(seed0, key=int) == source_order and seed0 != source_order
    # A buffer of 5 can only move a document a bounded distance forward.
    small = list(iter_documents(domain, seed=0, shuffle_buffer=5))
    assert sorted(small, key=int) == source_order
    assert all(int(doc) <= position + 5 for position, doc in enumerate(small))


# ------------------------------------------------------------------------------------------------ windows and budgets
def counted_per_domain(batches: list[data.Batch], n_domains: int) -> list[int]:
    totals = [0] * n_domains
    for b in batches:
        for d in range(n_domains):
            totals[d] += int(b.count_mask[b.domain_ids == d].sum())
    return totals


def test_windows_never_cross_documents_and_restart_with_bos(tmp_path, tok):
    domain = Domain("letters", letter_docs(tmp_path, length=23))
    batches = collect(token_batches([domain], tok, num_tokens=8 * 23, seq_len=10, batch_size=3, progress=False))
    for b in batches:
        assert b.input_ids.shape[1] <= 10
        for ids, mask, docs in zip(b.input_ids, b.attention_mask, b.doc_ids, strict=True):
            row = ids[mask.bool()]
            assert row[0] == BOS  # every window, even mid-document, starts the way the tokenizer frames text
            assert len(set(row[1:].tolist())) == 1  # one letter: one document
            assert len(set(docs[mask.bool()].tolist())) == 1
            assert (docs[~mask.bool()] == -1).all()
    # 23 letters in windows of 9 text tokens: 9 + 9 + 5 per document.
    assert sum(len(b.input_ids) for b in batches) == 8 * 3


def test_pack_joins_documents_with_eos_into_full_windows(tmp_path, tok):
    domain = Domain("letters", letter_docs(tmp_path, letters="abcd", length=5))
    batches = collect(
        token_batches([domain], tok, num_tokens=4 * 5, seq_len=6, batch_size=2, pack=True, progress=False, shuffle_buffer=0)
    )
    stream = torch.cat([ids[m.bool()] for b in batches for ids, m in zip(b.input_ids, b.attention_mask, strict=True)])
    letters = tok("abcd", add_special_tokens=False)["input_ids"]
    expected = [t for ch in letters for t in [BOS, *[ch] * 5, EOS]]
    assert stream.tolist() == expected[: len(stream)]
    rows = [m.sum().item() for b in batches for m in b.attention_mask]
    assert rows[:-1] == [6] * (len(rows) - 1)  # full windows; only the last may be short
    assert any(len(set(b.doc_ids[i].tolist()) - {-1}) > 1 for b in batches for i in range(len(b.doc_ids)))


@pytest.mark.parametrize(
    ("num_tokens", "seq_len", "batch_size", "pack", "keep_special"),
    [(1, 8, 2, False, False), (37, 8, 2, False, False), (100, 16, 3, True, False), (55, 7, 4, False, True), (64, 9, 1, True, True)],
)
def test_exact_budget_per_domain(tmp_path, tok, num_tokens, seq_len, batch_size, pack, keep_special):
    domains = [
        Domain("letters", letter_docs(tmp_path, length=30)),
        Domain("digits", write_jsonl(tmp_path / "d.jsonl", [{"text": str(i) * 17} for i in range(10)])),
    ]
    stream = token_batches(
        domains, tok, num_tokens=num_tokens, seq_len=seq_len, batch_size=batch_size, pack=pack,
        keep_special=keep_special, progress=False,
    )
    batches = collect(stream)
    assert counted_per_domain(batches, 2) == [num_tokens, num_tokens]
    assert stream.report.counted == {"letters": num_tokens, "digits": num_tokens}
    assert stream.report.incomplete == []
    for b in batches:
        assert len(set(b.domain_ids.tolist())) == 1  # one domain per batch
        assert b.input_ids.shape[0] <= batch_size and b.input_ids.shape[1] <= seq_len
        assert not (b.count_mask & ~b.attention_mask.bool()).any()  # padding never counts
        assert (b.attention_mask.sum(1) > 0).all()
    assert json.dumps(stream.report.to_dict())  # run.json-ready


def test_runs_out_with_a_warning_and_a_record(tmp_path, tok):
    domain = Domain("small", write_jsonl(tmp_path / "s.jsonl", [{"text": "abc"}, {"text": "defgh"}]))
    stream = token_batches([domain], tok, num_tokens=100, seq_len=4, progress=False)
    with pytest.warns(DataWarning, match=r"'small' ran out of data: 8 of 100 tokens \(2 documents\)"):
        batches = list(stream)
    assert counted_per_domain(batches, 1) == [8]
    assert stream.report.domains["small"].complete is False
    assert stream.report.to_dict()["domains"]["small"]["counted"] == 8
    assert stream.report.incomplete == ["small"]


@pytest.mark.parametrize(("text", "pack"), [
    ("\n\n   \n\t\n", False),  # blank lines only: every document is skipped as empty
    ("<|eos|><|bos|><|pad|><|eos|>", False),  # special tokens only: nothing counts
    ("<|eos|><|bos|><|pad|><|eos|>", True),
])
def test_a_domain_with_no_token_to_count_is_refused_naming_it(tmp_path, tok, text, pack):
    (tmp_path / "blank.txt").write_text(text, encoding="utf-8")
    good = Domain("good", write_jsonl(tmp_path / "g.jsonl", [{"text": "abcdef"}]))
    blank = Domain("blank", str(tmp_path / "blank.txt"))
    stream = token_batches([good, blank], tok, num_tokens=4, seq_len=8, pack=pack, progress=False)
    first = next(stream)  # the good domain comes first and is delivered in full
    assert first.num_counted == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # refused, not warned about as "0 of 4 tokens"
        with pytest.raises(InputError) as err:
            next(stream)
    assert str(err.value) == (f"--data: domain 'blank' ({tmp_path / 'blank.txt'}) has no token to count: its documents "
                              "are empty or hold only whitespace and special tokens; give it text or leave it out")
    # Counting the special tokens, the same text has something to count: a short domain, warned about as before.
    if "<|" in text:
        kept = token_batches([blank], tok, num_tokens=100, seq_len=8, pack=pack, keep_special=True, progress=False)
        with pytest.warns(DataWarning, match="'blank' ran out of data"):
            assert sum(b.num_counted for b in kept) > 0


def test_padding_and_specials_do_not_count_unless_kept(tmp_path, tok):
    domain = Domain("s", write_jsonl(tmp_path / "s.jsonl", [{"text": "abcdef"}, {"text": "xy"}]))
    [batch] = collect(token_batches([domain], tok, num_tokens=8, seq_len=16, progress=False, shuffle_buffer=0))
    assert batch.input_ids[1].tolist() == [BOS, *tok("xy", add_special_tokens=False)["input_ids"], *[PAD] * 4]
    assert batch.attention_mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert batch.count_mask.tolist()[1] == [False, True, True, False, False, False, False]
    assert not batch.count_mask[:, 0].any()  # BOS
    assert batch.num_counted == 8

    [kept] = collect(token_batches([domain], tok, num_tokens=10, seq_len=16, keep_special=True, progress=False, shuffle_buffer=0))
    assert kept.count_mask[:, 0].all()  # BOS counts now
    assert torch.equal(kept.count_mask, kept.attention_mask.bool())


def test_budget_cut_truncates_the_last_window(tmp_path, tok):
    domain = Domain("s", write_jsonl(tmp_path / "s.jsonl", [{"text": "abcdefghij"}]))
    [batch] = collect(token_batches([domain], tok, num_tokens=3, seq_len=16, progress=False))
    assert batch.input_ids.shape == (1, 4)  # BOS + the 3 counted tokens; nothing after the cut is computed
    assert batch.count_mask.tolist() == [[False, True, True, True]]


def test_no_pad_token_pads_with_eos_and_no_bos_tokenizer(tmp_path):
    domain = Domain("s", write_jsonl(tmp_path / "s.jsonl", [{"text": "abcd"}, {"text": "x"}]))
    [batch] = collect(token_batches([domain], byte_tokenizer(pad=False), num_tokens=5, progress=False, shuffle_buffer=0))
    assert batch.input_ids[1, -1] == EOS and batch.attention_mask[1, -1] == 0
    [plain] = collect(token_batches([domain], byte_tokenizer(bos=False), num_tokens=5, progress=False, shuffle_buffer=0))
    assert plain.attention_mask.sum() == 5 and plain.count_mask.sum() == 5  # no BOS convention: nothing added


def test_same_seed_same_batches_other_seed_other_order(tmp_path, tok):
    domain = Domain("letters", letter_docs(tmp_path, letters="abcdefghijklmnop", length=11))

    def run(seed: int) -> list[torch.Tensor]:
        return [b.input_ids for b in collect(token_batches([domain], tok, num_tokens=80, seq_len=8, seed=seed, progress=False))]

    first, again, other = run(0), run(0), run(1)
    assert len(first) == len(again) and all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    # Another seed reads the documents in another order: the first document of the stream differs, and with
    # every document read (a budget larger than the data), the same tokens in another order.
    assert not torch.equal(first[0], other[0])

    def everything(seed: int) -> torch.Tensor:
        with pytest.warns(DataWarning, match="ran out of data"):
            stream = list(token_batches([domain], tok, num_tokens=10_000, seq_len=8, seed=seed, progress=False))
        return torch.cat([b.input_ids[b.count_mask] for b in stream])

    all_first, all_other = everything(0), everything(1)
    assert all_first.numel() == 16 * 11
    assert torch.equal(all_first.sort().values, all_other.sort().values) and not torch.equal(all_first, all_other)


def test_batch_to_and_model_inputs(tmp_path, tok):
    domain = Domain("s", write_jsonl(tmp_path / "s.jsonl", [{"text": "abc"}]))
    [batch] = collect(token_batches([domain], tok, num_tokens=3, progress=False))
    batch.number = 7
    moved = batch.to("meta")  # a real move: every tensor goes, dtypes and shapes stay, the stream number follows
    for name in ("input_ids", "attention_mask", "count_mask", "domain_ids", "doc_ids"):
        before, after = getattr(batch, name), getattr(moved, name)
        assert after.device.type == "meta" and before.device.type == "cpu", name
        assert after.shape == before.shape and after.dtype == before.dtype, name
    assert moved.number == 7
    assert batch.token_weights().tolist() == batch.count_mask.flatten().float().tolist()
    assert batch.token_domains().tolist() == [0] * batch.input_ids.numel()
    assert set(batch.model_inputs()) == {"input_ids", "attention_mask"}


# ------------------------------------------------------------------------------------------------ hf: specs
def test_hf_spec_parsing():
    assert parse_hf_spec("hf:openai/gsm8k") == HFSpec("openai/gsm8k")
    assert parse_hf_spec("hf:openai/gsm8k:main:test#question,answer") == HFSpec(
        "openai/gsm8k", "main", "test", ("question", "answer")
    )
    assert parse_hf_spec("hf:openai/openai_humaneval::test#prompt") == HFSpec("openai/openai_humaneval", None, "test", ("prompt",))
    spec = parse_hf_spec("hf:monology/pile-uncopyrighted?pile_set_name=Gutenberg (PG-19)&x=a%26b")
    assert spec.filters == (("pile_set_name", "Gutenberg (PG-19)"), ("x", "a&b"))
    assert spec.fields == ("text",) and spec.split == "train" and spec.config is None
    assert parse_hf_spec("hf:c4#text?lang=en").filters == (("lang", "en"),)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hf:", "missing dataset id"),
        ("hf::main", "missing dataset id"),
        ("hf:a/b:c:d:e", "too many ':'"),
        ("hf:a/b/c", "not a Hugging Face dataset id"),
        ("hf:a/b#", "empty field name"),
        ("hf:a/b?lang", "filters must read"),
        ("hf:a/b?lang=en#text", "put #FIELD before"),
    ],
)
def test_hf_spec_errors(spec, message):
    with pytest.raises(InputError, match=message):
        resolve_domains(spec)


def test_hf_documents_through_a_fake_hub(monkeypatch):
    calls = []
    rows = [{"text": f"doc{i}", "meta": {"pile_set_name": "ArXiv" if i % 3 == 0 else "Github"}} for i in range(9)]

    def load_dataset(path, name=None, *, split, streaming):
        calls.append((path, name, split, streaming))
        return iter(rows)

    monkeypatch.setitem(__import__("sys").modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = docs_of("hf:some/pile:default:validation?pile_set_name=ArXiv")
    assert docs == ["doc0", "doc3", "doc6"]
    assert calls == [("some/pile", "default", "validation", True)]
    monkeypatch.setattr(documents, "FILTER_SCAN_LIMIT", 2)  # patched where it is read
    with pytest.warns(DataWarning, match="failed the filters"):
        assert docs_of("hf:some/pile?pile_set_name=Books3") == []


# ------------------------------------------------------------------------------------------------ presets
def test_hub_presets_resolve_without_network():
    expected = {  # the sources' kinds: hub datasets, or files by URL (downloaded when a run reads them)
        "olmoe": (["arxiv", "github", "wikipedia", "books", "c4"], "UUUUU"),
        "olmoe-pile": (["arxiv", "github", "wikipedia", "books", "c4"], "HHHHH"),
        "moe-lens": (["english", "french-qa", "gsm8k", "code"], "UHHU"),
        "router-study": (["fineweb", "gsm8k", "math", "aqua-rat", "github-code", "humaneval"], "HHHHHH"),
    }
    for preset, (names, kinds) in expected.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)  # the PIAF notice
            domains = resolve_domains(preset)
        assert [d.name for d in domains] == names
        assert "".join("H" if isinstance(data.parse_source(d.source), HFSpec) else "U" for d in domains) == kinds
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # the first components all exist in the default Pile copy
        pile = resolve_domains("pile", num_domains=5)
    assert [d.name for d in pile] == ["pile-cc", "pubmed-central", "arxiv", "github", "freelaw"]
    with pytest.warns(DataWarning, match="lacks this Pile component"):
        assert len(resolve_domains(["pile"])) == 22
    assert [d.name for d in resolve_domains("router-study", domains=["math", "gsm8k"])] == ["math", "gsm8k"]


@pytest.fixture
def fake_corpus(monkeypatch):
    corpus = types.SimpleNamespace(
        DEMO_DOMAINS=("code", "prose", "german"),
        available_demo_domains=lambda: (["code", "prose"], {"german": "needs the corpus dependency group"}),
        demo_documents=lambda name, split: iter([f"{name}-{split}-{i} " * 3 for i in range(4)]),
    )
    monkeypatch.setattr(domains, "_corpus", lambda: corpus)  # every use of the corpus goes through it
    return corpus


def test_demo_preset_and_single_domains(fake_corpus, tok):
    with pytest.warns(DataWarning, match="german: needs the corpus dependency group"):
        domains = resolve_domains("demo")
    assert domains == [Domain("code", "demo:code"), Domain("prose", "demo:prose")]
    assert resolve_domains("demo:prose") == [Domain("prose", "demo:prose")]
    assert sorted(iter_documents(domains[0], split="heldout")) == [f"code-heldout-{i} " * 3 for i in range(4)]
    with pytest.raises(InputError, match="unavailable here: needs the corpus"):
        resolve_domains("demo:german")
    with pytest.raises(InputError, match=r"unknown demo domain .*available: code, prose, german"):
        resolve_domains("demo:klingon")
    stream = token_batches([domains[1]], tok, num_tokens=10, split="heldout", progress=False)
    assert sum(b.num_counted for b in collect(stream)) == 10


# ------------------------------------------------------------------------------------------------ input errors
def test_input_errors(tmp_path, tok):
    good = write_jsonl(tmp_path / "g.jsonl", [{"text": "abc", "body": 3}])
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "doc.md").write_text("x", encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"text": 1\n', encoding="utf-8")
    (tmp_path / "t.txt").write_text("x", encoding="utf-8")
    (tmp_path / "empties").mkdir()
    (tmp_path / "empties" / "e.txt").write_text("", encoding="utf-8")
    cases = {
        str(tmp_path / "missing.jsonl"): "no such file",
        str(tmp_path / "empty.jsonl"): "the file is empty",
        str(tmp_path / "doc.md"): "unsupported file type '.md'",
        str(tmp_path / "bad.jsonl"): r"bad.jsonl:1: invalid JSON",
        str(tmp_path / "*.parquet"): "matches no",
        str(tmp_path / "empties"): "all 1 matching files are empty",
        str(tmp_path / "t.txt") + "#body": "no #FIELD",
        good + "#title": "no field 'title' \\(fields: text, body\\)",
        good + "#body": "holds int, not text",
        good + "?lang=en": "filter key 'lang' is not a field",
        "x=": "missing source after 'x='",
        "=foo": "missing domain name",
        "demo:": "missing demo domain name",
        "x=olmoe": "a preset cannot be renamed",
        "olmo": "unknown preset \\(presets: demo, olmoe, olmoe-pile, pile, moe-lens, router-study\\)",
    }
    for spec, message in cases.items():
        with pytest.raises(InputError, match=message):
            resolve_domains(spec)
    with pytest.raises(InputError, match="two domains named 'g'"):
        resolve_domains([good, good])
    with pytest.raises(InputError, match="--num_domains 6: only 5 domains available"):
        resolve_domains("olmoe", num_domains=6)
    with pytest.raises(InputError, match="--num_domains must be at least 1"):
        resolve_domains("olmoe", num_domains=0)
    with pytest.raises(InputError, match="--domains: unknown wiki \\(available: arxiv, github, wikipedia, books, c4\\)"):
        resolve_domains("olmoe", domains=["wiki"])
    domain = resolve_domains(good)
    with pytest.raises(InputError, match="--num_tokens must be positive, got 0"):
        token_batches(domain, tok, num_tokens=0)  # raised at the call, before any batch is asked for
    with pytest.raises(InputError, match="--seq_len 1 leaves no room"):
        token_batches(domain, tok, num_tokens=5, seq_len=1)


def test_input_errors_are_one_line(tmp_path):
    with pytest.raises(InputError) as err:
        resolve_domains(str(tmp_path / "nope.csv"))
    assert "\n" not in str(err.value)
