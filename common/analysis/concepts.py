"""Token-level binary concepts for k-sparse probing: regular expressions over text, code and LaTeX.

A concept is a regular expression. Its *match spans* are, for every match, the spans of the capture groups the
concept names (`groups`), or the whole match when it names none. Labelling a window of token ids:

1. decode the window to its text T and give every token its character span in T (`token_char_spans`,
   decode-based, so it works for any tokenizer): token i covers the characters T[len(decode(ids[:i])) :
   len(decode(ids[:i+1]))] (prefix lengths made non-decreasing); a token that adds no character of its own (a
   piece of a multi-byte character that a later token completes, or that an earlier token already showed as
   U+FFFD) covers the character it helps to spell, the last one before it; special tokens cover nothing;
2. **a token is positive iff its characters overlap a match span** (share at least one character), else
   negative (`label_tokens`).

Patterns are matched on each window's text on its own, so a construct cut by a window boundary (a display
equation that starts in the previous window) is matched only as far as it is visible. The regexes are heuristics,
not parsers: each concept's description says what it matches, and tests/test_concepts.py pins every one down with
positive and negative examples. Nothing here imports torch (`probing.py --list-concepts` stays light).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

GROUPS = ("text", "code", "latex")
# One level of nested braces inside a LaTeX argument: {a_{i}} or {x^{2}+1}.
_BRACED = r"\{((?:[^{}]|\{[^{}]*\})*)\}"
_BRACED_ARG = r"\{(?:[^{}]|\{[^{}]*\})*\}"
_GREEK = ("alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|vartheta|iota|kappa|lambda|mu|nu|xi|pi|varpi|"
          "rho|varrho|sigma|varsigma|tau|upsilon|phi|varphi|chi|psi|omega|Gamma|Delta|Theta|Lambda|Xi|Pi|Sigma|"
          "Upsilon|Phi|Psi|Omega")
_CALL_EXCLUDED = ("if|elif|while|for|return|and|or|not|in|is|with|assert|lambda|yield|except|switch|catch|sizeof|"
                  "typeof")
_STRING_PREFIX = r"(?<![A-Za-z0-9_])[rRbBuUfF]{0,2}"


@dataclass(frozen=True)
class Concept:
    """A named regular expression; `groups` = the capture groups whose spans are positive (() = whole match)."""

    name: str
    group: str  # text | code | latex
    description: str
    pattern: str
    groups: tuple[int, ...] = ()
    flags: int = 0
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern, self.flags))

    def spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character spans of the concept in `text` (empty spans dropped)."""
        found = []
        for match in self.regex.finditer(text):
            for g in self.groups or (0,):
                start, end = match.span(g)
                if end > start >= 0:
                    found.append((start, end))
        return found

    def char_mask(self, text: str) -> np.ndarray:
        """[len(text)] bool: the characters inside a match span."""
        mask = np.zeros(len(text), dtype=bool)
        for start, end in self.spans(text):
            mask[start:end] = True
        return mask


# fmt: off
CONCEPTS: tuple[Concept, ...] = (
    # ------------------------------------------------------------------------------------------- text
    Concept("capitalized", "text", "the capital letter opening a capitalised word (Hello, Paris)",
            r"\b[A-Z](?=[a-z])"),
    Concept("all_caps", "text", "a word of two or more capital letters (LORD, HTTP)", r"\b[A-Z]{2,}\b"),
    Concept("digits", "text", "a run of ASCII digits (42, 2024)", r"[0-9]+"),
    Concept("year", "text", "a four-digit year 1500-2099 standing alone", r"(?<![0-9])(?:1[5-9]|20)[0-9]{2}(?![0-9])"),
    Concept("non_ascii", "text", "a character outside ASCII (é, ×, €, U+FFFD of a split character)", r"[^\x00-\x7F]"),
    Concept("punctuation", "text", "a punctuation mark . , ; : ! ?", r"[.,;:!?]"),
    Concept("sentence_end", "text", "a sentence-final . ! or ? (followed by a space, line end or closing quote)",
            r"[.!?](?=[\"')\]]*(?:\s|$))"),
    Concept("sentence_start", "text", "the capitalised word after a sentence end or a blank line",
            r"(?:(?<=[.!?] )|(?<=[.!?]  )|(?<=[.!?]\n)|(?<=\n\n))[A-Z][A-Za-z]*"),
    Concept("whitespace_led", "text", "the whitespace right before a word: byte-level BPE word tokens that carry "
            "their leading space (' the')", r"\s(?=\S)"),
    Concept("newline", "text", "a line break", r"\n"),
    Concept("url", "text", "a web address (http://…, https://…, ftp://…, www.…)",
            r"\b(?:https?|ftp)://[^\s<>\"'\])]+|\bwww\.[A-Za-z0-9-]+\.[^\s<>\"'\])]+"),
    Concept("email", "text", "an e-mail address", r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    Concept("hyphenated", "text", "a hyphenated word (well-known)", r"\b[A-Za-z]+(?:-[A-Za-z]+)+\b"),
    Concept("arithmetic", "text", "an arithmetic expression of numbers and + - × ÷ * / = (3 + 4 = 7)",
            r"[0-9]+(?:\.[0-9]+)?(?:[ \t]*[-+×÷*/=][ \t]*[0-9]+(?:\.[0-9]+)?)+"),
    # ------------------------------------------------------------------------------------------- code
    Concept("string_literal", "code", "inside a quoted string, quotes included: triple-quoted, '…' or \"…\" on one "
            "line, with an optional r/b/u/f prefix (prose quotations count; apostrophes inside words do not)",
            r'"""[\s\S]*?"""|' r"'''[\s\S]*?'''|"
            + _STRING_PREFIX + r'"(?:[^"\\\n]|\\.)*"|'
            + _STRING_PREFIX + r"'(?:[^'\\\n]|\\.)*'(?![A-Za-z])"),
    Concept("function_def", "code", "the name in a function definition (def f, function f, func f, fn f)",
            r"\b(?:def|function|func|fn)[ \t]+([A-Za-z_]\w*)", (1,)),
    Concept("class_def", "code", "the name in a class definition (class Foo)", r"\bclass[ \t]+([A-Za-z_]\w*)", (1,)),
    Concept("function_call", "code", "the name of a called function or method, right before '(' (not def/class "
            "names, not keywords such as if, while, return)",
            r"(?<![\w])(?<!def )(?<!class )(?<!function )(?!(?:" + _CALL_EXCLUDED + r")\b)([A-Za-z_]\w*)(?=\()",
            (1,)),
    Concept("import_line", "code", "an import line without its indentation (import x, from x import y, #include, "
            "using x;, require)",
            r"(?m)^[ \t]*((?:import[ \t]+\w|from[ \t]+[\w.]+[ \t]+import\b|#[ \t]*include\b|using[ \t]+[\w.]+;|"
            r"(?:const|let|var)[ \t]+\w+[ \t]*=[ \t]*require\()[^\n]*)", (1,)),
    Concept("comment", "code", "a comment: # to line end (not #!, ##, #include, #define), // to line end (not "
            "in ://), /* … */",
            r"(?m)(?:(?<=\s)|^)#(?![!#]|[ \t]*include\b|[ \t]*define\b)[^\n]*|(?<![:/\w])//[^\n]*|/\*[\s\S]*?\*/"),
    Concept("loop_keyword", "code", "for / while opening a loop: at line start in a line ending with ':', or "
            "right before '('",
            r"(?m)^[ \t]*(?:async[ \t]+)?(for|while)\b[^\n]*:[ \t]*(?:#[^\n]*)?$|\b(for|while)(?=[ \t]*\()", (1, 2)),
    Concept("decorator", "code", "a decorator at line start (@property, @functools.cache)",
            r"(?m)^[ \t]*(@[A-Za-z_][\w.]*)", (1,)),
    Concept("dunder", "code", "a double-underscore name (__init__, __name__)", r"(?<!\w)__[A-Za-z0-9]\w*?__(?!\w)"),
    Concept("opening_bracket", "code", "an opening bracket ( [ {", r"[(\[{]"),
    Concept("closing_bracket", "code", "a closing bracket ) ] }", r"[)\]}]"),
    Concept("operator", "code", "an operator: == != <= >= += -= *= /= %= &= |= ^= ** -> => && || << >>, or one of "
            "= + - * / % < > × ÷ between spaces",
            r"==|!=|<=|>=|[-+*/%&|^]=|\*\*|->|=>|&&|\|\||<<|>>|(?<=\s)[=+\-*/%<>×÷](?=\s)"),
    Concept("indentation", "code", "the leading whitespace of an indented line", r"(?m)^[ \t]+(?=\S)"),
    Concept("snake_case", "code", "a snake_case identifier (max_len, os_path_join)", r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b"),
    Concept("camel_case", "code", "a camelCase or PascalCase identifier (getValue, TextIOWrapper)",
            r"\b[a-z]+[A-Z][A-Za-z0-9]*\b|\b[A-Z][a-z0-9]+[A-Z][A-Za-z0-9]*\b"),
    # ------------------------------------------------------------------------------------------- LaTeX
    Concept("inline_math", "latex", "inline math, delimiters included: $…$ (no space just inside the dollars, "
            "TeX's rule, so '$5 and $10' is not math) or \\(…\\)",
            r"(?<![\\$])\$(?![$\s])(?:[^$\\\n]|\\.)+?(?<!\s)\$(?!\$)|\\\([\s\S]+?\\\)"),
    Concept("display_math", "latex", "display math, delimiters included: $$…$$, \\[…\\], or an equation, align, "
            "gather, multline, eqnarray or displaymath environment",
            r"\$\$[\s\S]+?\$\$|\\\[[\s\S]+?\\\]|\\begin\{(equation|align|gather|multline|eqnarray|displaymath)\*?\}"
            r"[\s\S]*?\\end\{\1\*?\}"),
    Concept("frac_argument", "latex", "inside the braces of \\frac{…}{…} (also \\dfrac, \\tfrac; one level of nested "
            "braces)", r"\\[dt]?frac[ \t]*" + _BRACED + r"[ \t]*" + _BRACED, (1, 2)),
    Concept("superscript", "latex", "the exponent after ^ (x^2, e^{i\\pi}, a^\\alpha), braces included",
            r"(?<=[A-Za-z0-9})\]])\^(" + _BRACED_ARG + r"|\\[A-Za-z]+|[A-Za-z0-9])", (1,)),
    Concept("subscript", "latex", "the index after _ (x_i, a_{n+1}, \\sum_{k}), braces included; the base is one "
            "letter, a command or a closing bracket, so snake_case names do not count",
            r"(?:(?<![\w\\])[A-Za-z]|\\[A-Za-z]+|[})\]])_(" + _BRACED_ARG + r"|\\[A-Za-z]+|[A-Za-z0-9](?![A-Za-z0-9_]))",
            (1,)),
    Concept("latex_command", "latex", "a LaTeX command of two or more letters (\\frac, \\alpha, \\section)",
            r"(?<!\\)\\[A-Za-z]{2,}"),
    Concept("latex_environment", "latex", "\\begin{…} or \\end{…}", r"\\(?:begin|end)\{[A-Za-z]+\*?\}"),
    Concept("greek_letter", "latex", "a Greek-letter command (\\alpha, \\Omega)", r"\\(?:" + _GREEK + r")(?![A-Za-z])"),
)
# fmt: on
BY_NAME = {c.name: c for c in CONCEPTS}


def select_concepts(names: Sequence[str] | None) -> list[Concept]:
    """Concepts named by `--concepts` (names or the groups text, code, latex; None = all), in the table's order.

    Raises ValueError naming the unknown ones (the script turns it into its one-line error).
    """
    if not names:
        return list(CONCEPTS)
    unknown = [n for n in names if n not in BY_NAME and n not in GROUPS and n != "all"]
    if unknown:
        raise ValueError(f"unknown concept(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)} or a group "
                         f"({', '.join(GROUPS)}); see --list-concepts")
    wanted = set(names)
    return [c for c in CONCEPTS if "all" in wanted or c.name in wanted or c.group in wanted]


def listing() -> str:
    """`--list-concepts`: every concept with its group and what it matches."""
    width = max(len(c.name) for c in CONCEPTS)
    lines = [f"{len(CONCEPTS)} concepts (--concepts NAME … or a group: {', '.join(GROUPS)}); a token is positive "
             "if its characters overlap a match:"]
    for group in GROUPS:
        lines.append(f"{group}:")
        lines += [f"  {c.name:<{width}}  {c.description}" for c in CONCEPTS if c.group == group]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- tokens


def _decoder(tokenizer):
    """A function decoding many id lists at once: the Rust backend's batch decoder when there is one, without
    special tokens and without the Python side's clean-up of spaces (so prefixes stay prefixes)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode_batch"):
        return lambda lists: backend.decode_batch(lists, skip_special_tokens=True)
    return lambda lists: tokenizer.batch_decode(lists, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def token_char_spans(tokenizer, ids: Sequence[int], special_ids: Sequence[int] | None = None
                     ) -> tuple[str, np.ndarray, np.ndarray]:
    """(text, start [n], end [n]): the decoded text of `ids` and each token's character span in it (module doc).

    Costs one decode of every prefix (n decodes of up to n tokens; ~13 ms for 256 tokens with a Rust tokenizer).
    """
    ids = [int(i) for i in ids]
    n = len(ids)
    if n == 0:
        return "", np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    prefixes = _decoder(tokenizer)([ids[: i + 1] for i in range(n)])
    text = prefixes[-1]
    ends = np.array([len(p) for p in prefixes], dtype=np.int64)
    ends = np.minimum(np.minimum.accumulate(ends[::-1])[::-1], len(text))  # non-decreasing, inside the text
    starts = np.concatenate([[0], ends[:-1]])
    special = set(tokenizer.all_special_ids if special_ids is None else special_ids)
    is_special = np.array([i in special for i in ids], dtype=bool)
    shares = (starts == ends) & ~is_special & (starts > 0)
    starts[shares] -= 1  # a piece of a character shown by another token covers that character
    return text, starts, ends


def label_tokens(text: str, starts: np.ndarray, ends: np.ndarray, concepts: Sequence[Concept]) -> np.ndarray:
    """[n, C] bool: token i is positive for concept c iff [starts[i], ends[i]) overlaps one of c's match spans."""
    out = np.zeros((len(starts), len(concepts)), dtype=bool)
    for j, concept in enumerate(concepts):
        covered = np.concatenate([[0], np.cumsum(concept.char_mask(text), dtype=np.int64)])
        out[:, j] = covered[ends] > covered[starts]
    return out


def label_ids(tokenizer, ids: Sequence[int], concepts: Sequence[Concept], special_ids: Sequence[int] | None = None
              ) -> np.ndarray:
    """[n, C] bool labels of a window of token ids (decode, spans, overlap)."""
    text, starts, ends = token_char_spans(tokenizer, ids, special_ids)
    return label_tokens(text, starts, ends, concepts)
