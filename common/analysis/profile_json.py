"""The JSON profile of one expert (docs/METRICS.md#expert-profile), built from the streamed counts and activity of
`profiles.py`: frequency, weights, domains, tokens by count and by lift, next tokens, top contexts, promoted and
suppressed tokens, co-activated experts, predecessors and successors. Definitions: docs/METRICS.md."""

from __future__ import annotations

import math
import re

import numpy as np

from common.analysis.specialization import transition_probabilities

REPLACEMENT = "\ufffd"  # what decoding gives for bytes that are not whole UTF-8 characters


def _byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of the byte-level BPE vocabularies (GPT-2, OLMoE, Llama 3, ...): printable bytes stand for
    themselves, the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


BYTE_LEVEL = _byte_level_alphabet()


def token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The raw bytes of a vocabulary entry, from its byte-level BPE piece ('âĢ' -> e2 80) or byte-fallback piece
    ('<0xE2>'); None when the tokenizer is neither or its decoding disagrees with these bytes."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str) or not piece:
        return None
    fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    if not all(c in BYTE_LEVEL for c in piece):
        return None
    raw = bytes(BYTE_LEVEL[c] for c in piece)
    text = tokenizer.decode([int(token_id)])
    return raw if raw.decode("utf-8", errors="replace").strip() == text.strip() else None


def token_display(item: dict) -> str:
    """A token of a profile list as one unambiguous word: its Python repr, or for a fragment of a UTF-8 character
    (which decodes to '�', like every other fragment) its bytes, b'\\xe2\\x80', or else its id."""
    if REPLACEMENT not in item["token"]:
        return repr(item["token"])
    return repr(bytes.fromhex(item["bytes"])) if item.get("bytes") else f"{item['token']!r}#{item['token_id']}"


def _decode(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]) if token_id >= 0 else ""


def _token_list(tokenizer, ids: np.ndarray, values: np.ndarray, name: str, extra: dict[str, np.ndarray] | None = None) -> list[dict]:
    """One item per id: token_id, token (decoded), the value under `name`, the `extra` columns, and `bytes` (hex)
    for a token that decodes to '�' (a fragment of a UTF-8 character), which tells such tokens apart."""
    out = []
    for position, token_id in enumerate(ids):
        item = {"token_id": int(token_id), "token": _decode(tokenizer, int(token_id)), name: float(values[position])}
        for key, column in (extra or {}).items():
            item[key] = float(column[position])
        if REPLACEMENT in item["token"]:
            raw = token_bytes(tokenizer, int(token_id))
            item["bytes"] = raw.hex() if raw is not None else None
        out.append(item)
    return out


def build_profile(e: int, position: int, ctx: dict, top: int, min_count: int) -> dict:
    """The JSON profile of expert e (its column `position` in the activity accumulator)."""
    tok, layer = ctx["tokenizer"], ctx["layer"]
    li = ctx["layer_position"]
    counts, domains = ctx["counts"], ctx["domains"]
    tokens_total = counts["tokens"].sum()
    per_domain = counts["topk"][li][:, e]
    selected = per_domain.sum()
    profile: dict = {
        "layer": layer.layer, "expert": e, "model": ctx["model"], "tokens": int(tokens_total),
        "selected_topk": int(selected), "frequency_topk": selected / tokens_total,
        "frequency_top1": counts["top1"][li][:, e].sum() / tokens_total,
        "uniform_topk": layer.top_k / layer.num_choices, "uniform_top1": 1 / layer.num_choices,
    }
    weights = ctx["weights"]
    profile["weight_when_selected"] = {
        "count": int(weights["count"][position]), "mean": float(weights["mean"][position]),
        "std": float(weights["std"][position]),
        **{f"q{q}": float(v) for q, v in zip(ctx["quantile_levels"], ctx["quantiles"][position], strict=True)},
    }
    profile["domains"] = [
        {"domain": name, "tokens_routed": int(per_domain[d]), "share_of_expert": float(per_domain[d] / selected) if selected else 0.0,
         "share_of_domain": float(per_domain[d] / counts["tokens"][d]) if counts["tokens"][d] else 0.0}
        for d, name in enumerate(domains)
    ]
    table, occurrences = counts["token_current"][li][:, e], counts["occurrences_current"]
    by_count = np.argsort(-table, kind="stable")[:top]
    by_count = by_count[table[by_count] > 0]
    profile["top_tokens_by_count"] = _token_list(tok, by_count, table[by_count], "count")
    with np.errstate(invalid="ignore", divide="ignore"):
        # (c_e(t) · N) / (n_e · n_t): both products are exact integers, so tokens at the same lift get the same float
        # (the ratio of ratios rounded differently per token and broke the ties by count).
        lift = (table * float(tokens_total)) / (float(max(selected, 1)) * occurrences)
    eligible = (occurrences >= min_count) & (table > 0)
    lift = np.where(eligible, lift, -np.inf)
    by_lift = np.lexsort((-table, -lift))[:top]  # ties at the same lift (the ceiling): the more frequent first
    by_lift = by_lift[np.isfinite(lift[by_lift])]
    profile["top_tokens_by_lift"] = _token_list(tok, by_lift, lift[by_lift], "lift",
                                                {"count": table[by_lift], "occurrences": occurrences[by_lift]})
    # Lift cannot exceed N / n_e, reached by every id whose occurrences all go to e: many ids tie there, and only
    # their counts tell them apart, so the profile says where the ceiling is and how many ids sit on it.
    profile["lift_min_count"] = int(min_count)
    profile["lift_ceiling"] = float(tokens_total / selected) if selected else None
    profile["lift_at_ceiling"] = int((eligible & (table == occurrences)).sum())
    next_table = counts["token_next"][li][:, e]
    by_next = np.argsort(-next_table, kind="stable")[:top]
    by_next = by_next[next_table[by_next] > 0]
    profile["top_next_tokens"] = _token_list(tok, by_next, next_table[by_next], "count")

    contexts = []
    for rank in range(ctx["best_score"].shape[0]):
        score = float(ctx["best_score"][rank, position])
        if not math.isfinite(score):
            break
        window = [int(t) for t in ctx["best_window"][rank, position]]
        centre = len(window) // 2
        contexts.append({
            "score": score, "weight": float(ctx["best_weight"][rank, position]),
            "domain": domains[int(ctx["best_domain"][rank, position])],
            "token": _decode(tok, window[centre]),
            "before": tok.decode([t for t in window[:centre] if t >= 0]),
            "after": tok.decode([t for t in window[centre + 1 :] if t >= 0]),
        })
    profile["top_contexts"] = contexts

    logits = ctx["decoded"][position]
    promoted, suppressed = np.argsort(-logits, kind="stable")[:top], np.argsort(logits, kind="stable")[:top]
    profile["promoted_tokens"] = _token_list(tok, promoted, logits[promoted], "logit")
    profile["suppressed_tokens"] = _token_list(tok, suppressed, logits[suppressed], "logit")

    coact = counts["coactivation"][li][e]
    with np.errstate(invalid="ignore", divide="ignore"):
        conditional = coact / selected if selected else np.zeros_like(coact)
    partners = [j for j in np.argsort(-coact, kind="stable") if j != e and coact[j] > 0][:top]
    profile["coactivated_experts"] = [{"expert": int(j), "count": int(coact[j]), "p_given_this": float(conditional[j])} for j in partners]

    for key, pair, neighbour in (("predecessors", li - 1, "previous"), ("successors", li, "next")):
        profile[key] = []
        if ctx["neighbours"].get(neighbour) is None:
            continue
        transitions = counts["transitions"][pair]
        if key == "successors":
            probs = transition_probabilities(transitions, counts["topk"][li].sum(0))[e]
        else:  # P(e' ∈ K_prev | e ∈ K_this): column e of the previous layer's pair counts, over n_e
            probs = transitions[:, e] / selected if selected else np.zeros(transitions.shape[0])
        order = [j for j in np.argsort(-np.nan_to_num(probs), kind="stable") if probs[j] > 0][:top]
        profile[key] = [{"layer": ctx["neighbours"][neighbour], "expert": int(j), "probability": float(probs[j])} for j in order]
    return profile
