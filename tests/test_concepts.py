"""Every concept's regular expression against marked positive examples («…» = exactly the characters that must
match) and negative examples (nothing may match), and the mapping from characters to tokens."""

from __future__ import annotations

import numpy as np
import pytest

from common.analysis.concepts import (
    BY_NAME,
    CONCEPTS,
    GROUPS,
    label_ids,
    label_tokens,
    listing,
    select_concepts,
    token_char_spans,
)

# concept -> (positive examples with «marked» matches, negative examples)
EXAMPLES: dict[str, tuple[list[str], list[str]]] = {
    # text
    "capitalized": (["«H»ello «P»aris", "say «W»ord"], ["hello", "HTTP", "x = A"]),
    "all_caps": (["the «LORD» said", "«HTTP» «GET»"], ["Hello", "A b", "HTTPServer"]),
    "digits": (["room «42»", "v«3».«14»"], ["forty-two", "x"]),
    "year": (["in «2024».", "(«1999»)"], ["12024", "1400", "20245", "2150"]),
    "non_ascii": (["caf«é»", "«€»5", "a «×» b"], ["plain ASCII ~!"]),
    "punctuation": (["Hi«,» there«.»", "a«;» b«:» c«!» d«?»"], ["no marks here", "a-b (c)"]),
    "sentence_end": (["It ends«.» Next", "Really«?»\n", "Stop«!»", 'He said "go«.»" Then'], ["3.14", "os.path", "e.g.x"]),
    "sentence_start": (["Done. «The» end", "x!  «Next»", "para\n\n«New» one", "end.\n«Then»"],
                       ["the end", "Mr Smith", "done. the end"]),
    "whitespace_led": (["a« »b", "x«\n»y", "«\t»z", "a « »b"], ["ab", "a  "]),
    "newline": (["a«\n»b"], ["a b"]),
    "url": (["see «https://python.org/x?y=1» now", "«www.example.com»"], ["http:/bad", "email@x.com"]),
    "email": (["mail «a.b@c.org»"], ["a@b", "@user"]),
    "hyphenated": (["a «well-known» fact", "«state-of-the-art»"], ["a - b", "x-1"]),
    "arithmetic": (["«3 + 4 = 7»", "«12×5»", "so «2.5 / 5 = 0.5»."], ["3 apples", "x + y", "2024"]),
    # code
    "string_literal": (['x = «"hi"»', "f(«'a b'»)", 'y = «f"{x}"»', "«'''doc'''»"],
                       ["don't won't", "it's John's", "no quotes"]),
    "function_def": (["def «foo»(x):", "function «bar»() {}", "fn «main»()"], ["define x", "default(y)"]),
    "class_def": (["class «Foo»(Base):"], ["classes are", "subclass Foo"]),
    "function_call": (["«print»(x)", "x.«append»(1)", "«len»(«f»(y))"],
                      ["def foo(x):", "if (x)", "while(True)", "class A(B):", "return (x)"]),
    "import_line": (["«import os»", "  «from a.b import c»", "«#include <stdio.h>»"],
                    ["important", "x = import_module()", "# import later"]),
    "comment": (["x = 1  «# note»", "«# header»", "y; «// c-style»", "«/* block */» z"],
                ["#!/usr/bin/env python", "## markdown", "http://x.org", "#include <a>", "a#b"]),
    "loop_keyword": (["«for» i in x:", "    «while» True:", "«for» (i = 0; i < n; i++) {", "«while»(x)"],
                     ["for example, this", "used for:", "a while ago"]),
    "decorator": (["«@property»\ndef f", "  «@functools.cache»"], ["a @ b", "user@example.com"]),
    "dunder": (["«__init__»", "x.«__name__»"], ["_private", "__x", "a__b__c"]),
    "opening_bracket": (["f«(»x«[»0«{»"], ["x)]}"]),
    "closing_bracket": (["x«)»«]»«}»"], ["(["]),
    "operator": (["a «==» b", "x «+=» 1", "a «+» b", "3 «×» 4", "f() «->» int", "a«**»2"], ["well-known", "a=b", "x-1"]),
    "indentation": (["«    »return x", "«\t»y"], ["x = 1", "a\n  \nb"]),
    "snake_case": (["«max_len» = 3", "«os_path_join»"], ["maxLen", "MAX_LEN", "__init__", "_x"]),
    "camel_case": (["«getValue»()", "«TextIOWrapper»"], ["value", "Value", "VALUE", "get_value"]),
    # LaTeX
    "inline_math": (["let «$x^2$» be", r"«\(a+b\)»"], ["costs $5 and $10", "$$x$$", "no math"]),
    "display_math": (["«$$x+1$$»", r"«\[ a \]»", r"«\begin{align}x\end{align}»", r"«\begin{equation*}y\end{equation*}»"],
                     ["$x$", r"\begin{itemize}\end{itemize}"]),
    "frac_argument": ([r"\frac{«a+b»}{«2»}", r"\dfrac{«x_{1}»}{«y»}"], ["frac{a}{b}", r"\frac12"]),
    "superscript": (["x^«2»", r"e^«{i\pi}»", r"a^«\alpha»"], ["a ^ b", "r'^abc'", "^start"]),
    "subscript": (["x_«i»", "a_«{n+1}»", r"\sum_«{k}»"], ["max_len", "my_var", "__init__", "foo_1"]),
    "latex_command": ([r"«\frac»{a}", r"«\section»{x}"], [r"\n", r"a\\b"]),
    "latex_environment": ([r"«\begin{itemize}» x «\end{itemize}»"], ["begin{x}", r"\beginx"]),
    "greek_letter": ([r"«\alpha» + «\Omega»"], [r"\alphabet", "alpha", r"\frac"]),
}


def _unmark(marked: str) -> tuple[str, np.ndarray]:
    """(text without the «» marks, [len(text)] bool: the marked characters)."""
    text, mask, inside = [], [], False
    for ch in marked:
        if ch in "«»":
            inside = ch == "«"
            continue
        text.append(ch)
        mask.append(inside)
    return "".join(text), np.array(mask, dtype=bool)


def test_every_concept_has_examples_and_there_are_enough():
    assert set(EXAMPLES) == set(BY_NAME)
    assert len(CONCEPTS) >= 20
    assert {c.group for c in CONCEPTS} == set(GROUPS)
    assert all(len(pos) >= 1 and len(neg) >= 1 for pos, neg in EXAMPLES.values())


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_concept_matches_exactly_the_marked_characters_and_their_tokens(name, tiny_tokenizer):
    concept = BY_NAME[name]
    positives, negatives = EXAMPLES[name]
    for marked in positives:
        text, expected = _unmark(marked)
        assert expected.any(), marked
        got = concept.char_mask(text)
        assert got.tolist() == expected.tolist(), (marked, [text[s:e] for s, e in concept.spans(text)])
        # byte tokens: each byte is positive iff the character it belongs to is marked
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        byte_marks = [bool(m) for ch, m in zip(text, expected, strict=True) for _ in ch.encode("utf-8")]
        assert label_ids(tiny_tokenizer, ids, [concept])[:, 0].tolist() == byte_marks, marked
    for text in negatives:
        assert not concept.char_mask(text).any(), (text, [text[s:e] for s, e in concept.spans(text)])
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert not label_ids(tiny_tokenizer, ids, [concept]).any(), text


def test_overlap_rule_a_token_touching_a_match_is_positive():
    text = "abc12 x"
    starts, ends = np.array([0, 2, 5, 6]), np.array([2, 5, 6, 7])  # "ab", "c12", " ", "x"
    labels = label_tokens(text, starts, ends, [BY_NAME["digits"], BY_NAME["whitespace_led"]])
    assert labels[:, 0].tolist() == [False, True, False, False]
    assert labels[:, 1].tolist() == [False, False, True, False]


def test_byte_tokens_of_one_character_all_cover_it(tiny_tokenizer):
    ids = tiny_tokenizer("aé€", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6  # 1 + 2 + 3 bytes
    text, starts, ends = token_char_spans(tiny_tokenizer, ids)
    assert text == "aé€"
    assert [text[s:e] for s, e in zip(starts, ends, strict=True)] == ["a", "é", "é", "€", "€", "€"]
    labels = label_ids(tiny_tokenizer, ids, [BY_NAME["non_ascii"]])
    assert labels[:, 0].tolist() == [False, True, True, True, True, True]


def test_bpe_tokens_map_to_their_characters_and_specials_to_nothing():
    from transformers import AutoTokenizer

    from common.config import SHIPPED_MODELS

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODELS["demo"])
    source = "def foo(x):\n    return x  # é"
    ids = [tokenizer.bos_token_id, *tokenizer(source, add_special_tokens=False)["input_ids"]]
    text, starts, ends = token_char_spans(tokenizer, ids)
    assert text == source
    assert starts[0] == ends[0] == 0  # BOS covers nothing
    pieces = [text[s:e] for s, e in zip(starts, ends, strict=True)]
    assert ends[-1] == len(text) and (np.diff(ends) >= 0).all()
    # tokens tile the text; the two byte tokens of 'é' both cover it
    tiles = [(s, e) for i, (s, e) in enumerate(zip(starts, ends, strict=True)) if e > s and (i == 0 or s >= ends[i - 1])]
    assert "".join(text[s:e] for s, e in tiles) == source
    assert pieces[-2:] == ["é", "é"] or pieces[-1] == "é"
    concepts = [BY_NAME[n] for n in ("function_def", "comment", "non_ascii", "opening_bracket")]
    labels = label_ids(tokenizer, ids, concepts)
    positive = {c.name: [pieces[i] for i in np.nonzero(labels[:, j])[0]] for j, c in enumerate(concepts)}
    assert "".join(positive["function_def"]).strip() == "foo"
    assert "".join(positive["comment"]).strip().startswith("#") and "é" in "".join(positive["comment"])
    assert positive["non_ascii"] and all("é" in p for p in positive["non_ascii"])
    assert positive["opening_bracket"] == ["("]
    assert not labels[0].any()  # BOS


def test_select_concepts_by_name_and_group():
    assert select_concepts(None) == list(CONCEPTS)
    assert [c.name for c in select_concepts(["digits", "url"])] == ["digits", "url"]
    assert {c.group for c in select_concepts(["latex"])} == {"latex"}
    with pytest.raises(ValueError, match=r"unknown concept.*nonsense"):
        select_concepts(["digits", "nonsense"])
    text = listing()
    assert all(c.name in text for c in CONCEPTS)
