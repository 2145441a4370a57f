"""Automatic expert labels: an LLM labels each expert from its top windows; a second call scores the label.

    uv run label.py --layer 1 --experts 0 1 --local-llm demo        # offline; the demo LM's labels are nonsense
    uv run label.py --layer 1 --api-base http://127.0.0.1:8000/v1 --llm Qwen/Qwen2.5-7B-Instruct   # local server
    OPENAI_API_KEY=... uv run label.py --model allenai/OLMoE-1B-7B-0924 --data olmoe --layer 7 \\
        --api-base https://api.openai.com/v1 --llm gpt-4o-mini

For each expert of --layer (--experts, default all; docs/METRICS.md#automatic-labels): its --top windows of
--window tokens around the tokens with the largest w_e · ‖E_e(x)‖, with the tokens the expert processed marked
<<like this>> and, for each, the top-3 logit-lens tokens of its weighted output w_e · E_e(x). Ranks 0, 2, 4, … go
to an explainer LLM, which answers with a short label; ranks 1, 3, 5, … mixed with as many windows of other
experts go (unmarked, --score-batch per request) to a scorer, which says for each window whether the label applies.
Detection F1 and accuracy per expert (the detection scoring of EleutherAI's automatic interpretability work).
--shuffle-windows deals the windows to random experts first: the chance control.

LLM backends: an OpenAI-compatible chat endpoint (--api-base URL --llm MODEL; key from the environment variable
named by --api-key-env, which a server on this machine does not need; vLLM, llama.cpp server, Ollama, hosted APIs)
or a local transformers model (--local-llm PATH or demo). Nothing leaves the machine unless --api-base is given;
the endpoint is probed before any model work, and the number of windows and requests is printed before anything is
sent. Answers are cached in --cache by prompt hash (a re-run sends nothing), requests run --concurrency at a time
and are retried (--retries, exponential backoff from --backoff seconds) on 429, 5xx and timeouts; a failed or
malformed answer is recorded, not fatal.

Outputs: label_layer<L>_expert<E>.json per expert (label, scores, the windows, every prompt and response) and
labels_layer<L>.csv (one row per expert).
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from common import cli
from common.cli import at_least, base_parser, positive_float, run_main
from common.config import SHIPPED_MODELS
from common.errors import InputError

if TYPE_CHECKING:
    from common.model import MoELayer

SCRIPT = "label"
NO_KEY = "none"


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0], layers=False)
    parser.add_argument("--layer", "--layers", dest="layer", type=int, required=True,
                        help="decoder-layer index of the MoE layer (negatives from the end)")
    parser.add_argument("--experts", type=at_least(0), nargs="+", default=None,
                        help="experts to label (default: every expert of the layer)")
    parser.add_argument("--top", type=at_least(2), default=20,
                        help="windows per expert: half explained, half scored (with as many of other experts)")
    parser.add_argument("--window", type=at_least(2), default=32, help="tokens per window")
    parser.add_argument("--score-batch", dest="score_batch", type=at_least(1), default=10,
                        help="windows per scorer request")
    parser.add_argument("--shuffle-windows", dest="shuffle_windows", action="store_true",
                        help="chance control: deal the windows to random experts before explaining and scoring")
    llm = parser.add_argument_group("LLM (one of --api-base or --local-llm)")
    which = llm.add_mutually_exclusive_group(required=True)
    which.add_argument("--api-base", dest="api_base", metavar="URL", default=None,
                       help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (POST URL/chat/completions); "
                       "windows of text are sent there")
    which.add_argument("--local-llm", dest="local_llm", metavar="PATH", default=None,
                       help="a local transformers causal LM folder, or 'demo' (the shipped demo model: nonsense labels)")
    llm.add_argument("--llm", metavar="MODEL", default=None, help="model name at --api-base (required with it)")
    llm.add_argument("--api-key-env", dest="api_key_env", metavar="VAR", default="OPENAI_API_KEY",
                     help=f"environment variable holding the API key; '{NO_KEY}' for endpoints without a key. A "
                     "loopback --api-base (localhost, 127.0.0.1, ::1) needs none: no key is sent when VAR is unset")
    llm.add_argument("--cache", metavar="DIR", default=None, help="answer cache (default: <--out>/.label-cache)")
    llm.add_argument("--concurrency", type=at_least(1), default=4, help="requests in flight at once")
    llm.add_argument("--retries", type=at_least(0), default=4, help="retries per request on 429, 5xx and timeouts")
    llm.add_argument("--backoff", type=positive_float, default=1.0,
                     help="seconds before the first retry; doubled for each further one")
    llm.add_argument("--timeout", type=positive_float, default=120.0, help="seconds per request")
    return parser


def is_loopback(url: urllib.parse.ParseResult) -> bool:
    """Whether the URL names this machine: localhost, 127.0.0.0/8 or ::1 (a name is not resolved: only these)."""
    host = (url.hostname or "").lower()  # hostname drops the port and the brackets of [::1], and lower-cases
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost
        return False


def _backend(args: argparse.Namespace):
    """The LLM backend, checked before any model work: key present, endpoint reachable (probed), local path found."""
    from common.llm import LocalModel, OpenAICompatible

    if args.api_base is None:
        if args.llm is not None:
            raise InputError("--llm names the model at --api-base; with --local-llm the path is the model")
        name = args.local_llm
        if name not in SHIPPED_MODELS and not (Path(name).expanduser() / "config.json").is_file():
            raise InputError(f"--local-llm {name}: not a model folder (no config.json) and not one of "
                             f"{', '.join(SHIPPED_MODELS)}")
        return lambda: LocalModel(name, device=args.device, dtype=args.dtype)
    url = urllib.parse.urlparse(args.api_base)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise InputError(f"--api-base {args.api_base}: not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
    if not args.llm:
        raise InputError("--api-base needs --llm MODEL (the model name the endpoint serves)")
    key = None
    if args.api_key_env.lower() != NO_KEY:
        key = os.environ.get(args.api_key_env) or None
        # A server on this machine usually runs without a key, and nothing sent there leaves the machine: an unset
        # variable sends no key (a server that wants one answers the probe with 401, which names the variable).
        if key is None and not is_loopback(url):
            raise InputError(f"--api-key-env: environment variable {args.api_key_env} is not set or empty; set it, "
                             f"or pass --api-key-env {NO_KEY} for an endpoint that needs no key")
    backend = OpenAICompatible(args.api_base, args.llm, key, timeout=args.timeout)
    listed = backend.probe(timeout=min(args.timeout, 10.0))
    if listed is not None and args.llm not in listed:
        import warnings

        shown = ", ".join(listed[:5]) + (", …" if len(listed) > 5 else "")
        warnings.warn(f"--llm {args.llm} is not among the models {args.api_base} lists ({shown})", stacklevel=2)
    return lambda: backend


def _announce(phase: str, prompts, windows: Sequence[int], client, where: str) -> None:
    """Say, before anything is sent, how many windows and requests go where."""
    first: dict[str, int] = {}
    for i, (messages, max_tokens) in enumerate(prompts):
        first.setdefault(client.key(messages, max_tokens), i)
    to_send = [i for i in first.values() if not client.is_cached(*prompts[i])]
    details = [f"{len(first) - len(to_send)} answered from the cache"] if len(to_send) < len(first) else []
    if len(first) < len(prompts):
        details.append(f"{len(prompts) - len(first)} identical to another, asked once")
    print(f"{SCRIPT}.py: {phase}: sending {sum(windows[i] for i in to_send)} windows in {len(to_send)} requests to "
          f"{where}" + (f" ({'; '.join(details)})" if details else ""), file=sys.stderr, flush=True)


def _reply_record(messages, reply) -> dict:
    """One request as the JSON keeps it; `malformed` is filled in once the reply is parsed (None: no reply)."""
    return {"prompt": messages, "response": reply.text, "error": reply.error, "cached": reply.cached,
            "note": reply.note, "malformed": None}


def _number(value: float) -> float | None:
    """JSON has no NaN: an undefined score is null."""
    return None if math.isnan(value) else value


def labelled_experts(args: argparse.Namespace, layer: MoELayer) -> list[int]:
    """--experts (default: every expert of the layer), checked against the layer."""
    experts = list(dict.fromkeys(args.experts)) if args.experts else list(range(layer.num_experts))
    for e in experts:
        if not 0 <= e < layer.num_experts:
            raise InputError(f"--experts {e} out of range: layer {layer.layer} has experts 0..{layer.num_experts - 1}")
    return experts


def run(args: argparse.Namespace) -> None:
    make_backend = _backend(args)  # before any model work

    config = cli.config(args, SCRIPT, layers=[args.layer])  # the flags and data specs, checked before torch is imported
    from common.cli import pipeline

    def preflight(skeleton, layers, domains) -> None:  # on the weightless model: refused before any weight is read
        labelled_experts(args, layers[0])

    s = pipeline.setup(config, preflight)
    # imported once the input is known to be good: a refused run does not pay for them
    import numpy as np
    import pandas as pd

    from common import distributed
    from common.analysis import labelling as lab
    from common.figures.labels import plot_labels
    from common.llm import ChatClient, Reply, ResponseCache

    layer = s.layers[0]
    experts = labelled_experts(args, layer)
    tracked = list(range(layer.num_experts))  # negatives (and the shuffled control) draw on every expert's windows
    domains = [d.name for d in s.domains]
    backend = make_backend() if distributed.rank() == 0 else None  # under torchrun rank 0 talks to the LLM
    stream = pipeline.batches(s)
    with pipeline.start_run(s) as out:
        acc = lab.LabelWindows(s.moe, layer, tracked, top_n=args.top, window=args.window,
                               lens_experts=tracked if args.shuffle_windows else experts)
        batches = pipeline.resumable(out, s, stream, windows=acc)
        for records, batch, _ in pipeline.captured_batches(s.moe, batches, [layer], ("topk", "input")):
            acc.update(records[layer.layer], batch)
        acc.all_reduce()
        out.record(tokens=stream.report.to_dict())
        if backend is None:
            return
        windows = lab.collect_windows(acc, s.moe.tokenizer, domains)
        if args.shuffle_windows:
            windows = lab.shuffle_windows(windows, np.random.default_rng([args.seed, layer.layer, 0]))

        cache_dir = Path(args.cache) if args.cache else Path(args.out) / ".label-cache"
        client = ChatClient(backend, ResponseCache(cache_dir), concurrency=args.concurrency, retries=args.retries,
                            backoff=args.backoff)
        where = (f"{backend.url} (model {args.llm})" if args.api_base
                 else f"the local model {args.local_llm} (nothing leaves this machine)")

        # ---- explain
        results: dict[int, dict] = {}
        explain_prompts, explain_experts = [], []
        for e in experts:
            explained, scored = lab.split_windows(windows[e])
            results[e] = {"explained": explained, "scored": scored, "label": None, "malformed": 0, "failed": 0,
                          "note": None, "explanation": None, "requests": [], "items": []}
            if not explained:
                results[e]["note"] = "no windows: the expert was never chosen by a counted token"
                continue
            explain_prompts.append((lab.explainer_messages(explained), lab.EXPLAINER_MAX_TOKENS))
            explain_experts.append(e)
        if explain_prompts:
            _announce("explainer", explain_prompts, [len(results[e]["explained"]) for e in explain_experts], client,
                      where)
        for e, (messages, _), reply in zip(explain_experts, explain_prompts, client.complete_all(explain_prompts),
                                           strict=True):
            r = results[e]
            r["explanation"] = _reply_record(messages, reply)
            if reply.text is None:
                r["failed"] += 1
                r["note"] = f"the explainer gave no answer: {reply.error}"
                continue
            label, malformed = lab.parse_label(reply.text)
            r["explanation"]["malformed"] = malformed
            r["malformed"] += int(malformed)
            r["label"] = label
            if label is None:
                r["note"] = "the explainer's answer holds no label"
            elif not r["scored"]:
                r["note"] = "too few windows to score (need at least 2)"

        # ---- score
        score_prompts, score_owner = [], []
        for e in experts:
            r = results[e]
            if r["label"] is None or not r["scored"]:
                continue
            rng = np.random.default_rng([args.seed, layer.layer, 1, e])
            negatives = lab.choose_negatives(e, windows[e], windows, len(r["scored"]), rng,
                                             use_routing=not args.shuffle_windows)
            if len(negatives) < len(r["scored"]):
                r["note"] = f"only {len(negatives)} negative windows for {len(r['scored'])} positives"
            items = [(w, True) for w in r["scored"]] + [(w, False) for w in negatives]
            items = [items[i] for i in rng.permutation(len(items))]
            r["items"] = items
            for start in range(0, len(items), args.score_batch):
                chunk = items[start : start + args.score_batch]
                messages = lab.scorer_messages(r["label"], [w.text() for w, _ in chunk])
                score_prompts.append((messages, lab.scorer_max_tokens(len(chunk))))
                score_owner.append((e, start, len(chunk)))
        if score_prompts:
            _announce("scorer", score_prompts, [n for _, _, n in score_owner], client, where)
        answers: dict[int, list] = {e: [None] * len(results[e]["items"]) for e in experts}
        for (e, start, n), (messages, _), reply in zip(score_owner, score_prompts,
                                                       client.complete_all(score_prompts), strict=True):
            r = results[e]
            record = {"windows": [w.id for w, _ in r["items"][start : start + n]], **_reply_record(messages, reply),
                      "answers": None}
            if reply.text is None:
                r["failed"] += 1
            else:
                parsed, malformed = lab.parse_answers(reply.text, n)
                answers[e][start : start + n] = parsed
                record["answers"] = parsed
                record["malformed"] = malformed
                r["malformed"] += int(malformed)
            r["requests"].append(record)

        # ---- write
        identity = {**backend.identity, "endpoint": backend.url if args.api_base else None}
        rows = []
        for e in experts:
            r = results[e]
            truth = [belongs for _, belongs in r["items"]]
            scores = lab.detection_scores(truth, answers[e])
            answered = sum(a is not None for a in answers[e])
            if r["items"] and not answered and r["note"] is None:
                r["note"] = f"the scorer answered for none of the {len(r['items'])} windows (see scoring.requests)"
            scored_windows = [{**w.record(marked=belongs), "belongs": belongs, "answer": a}
                              for (w, belongs), a in zip(r["items"], answers[e], strict=True)]
            document = {
                "layer": layer.layer, "expert": e, "model": s.moe.name, "label": r["label"],
                **{name: _number(scores[name]) for name in ("f1", "accuracy", "precision", "recall")},
                "windows_explained": len(r["explained"]), "windows_scored": answered,
                "positives": sum(truth), "negatives": len(truth) - sum(truth),
                "confusion": {k: scores[k] for k in ("true_positives", "false_positives", "true_negatives",
                                                     "false_negatives")},
                "malformed": r["malformed"], "failed": r["failed"], "note": r["note"],
                "control": "shuffled windows" if args.shuffle_windows else None, "llm": identity,
                "explanation": {**(r["explanation"] or _reply_record(None, Reply(None))),
                                "windows": [w.record() for w in r["explained"]]},
                "scoring": {"requests": r["requests"], "windows": scored_windows},
            }
            out.save_json(document, f"label_layer{layer.layer}_expert{e}")
            rows.append({"layer": layer.layer, "expert": e, "label": r["label"] or "", "f1": scores["f1"],
                         "accuracy": scores["accuracy"], "windows_explained": len(r["explained"]),
                         "windows_scored": answered, "malformed": r["malformed"], "failed": r["failed"]})
        table = pd.DataFrame(rows)
        out.save_table(table, f"labels_layer{layer.layer}")
        out.save_figure(plot_labels(table, layer.layer, control=args.shuffle_windows),
                        f"labels_layer{layer.layer}")
        stats = client.stats.to_dict()
        out.record(llm={**identity, **stats, "cache": str(cache_dir),
                        "malformed": sum(r["malformed"] for r in results.values())})
        mean_f1 = [row["f1"] for row in rows if not math.isnan(row["f1"])]
        print(f"{SCRIPT}.py: {len(rows)} experts, mean detection F1 "
              + (f"{sum(mean_f1) / len(mean_f1):.3f}" if mean_f1 else "n/a")
              + f"; {stats['requests_sent']} requests sent, {stats['answered_from_cache']} answered from the cache, "
              f"{stats['retries']} retries, {stats['failed']} failed", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
