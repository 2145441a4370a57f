"""Train the shipped demo models: a small OLMoE and its dense twin, on the offline `demo` corpus, on CPU.

Run from the repository root (this is how `data/demo-moe` and `data/demo-dense` were made):

    uv run python -m tools.train_demo --out data --steps 2000 --seed 0 --threads 2

What it does, in order, all seeded:
1. trains a byte-level BPE tokenizer (vocab 4096) on a bounded, evenly strided sample of each domain's training split;
2. tokenises every domain's training documents into one stream per domain (`<|bos|> doc <|eos|>` per document);
3. trains `OlmoeForCausalLM` (4 layers, hidden 128, 16 experts, top-2) with the load-balancing loss computed for each
   layer separately and averaged. transformers' own `load_balancing_loss_func` pools all layers before balancing,
   which lets individual layers leave experts dead while the pooled value looks balanced;
4. trains a dense twin (`LlamaForCausalLM`, same width/depth/heads, FFN width = k × expert width = the MoE's active
   FFN width) on exactly the same batches;
5. saves both in bf16, loads them back through `from_pretrained` in fp32, and measures held-out loss and routing
   specialization per domain on a fixed held-out sample (`heldout_windows`), plus an untrained control;
6. writes `data/demo-moe/TRAINING.md` and `data/demo-moe/heldout_metrics.json` (the numbers `tests/test_demo.py`
   recomputes from the saved files).

Every batch holds the same number of sequences from each domain, so small domains are not drowned by large ones.
Same seed + same thread count + same experts implementation gives bit-identical weights.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import multiprocessing
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from common.corpus import available_demo_domains, demo_documents, demo_domain_info
from common.errors import InputError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

# The fixed held-out sample: the first EVAL_WINDOWS non-overlapping windows of EVAL_SEQ_LEN tokens of each domain's
# held-out stream. The test uses the same recipe (it imports `heldout_windows`), so its numbers are comparable.
EVAL_SEQ_LEN = 256
EVAL_WINDOWS = 16
EVAL_BATCH = 8


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def _strided_sample(docs: Sequence[str], max_chars: int) -> list[str]:
    """Every n-th document so that the sample is about `max_chars`: spread over the whole domain, not its first files."""
    total = sum(len(d) for d in docs)
    stride = max(1, math.ceil(total / max_chars))
    return list(docs[::stride])


def train_tokenizer(train_docs: dict[str, list[str]], vocab_size: int, sample_chars: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on an equal-sized sample per domain; deterministic for the same input."""
    tok = Tokenizer(models.BPE())
    # Byte-level: every string is encodable (no <unk>), which matters for code and non-ASCII French.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sample = [text for docs in train_docs.values() for text in _strided_sample(docs, sample_chars)]
    tok.train_from_iterator(sample, trainer)
    bos_id = tok.token_to_id(BOS)
    # Text encoded with special tokens starts with <|bos|>, as every training document did.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1024
    )


def token_stream(tokenizer: PreTrainedTokenizerBase, docs: Sequence[str]) -> np.ndarray:
    """Concatenate `<|bos|> doc <|eos|>` for every document into one int32 array."""
    parts: list[np.ndarray] = []
    batch = 256  # bounded memory for the 10 MB code domain
    # The backend tokenizer directly: same ids as `tokenizer(...)`, without the per-call "longer than
    # model_max_length" warning that whole documents trigger (they are cut into windows afterwards).
    backend = tokenizer.backend_tokenizer
    for i in range(0, len(docs), batch):
        for enc in backend.encode_batch(list(docs[i : i + batch]), add_special_tokens=False):
            parts.append(np.asarray([tokenizer.bos_token_id, *enc.ids, tokenizer.eos_token_id], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def heldout_windows(
    tokenizer: PreTrainedTokenizerBase, domain: str, n_windows: int = EVAL_WINDOWS, seq_len: int = EVAL_SEQ_LEN
) -> torch.Tensor:
    """The fixed held-out sample of a domain: the first `n_windows` full windows of its held-out stream (fewer if the
    held-out split is shorter), shape [n, seq_len]."""
    stream = token_stream(tokenizer, list(demo_documents(domain, "heldout")))
    n = min(n_windows, len(stream) // seq_len)
    return torch.from_numpy(stream[: n * seq_len].astype(np.int64)).view(n, seq_len)


def sample_fingerprint(windows: torch.Tensor) -> str:
    """SHA-256 of the token ids: tells the test whether it rebuilt exactly the sample the numbers were measured on."""
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Models


def moe_config(vocab_size: int, expert_width: int, tokenizer: PreTrainedTokenizerBase) -> OlmoeConfig:
    return OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=expert_width,  # width of each expert
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=16,
        num_experts_per_tok=2,
        norm_topk_prob=False,  # OLMoE's own choice: weights are the raw softmax probabilities of the top-k
        max_position_embeddings=256,  # the training window: scripts default to --seq_len = min(512, this)
        tie_word_embeddings=True,  # halves the embedding cost at this size (vocab × hidden = 0.5 M parameters)
        router_aux_loss_coef=0.01,  # documents the weight used; training computes the per-layer version itself
        output_router_logits=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def dense_config(moe: OlmoeConfig) -> LlamaConfig:
    """The dense twin: same embedding, depth, width and heads, FFN width = k × expert width (the MoE's active FFN).

    Llama rather than OLMo(1): Llama has OLMoE's pre-norm RMSNorm layout and SwiGLU FFN; the only remaining difference
    is OLMoE's QK-norm."""
    return LlamaConfig(
        vocab_size=moe.vocab_size,
        hidden_size=moe.hidden_size,
        intermediate_size=moe.num_experts_per_tok * moe.intermediate_size,
        num_hidden_layers=moe.num_hidden_layers,
        num_attention_heads=moe.num_attention_heads,
        num_key_value_heads=moe.num_key_value_heads,
        max_position_embeddings=moe.max_position_embeddings,
        rms_norm_eps=moe.rms_norm_eps,
        rope_theta=getattr(moe, "rope_theta", 10000.0),
        tie_word_embeddings=True,
        bos_token_id=moe.bos_token_id,
        eos_token_id=moe.eos_token_id,
        pad_token_id=moe.pad_token_id,
    )


def per_layer_balance_loss(router_logits: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Switch-style balancing loss E · Σ_e f_e · P̄_e computed for each layer on its own, then averaged.

    f_e = share of tokens with e in their top-k (sums to k), P̄_e = mean router probability. Equal to transformers'
    `load_balancing_loss_func` applied to one layer at a time (balanced value: k)."""
    losses = []
    for z in router_logits:
        probs = z.float().softmax(dim=-1)
        n_tokens, n_experts = probs.shape
        top = probs.topk(k, dim=-1).indices
        frac = torch.zeros(n_experts, dtype=probs.dtype).scatter_add_(
            0, top.reshape(-1), torch.ones(top.numel(), dtype=probs.dtype)
        ) / n_tokens
        losses.append(n_experts * (frac * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of full (unpadded) windows."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # Decay matrices only: decaying norm gains pulls them towards zero for no benefit.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


def batch_plan(lengths: dict[str, int], steps: int, per_domain: int, seq_len: int, seed: int) -> np.ndarray:
    """Start offsets [steps, domains, per_domain] of every training window, drawn once so both models see the same."""
    rng = np.random.default_rng(seed)
    plan = np.empty((steps, len(lengths), per_domain), dtype=np.int64)
    for j, n in enumerate(lengths.values()):
        plan[:, j, :] = rng.integers(0, n - seq_len - 1, size=(steps, per_domain))
    return plan


def train_model(
    model: PreTrainedModel,
    streams: dict[str, np.ndarray],
    plan: np.ndarray,
    args: argparse.Namespace,
    log_prefix: str,
    checkpoint: Callable[[int, PreTrainedModel], None] | None = None,
) -> list[dict[str, float]]:
    """Train in place; returns the logged losses. `checkpoint(steps_done, model)` is called after each step listed
    in `args.checkpoints` (it must not change the model: the run goes on from the same state)."""
    is_moe = isinstance(model, OlmoeForCausalLM)
    k = model.config.num_experts_per_tok if is_moe else 0
    opt = _optimizer(model, args.lr, args.weight_decay)
    tensors = {d: torch.from_numpy(s.astype(np.int64)) for d, s in streams.items()}
    log: list[dict[str, float]] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(plan.shape[0]):
        for group in opt.param_groups:
            group["lr"] = _lr(step, plan.shape[0], args.lr, args.warmup)
        ids = torch.stack(
            [tensors[d][o : o + args.seq_len + 1] for j, d in enumerate(streams) for o in plan[step, j]]
        )
        out = model(input_ids=ids, output_router_logits=is_moe, use_cache=False)
        ce = lm_loss(out.logits, ids)
        loss = ce
        bal = torch.zeros(())
        if is_moe:
            bal = per_layer_balance_loss(out.router_logits, k)
            loss = ce + args.balance_coef * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if checkpoint is not None and step + 1 in getattr(args, "checkpoints", ()):
            checkpoint(step + 1, model)
        if step % args.log_every == 0 or step == plan.shape[0] - 1:
            rate = (step + 1) * ids.numel() / (time.perf_counter() - t0)
            entry = {"step": step, "ce": round(ce.item(), 4), "balance": round(bal.item(), 4),
                     "tokens_per_s": round(rate)}
            log.append(entry)
            print(f"[{log_prefix}] step {step:5d}  ce {ce.item():.4f}  balance {bal.item():.4f}  "
                  f"{rate:,.0f} tok/s  {time.perf_counter() - t0:,.0f}s", flush=True)
    model.eval()
    return log


# ---------------------------------------------------------------------------------------------------------------
# Measurement on the held-out sample (used for the trained models and the untrained control)


@torch.inference_mode()
def measure(model: PreTrainedModel, windows: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Held-out loss per domain and, for an MoE, top-k routing counts per layer × domain × expert."""
    is_moe = hasattr(model.config, "num_experts")
    losses: dict[str, float] = {}
    counts: dict[str, torch.Tensor] = {}  # domain -> [layers, experts] top-k assignment counts
    for domain, w in windows.items():
        total, n = 0.0, 0
        c = None
        for i in range(0, len(w), EVAL_BATCH):
            ids = w[i : i + EVAL_BATCH]
            out = model(input_ids=ids, output_router_logits=is_moe, use_cache=False)
            total += lm_loss(out.logits, ids).item() * ids[:, 1:].numel()
            n += ids[:, 1:].numel()
            if is_moe:
                k, n_exp = model.config.num_experts_per_tok, model.config.num_experts
                layer_counts = torch.stack([
                    torch.bincount(z.softmax(dim=-1).topk(k, dim=-1).indices.reshape(-1), minlength=n_exp)
                    for z in out.router_logits
                ])
                c = layer_counts if c is None else c + layer_counts
        losses[domain] = total / n
        if c is not None:
            counts[domain] = c
    result: dict[str, Any] = {"loss": losses}
    if is_moe:
        result["routing"] = routing_summary(counts, windows, model.config.num_experts_per_tok)
    return result


def routing_summary(counts: dict[str, torch.Tensor], windows: dict[str, torch.Tensor], k: int) -> dict[str, Any]:
    """Busiest-expert share per layer and domain (share of the domain's tokens that have it in their top-k; uniform
    = k/E), dead experts per layer (never selected on the whole sample), lowest load relative to the mean."""
    domains = list(counts)
    n_layers, n_exp = next(iter(counts.values())).shape
    uniform = k / n_exp
    share: dict[str, dict[str, float]] = {}
    busiest: dict[str, dict[str, int]] = {}
    for layer in range(n_layers):
        share[str(layer)] = {}
        busiest[str(layer)] = {}
        for d in domains:
            tokens = windows[d].numel()
            row = counts[d][layer]
            share[str(layer)][d] = row.max().item() / tokens
            busiest[str(layer)][d] = int(row.argmax().item())
    # Lift: the busiest expert's share of this domain over its mean share across domains (1 = the expert is just as
    # busy everywhere, a generic expert; the number of domains = it serves this domain only).
    per_domain_share = {d: counts[d].double() / windows[d].numel() for d in domains}  # [layers, experts]
    mean_share = sum(per_domain_share.values()) / len(domains)
    lift = {
        str(layer): {d: (per_domain_share[d][layer, busiest[str(layer)][d]]
                         / mean_share[layer, busiest[str(layer)][d]]).item() for d in domains}
        for layer in range(n_layers)
    }
    total = sum(counts.values())
    dead = {str(layer): int((total[layer] == 0).sum().item()) for layer in range(n_layers)}
    min_load = {str(layer): total[layer].min().item() / total[layer].float().mean().item() for layer in range(n_layers)}
    ratio = {lay: {d: v / uniform for d, v in row.items()} for lay, row in share.items()}
    layers_all_3x = [int(lay) for lay, row in ratio.items() if all(v >= 3.0 for v in row.values())]
    return {
        "k": k,
        "num_experts": n_exp,
        "uniform_share": uniform,
        "busiest_share": share,
        "busiest_over_uniform": ratio,
        "busiest_expert": busiest,
        "busiest_lift": lift,
        "best_ratio_per_domain": {d: max(ratio[lay][d] for lay in ratio) for d in domains},
        "layers_where_every_domain_reaches_3x": layers_all_3x,
        "dead_experts": dead,
        "min_load_over_mean": min_load,
    }


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_training_md(path: Path, m: dict[str, Any]) -> None:
    doms = m["domains"]
    moe_l, dense_l, untr_l = m["moe"]["loss"], m["dense"]["loss"], m["untrained"]["loss"]
    r, ru = m["moe"]["routing"], m["untrained"]["routing"]
    layers = sorted(r["busiest_share"], key=int)
    corpus_rows = [
        [d, m["corpus"][d]["source"], m["corpus"][d]["licence"], m["corpus"][d]["train_docs"],
         f"{m['corpus'][d]['train_mb']:.3f}", f"{m['corpus'][d]['train_tokens']:,}", m["corpus"][d]["heldout_docs"],
         m["sample"]["windows"][d]]
        for d in doms
    ]
    loss_rows = [[d, f"{moe_l[d]:.3f}", f"{dense_l[d]:.3f}", f"{moe_l[d] - dense_l[d]:+.3f}", f"{untr_l[d]:.3f}"]
                 for d in doms]
    loss_rows.append(["**mean**", f"{m['moe']['mean_loss']:.3f}", f"{m['dense']['mean_loss']:.3f}",
                      f"{m['moe']['mean_loss'] - m['dense']['mean_loss']:+.3f}", f"{m['untrained']['mean_loss']:.3f}"])
    spec_rows = []
    for lay in layers:
        spec_rows.append(
            [lay]
            + [f"{r['busiest_share'][lay][d]:.3f} ({r['busiest_over_uniform'][lay][d]:.1f}×, e{r['busiest_expert'][lay][d]}, "
               f"lift {r['busiest_lift'][lay][d]:.1f}) / {ru['busiest_over_uniform'][lay][d]:.1f}×" for d in doms]
            + [r["dead_experts"][lay], f"{r['min_load_over_mean'][lay]:.2f}", ru["dead_experts"][lay]]
        )
    groups = []
    for lay in layers:
        by_expert: dict[int, list[str]] = {}
        for d in doms:
            by_expert.setdefault(r["busiest_expert"][lay][d], []).append(d)
        groups += [f"layer {lay} e{e}: {'+'.join(ds)}" for e, ds in by_expert.items() if len(ds) > 1]
    shared = "; ".join(groups) or "none"
    a = m["args"]
    text = f"""# The demo models: how they were trained

`data/demo-moe/` is a small OLMoE ({m['moe']['parameters']:,} parameters, {m['moe']['config']}) and `data/demo-dense/`
its dense twin ({m['dense']['parameters']:,} parameters, {m['dense']['config']}), both trained from scratch by
`tools/train_demo.py` on the offline `demo` corpus (`common/corpus.py`). They share one tokenizer. Files are bf16
safetensors; this file and `heldout_metrics.json` (the same numbers, machine-readable, read by `tests/test_demo.py`)
are written by the training script.

## Exact command

```
{m['command']}
```

seed {a['seed']}, {a['threads']} torch threads, experts implementation `{m['experts_implementation']}`,
torch {m['versions']['torch']}, transformers {m['versions']['transformers']}, tokenizers {m['versions']['tokenizers']},
Python {m['versions']['python']} ({m['versions']['platform']}).
Wall time of the whole script: **{m['wall_time_s'] / 60:.1f} min** ({m['wall_time_s']:.0f} s; MoE training
{m['moe']['train_time_s']:.0f} s, dense {m['dense']['train_time_s']:.0f} s{", the two at the same time in two processes" if a['jobs'] > 1 else ""}) on a 2-core machine
shared with other jobs.
Same seed, same thread count and same experts implementation reproduce the weights bit for bit; another thread count
gives slightly different weights (losses agree to ~0.01–0.03).

## Training recipe

- Tokenizer: byte-level BPE, vocab {a['vocab_size']}, trained on an evenly strided sample of ≤ {a['tokenizer_sample_mb']} MB of each
  domain's training split; specials `<|bos|>`=0, `<|eos|>`=1, `<|pad|>`=2; encoding with special tokens prepends `<|bos|>`.
- Data: each domain's training documents become one stream `<|bos|> doc <|eos|> <|bos|> doc …`; every step takes
  {a['seqs_per_domain']} random windows of {a['seq_len']} (+1) tokens from **each** domain ({len(doms)} domains → {a['seqs_per_domain'] * len(doms)} sequences,
  {a['seqs_per_domain'] * len(doms) * a['seq_len']:,} tokens per step). Both models see exactly the same windows.
- Steps: {a['steps']}; tokens seen per model: **{m['tokens_seen']:,}** ({m['tokens_seen'] // len(doms):,} per domain).
- AdamW (β = 0.9, 0.95; weight decay {a['weight_decay']} on matrices), peak lr {a['lr']}, {a['warmup']} warm-up steps, cosine to 10%,
  gradient clipping 1.0, fp32 on CPU.
- MoE balancing: switch-style loss E·Σ f_e·P̄_e computed **per layer and averaged** (weight {a['balance_coef']}). transformers'
  `load_balancing_loss_func` pools all layers first, which hides dead experts in single layers.
- Dense twin: `LlamaForCausalLM` with the same vocabulary, hidden size, layers and heads, tied embeddings, and FFN width
  {m['dense']['ffn_width']} = k × expert width (the MoE's active FFN width). Llama matches OLMoE's pre-norm RMSNorm + SwiGLU layout;
  OLMoE's QK-norm is the one architectural difference besides the MoE.

## Corpus

{_md_table(["domain", "source", "licence", "train docs", "train MB", "train tokens", "held-out docs",
            "held-out windows"], corpus_rows)}

The French domain is small: Django's French catalogues are the only non-English text a `uv sync` of this project
installs (translated text: ~30 kB German, 35 kB French), so the model sees it ~{m['corpus'].get('french', {}).get('epochs', 0):.0f} times over; its held-out loss shows how
little that generalises. Legal paragraphs are deduplicated across packages before splitting.

## Held-out loss (nats/token)

Fixed held-out sample: per domain, the first {EVAL_WINDOWS} non-overlapping {EVAL_SEQ_LEN}-token windows of the held-out stream
(`tools.train_demo.heldout_windows`; fewer where the held-out split is shorter), loss over every next-token prediction.
Measured by loading the saved bf16 files with `from_pretrained(..., dtype=torch.float32)`.

{_md_table(["domain", "MoE", "dense", "MoE − dense", "untrained MoE"], loss_rows)}

## Routing specialization (MoE, held-out sample)

Cell: share of the domain's tokens whose top-{r['k']} includes the busiest expert (that share over the uniform share
k/E = {r['uniform_share']:.3f}; expert id; lift = that share over the same expert's mean share across the {len(doms)} domains, 1 for an expert
equally busy everywhere, {len(doms)} for one that serves this domain only) / the same ratio for the untrained control (same config
and seed, no training). Dead = experts never selected on the whole held-out sample; min load = least-used expert's
assignments over the mean.

{_md_table(["layer", *doms, "dead", "min load", "dead (untrained)"], spec_rows)}

- Layers in which **every** domain's busiest expert gets ≥ 3× the uniform share: {r['layers_where_every_domain_reaches_3x'] or 'none'}
  (untrained control: {ru['layers_where_every_domain_reaches_3x'] or 'none'}).
- Best ratio per domain over layers, trained vs untrained: {', '.join(f"{d} {r['best_ratio_per_domain'][d]:.1f}× vs {ru['best_ratio_per_domain'][d]:.1f}×" for d in doms)}.
- An untrained router already concentrates tokens (same-looking inputs get the same random projection), so the
  untrained column, not the uniform share, is the baseline to beat.
- Shared busiest experts (domains whose busiest expert is the same one, i.e. concentration that is not
  domain-specific): {shared}.

## Choice of the balancing weight

Measured with this script (seed 0, 1 thread), on the same held-out sample:
- `--balance-coef 0.01` (OLMoE's value), 2000 steps: no dead expert (least-used ≥ 0.48× mean) and held-out mean 2.905
  (dense twin 2.955), but the per-layer loss kept routing so even that legal and prose text never concentrated:
  best busiest-expert ratio legal 2.6×, prose 3.4× (code 4.7×, Bible 7.4×, French 4.4×, math 4.6×), and no layer in
  which every domain reached 3×.
- 500-step trials, MoE only: 0.003 — no such layer; 0.002 — one layer, legal at 3.03×; 0.001 — one layer, legal at
  4.1×, no dead expert, and the best held-out loss of the four (3.65 vs 3.69–3.75); 0 — every layer, but a dead
  expert and experts at < 1% of the mean load.
- 0.001 was chosen. At 2000 steps it costs almost nothing in loss (held-out mean above vs 2.905 with 0.01). The price
  is visible in the table: weaker balancing lets some experts serve several English domains at once (lift near 1)
  and leaves a few experts lightly used (min load).
"""
    path.write_text(text + checkpoints_section(a.get("checkpoints") or [], a["steps"]))


def checkpoints_section(steps_saved: Sequence[int], steps: int) -> str:
    """TRAINING.md's account of the intermediate checkpoints (`--checkpoints`), empty without any."""
    if not steps_saved:
        return ""
    names = " ".join(f"step{n}" for n in steps_saved)
    return f"""
## Training checkpoints

`OUT/demo-moe-checkpoints/step<N>/` holds the MoE after N optimizer steps of this run ({names}; bf16, with the
tokenizer), saved by `--checkpoints {" ".join(map(str, steps_saved))}` from a copy of the model, so the run goes on
unchanged: its step-{steps} weights are those written to `OUT/demo-moe/`. Shipped in `data/demo-moe-checkpoints/`,
they load as revisions of `demo` (`--revision step500`; `--revisions {names} ...` for router saturation).
"""


# ---------------------------------------------------------------------------------------------------------------


def _train_dense_here(
    dcfg: LlamaConfig, streams: dict[str, np.ndarray], plan: np.ndarray, args: argparse.Namespace
) -> tuple[LlamaForCausalLM, list[dict[str, float]], float]:
    torch.manual_seed(args.seed)  # same seed as the MoE: embeddings and attention start from the same draws order
    dense = LlamaForCausalLM(dcfg)
    t0 = time.perf_counter()
    log = train_model(dense, streams, plan, args, "dense")
    return dense, log, time.perf_counter() - t0


def _train_dense(
    dcfg: dict[str, Any], streams: dict[str, np.ndarray], plan: np.ndarray, args: argparse.Namespace
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]], float]:
    """Entry point of the second process: train the dense twin and send its weights back."""
    torch.set_num_threads(args.threads)
    dense, log, seconds = _train_dense_here(LlamaConfig.from_dict(dcfg), streams, plan, args)
    return dense.state_dict(), log, seconds


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data"), help="writes OUT/demo-moe and OUT/demo-dense")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps for each model")
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation, batch plan and everything else")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per model; part of what makes runs bit-identical. 1 is fastest on a busy "
                   "2-core machine: with 2, each op waits for the slower core")
    p.add_argument("--jobs", type=int, default=2, choices=(1, 2),
                   help="2 trains the dense twin in a second process alongside the MoE (same weights, less wall time)")
    p.add_argument("--seq-len", type=int, default=256, help="training window length in tokens")
    p.add_argument("--seqs-per-domain", type=int, default=2, help="windows from each domain in every step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (small models tolerate a high one)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--balance-coef", type=float, default=0.001,
                   help="weight of the per-layer balancing loss (0.01, OLMoE's value, left legal and prose text spread thinly "
                   "over experts in this small model; see TRAINING.md)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--expert-width", type=int, default=128, help="FFN width of each expert (64 halves the file size)")
    p.add_argument("--tokenizer-sample-mb", type=float, default=2.0, help="tokenizer training text per domain")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--skip-dense", action="store_true", help="train only the MoE (for quick trials)")
    p.add_argument("--checkpoints", type=int, nargs="*", default=[],
                   help="also save the MoE after these steps, bf16, to OUT/demo-moe-checkpoints/step<N> (the run "
                        "goes on unchanged: the final weights are the same as without)")
    p.add_argument("--measure-only", action="store_true",
                   help="no training: re-measure the models saved in OUT and rewrite TRAINING.md and the metrics")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    if args.measure_only:
        return remeasure(args)
    shown = list(argv) if argv is not None else sys.argv[1:]
    command = "uv run python -m tools.train_demo " + " ".join(shown)

    domains, skipped = available_demo_domains()
    if skipped:
        # The shipped model must cover every demo domain; a partial corpus would silently change it.
        raise InputError("demo corpus incomplete: " + "; ".join(f"{d}: {why}" for d, why in skipped.items()))
    train_docs = {d: list(demo_documents(d, "train")) for d in domains}
    print(f"corpus loaded ({time.perf_counter() - t_start:.1f}s)", flush=True)

    tokenizer = train_tokenizer(train_docs, args.vocab_size, int(args.tokenizer_sample_mb * 1e6))
    streams = {d: token_stream(tokenizer, docs) for d, docs in train_docs.items()}
    print("train tokens: " + ", ".join(f"{d} {len(s):,}" for d, s in streams.items())
          + f" ({time.perf_counter() - t_start:.1f}s)", flush=True)
    plan = batch_plan({d: len(s) for d, s in streams.items()}, args.steps, args.seqs_per_domain, args.seq_len, args.seed)

    cfg = moe_config(args.vocab_size, args.expert_width, tokenizer)
    torch.manual_seed(args.seed)
    moe = OlmoeForCausalLM(cfg)
    untrained = OlmoeForCausalLM(cfg)
    untrained.load_state_dict(moe.state_dict())  # the control is the trained model's own initialisation
    untrained.eval()
    experts_impl = getattr(moe.config, "_experts_implementation", None) or "default"

    dcfg = dense_config(cfg)
    pool = None
    dense_job = None
    if not args.skip_dense and args.jobs > 1:
        # The dense twin trains in a second single-purpose process at the same time. Each process runs its own fixed
        # thread count, so the weights are the same as training one after the other, in about half the wall time.
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        dense_job = pool.submit(_train_dense, dcfg.to_dict(), streams, plan, args)

    def save_checkpoint(steps_done: int, model: PreTrainedModel) -> None:
        folder = args.out / "demo-moe-checkpoints" / f"step{steps_done}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        snapshot = copy.deepcopy(model)  # the training copy keeps its fp32 weights and optimizer state
        snapshot.to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        print(f"[moe] checkpoint after step {steps_done} -> {folder}", flush=True)

    t0 = time.perf_counter()
    moe_log = train_model(moe, streams, plan, args, "moe", save_checkpoint)
    moe_time = time.perf_counter() - t0

    dense_log: list[dict[str, float]] = []
    dense_time = 0.0
    if dense_job is not None and pool is not None:
        state, dense_log, dense_time = dense_job.result()
        pool.shutdown()
        dense = LlamaForCausalLM(dcfg)
        dense.load_state_dict(state)
    elif not args.skip_dense:
        dense, dense_log, dense_time = _train_dense_here(dcfg, streams, plan, args)
    else:
        dense = LlamaForCausalLM(dcfg)

    moe_dir, dense_dir = args.out / "demo-moe", args.out / "demo-dense"
    saved = [(moe, moe_dir)] + ([] if args.skip_dense else [(dense, dense_dir)])
    for model, folder in saved:
        if folder.exists():
            shutil.rmtree(folder)  # stale shards or tokenizer files from an older run must not survive
        folder.mkdir(parents=True)
        model.to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    tokens_seen = args.steps * args.seqs_per_domain * len(domains) * args.seq_len
    corpus_info = {}
    for d in domains:
        info = demo_domain_info(d)
        corpus_info[d] = {
            "source": info["source"], "licence": info["licence"], "train_docs": len(train_docs[d]),
            "train_mb": sum(len(t.encode()) for t in train_docs[d]) / 1e6, "train_tokens": len(streams[d]),
            "heldout_docs": len(list(demo_documents(d, "heldout"))),
            "epochs": tokens_seen / len(domains) / len(streams[d]),
        }
    metrics: dict[str, Any] = {
        "command": command,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "domains": domains,
        "experts_implementation": experts_impl,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "python": platform.python_version(),
                     "platform": platform.platform()},
        "tokens_seen": tokens_seen,
        "corpus": corpus_info,
        "moe": {"parameters": sum(p.numel() for p in moe.parameters()), "train_time_s": moe_time,
                "log": moe_log, "config": f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                f"{cfg.num_attention_heads} heads, {cfg.num_experts} experts of width {cfg.intermediate_size}, "
                f"top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}, tied embeddings"},
        "dense": {"parameters": sum(p.numel() for p in dense.parameters()), "train_time_s": dense_time,
                  "log": dense_log, "ffn_width": dcfg.intermediate_size,
                  "config": f"{dcfg.num_hidden_layers} layers, hidden {dcfg.hidden_size}, {dcfg.num_attention_heads} "
                  f"heads, FFN {dcfg.intermediate_size}, vocab {dcfg.vocab_size}, tied embeddings"},
        "untrained": {},
    }
    return measure_and_report(args, metrics, untrained, t_start)


def measure_and_report(
    args: argparse.Namespace, metrics: dict[str, Any], untrained: PreTrainedModel, t_start: float | None
) -> dict[str, Any]:
    """Measure what was shipped (bf16 files loaded back as fp32, with the tokenizer as saved) and the untrained
    control on the fixed held-out sample; write heldout_metrics.json and TRAINING.md."""
    moe_dir, dense_dir = args.out / "demo-moe", args.out / "demo-dense"
    domains = metrics["domains"]
    tok = AutoTokenizer.from_pretrained(moe_dir)
    windows = {d: heldout_windows(tok, d) for d in domains}
    results = {"moe": measure(AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32), windows),
               "untrained": measure(untrained, windows)}
    if (dense_dir / "config.json").is_file() and not args.skip_dense:
        results["dense"] = measure(AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32), windows)
    else:
        results["dense"] = {"loss": dict.fromkeys(domains, float("nan"))}
    for name, res in results.items():
        res["mean_loss"] = sum(res["loss"].values()) / len(res["loss"])
        metrics[name].update(res)
    metrics["sample"] = {"seq_len": EVAL_SEQ_LEN, "max_windows": EVAL_WINDOWS,
                         "windows": {d: len(w) for d, w in windows.items()},
                         "sha256": {d: sample_fingerprint(w) for d, w in windows.items()}}
    metrics["file_bytes"] = {f.parent.name: f.stat().st_size for f in (moe_dir / "model.safetensors",
                             dense_dir / "model.safetensors") if f.is_file()}
    if t_start is not None:  # a re-measurement keeps the training run's wall time
        metrics["wall_time_s"] = time.perf_counter() - t_start
    (moe_dir / "heldout_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_training_md(moe_dir / "TRAINING.md", metrics)

    moe_m, r = metrics["moe"], metrics["moe"]["routing"]
    print("held-out loss  MoE " + ", ".join(f"{d} {v:.3f}" for d, v in moe_m["loss"].items())
          + f" | mean {moe_m['mean_loss']:.3f}; dense mean {metrics['dense']['mean_loss']:.3f}")
    untrained_best = metrics["untrained"]["routing"]["best_ratio_per_domain"]
    print(f"layers where every domain ≥3×: {r['layers_where_every_domain_reaches_3x']}; "
          f"best ratio per domain {json.dumps({d: round(v, 2) for d, v in r['best_ratio_per_domain'].items()})}; "
          f"dead {r['dead_experts']}; untrained best {json.dumps({d: round(v, 2) for d, v in untrained_best.items()})}")
    print(f"wall time {metrics['wall_time_s']:.0f}s")
    return metrics


def remeasure(args: argparse.Namespace) -> dict[str, Any]:
    """`--measure-only`: redo the held-out measurement of already saved models without training again."""
    moe_dir = args.out / "demo-moe"
    metrics = json.loads((moe_dir / "heldout_metrics.json").read_text())
    for name in ("moe", "dense", "untrained"):  # keep only what training recorded
        for key in ("loss", "routing", "mean_loss"):
            metrics[name].pop(key, None)
    # The untrained control is the MoE's initialisation: same config, same seed, nothing drawn before it.
    cfg = OlmoeConfig.from_pretrained(moe_dir)
    torch.manual_seed(metrics["args"]["seed"])
    untrained = OlmoeForCausalLM(cfg).float().eval()
    return measure_and_report(args, metrics, untrained, None)


if __name__ == "__main__":
    main()
