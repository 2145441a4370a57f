"""Automatic expert labels (docs/METRICS.md#automatic-labels): top windows, prompts, answers and detection scores.

`LabelWindows` composes `ExpertActivity` (the `top_n` positions per expert with the largest w_e · ‖E_e(x)‖, with
their token windows, streamed and merged under torchrun) with what labelling needs on top, kept per top-window
slot and carried along as the running top list changes: the experts chosen at every position of the window (so
the tokens an expert processed can be marked, and windows where an expert is active can be kept out of its
negatives), and for the tokens where the window's expert is active the top logit-lens tokens of its weighted
output w_e · E_e(x) through the model's final norm and unembedding (and that output's norm). The extra state is
computed once per window, in the batch where the window enters the top list, so it costs a few expert calls per
batch, not one per token.

The rest is plain Python: `Window` (one window, decoded for display), the explainer and scorer prompts, the
parsers of their replies (lenient; what cannot be read is reported as malformed), the choice of negatives and
the detection scores. The detection protocol (an explainer writes a label from some examples, a scorer decides for
held-out examples mixed with non-examples whether the label applies) is that of EleutherAI's automatic
interpretability work [AutoInterp]; marking the active tokens with << >> follows the same work. Prompts are this
project's own.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from common import distributed
from common.analysis.expert_profile import _ROW_STRIDE, ExpertActivity
from common.data import Batch
from common.hooks import LayerRecord
from common.model import MoELayer, MoEModel

MARK_OPEN, MARK_CLOSE = "<<", ">>"
LABEL_MAX_CHARS = 200


# ------------------------------------------------------------------------------------------ streaming


class LabelWindows:
    """Top `top_n` windows of `window` tokens per expert of `experts` (the top token at index window // 2: that
    many tokens before it, the rest after), with the routing of every window position and, for the experts in
    `lens_experts`, the top `lens_top` logit-lens tokens of the expert's weighted output at its active tokens.

    An expert is *active* at a token when the token counts (see docs/METRICS.md#conventions) and chose it with
    a nonzero weight, the same rule `ExpertActivity` ranks by."""

    def __init__(self, moe: MoEModel, moe_layer: MoELayer, experts: Sequence[int], *, top_n: int, window: int = 32,
                 lens_experts: Sequence[int] | None = None, lens_top: int = 3) -> None:
        self.moe, self.moe_layer, self.experts = moe, moe_layer, list(experts)
        self.device = moe.device
        self.window, self.radius, self.lens_top = window, window // 2, lens_top
        self.activity = ExpertActivity(moe_layer, self.experts, self.device, hidden_size=moe.hidden_size,
                                       top_n=top_n, radius=self.radius)
        lens = set(self.experts if lens_experts is None else lens_experts)
        self.lens_columns = [c for c, e in enumerate(self.experts) if e in lens]
        n, X, W, k = top_n, len(self.experts), window, moe_layer.top_k
        self.offsets = torch.arange(-self.radius, -self.radius + W, device=self.device)
        self.routed = torch.full((n, X, W, k), -1, dtype=torch.long, device=self.device)  # chosen experts, -1 = none
        self.routed_weight = torch.zeros((n, X, W, k), device=self.device)
        self.lens_ids = torch.full((n, X, W, lens_top), -1, dtype=torch.long, device=self.device)
        self.lens_norm = torch.zeros((n, X, W), device=self.device)  # ‖w_e E_e(x)‖ at active tokens

    def _state(self) -> list[torch.Tensor]:
        return [self.routed, self.routed_weight, self.lens_ids, self.lens_norm]

    def _set_state(self, parts: list[torch.Tensor]) -> None:
        self.routed, self.routed_weight, self.lens_ids, self.lens_norm = parts

    @torch.no_grad()
    def update(self, record: LayerRecord, batch: Batch) -> None:
        old_key, old_state = self.activity.best_key.clone(), self._state()
        self.activity.update(record, batch)
        fresh = self._follow(old_key, old_state)
        fresh &= (self.activity.best_key // _ROW_STRIDE) == batch.number
        if fresh.any():
            self._fill(fresh.nonzero(), record, batch)

    def _follow(self, old_key: torch.Tensor, old_state: list[torch.Tensor]) -> torch.Tensor:
        """Carry each kept window's state to its new slot; returns [n, X] the slots holding a window not seen
        before (with a finite score: slots an expert never filled stay empty)."""
        new_key = self.activity.best_key
        same = new_key.unsqueeze(1) == old_key.unsqueeze(0)  # [n_new, n_old, X]
        found = same.any(1)
        source = same.int().argmax(1)  # [n_new, X]
        moved = []
        for old, empty in zip(old_state, (-1, 0, -1, 0), strict=True):
            index = source.view(*source.shape, *([1] * (old.dim() - 2))).expand(-1, -1, *old.shape[2:])
            kept = old.gather(0, index)
            mask = found.view(*found.shape, *([1] * (old.dim() - 2)))
            moved.append(torch.where(mask, kept, torch.full_like(kept, empty)))
        self._set_state(moved)
        return ~found & torch.isfinite(self.activity.best_score)

    def _fill(self, slots: torch.Tensor, record: LayerRecord, batch: Batch) -> None:
        """Routing and logit lens of the windows in `slots` [F, 2] (rank, column), all from this batch."""
        rank, column = slots[:, 0], slots[:, 1]
        S = batch.input_ids.shape[1]
        token = self.activity.best_key[rank, column] - batch.number * _ROW_STRIDE
        positions = (token % S).unsqueeze(1) + self.offsets  # [F, W]
        inside = (positions >= 0) & (positions < S)
        flat = (token // S).unsqueeze(1) * S + positions.clamp(0, S - 1)
        counted = batch.count_mask.reshape(-1).to(self.device)[flat] & inside
        k = self.routed.shape[-1]
        index = record.topk_index.to(self.device).long()[:, :k][flat]  # [F, W, k]
        weight = record.topk_weight.to(self.device).float()[:, :k][flat]
        valid = counted.unsqueeze(2) & (weight != 0)
        self.routed[rank, column] = torch.where(valid, index, torch.full_like(index, -1))
        self.routed_weight[rank, column] = torch.where(valid, weight, torch.zeros_like(weight))
        experts = torch.tensor(self.experts, device=self.device)[column]  # [F]
        hit = valid & (index == experts.view(-1, 1, 1))
        active_weight = (weight * hit).sum(2)  # [F, W]
        active = hit.any(2)
        x = record.expert_input
        for c in self.lens_columns:
            where = active & (column == c).unsqueeze(1)
            if not where.any():
                continue
            f, p = where.nonzero(as_tuple=True)
            tokens = flat[f, p].to(x.device)
            out = self.moe_layer.expert_fn(self.experts[c], x[tokens]).to(self.device).float()
            out = out * active_weight[f, p].unsqueeze(1)
            logits = self.moe.unembed(out.to(self.moe.dtype)).float()
            self.lens_ids[rank[f], column[f], p] = logits.topk(min(self.lens_top, logits.shape[-1]), dim=-1).indices
            self.lens_norm[rank[f], column[f], p] = out.norm(dim=-1)

    @torch.no_grad()
    def all_reduce(self) -> LabelWindows:
        """Merge all ranks (no-op without torchrun): the top windows as `ExpertActivity.all_reduce`, their state
        following them by stream key (unique across ranks)."""
        if distributed.world_size() > 1:
            keys = distributed.all_gather(self.activity.best_key).flatten(0, 1)
            state = [distributed.all_gather(t).flatten(0, 1) for t in self._state()]
            self.activity.all_reduce()
            self._follow(keys, state)
        else:
            self.activity.all_reduce()
        return self


# ------------------------------------------------------------------------------------------ windows


def _clean(text: str) -> str:
    """One-line display: newlines, carriage returns and tabs written as escapes."""
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded window: differences of decoded prefixes, so SentencePiece's leading
    spaces come out right, and a character split over several byte tokens is given whole to the token that
    completes it (the tokens before it get ''). '' also for padding (-1) and special tokens."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces, shown, previous = [], [], ""
    for i, token in enumerate(ids):
        if token < 0 or token in special:
            pieces.append("")
            continue
        shown.append(token)
        text = tokenizer.decode(shown)
        if text.endswith("\ufffd") and any(t >= 0 and t not in special for t in ids[i + 1 :]):
            pieces.append("")  # an incomplete character: wait for the token that completes it
            continue
        pieces.append(text[len(previous):] if text.startswith(previous) else tokenizer.decode([token]))
        previous = text
    return pieces


@dataclass
class Window:
    """One top window of an expert (`expert`, its `rank`-th strongest, 0 = strongest), decoded for display."""

    expert: int
    rank: int
    key: int  # stream position of the top token (unique id of the window)
    score: float  # w_e · ‖E_e(x)‖ of the top token
    weight: float  # w_e of the top token
    domain: str
    pieces: list[str]  # display text of each position ('' = padding, outside the sequence or special)
    ids: list[int]  # token id of each position (-1 = padding or outside the sequence)
    routed: list[list[int]]  # experts active at each position
    active: list[dict] = field(default_factory=list)  # the window's expert's active tokens (position, token, ...)
    centre: int = 0
    _decode: Callable[[list[int]], str] = field(default=lambda ids: "", repr=False)

    @property
    def id(self) -> str:
        return f"{self.expert}:{self.rank}"

    def text(self, *, one_line: bool = True) -> str:
        """The window's text; `one_line` writes newlines and tabs as escapes (as the prompts show it)."""
        clean = _clean if one_line else str
        return clean("".join(self.pieces))

    def marked(self, *, one_line: bool = True) -> str:
        """The text with the window's expert's active tokens as <<token>> (a token that shows no text of its own,
        the first bytes of a split character, is not marked)."""
        clean = _clean if one_line else str
        on = {a["position"] for a in self.active}
        return "".join(f"{MARK_OPEN}{clean(p)}{MARK_CLOSE}" if i in on and p else clean(p)
                       for i, p in enumerate(self.pieces))

    def token(self, position: int) -> str:
        """The token at `position` as text: its piece, or (the first bytes of a split character) itself decoded."""
        return self.pieces[position] or (self._decode([self.ids[position]]) if self.ids[position] >= 0 else "")

    def active_anywhere(self, expert: int) -> bool:
        return any(expert in experts for experts in self.routed)

    def active_at_centre(self, expert: int) -> bool:
        return expert in self.routed[self.centre]

    def record(self, *, marked: bool = True) -> dict:
        out = {"id": self.id, "expert": self.expert, "rank": self.rank, "score": self.score, "weight": self.weight,
               "domain": self.domain, "top_position": self.centre, "top_token": self.token(self.centre),
               "text": self.text(one_line=False)}
        if marked:
            out["marked"] = self.marked(one_line=False)
            out["active_tokens"] = self.active
        return out


def collect_windows(acc: LabelWindows, tokenizer, domains: Sequence[str]) -> dict[int, list[Window]]:
    """The windows of every tracked expert, strongest first (experts never chosen get none)."""
    activity = acc.activity
    score, key = activity.best_score.cpu().numpy(), activity.best_key.cpu().numpy()
    windows = activity.best_window[:, :, : acc.window].cpu().numpy()
    domain, weight = activity.best_domain.cpu().numpy(), activity.best_weight.cpu().numpy()
    routed, routed_weight = acc.routed.cpu().numpy(), acc.routed_weight.cpu().numpy()
    lens_ids, lens_norm = acc.lens_ids.cpu().numpy(), acc.lens_norm.cpu().numpy()
    lens_columns = set(acc.lens_columns)
    decoded: dict[int, str] = {}

    def decode(token: int) -> str:
        if token not in decoded:
            decoded[token] = tokenizer.decode([token])
        return decoded[token]

    out: dict[int, list[Window]] = {}
    for c, e in enumerate(acc.experts):
        found = []
        for r in range(score.shape[0]):
            if not math.isfinite(float(score[r, c])):
                break
            ids = [int(t) for t in windows[r, c]]
            pieces = token_pieces(tokenizer, ids)
            chosen = [[int(x) for x in routed[r, c, p] if x >= 0] for p in range(len(ids))]
            active = []
            for p in range(len(ids)):
                hit = routed[r, c, p] == e
                if not hit.any():
                    continue
                item = {"position": p, "token": pieces[p] or decode(ids[p]),
                        "weight": float(routed_weight[r, c, p][hit].sum())}
                if c in lens_columns:
                    item["output_norm"] = float(lens_norm[r, c, p])
                    item["logit_lens"] = [decode(int(t)) for t in lens_ids[r, c, p] if t >= 0]
                active.append(item)
            found.append(Window(expert=e, rank=r, key=int(key[r, c]), score=float(score[r, c]),
                                weight=float(weight[r, c]), domain=domains[int(domain[r, c])], pieces=pieces,
                                ids=ids, routed=chosen, active=active, centre=acc.radius, _decode=tokenizer.decode))
        out[e] = found
    return out


def split_windows(windows: Sequence[Window]) -> tuple[list[Window], list[Window]]:
    """(explained, scored): ranks 0, 2, 4, … go to the explainer, 1, 3, 5, … to the scorer, so both halves span
    the same range of activation strengths."""
    return list(windows[0::2]), list(windows[1::2])


def shuffle_windows(windows: dict[int, list[Window]], rng: np.random.Generator) -> dict[int, list[Window]]:
    """Chance control: every window dealt to a random expert, each expert keeping its number of windows (a window
    keeps its own marks and logit lens, so the explainer sees the same kind of input)."""
    pool = [w for e in windows for w in windows[e]]
    order = rng.permutation(len(pool))
    dealt, start = {}, 0
    for e, own in windows.items():
        dealt[e] = [pool[i] for i in order[start : start + len(own)]]
        start += len(own)
    return dealt


def choose_negatives(expert: int, own: Sequence[Window], windows: dict[int, list[Window]], n: int,
                     rng: np.random.Generator, *, use_routing: bool = True) -> list[Window]:
    """n windows of other experts for `expert`'s scorer: never one of its own windows (by stream position); with
    `use_routing`, never one whose top token chose `expert`, and preferably ones where `expert` is active nowhere.
    Drawn at random (rng) within each tier; fewer than n if the other experts do not have enough."""
    taken = {w.key for w in own}
    candidates, seen = [], set()
    for other in sorted(windows):
        if other == expert:
            continue
        for w in windows[other]:
            if w.key in taken or w.key in seen:
                continue
            seen.add(w.key)
            if use_routing and w.active_at_centre(expert):
                continue
            candidates.append(w)
    tiers = [[w for w in candidates if not (use_routing and w.active_anywhere(expert))],
             [w for w in candidates if use_routing and w.active_anywhere(expert)]]
    chosen: list[Window] = []
    for tier in tiers:
        for i in rng.permutation(len(tier)):
            if len(chosen) == n:
                return chosen
            chosen.append(tier[i])
    return chosen


# ------------------------------------------------------------------------------------------ prompts

EXPLAINER_SYSTEM = (
    "You help interpret a mixture-of-experts language model. Its router sends every token to a few of many "
    "experts. You will see text windows from the places where one expert was used most strongly; the tokens "
    f"this expert processed are marked {MARK_OPEN}like this{MARK_CLOSE}. Below each window, for each marked token, "
    "are the three tokens the expert's output pushes the model towards (read through the model's unembedding).\n\n"
    "Work out what the marked tokens have in common: a kind of token or word, a grammatical role, a topic, a "
    "formatting or code pattern, or the kind of next token the expert helps to predict. A specific description "
    "beats a vague one. Newlines in the text are written as \\n.\n\n"
    "Reply with exactly one line:\nLABEL: <a short phrase of at most 12 words>"
)

SCORER_SYSTEM = (
    "You check a label for one expert of a mixture-of-experts language model. The label describes the tokens "
    "and contexts where the expert is used. You will see numbered text windows: some come from the places where "
    "this expert is used most strongly, the others from places where other experts are. For each window decide "
    "whether the label applies to it, that is whether the expert would be strongly used somewhere in it. Newlines "
    "in the text are written as \\n.\n\n"
    "Reply with one line per window, in order, each exactly `<number>: yes` or `<number>: no`, and nothing else."
)


def explainer_messages(windows: Sequence[Window]) -> list[dict[str, str]]:
    blocks = []
    for i, w in enumerate(windows, 1):
        lines = [f"Window {i}: {w.marked()}"]
        lens = [f"{MARK_OPEN}{_clean(a['token'])}{MARK_CLOSE} → {', '.join(repr(t) for t in a['logit_lens'])}"
                for a in w.active if a.get("logit_lens") and w.pieces[a["position"]]]
        if lens:
            lines.append("Output promotes: " + "; ".join(lens))
        blocks.append("\n".join(lines))
    user = "Windows where the expert is used most strongly:\n\n" + "\n\n".join(blocks)
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": user}]


def scorer_messages(label: str, texts: Sequence[str]) -> list[dict[str, str]]:
    body = "\n".join(f"Window {i}: {t}" for i, t in enumerate(texts, 1))
    user = f"Label: {json.dumps(label, ensure_ascii=False)}\n\n{body}\n\nAnswer for windows 1 to {len(texts)}."
    return [{"role": "system", "content": SCORER_SYSTEM}, {"role": "user", "content": user}]


def scorer_max_tokens(n: int) -> int:
    return 16 + 8 * n


EXPLAINER_MAX_TOKENS = 64


# ------------------------------------------------------------------------------------------ replies

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_LABEL_LINE = re.compile(r"^[\s*#>_-]*label[\s*_]*:[\s*_]*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_ANSWER_LINE = re.compile(r"^[\s*#>-]*(?:window\s*)?(\d+)\s*[:.)\]-]+\s*[*_\s]*(yes|no|true|false|1|0)\b",
                          re.IGNORECASE | re.MULTILINE)
_YES = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}


def _strip(text: str) -> str:
    return _THINK.sub("", text).strip()


def parse_label(text: str) -> tuple[str | None, bool]:
    """(label, malformed). The phrase after the first `LABEL:`; without one, the reply's first non-empty line is
    used and the reply counts as malformed; an empty reply gives no label."""
    text = _strip(text)
    found = _LABEL_LINE.search(text)
    malformed = found is None
    phrase = found.group(1) if found else next((line for line in text.splitlines() if line.strip()), "")
    phrase = phrase.strip().strip("*_`\"'“”").strip()
    return (phrase[:LABEL_MAX_CHARS] or None), malformed or not phrase


def parse_answers(text: str, n: int) -> tuple[list[bool | None], bool]:
    """(answer per window, malformed). Lines `<i>: yes|no` (first answer per number wins); failing that a JSON
    list of n yes/no/true/false/1/0. Windows without an answer get None and make the reply malformed."""
    text = _strip(text)
    answers: list[bool | None] = [None] * n
    for match in _ANSWER_LINE.finditer(text):
        i = int(match.group(1)) - 1
        if 0 <= i < n and answers[i] is None:
            answers[i] = _YES[match.group(2).lower()]
    if any(a is None for a in answers):
        for candidate in re.findall(r"\[[^\[\]]*\]", text):
            try:
                items = json.loads(candidate)
            except ValueError:
                continue
            if isinstance(items, list) and len(items) == n and all(str(v).lower() in _YES for v in items):
                answers = [_YES[str(v).lower()] for v in items]
                break
    return answers, any(a is None for a in answers)


# ------------------------------------------------------------------------------------------ scores


def detection_scores(truth: Sequence[bool], answers: Sequence[bool | None]) -> dict:
    """Detection scores over the answered windows: F1 of the 'belongs to the expert' class, accuracy, precision,
    recall and the confusion counts. NaN where undefined (no answered window; F1 and precision with nothing
    predicted and nothing to find)."""
    pairs = [(t, a) for t, a in zip(truth, answers, strict=True) if a is not None]
    tp = sum(t and a for t, a in pairs)
    fp = sum((not t) and a for t, a in pairs)
    fn = sum(t and not a for t, a in pairs)
    tn = sum((not t) and not a for t, a in pairs)
    nan = float("nan")
    return {
        "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else nan,
        "accuracy": (tp + tn) / len(pairs) if pairs else nan,
        "precision": tp / (tp + fp) if tp + fp else nan,
        "recall": tp / (tp + fn) if tp + fn else nan,
        "true_positives": tp, "false_positives": fp, "true_negatives": tn, "false_negatives": fn,
    }
