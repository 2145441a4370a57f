"""Load a causal LM and its tokenizer from one `--model` string, and wrap it as a `MoEModel`.

`--model` accepts:
- `demo` / `demo-dense`: the small models shipped in `data/` (see data/demo-moe/TRAINING.md);
- `random:<model_type>`: a tiny randomly initialised model of any transformers MoE architecture (offline smoke runs);
- a local directory written by `save_pretrained` (the real `from_pretrained` path);
- a hub id (`allenai/OLMoE-1B-7B-0924`), with `--revision`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from common import distributed, hub
from common.config import DTYPE_NAMES, RANDOM_PREFIX, ModelSpec
from common.errors import InputError
from common.model import deepseek_moe
from common.model.adapter import MoEModel, find_moe_layers
from common.model.config_facts import hub_kwargs as _hub_kwargs
from common.model.config_facts import model_source as _source
from common.model.view import LanguageModel

deepseek_moe.register()  # native DeepSeekMoE v1 (model_type "deepseek"): every load path below sees it

def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return distributed.local_cuda_device() if distributed.world_size() > 1 else torch.device("cuda")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise InputError(f"--device: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA (the models' training precision, half the memory), fp32 on CPU (bf16 matmuls are slow there)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPE_NAMES:
        raise InputError(f"--dtype {dtype}: choose auto, float32, bfloat16 or float16")
    return getattr(torch, DTYPE_NAMES[dtype])


def _not_cached(spec: ModelSpec) -> InputError:
    return InputError(
        f"--model {spec.model}: {hub.unreachable_reason()} and the model is not in the local cache; pass a local "
        "folder written by save_pretrained, or download it on a machine that reaches the hub"
    )


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _load_error(name: str, err: Exception) -> InputError:
    return InputError(f"--model {name}: cannot load it ({_first_line(err)})")


# What a repository's modeling code written for an older transformers raises at import (a removed helper, ...).
_REMOTE_CODE_ERRORS = (ImportError, AttributeError, NameError)


def _raised_in_remote_code(err: BaseException) -> bool:
    """Whether `err` was raised inside a repository's own code (a module transformers imported from the repository)."""
    from transformers.dynamic_module_utils import TRANSFORMERS_DYNAMIC_MODULE_NAME

    tb = err.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).startswith(TRANSFORMERS_DYNAMIC_MODULE_NAME + "."):
            return True
        tb = tb.tb_next
    return False


def _declared_model_type(source: str | Path, revision: str | None) -> str | None:
    from transformers import PretrainedConfig

    try:
        return PretrainedConfig.get_config_dict(str(source), revision=revision)[0].get("model_type")
    except Exception:  # only used for a hint
        return None


def _remote_code_error(spec: ModelSpec, model_type: str | None, err: BaseException) -> InputError:
    """The repository's own code fails to import under this transformers: say so in one line, with the way out."""
    import transformers

    if model_type == deepseek_moe.MODEL_TYPE:
        hint = "DeepSeekMoE checkpoints load natively without the flag"
    else:
        hint = "without the flag it loads if transformers implements its model_type, else use the transformers version it was written for"
    return InputError(
        f"--trust_remote_code: {spec.model}'s own code cannot be imported under transformers "
        f"{transformers.__version__} ({_first_line(err)}); {hint}"
    )


def _read_pretrained(spec: ModelSpec, read):
    """`read(source, ...)` (a config's or tokenizer's `from_pretrained`) with the loader's one-line errors: a model
    that is not cached while offline, a missing or unreadable one, a repository's own code that fails."""
    source = _source(spec)
    hub_kwargs = _hub_kwargs(spec, source)
    try:
        return read(source, trust_remote_code=spec.trust_remote_code, **hub_kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise (_not_cached(spec) if hub_kwargs.get("local_files_only") else _load_error(spec.model, err)) from None
    except _REMOTE_CODE_ERRORS as err:
        if spec.trust_remote_code and _raised_in_remote_code(err):
            raise _remote_code_error(spec, _declared_model_type(source, spec.revision), err) from None
        raise


def _skeleton(spec: ModelSpec):
    """The model built from its config alone, parameters on the meta device (no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.model.startswith(RANDOM_PREFIX):
        from common.model.tiny import tiny_config, tiny_tokenizer

        config = tiny_config(spec.model[len(RANDOM_PREFIX):], vocab_size=len(tiny_tokenizer()))
    else:
        config = _read_pretrained(spec, AutoConfig.from_pretrained)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    except ValueError as err:
        raise _load_error(spec.model, err) from None
    except _REMOTE_CODE_ERRORS as err:
        if spec.trust_remote_code and _raised_in_remote_code(err):
            raise _remote_code_error(spec, getattr(config, "model_type", None), err) from None
        raise
    if spec.trust_remote_code and getattr(config, "model_type", None) == deepseek_moe.MODEL_TYPE:
        warnings.warn("--trust_remote_code is not needed: DeepSeekMoE checkpoints load natively (the repository's "
                      "code is not used)", stacklevel=2)
    return skeleton


def _view(model, tokenizer, spec: ModelSpec, *, require_moe: bool) -> LanguageModel:
    """MoEModel for a model with MoE layers; a dense LanguageModel otherwise, unless MoE layers are required."""
    try:
        if require_moe or _has_moe_layers(model):
            return MoEModel(model, tokenizer, name=spec.model, revision=spec.revision)
        return LanguageModel(model, tokenizer, name=spec.model, revision=spec.revision)
    except InputError as err:
        raise InputError(f"--model {spec.model}: {err}") from None


def _has_moe_layers(model) -> bool:
    try:
        return bool(find_moe_layers(model))
    except InputError:
        return False


def inspect_moe(spec: ModelSpec) -> MoEModel:
    """The model's MoE structure from its config alone: a dense model or a wrong `--layers` is refused in seconds,
    before a large checkpoint is loaded."""
    return _view(_skeleton(spec), None, spec, require_moe=True)


def inspect_model(spec: ModelSpec) -> LanguageModel:
    """The model's structure from its config alone, dense or MoE (for analyses that accept dense baselines)."""
    return _view(_skeleton(spec), None, spec, require_moe=False)


def load_model_and_tokenizer(spec: ModelSpec):
    """(model in eval mode on its device, tokenizer, resolved source string)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    name = spec.model
    if name.startswith(RANDOM_PREFIX):
        from common.model.tiny import build_random_model

        model, tokenizer = build_random_model(name[len(RANDOM_PREFIX):], seed=spec.seed, dtype=dtype)
        return model.to(device).eval(), tokenizer, name
    source = _source(spec)
    hub_kwargs = _hub_kwargs(spec, source)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code, **hub_kwargs}
    if spec.device_map:
        kwargs["device_map"] = spec.device_map
        if spec.max_memory:
            kwargs["max_memory"] = {int(device) if device.isdigit() else device: size for device, size in spec.max_memory}
        if spec.offload_folder:
            kwargs["offload_folder"] = spec.offload_folder
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code, **hub_kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise (_not_cached(spec) if hub_kwargs.get("local_files_only") else _load_error(name, err)) from None
    except _REMOTE_CODE_ERRORS as err:
        if spec.trust_remote_code and _raised_in_remote_code(err):
            raise _remote_code_error(spec, _declared_model_type(source, kwargs.get("revision")), err) from None
        raise
    if not spec.device_map:
        model = model.to(device)
    return model.eval(), tokenizer, str(source)


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer alone (no weight is read), prepared as `load_moe` prepares it: for checks that need
    it (prompt positions, window framing) before a large checkpoint is loaded."""
    from transformers import AutoTokenizer

    if spec.model.startswith(RANDOM_PREFIX):
        from common.model.tiny import tiny_tokenizer

        tokenizer = tiny_tokenizer()
    else:
        tokenizer = _read_pretrained(spec, AutoTokenizer.from_pretrained)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # as `_loaded` does: batching needs a pad id
    return tokenizer


def _loaded(spec: ModelSpec):
    model, tokenizer, _ = load_model_and_tokenizer(spec)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; padding never counts anyway
    return model, tokenizer


def load_moe(spec: ModelSpec) -> MoEModel:
    """Load `spec.model` and find its MoE layers (an `InputError` for dense models)."""
    model, tokenizer = _loaded(spec)
    return _view(model, tokenizer, spec, require_moe=True)


def load_model(spec: ModelSpec) -> LanguageModel:
    """Load `spec.model`: a `MoEModel` if it has MoE layers, else a dense `LanguageModel` (decoder layers, FFNs,
    final norm and unembedding) for analyses that need a dense baseline."""
    model, tokenizer = _loaded(spec)
    return _view(model, tokenizer, spec, require_moe=False)
