"""Steer or ablate one expert through its routing: how does the model's next token change? (and which experts matter)

    uv run interv.py --prompt "Data collected by Barack Obama" --target_idx 4 --expert_id 9 --layer 1
    uv run interv.py --prompt "In the beginning God created the heaven and the" --target_idx 9 --expert_id 13 \
        --layer 1 --target_token " earth"                           # demo model: expert 13 of layer 1 takes Bible text
    uv run interv.py --prompt "def __init__(self, name):" --expert_id 13 --layer 1 --mode force --value 0.5
    uv run interv.py --prompts prompts.txt --expert_id 9 --layer 1 --mode logit --values -4 0 4 --target_idx all
    uv run interv.py --layer 1 --data demo --num_tokens 5000            # dataset mode: ΔNLL of every expert

Prompt mode (`--prompt`, repeatable, or `--prompts FILE` with one prompt per line; SPEC "Intervention"): at
decoder layer --layer, expert --expert_id and the prompt positions --target_idx (0-based indices into the
tokenised prompt, BOS included where the tokenizer adds one; negatives count from the end; default all),
`--mode scale` multiplies w_e by each value (0 ablates; default sweep 0 0.5 1 2 4 8), `set` sets w_e, `force`
routes the token to the expert even if it was not selected (replacing its lowest-weighted expert; `--value` is the
weight, default that expert's), `logit` adds d to the router logit z_e before selection. `--renormalize` rescales
each edited token's weights to their original sum. For every prompt and value: the next-token distribution at the
last position before and after (top tokens, KL(before‖after) and entropies in nats, the probability of
--target_token), and a continuation of --max_new_tokens before and after, greedy or `--sample`d (the same seed
before and after). The continuation is generated under the edit: edited prompt positions stay edited in the KV
cache; with `--target_idx all` every generated token is edited too.

Dataset mode (no prompt; SPEC "Expert importance"): for each expert e of --layer (or --experts), ΔNLL_{e,D} = mean
next-token NLL on domain D with w_e = 0 at every token (not renormalised unless --renormalize) minus the unedited
NLL on the same counted tokens, beside e's selection frequency on D. Cost: E+1 forwards per batch; streamed.

Outputs, prompt mode: prompt_tokens.csv (every prompt token: id, text, targeted or not, w_e before),
intervention_sweep.csv (one row per prompt and value), next_token_top.csv (top tokens before / after),
sweep_token_probs.csv (the next tokens the figures follow), interventions.json (all of it, nested), figures
sweep_prompt<i> (probability and KL against the value; before / after bars for one value) and kl_by_value
(several prompts). Dataset mode: importance_layer<L>.csv (tidy: expert × domain, with 'all'),
importance_summary_layer<L>.csv, importance_layer<L>.npy and importance_frequency_layer<L>.npy [expert, domain],
figures importance_heatmap_layer<L> and importance_vs_frequency_layer<L>. Definitions: docs/METRICS.md#intervention
and #expert-importance.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from common import cli
from common.cli import at_least, base_parser, positive_float, run_main
from common.errors import InputError

if TYPE_CHECKING:
    from common.model import MoELayer, MoEModel
    from common.model.config_facts import ConfigFacts

SCRIPT = "interv"
MODES = ("scale", "set", "force", "logit")
INERT_WHEN_NOT_ROUTED = ("scale", "set")  # modes that edit w_e, which is 0 where the expert is not routed
DEFAULT_VALUES = {"scale": [0, 0.5, 1, 2, 4, 8], "set": [0, 0.1, 0.25, 0.5, 1, 2], "logit": [-8, -4, -2, 0, 2, 4, 8]}
MAX_PROMPT_FIGURES = 20
TRACKED_TOKENS = 8  # next tokens followed across the values in a prompt's figure
# Prompt-mode tables: key in run_prompts -> file name.
TABLE_NAMES = {"tokens": "prompt_tokens", "sweep": "intervention_sweep", "next_token": "next_token_top",
               "token_probs": "sweep_token_probs"}
PROMPT_ONLY = ("expert_id", "target_idx", "mode", "value", "values", "target_token", "sample", "temperature",
               "max_new_tokens")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite (got {text})")
    return value


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0], layers=False)
    parser.set_defaults(data=None)  # no --data: prompt mode if a prompt is given, else dataset mode on 'demo'
    for action in parser._actions:
        if action.dest == "data":
            action.help += " (dataset mode only; default there: demo)"
    parser.add_argument("--layer", "--layers", dest="layer", type=int, required=True,
                        help="decoder-layer index of the MoE layer (negatives from the end)")
    prompt = parser.add_argument_group("prompt mode")
    given = prompt.add_mutually_exclusive_group()
    given.add_argument("--prompt", action="append", default=None, help="a prompt (repeat the flag for several)")
    given.add_argument("--prompts", type=Path, default=None, help="a text file with one prompt per line")
    prompt.add_argument("--expert_id", type=at_least(0), default=None, help="the expert to edit")
    prompt.add_argument("--target_idx", nargs="+", default=None, metavar="I",
                        help="token positions to edit (0-based, BOS included; negatives from the end) or 'all' "
                        "(default: all)")
    prompt.add_argument("--mode", choices=MODES, default=None,
                        help="scale: w_e *= value; set: w_e = value; force: route to e with weight value; "
                        "logit: z_e += value before selection (default: scale)")
    values = prompt.add_mutually_exclusive_group()
    values.add_argument("--value", type=_number, default=None, help="one value")
    values.add_argument("--values", type=_number, nargs="+", default=None,
                        help="a sweep (default: scale 0 0.5 1 2 4 8; set 0 0.1 0.25 0.5 1 2; logit -8 -4 -2 0 2 4 8)")
    parser.add_argument("--renormalize", action="store_true", help="rescale edited tokens' weights to their original sum")
    prompt.add_argument("--target_token", default=None,
                        help="report this next token's probability (text that is one token, e.g. ' earth')")
    prompt.add_argument("--max_new_tokens", type=at_least(0), default=None, help="continuation length (default 20)")
    prompt.add_argument("--sample", action="store_true", help="sample the continuation (seeded by --seed) instead of greedy")
    prompt.add_argument("--temperature", type=positive_float, default=None, help="sampling temperature (with --sample; default 1)")
    prompt.add_argument("--top", type=at_least(1), default=10, help="next tokens listed before / after")
    dataset = parser.add_argument_group("dataset mode")
    dataset.add_argument("--experts", type=at_least(0), nargs="+", default=None,
                         help="ablate only these experts (default: every expert of the layer)")
    dataset.add_argument("--ablations_per_forward", type=at_least(1), default=None, metavar="N",
                         help="ablation variants of a batch carried side by side in one forward (default on a GPU: "
                         "all the experts, as many as keep their float32 logits within 1 GiB; on a CPU: 1)")
    dataset.add_argument("--full_forwards", action="store_true",
                         help="run every ablation as a whole forward from the embeddings (the plain way; default: "
                         "start at the ablated layer from the unedited forward's residual, the same numbers)")
    dataset.add_argument("--bootstrap", type=at_least(1), default=200, metavar="N",
                         help="causal audit: bootstrap resamples of the documents for the correlations' 95%% intervals")
    return parser


# ----------------------------------------------------------------------------------------------- validation


def _read_prompts(args: argparse.Namespace) -> list[str] | None:
    if args.prompt is not None:
        for text in args.prompt:
            if not text.strip():
                raise InputError("--prompt is empty")
        return list(args.prompt)
    if args.prompts is None:
        return None
    try:
        lines = args.prompts.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"--prompts {args.prompts}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--prompts {args.prompts}: cannot read it ({err})") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise InputError(f"--prompts {args.prompts}: no prompt in it (one per line)")
    return prompts


def _parse_targets(items: list[str] | None) -> list[int] | None:
    """None = every position."""
    if items is None or [i.lower() for i in items] == ["all"]:
        return None
    if any(i.lower() == "all" for i in items):
        raise InputError("--target_idx: give 'all' alone or token positions")
    targets = []
    for item in items:
        try:
            targets.append(int(item))
        except ValueError:
            raise InputError(f"--target_idx: '{item}' is not a token position or 'all'") from None
    return targets


def _check_flags(args: argparse.Namespace, prompts: list[str] | None) -> None:
    """Flag combinations, checked before anything heavy is imported."""
    if prompts is None:
        if args.data is None:
            args.data = ["demo"]
        stray = [name for name in PROMPT_ONLY if getattr(args, name) not in (None, False)]
        if stray:
            raise InputError(f"--{stray[0]} needs a prompt (--prompt or --prompts); dataset mode ablates every expert "
                             "of --layer, or those of --experts")
        return
    if args.data is not None or args.experts is not None:
        flag = "--data" if args.data is not None else "--experts"
        raise InputError(f"{flag} is for dataset mode; drop it or drop --prompt/--prompts")
    if args.expert_id is None:
        raise InputError("--expert_id is required with a prompt")
    args.mode = args.mode or "scale"
    if args.mode == "force" and args.values is not None:
        raise InputError("--mode force takes one --value (the forced weight; default: the replaced expert's weight), "
                         "not a list")
    if args.temperature is not None and not args.sample:
        raise InputError("--temperature applies to --sample")
    args.temperature = args.temperature or 1.0
    args.max_new_tokens = 20 if args.max_new_tokens is None else args.max_new_tokens
    args.targets = _parse_targets(args.target_idx)
    if args.value is not None:
        args.sweep = [args.value]
    elif args.values is not None:
        args.sweep = list(dict.fromkeys(args.values))
    else:
        args.sweep = [None] if args.mode == "force" else DEFAULT_VALUES[args.mode]


def run(args: argparse.Namespace) -> None:
    prompts = _read_prompts(args)
    _check_flags(args, prompts)
    if prompts is None:
        run_dataset(args)
    else:
        run_prompts(args, prompts)


# ------------------------------------------------------------------------------------------------ prompt mode


def _resolve_targets(targets: list[int] | None, length: int, number: int, prompt: str) -> list[int] | None:
    if targets is None:
        return None
    resolved = []
    for t in targets:
        position = t + length if t < 0 else t
        if not 0 <= position < length:
            raise InputError(f"--target_idx {t} is beyond prompt {number} ({prompt[:40]!r}): it has {length} tokens, "
                             f"positions 0..{length - 1} (negatives count from the end)")
        if position not in resolved:
            resolved.append(position)
    return sorted(resolved)


def _target_token(tokenizer, text: str | None) -> int | None:
    if text is None:
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise InputError(f"--target_token {text!r} is {len(ids)} tokens {pieces}, not one; give a single token "
                         "(mind the leading space: ' earth' and 'earth' differ)")
    return int(ids[0])


def _value_text(mode: str, value: float | None) -> str:
    return f"{mode} (weight of the replaced expert)" if value is None else f"{mode} {value:g}"


@dataclasses.dataclass
class PromptPlan:
    """The prompts tokenised and their target positions resolved, with the --target_token id."""

    encoded: list[list[int]]  # token ids, one list per prompt (torch-free: the early checks build it too)
    targets: list[list[int] | None]
    target_id: int | None


def plan_prompts(args: argparse.Namespace, prompts: list[str], skeleton: MoEModel, layer: MoELayer) -> PromptPlan:
    """--expert_id, --target_token, the prompts' lengths and --target_idx, from the config and tokenizer alone (the
    weightless model): refused before any weight is read."""
    if args.expert_id >= layer.num_experts:
        raise InputError(f"--expert_id {args.expert_id} out of range: layer {layer.layer} has experts "
                         f"0..{layer.num_experts - 1}")
    return tokenize_prompts(args, prompts, skeleton.tokenizer, skeleton.context_length)


def early_prompt_checks(args: argparse.Namespace, prompts: list[str], facts: ConfigFacts) -> None:
    """`plan_prompts` on the config and tokenizer alone, before the modelling code is imported: --expert_id against
    the config's expert count, and the prompts tokenised by the same call (`tokenize_prompts`)."""
    facts.check_expert("--expert_id", args.expert_id, args.layer)
    if facts.tokenizer is not None:
        tokenize_prompts(args, prompts, facts.tokenizer, facts.context_length)


def tokenize_prompts(args: argparse.Namespace, prompts: list[str], tok, context: int | None) -> PromptPlan:
    """--target_token, the prompts' lengths against the context and --target_idx against the tokenised prompts."""
    target_id = _target_token(tok, args.target_token)
    encoded, targets = [], []
    for number, prompt in enumerate(prompts):
        ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
        if not ids:
            raise InputError(f"prompt {number} encodes to no tokens")
        if context is not None and len(ids) + args.max_new_tokens > context:
            raise InputError(f"prompt {number} ({len(ids)} tokens) + --max_new_tokens {args.max_new_tokens} "
                             f"exceeds the model's context length {context}")
        encoded.append(ids)
        targets.append(_resolve_targets(args.targets, len(ids), number, prompt))
    return PromptPlan(encoded, targets, target_id)


def run_prompts(args: argparse.Namespace, prompts: list[str]) -> None:
    config = cli.config(args, SCRIPT, layers=[args.layer])  # the flags and data specs, checked before torch is imported
    from common.cli import pipeline

    plans: list[PromptPlan] = []

    def preflight(skeleton, layers, domains) -> None:
        plans.append(plan_prompts(args, prompts, skeleton, layers[0]))

    s = pipeline.setup(config, preflight, early=lambda facts: early_prompt_checks(args, prompts, facts))
    # imported once the input is known to be good: a refused run does not pay for them
    import pandas as pd
    import torch

    from common.analysis.importance import kl_divergence, next_token_summary, run_prompt
    from common.hooks import RoutingEdit
    from common.run import Run

    moe, layer, tok = s.moe, s.layers[0], s.moe.tokenizer
    encoded = [torch.tensor([ids], dtype=torch.long) for ids in plans[0].encoded]  # [1, n] each
    targets, target_id = plans[0].targets, plans[0].target_id

    e, mode = args.expert_id, args.mode
    generation = {"sample": args.sample, "temperature": args.temperature, "seed": args.seed, "eos_id": tok.eos_token_id}
    tables: dict[str, list[dict]] = {"tokens": [], "sweep": [], "next_token": [], "token_probs": []}
    report = []
    sweep_text = "" if args.sweep == [None] else " " + " ".join(f"{v:g}" for v in args.sweep)
    print(f"layer {layer.layer}, expert {e}, {mode}{sweep_text}{' (renormalized)' if args.renormalize else ''}")
    for number, (prompt, ids, positions) in enumerate(zip(prompts, encoded, targets, strict=True)):
        base = run_prompt(moe, ids, layer, [], [], args.max_new_tokens, **generation)
        before = next_token_summary(base.logp, tok, args.top, target_id)
        base_weight, base_selected = base.expert_weight(e), base.selected(e)
        chosen = list(range(ids.shape[1])) if positions is None else sorted(positions)
        tokens = [
            {"prompt": number, "position": p, "token_id": t, "token": tok.decode([t]), "target": p in chosen,
             "selected_before": bool(base_selected[p]), "weight_before": float(base_weight[p])}
            for p, t in enumerate(ids[0].tolist())
        ]
        tables["tokens"] += tokens
        hits = int(base_selected[chosen].sum())
        # scale / set edit w_e, and w_e is 0 wherever the unedited forward did not route the token to e: with no
        # target routed there is nothing to edit, and every value gives the unedited output.
        routed = int((base_weight[chosen] != 0).sum())
        cannot_act = mode in INERT_WHEN_NOT_ROUTED and routed == 0
        _print_targets(number, prompt, tokens, positions, e, hits)
        if cannot_act:
            warnings.warn(f"prompt {number}: expert {e} is not routed at any target position (w_e = 0 there without "
                          f"the edit), so --mode {mode} cannot act and every value leaves the output unchanged; use "
                          "--mode force (or logit) to route the token to it", stacklevel=1)
        continuation_before = tok.decode(base.continuation)
        print(f"  {'before':<16} picked at {hits}/{len(chosen)} targets; next {_top_text(before['top'])}")
        print(f"  {'':<16} continuation {continuation_before!r}")
        tables["next_token"] += [{"prompt": number, "value": None, "which": "before", **t} for t in before["top"]]
        results, after_logps = [], []
        for value in args.sweep:
            edit = RoutingEdit(layer.layer, e, mode, value, positions=positions, renormalize=args.renormalize)
            # Edited prompt positions stay edited in the KV cache; only 'all' edits the generated tokens too.
            after_run = run_prompt(moe, ids, layer, [edit], [edit] if positions is None else [], args.max_new_tokens,
                                   **generation)
            after = next_token_summary(after_run.logp, tok, args.top, target_id)
            kl = kl_divergence(base.logp, after_run.logp)
            continuation_after = tok.decode(after_run.continuation)
            row = {
                "prompt": number, "layer": layer.layer, "expert": e, "mode": mode, "value": value,
                "renormalize": args.renormalize, "targets": "all" if positions is None else " ".join(map(str, positions)),
                "n_targets": len(chosen), "selected_before": hits,
                "selected_after": int(after_run.selected(e)[chosen].sum()),
                "weight_before_mean": float(base_weight[chosen].mean()),
                "weight_after_mean": float(after_run.expert_weight(e)[chosen].mean()),
                "kl_nats": kl, "entropy_before": before["entropy"], "entropy_after": after["entropy"],
                "top1_before": before["top"][0]["token"], "top1_prob_before": before["top"][0]["prob"],
                "top1_after": after["top"][0]["token"], "top1_prob_after": after["top"][0]["prob"],
                "target_token": args.target_token, "target_prob_before": before["target_prob"],
                "target_prob_after": after["target_prob"],
                "continuation_before": continuation_before, "continuation_after": continuation_after,
                "continuation_changed": base.continuation != after_run.continuation,
            }
            tables["sweep"].append(row)
            tables["next_token"] += [{"prompt": number, "value": value, "which": "after", **t} for t in after["top"]]
            results.append({"value": value, "kl_nats": kl, "selected_after": row["selected_after"],
                            "weight_after_mean": row["weight_after_mean"], "next_token": after,
                            "continuation": continuation_after, "continuation_ids": after_run.continuation})
            after_logps.append(after_run.logp)
            target_text = (f", p({args.target_token!r}) {before['target_prob']:.4f} -> {after['target_prob']:.4f}"
                           if target_id is not None else "")
            picked = f"picked at {row['selected_after']}/{len(chosen)} targets; "
            print(f"  {_value_text(mode, value):<16} {picked}KL {kl:.4g} nats{target_text}; next {_top_text(after['top'])}")
            print(f"  {'':<16} continuation {continuation_after!r}")
        for token in _tracked_tokens(before, results, target_id):
            tables["token_probs"] += [
                {"prompt": number, "value": value, "token_id": token, "token": tok.decode([token]),
                 "prob_before": float(base.logp[token].exp()), "prob_after": float(logp[token].exp())}
                for value, logp in zip(args.sweep, after_logps, strict=True)
            ]
        report.append({"prompt": prompt, "token_ids": ids[0].tolist(), "targets": positions, "tokens": tokens,
                       "routed_at_targets": routed, "edit_cannot_act": cannot_act,
                       "before": {"next_token": before, "continuation": continuation_before,
                                  "continuation_ids": base.continuation},
                       "after": results})

    frames = {name: pd.DataFrame(rows) for name, rows in tables.items()}
    with Run(s.config.run, moe.name, "prompts") as out:
        out.record(model_info=moe.describe(), layer=layer.layer, expert=e, mode=mode, values=args.sweep,
                   target_token_id=target_id)
        for name, frame in frames.items():
            out.save_table(frame, TABLE_NAMES[name])
        out.save_json({"layer": layer.layer, "expert": e, "mode": mode, "values": args.sweep,
                       "renormalize": args.renormalize, "target_token": args.target_token, "target_token_id": target_id,
                       "generation": {**generation, "max_new_tokens": args.max_new_tokens}, "prompts": report},
                      "interventions")
        texts = [[tok.decode([t]) for t in ids[0].tolist()] for ids in encoded]
        _prompt_figures(out, frames["sweep"], frames["token_probs"], prompts, targets, texts, layer.layer, e, mode,
                        args.renormalize)


def _print_targets(number: int, prompt: str, tokens: list[dict], positions: list[int] | None, expert: int,
                   hits: int) -> None:
    from common.figures.interventions import token_label

    print(f"\nprompt {number}: {prompt!r} ({len(tokens)} tokens)")
    if positions is None and len(tokens) > 32:
        print(f"  targets: all {len(tokens)} positions; expert {expert} selected at {hits} of them")
        return
    for row in tokens:
        if row["target"]:
            where = f"selected, w_e = {row['weight_before']:.4g}" if row["selected_before"] else "not selected"
            print(f"  target {row['position']:>3}: {token_label(row['token']):<16} id {row['token_id']:<6} "
                  f"expert {expert} {where}")


def _top_text(top: list[dict], n: int = 5) -> str:
    return ", ".join(f"{t['token']!r} {t['prob']:.3f}" for t in top[:n])


def _tracked_tokens(before: dict, results: list[dict], target_id: int | None) -> list[int]:
    """The tokens a prompt's figure follows: the target token, the top 3 before and the top 1 after each value
    (one value: the top 5 before and after)."""
    tracked = [target_id] if target_id is not None else []
    if len(results) == 1:  # one value: the before / after bars show both top-5 lists
        tracked += [t["token_id"] for t in before["top"][:5]] + [t["token_id"] for t in results[0]["next_token"]["top"][:5]]
    else:
        tracked += [t["token_id"] for t in before["top"][:3]] + [r["next_token"]["top"][0]["token_id"] for r in results]
    return list(dict.fromkeys(tracked))[:TRACKED_TOKENS]


def _where_text(positions: list[int] | None, tokens: list[str], shown: int = 4) -> str:
    """'all positions', or the positions with their tokens: "position 9 (' heaven')"."""
    if positions is None:
        return "all positions"
    items = [f"{p} ({tokens[p]!r})" for p in positions[:shown]]
    more = f" and {len(positions) - shown} more" if len(positions) > shown else ""
    return ("positions " if len(positions) > 1 else "position ") + ", ".join(items) + more


def _prompt_figures(out, sweep, probs, prompts: list[str], targets: list, tokens: list[list[str]], layer: int,
                    expert: int, mode: str, renormalize: bool) -> None:
    from common.figures.interventions import not_routed_note, plot_before_after, plot_kl_by_value, plot_sweep

    for number, prompt in enumerate(prompts[:MAX_PROMPT_FIGURES]):
        where = _where_text(targets[number], tokens[number])
        title = (f"Layer {layer}, expert {expert}, {mode}{' (renormalised)' if renormalize else ''} at {where}\n"
                 f"next token after {prompt_tail(prompt)!r}")
        rows, part = probs[probs.prompt == number], sweep[sweep.prompt == number]
        if len(part) >= 2:
            fig = plot_sweep(rows, part, mode=mode, title=title)
        else:
            value = part["value"].iloc[0]
            fig = plot_before_after(rows, value_label=_value_text(mode, None if pd_missing(value) else float(value)),
                                    kl=float(part["kl_nats"].iloc[0]), title=title, note=not_routed_note(part, mode))
        out.save_figure(fig, f"sweep_prompt{number}")
    if len(prompts) > MAX_PROMPT_FIGURES:
        print(f"figures drawn for the first {MAX_PROMPT_FIGURES} of {len(prompts)} prompts; the tables hold all",
              file=sys.stderr)
    if len(prompts) > 1 and sweep["value"].nunique() >= 2:
        title = f"Layer {layer}, expert {expert}, {mode}: change of the next-token distribution"
        out.save_figure(plot_kl_by_value(sweep, mode=mode, title=title), "kl_by_value")


def pd_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def prompt_tail(prompt: str, limit: int = 50) -> str:
    text = " ".join(prompt.split())
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


# ----------------------------------------------------------------------------------------------- dataset mode


def ablated_experts(args: argparse.Namespace, layer: MoELayer) -> list[int]:
    """--experts (default: every expert of the layer), checked against the layer."""
    experts = list(range(layer.num_experts)) if args.experts is None else list(dict.fromkeys(args.experts))
    for e in experts:
        if e >= layer.num_experts:
            raise InputError(f"--experts {e} out of range: layer {layer.layer} has experts 0..{layer.num_experts - 1}")
    return experts


def run_dataset(args: argparse.Namespace) -> None:
    config = cli.config(args, SCRIPT, layers=[args.layer])  # the flags and data specs, checked before torch is imported
    from common.cli import pipeline

    def preflight(skeleton, layers, domains) -> None:  # on the weightless model: refused before any weight is read
        ablated_experts(args, layers[0])

    def early(facts: ConfigFacts) -> None:  # on the config alone, before the modelling code is imported
        for expert in args.experts or []:
            facts.check_expert("--experts", expert, args.layer)

    s = pipeline.setup(config, preflight, early)
    # imported once the input is known to be good: a refused run does not pay for them
    import pandas as pd
    from tqdm import tqdm

    from common import distributed
    from common.analysis.audit import METRICS, AuditAccumulator, correlations
    from common.analysis.importance import (
        ImportanceAccumulator,
        ablations_per_forward,
        accumulate_importance,
        importance_tables,
    )
    from common.figures.interventions import plot_audit, plot_importance_heatmap, plot_importance_scatter

    layer = s.layers[0]
    experts = ablated_experts(args, layer)
    domains = [d.name for d in s.domains]
    quiet = dataclasses.replace(s, config=dataclasses.replace(s.config, run=dataclasses.replace(s.config.run, progress=False)))
    stream = pipeline.batches(quiet)
    with pipeline.start_run(s) as out:
        acc = ImportanceAccumulator(layer, experts, domains, s.moe.device)
        # the causal audit keeps per-document sums on this process: under torchrun it is left out (recorded)
        audit = AuditAccumulator(layer, experts, s.moe.vocab_size, s.moe.device) if distributed.world_size() == 1 else None
        total = s.config.data.num_tokens * len(domains) * (len(experts) + 1)
        with tqdm(total=total, unit="tok", unit_scale=True, disable=not args.progress,
                  desc=f"layer {layer.layer}: base + {len(experts)} ablations per batch") as bar:
            # Side by side on a GPU; one at a time on a CPU, where 64 variants in one forward measured 1.3x slower
            # than one by one (bench/interv_speed.py): larger activations, no launch overhead to save.
            variants = args.ablations_per_forward or (ablations_per_forward(
                s.config.data.batch_size, s.seq_len, s.moe.vocab_size, len(experts))
                if s.moe.device.type == "cuda" else 1)
            batches = pipeline.resumable(out, s, stream, importance=acc, audit=audit) if audit is not None else \
                pipeline.resumable(out, s, stream, importance=acc)
            how = accumulate_importance(s.moe, acc, batches, args.renormalize, progress=bar, variants=variants,
                                        resume=not args.full_forwards, audit=audit)
        acc.all_reduce()
        out.record(tokens=stream.report.to_dict(), experts=experts,
                   forwards_per_batch=1 + math.ceil(len(experts) / how["variants_per_forward"]),
                   ablations_per_forward=how["variants_per_forward"], resumed_at_ablated_layer=how["resumed"])
        arrays = acc.arrays()
        result = importance_tables(arrays, layer, experts, domains)
        L = layer.layer
        out.save_table(result["table"], f"importance_layer{L}")
        out.save_table(result["summary"], f"importance_summary_layer{L}")
        out.save_array(result["delta"], f"importance_layer{L}")
        out.save_array(result["frequency"], f"importance_frequency_layer{L}")
        frequency_all = arrays["selected"][: layer.num_experts] / arrays["routed"].clip(min=1)
        out.save_figure(plot_importance_heatmap(result["delta"], frequency_all, experts, domains, L),
                        f"importance_heatmap_layer{L}")
        out.save_figure(plot_importance_scatter(result["table"], domains, L, result["uniform"], result["summary"]),
                        f"importance_vs_frequency_layer{L}")
        if audit is not None:
            values = audit.metrics()
            out.save_table(pd.DataFrame({"layer": L, "expert": experts, **{k: values[k] for k in ("delta_nll", *METRICS)}}),
                           f"audit_layer{L}")
            rows = correlations(audit, draws=args.bootstrap, seed=args.seed)
            out.save_table(pd.DataFrame([{"layer": L, **row} for row in rows]), f"audit_correlation_layer{L}")
            out.save_figure(plot_audit(values, rows, L), f"audit_layer{L}")
        else:
            out.record(audit="left out under torchrun (its per-document sums stay on one process)")
        _print_summary(result["summary"])


def _print_summary(summary) -> None:
    top = next(c for c in summary.columns if c.endswith("_selected") and not c.startswith("important"))
    print(f"{'domain':<12} {'tokens':>8} {'NLL base':>9}  {'costliest ablation':<19} {'ΔNLL':>8} {'its rank':>8}  "
          f"{'most selected':<14} {'Spearman ρ':>10}")
    for row in summary.to_dict("records"):
        print(f"{row['domain']:<12} {row['tokens']:>8} {row['nll_base']:>9.4f}  expert {row['most_important_expert']:<12} "
              f"{row['delta_nll_max']:>+8.4f} {row['its_freq_rank']:>8}  {row[top]:<14} {row['spearman_delta_vs_freq']:>10.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
