"""Behaviour experts: which experts fire more for texts A than for texts B, and does switching them off / on steer generation?

    uv run contrast.py                                                  # demo model: English prose (A) vs French (B)
    uv run contrast.py --data demo:code demo:prose --top 8              # code vs prose
    uv run contrast.py --model allenai/OLMoE-1B-7B-0924 --data en=hf:ID1 fr=hf:ID2 --num_tokens 50000 --top 20

--data takes exactly two sources (any the other scripts take): the first is A, the second B. One pass over
--num_tokens counted tokens of each measures, per MoE layer and routed expert, the activation rates p_A and p_B
(share of the set's tokens whose top-k includes the expert with w ≠ 0), Δ = p_A − p_B with Newcombe's 95% interval
(tokens treated as independent) and a 95% document-bootstrap interval (documents resampled: the dependence-aware
one), the pooled two-proportion z-test and Benjamini–Hochberg q-values over all layer × expert tests (FDR --alpha),
Bonferroni beside them. Candidates: q ≤ --alpha with the bootstrap interval on the same side of 0. The top --top
A-experts (largest Δ > 0) and B-experts (most negative Δ), ranked over all layers, are then steered as SteerMoE
(arXiv 2509.09660) does: "off" = router logit −inf before selection, "on" = the token's largest logit + ε.

Steering check, on held-out text (the demo's held-out split, or documents after those measured): --prompts windows
of --prompt_len + --max_new_tokens tokens per set. From A's first --prompt_len tokens, --max_new_tokens are sampled
(common random numbers: the same uniform per prompt and step in every condition; --greedy for argmax) under: none,
A off, B on, A off + B on, and --draws random controls of each with as many experts per layer (outside both sets).
Each continuation is scored by a naive Bayes bag-of-tokens classifier fitted on the measured A and B tokens (share
of tokens favouring B, mean P(B | text)); the true continuations of A and B are scored as references. Teacher-forced
on the held-out windows of A and B: next-token NLL and KL(unsteered ‖ steered) per condition.

Outputs: contrast_experts.csv (every layer × expert: rates, Δ, intervals, z, p, q, candidate, steered),
contrast_top.csv (the steered experts), contrast_rates.npy [set, layer, expert], contrast_steering.csv (per condition
and draw: classifier scores, NLL and KL on A and B), contrast_generations.csv (every continuation with its
scores), figures contrast_delta (layer × expert Δ heatmap), contrast_volcano (Δ vs −log10 q), contrast_top (the
steered experts' Δ with both intervals) and contrast_steering (scores by condition against the random band).
Definitions: docs/METRICS.md#behaviour-experts.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from common import cli
from common.cli import at_least, base_parser, open_fraction, positive_float, run_main
from common.errors import InputError

SCRIPT = "contrast"
STEERED = ("A off", "B on", "A off + B on")  # each against the random condition of the same kind
RANDOM = {"A off": "random off", "B on": "random on", "A off + B on": "random off + on"}


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(data=["demo:prose", "demo:french"])
    group = parser.add_argument_group("contrast (--data: exactly two sources, A then B)")
    group.add_argument("--alpha", type=open_fraction, default=0.05,
                       help="false discovery rate of the Benjamini–Hochberg correction over all layer × expert tests")
    group.add_argument("--bootstrap", type=at_least(0), default=1000,
                       help="document-bootstrap resamples of Δ's dependence-aware interval (0: none; candidates then "
                       "need q ≤ --alpha only)")
    group.add_argument("--top", type=at_least(1), default=5,
                       help="A-experts and B-experts steered, each ranked by |Δ| over all layers (at most E − k off and "
                       "k on per layer)")
    steer = parser.add_argument_group("steering check (SteerMoE)")
    steer.add_argument("--prompts", type=at_least(1), default=16,
                       help="held-out windows per set: A's give the prompts; A's and B's the teacher-forced NLL and KL")
    steer.add_argument("--prompt_len", type=at_least(2), default=16,
                       help="prompt length in tokens (the tokenizer's leading specials included)")
    steer.add_argument("--max_new_tokens", type=at_least(1), default=32, help="tokens generated per prompt and condition")
    steer.add_argument("--draws", type=at_least(1), default=5, help="seeded random expert sets per random condition")
    steer.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    steer.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    return parser


def _check_domains(domains) -> None:
    if len(domains) != 2:
        names = ", ".join(d.name for d in domains) or "none"
        raise InputError(f"--data: contrast.py compares exactly two sets, A then B; got {len(domains)} ({names})")
    a, b = domains
    if a.source == b.source:
        raise InputError(f"--data: A ({a.name}) and B ({b.name}) are the same data ({a.source}); give two different "
                         "sources")


def run(args: argparse.Namespace) -> None:
    if len(args.data) == 2 and args.data[0] == args.data[1]:  # before the data layer's "two domains named ..."
        raise InputError(f"--data: A and B are the same data ({args.data[0]}); give two different sources")
    config = cli.config(args, SCRIPT)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("contrast.py runs in one process (its counts, document bootstrap and generations are not "
                         "gathered across torchrun ranks; a model too large for one GPU runs with --device_map auto)")
    from common.cli import pipeline

    window = args.prompt_len + args.max_new_tokens

    def preflight(skeleton, layers, domains) -> None:  # on the weightless model: refused before any weight is read
        _check_domains(domains)
        context = skeleton.context_length
        if context is not None and window > context:
            raise InputError(f"--prompt_len {args.prompt_len} + --max_new_tokens {args.max_new_tokens} = {window} "
                             f"exceeds the model's context length {context}")
        from common.analysis.contrast import heldout_windows
        from common.data import DemoSpec, parse_source
        from common.data.framing import special_frame

        prefix = len(special_frame(skeleton.tokenizer)[0])
        if args.prompt_len <= prefix:
            raise InputError(f"--prompt_len {args.prompt_len} leaves no text after the tokenizer's {prefix} leading "
                             "special tokens")
        for label, domain in zip("AB", domains, strict=True):  # the demo's held-out split is known before the pass
            if isinstance(parse_source(domain.source), DemoSpec):
                found = heldout_windows(domain, skeleton.tokenizer, split="heldout", skip=0, seed=args.seed,
                                        length=window, count=1)
                if not len(found):
                    raise InputError(f"{label} ({domain.name}): no held-out document has {window} tokens "
                                     "(--prompt_len + --max_new_tokens); shorten them")

    s = pipeline.setup(config, preflight)
    import numpy as np
    import pandas as pd
    import torch
    from tqdm import tqdm

    from common.analysis import contrast
    from common.data import DemoSpec, parse_source
    from common.figures import contrast as figures

    moe, tok = s.moe, s.moe.tokenizer
    names = [d.name for d in s.domains]
    stream = pipeline.batches(s)
    with pipeline.start_run(s) as out:
        counts = contrast.ContrastCounts(s.layers, moe.vocab_size, moe.device)
        resumable = pipeline.resumable(out, s, stream, counts=counts)
        for records, batch, _ in pipeline.captured_batches(moe, resumable, s.layers, ("topk",), split_on_oom=True):
            counts.update(records, batch)
        out.record(tokens=stream.report.to_dict())
        if min(float(t) for t in counts.tokens) == 0:
            raise InputError("the data gave no counted token of A or of B")

        table = contrast.rate_table(counts, args.alpha, args.bootstrap, args.seed)
        a_set, b_set, chosen = contrast.steering_sets(table, s.layers, args.top)
        steered = {(layer, e): side for side, _, layer, e in chosen}
        table["steered"] = [steered.get((int(r.layer), int(r.expert)), "") for r in table.itertuples()]
        out.save_table(table, "contrast_experts")
        rates = np.full((2, len(s.layers), counts.width), np.nan)
        for i, layer in enumerate(s.layers):
            for d, column in enumerate(("p_a", "p_b")):
                rates[d, i, : layer.num_experts] = table[table.layer == layer.layer][column].to_numpy()
        out.save_array(rates, "contrast_rates")
        top = pd.DataFrame([{"side": side, "rank": rank, **table[(table.layer == layer) & (table.expert == e)]
                             .drop(columns=["steered", "tokens_a", "tokens_b"]).iloc[0].to_dict()}
                            for side, rank, layer, e in chosen],
                           columns=["side", "rank", *[c for c in table.columns
                                                      if c not in ("steered", "tokens_a", "tokens_b")]])
        out.save_table(top, "contrast_top")
        out.save_figure(figures.plot_contrast_delta(table, names), "contrast_delta")
        out.save_figure(figures.plot_volcano(table, names, args.alpha), "contrast_volcano")
        if len(top):
            out.save_figure(figures.plot_contrast_top(top, names), "contrast_top")
        candidates = {side: int((table.candidate == side).sum()) for side in "AB"}
        out.record(alpha=args.alpha, bootstrap=args.bootstrap, candidates=candidates,
                   a_experts=contrast.set_text(a_set), b_experts=contrast.set_text(b_set))
        print(f"{len(table)} layer × expert tests; candidates (q ≤ {args.alpha:g}{', bootstrap agreeing' if args.bootstrap else ''}): "
              f"{candidates['A']} for A ({names[0]}), {candidates['B']} for B ({names[1]})")
        for side, rank, layer, e in chosen:
            row = table[(table.layer == layer) & (table.expert == e)].iloc[0]
            print(f"  {side} #{rank}: layer {layer} expert {e}: p_A {row.p_a:.3f}, p_B {row.p_b:.3f}, "
                  f"Δ {row.delta:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}], "
                  f"q {'< 1e-300' if row.q_value < 1e-300 else format(row.q_value, '.2g')}")
        if not a_set and not b_set:
            warnings.warn("no expert separates A from B at this --alpha: nothing to steer (the steering check is "
                          "skipped)", stacklevel=1)
            return

        # ---- the steering check, on held-out windows
        windows = []
        for label, domain in zip("AB", s.domains, strict=True):
            demo = isinstance(parse_source(domain.source), DemoSpec)
            found = contrast.heldout_windows(
                domain, tok, split="heldout" if demo else "train", seed=args.seed, length=window, count=args.prompts,
                skip=0 if demo else stream.report.domains[domain.name].documents)
            if not len(found):
                raise InputError(f"{label} ({domain.name}): no held-out document of {window} tokens (--prompt_len + "
                                 f"--max_new_tokens) {'in the demo held-out split' if demo else 'after the documents measured'}")
            if len(found) < args.prompts:
                warnings.warn(f"{label} ({domain.name}): {len(found)} held-out windows of {window} tokens, not "
                              f"{args.prompts}", stacklevel=1)
            windows.append(found)
        conditions = [contrast.Condition("none", 0)]
        conditions += [contrast.Condition(name, 0, off, on) for name, off, on in
                       (("A off", a_set, {}), ("B on", {}, b_set), ("A off + B on", a_set, b_set)) if off or on]
        for draw in range(args.draws):
            rng_off = np.random.default_rng([args.seed, draw, 0])
            rng_on = np.random.default_rng([args.seed, draw, 1])
            random_off = contrast.random_like(a_set, s.layers, [a_set, b_set], rng_off)
            random_on = contrast.random_like(b_set, s.layers, [a_set, b_set], rng_on)
            conditions += [contrast.Condition(name, draw, off, on) for name, off, on in
                           (("random off", random_off, {}), ("random on", {}, random_on),
                            ("random off + on", random_off, random_on)) if off or on]
        prompts = windows[0][:, : args.prompt_len]
        uniforms = np.random.default_rng([args.seed, 0x5EED]).random((len(prompts), args.max_new_tokens))
        classifier = contrast.NaiveBayes(counts.vocab.cpu().numpy(), ignore=tok.all_special_ids)
        batch_size = s.config.data.batch_size
        generations, rows = [], []
        for label, w in zip("AB", windows, strict=True):  # the true continuations: where A and B text score
            rows.append(_scores(f"reference {label}", 0, {}, {}, [c.tolist() for c in w[:, args.prompt_len:]],
                                classifier, contrast))
        with tqdm(total=len(conditions) * (len(prompts) + sum(len(w) for w in windows)), desc="steering",
                  unit="seq", disable=not args.progress) as bar:
            nll, kl = contrast.teacher_forced(moe, torch.cat(windows), conditions, batch_size, bar)
            for c, condition in enumerate(conditions):
                with contrast.steered(moe, condition.off, condition.on):
                    found = contrast.generate(moe, prompts, args.max_new_tokens, uniforms, greedy=args.greedy,
                                              temperature=args.temperature, eos_id=tok.eos_token_id,
                                              batch_size=batch_size)
                bar.update(len(prompts))
                row = _scores(condition.name, condition.draw, condition.off, condition.on, found, classifier, contrast)
                a_rows, b_rows = slice(0, len(windows[0])), slice(len(windows[0]), None)
                row.update(nll_a=float(nll[c, a_rows].mean()), nll_b=float(nll[c, b_rows].mean()),
                           kl_a=float(kl[c, a_rows].mean()), kl_b=float(kl[c, b_rows].mean()))
                rows.append(row)
                for p, tokens in enumerate(found):
                    shared, scored = classifier.b_share(tokens)
                    odds = classifier.log_odds_b(tokens)
                    generations.append({"prompt": p, "condition": condition.name, "draw": condition.draw,
                                        "prompt_text": tok.decode(prompts[p].tolist(), skip_special_tokens=True),
                                        "continuation": tok.decode(tokens), "tokens": len(tokens),
                                        "tokens_scored": scored, "b_token_share": shared / scored if scored else np.nan,
                                        "log_odds_b": odds, "p_b": contrast.posterior_b(odds)})
        steering = pd.DataFrame(rows)
        base = steering[steering.condition == "none"].iloc[0]
        steering["delta_nll_a"] = steering.nll_a - base.nll_a
        steering["delta_nll_b"] = steering.nll_b - base.nll_b
        out.save_table(steering, "contrast_steering")
        out.save_table(pd.DataFrame(generations), "contrast_generations")
        summary = _versus_random(steering)
        out.record(steering=summary, prompts=len(prompts), heldout_windows={n: len(w) for n, w in
                                                                         zip(names, windows, strict=True)})
        out.save_figure(figures.plot_contrast_steering(steering, names), "contrast_steering")
        for name, facts in summary.items():
            print(f"  {name}: B-token share {facts['b_token_share']:.3f} (random {facts['random_mean']:.3f} ± "
                  f"{facts['random_sd']:.3f}, above {facts['random_below']}/{facts['draws']} draws); "
                  f"ΔNLL A {facts['delta_nll_a']:+.3f}, B {facts['delta_nll_b']:+.3f} nats")


def _scores(name, draw, off, on, continuations, classifier, contrast) -> dict:
    """One row of contrast_steering.csv: the classifier's scores of a condition's continuations."""
    import numpy as np

    favour, scored = zip(*(classifier.b_share(c) for c in continuations), strict=True)
    posterior = [contrast.posterior_b(classifier.log_odds_b(c)) for c in continuations]
    return {"condition": name, "draw": draw, "experts_off": contrast.set_text(off),
            "experts_on": contrast.set_text(on), "continuations": len(continuations),
            "tokens_scored": int(sum(scored)), "b_token_share": sum(favour) / max(sum(scored), 1),
            "p_b_mean": float(np.mean(posterior)), "nll_a": np.nan, "nll_b": np.nan, "kl_a": np.nan, "kl_b": np.nan}


def _versus_random(steering) -> dict:
    """Each steered condition's B-token share against the draws of its random control."""
    summary = {}
    for name in STEERED:
        mine, control = steering[steering.condition == name], steering[steering.condition == RANDOM[name]]
        if mine.empty:
            continue
        value, draws = float(mine.b_token_share.iloc[0]), control.b_token_share.to_numpy()
        summary[name] = {"b_token_share": value, "p_b_mean": float(mine.p_b_mean.iloc[0]),
                         "random_mean": float(draws.mean()), "random_sd": float(draws.std(ddof=1)) if len(draws) > 1 else 0.0,
                         "random_below": int((draws < value).sum()), "draws": len(draws),
                         "delta_nll_a": float(mine.delta_nll_a.iloc[0]), "delta_nll_b": float(mine.delta_nll_b.iloc[0])}
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
