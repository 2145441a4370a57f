"""What do the top experts alone predict? The logit lens over experts and top-k restriction (MoE Lens).

    uv run logit_lens.py --prompt "def add(a, b):\\n    return"     # the lens grid of a prompt (demo model)
    uv run logit_lens.py                                             # perplexity and hidden-state cosine vs k' (demo data)
    uv run logit_lens.py --model deepseek-ai/deepseek-moe-16b-base --data moe-lens --num_tokens 100000

With --prompt (SPEC "Logit lens over experts", MoE Lens Figure 2): at --position (default: the last token) and
each MoE layer, the residual stream is decoded through the model's own final norm and unembedding: after the
layer; at the MoE's input ("before MoE"); plus the top-1, top-2, ... top-k experts' weighted outputs; plus all k
and the shared experts (where the model has them, which gives the layer output back); and plus each expert alone
(CSV only). The lens is exact only where the layer adds its MoE output to the residual stream; that is checked on
the prompt and a model where it does not hold (a norm after the MoE, hyper-connections) is refused
(common/analysis/lens.py). A dense model gets the layer-output column only, for every decoder layer. In --prompt,
the escapes \\n, \\t and \\\\ are read as newline, tab and backslash.

Without --prompt (SPEC "Top-k restriction", MoE Lens Figure 3): every batch of --data runs once as the model is
and once per k' = 1 ... --max_k (default k - 1) with every MoE layer of --layers (default all) keeping only its k'
highest-weighted experts (--renormalize rescales the kept weights to the original sum; shared experts are kept).
Reported: next-token perplexity per domain and k' (a counted token is predicted from the tokens before it in its
window), and per decoder layer the cosine between the residual after the layer in the restricted and in the full
run at every counted token (mean, std, quantiles; streamed: memory does not grow with --num_tokens).

Outputs: --prompt: lens_grid.csv (each cell's top --top tokens), figure lens_grid. Data: perplexity.csv,
cosine_summary.csv, cosine_hist.npy [k', decoder layer, domain (+all last), bin] with cosine_hist_edges.npy,
figures perplexity_vs_k and cosine_by_layer.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from common import cli
from common.cli import at_least, base_parser, positive_float, run_main
from common.errors import InputError

if TYPE_CHECKING:
    from common.model import MoELayer
    from common.model.config_facts import ConfigFacts

SCRIPT = "logit_lens"
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def build_parser():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(data=None)  # None = not given: the data analyses read `demo`, --prompt reads no data
    lens = parser.add_argument_group("lens")
    lens.add_argument("--prompt", default=None, help="lens this text (the grid); without it: the data analyses on --data (default demo)")
    lens.add_argument("--position", type=int, default=-1, help="--prompt: token position lensed (negatives from the end)")
    lens.add_argument("--top", type=at_least(1), default=5, help="--prompt: tokens per cell in lens_grid.csv")
    lens.add_argument("--max_k", type=at_least(1), default=None,
                      help="largest k' (experts kept); default: the model's k (data: restricted runs up to k - 1)")
    lens.add_argument("--renormalize", action="store_true", help="data: rescale the kept weights to their original sum")
    lens.add_argument("--bins", type=at_least(10), default=400, help="data: histogram bins of the cosine over [-1, 1]")
    lens.add_argument("--logits_mb", type=positive_float, default=256.0, metavar="MiB",
                      help="data: the output head is applied to as many positions at a time as fit float32 logits of "
                      "this size (a 150k vocabulary at 4k tokens per row would be 2.4 GB per row at once)")
    return parser


def unescape(text: str) -> str:
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def run(args: argparse.Namespace) -> None:
    if args.prompt is not None:
        if args.data is not None:
            raise InputError("--prompt lenses one text; --data belongs to the data analyses (run without --prompt)")
        if args.renormalize:
            raise InputError("--renormalize applies to the data analyses (run without --prompt)")
        text = unescape(args.prompt)
        if not text.strip():
            raise InputError("--prompt is empty")
        run_prompt(args, text)
    else:
        args.data = args.data or ["demo"]
        run_data(args)


def _check_max_k(max_k: int | None, layers) -> int:
    k = max(m.top_k for m in layers)
    if max_k is not None and max_k > k:
        raise InputError(f"--max_k {max_k} exceeds k = {k}, the experts per token of layers "
                         f"{', '.join(str(m.layer) for m in layers)}")
    return k


def _restrictable(max_k: int | None, layers: Sequence[MoELayer]) -> int:
    """k of the layers, which must route each token to more than one expert for top-k restriction to mean anything."""
    k = _check_max_k(max_k, layers)
    if k < 2:
        raise InputError(f"layers {', '.join(str(m.layer) for m in layers)} send each token to 1 expert: "
                         "there is nothing to restrict")
    return k


def early_prompt_checks(position: int, text: str, facts: ConfigFacts) -> None:
    """--position against the tokenised prompt from the config's tokenizer, before the modelling code is imported
    (`common.analysis.lens` imports it, so its `prompt_ids` / `resolve_position` run later, on the same tokenizer,
    and tests/test_early_checks.py holds the two to the same answers): the prompt is framed as `prompt_ids` frames
    it (the tokenizer's leading specials, then the text's tokens) and refused in `resolve_position`'s words."""
    if facts.tokenizer is None:
        return
    from common.data.framing import special_frame

    tok = facts.tokenizer
    length = len(special_frame(tok)[0]) + len(tok(text, add_special_tokens=False)["input_ids"])
    if length and not -length <= position < length:
        raise InputError(
            f"--position {position} is beyond the prompt: it has {length} tokens (positions 0..{length - 1} or "
            f"-{length}..-1, counting the tokenizer's leading special tokens)"
        )


def run_prompt(args: argparse.Namespace, text: str) -> None:
    config = cli.config(args, SCRIPT)
    from common.cli import pipeline

    # --layers against the config's layer count, --position against the prompt: before the modelling code is imported
    pipeline.check_config(config, lambda facts: early_prompt_checks(args.position, text, facts))
    from common.analysis.lens import prompt_ids, resolve_position
    from common.model import MoEModel, inspect_model, load_model
    from common.model.load import load_tokenizer

    if not config.run.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # Everything below up to load_model needs the config and the tokenizer only: refused before any weight is read.
    skeleton = inspect_model(config.model)
    is_moe = isinstance(skeleton, MoEModel)
    if is_moe:
        _check_max_k(args.max_k, skeleton.select(config.layers))
    elif args.max_k is not None:
        raise InputError(f"--max_k: {config.model.model} is dense (no experts); its lens has the layer-output column only")
    dense_rows = _dense_rows(skeleton, config.layers) if not is_moe else []
    ids = prompt_ids(load_tokenizer(config.model), text)
    if not ids:
        raise InputError("--prompt is empty after tokenisation")
    position = resolve_position(args.position, len(ids))
    model = load_model(config.model)
    # imported once the input is known to be good: a refused run does not pay for them
    from common.analysis.lens import grid_table, prompt_lens
    from common.figures.lens import plot_lens_grid
    from common.run import Run

    moe_layers = model.select(config.layers) if is_moe else []
    lens = prompt_lens(model, ids, position, moe_layers, dense_rows, top=args.top, max_k=args.max_k)
    with Run(config.run, model.name, "prompt") as out:
        out.record(
            model_info=model.describe(), prompt=text, input_ids=ids, position=position,
            lens_checks=[vars(c) for c in lens.checks], last_layer_relative_error=lens.last_layer_error,
        )
        out.save_table(grid_table(lens, model.tokenizer), "lens_grid")
        out.save_figure(plot_lens_grid(lens, model.tokenizer, model.name), "lens_grid")


def _dense_rows(view, spec: Sequence[str] | None) -> list[int]:
    if spec is None or any(str(s).lower() == "all" for s in spec):
        return list(range(view.num_decoder_layers))
    return list(dict.fromkeys(view.resolve_layer(item) for item in spec))


def run_data(args: argparse.Namespace) -> None:
    config = cli.config(args, SCRIPT)  # the flags and data specs, checked before torch is imported
    from common.cli import pipeline
    from common.model import MoEModel, inspect_model


    def preflight(skeleton, layers, domains) -> None:  # on the weightless model: refused before any weight is read
        _restrictable(args.max_k, layers)

    try:
        s = pipeline.setup(config, preflight)
    except InputError as err:
        if not isinstance(inspect_model(config.model), MoEModel):
            raise InputError(f"{err}; top-k restriction needs experts (--prompt lenses a dense model's layer outputs)") from None
        raise
    # imported once the input is known to be good: a refused run does not pay for them
    from common.analysis.lens import TopkSweep
    from common.figures.lens import plot_cosine, plot_perplexity

    k = _restrictable(args.max_k, s.layers)
    ks = list(range(1, min(args.max_k or k - 1, k - 1) + 1))
    domains = [d.name for d in s.domains]
    stream = pipeline.batches(s)
    with pipeline.start_run(s) as out:
        sweep = TopkSweep(s.moe, s.layers, domains, ks, renormalize=args.renormalize, bins=args.bins,
                          logits_mb=args.logits_mb)
        for batch in pipeline.resumable(out, s, stream, sweep=sweep):
            sweep.update(batch)
        sweep.all_reduce()
        out.record(tokens=stream.report.to_dict(), k=k, k_primes=sweep.k_primes,
                   restricted_layers=[m.layer for m in s.layers])
        perplexity = sweep.perplexity_table()
        cosine = sweep.cosine_table()
        out.save_table(perplexity, "perplexity")
        out.save_table(cosine, "cosine_summary")
        counts, edges = sweep.cosine_histogram()
        out.save_array(counts, "cosine_hist")
        out.save_array(edges, "cosine_hist_edges")
        out.save_figure(plot_perplexity(perplexity, domains, k), "perplexity_vs_k")
        out.save_figure(plot_cosine(cosine, domains, k), "cosine_by_layer")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
