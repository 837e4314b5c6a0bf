"""Turn a MODEL spec (CLI argument or Python string) into a model in eval mode plus example inputs.

Accepted specs:

    timm:NAME                        timm.create_model(NAME); random weights unless pretrained/weights
    hf:DIR_OR_ID                     transformers model class named by the config's `architectures`
    diffusers:DIR_OR_ID[#SUBFOLDER]  diffusers model class named by config.json's `_class_name`
    FILE.py:FUNCTION                 FUNCTION() returns model, (model, args) or (model, args, kwargs)
    zoo:NAME                         a small random-config model from dittofx.models.zoo

Hub ids (hf:ORG/NAME, diffusers:ORG/NAME) and timm's pretrained weights: the Hugging Face hub is
contacted only with `pretrained=True` (--pretrained), and then only once it answered a HEAD request
within HUB_TIMEOUT_S (one check per process); HF_HUB_OFFLINE=1 skips the check and the hub. Without
it, or with the hub unreachable, the local Hugging Face cache (HF_HUB_CACHE) is read: a model
downloaded once keeps working offline, and one never downloaded is one line saying what to do, at
once instead of after a minute of retries.

`weights=FILE` loads a safetensors file or a torch state dict into the model afterwards
(`load_weights`). Example inputs are inferred from the model's config (`example_inputs_for`);
`input_shape` overrides the shape of the main input and is given WITHOUT the batch dimension,
e.g. (3, 224, 224) for an image model or (16, 3, 224, 224) (T, C, H, W) for VideoMAE.

Every user error is a `ModelSpecError` with a one-line message. timm, transformers and diffusers
are imported only when a spec needs them.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from dittofx.errors import ModelSpecError, first_line
from dittofx.models.example_inputs import (
    _family_of,
    _like,
    allocating,
    check_input_size,
    example_inputs_for,
    parse_input_shape,
)
from dittofx.models.weights import WEIGHT_FORMS, load_weights

SPEC_FORMS = "timm:NAME, hf:DIR_OR_ID, diffusers:DIR_OR_ID[#SUBFOLDER], FILE.py:FUNCTION, zoo:NAME"


@dataclass
class ResolvedModel:
    """A resolved MODEL spec: `model(*example_inputs, **example_kwargs)` runs it.

    `name` is short (for reports and file names); `family` is "timm", "transformers",
    "diffusers" or "torch" (a model from FILE.py built from none of these libraries).
    """

    model: nn.Module
    example_inputs: tuple
    example_kwargs: dict = field(default_factory=dict)
    name: str = ""
    family: str = "torch"


# ---------------------------------------------------------------------------------------------
# resolve


def resolve(
    spec: str,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    input_shape: tuple[int, ...] | str | None = None,
    batch: int = 1,
) -> ResolvedModel:
    """Resolve a MODEL spec (see the module docstring) to a model in eval mode and example inputs.

    `pretrained` lets timm fetch its pretrained weights and hf:/diffusers: hub ids be downloaded (the
    module docstring says when the hub is contacted); hf: and diffusers: load the folder's (or the
    cached snapshot's) weights. `weights` is a local checkpoint loaded after the model is built (strictly: every key
    must match). `input_shape` is the main input's shape without the batch dimension (a tuple or
    "3,224,224"); it also overrides inputs that a FILE.py function returns. `batch` is the batch size
    of inferred inputs.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"empty MODEL spec; accepted forms: {SPEC_FORMS}")
    spec = spec.strip()
    shape = parse_input_shape(input_shape) if input_shape is not None else None
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ModelSpecError(f"batch must be a positive integer, got {batch!r}")
    if weights is not None:
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise ModelSpecError(f"weights file {weights!r} does not exist ({WEIGHT_FORMS})")

    prefix, _, rest = spec.partition(":")
    if prefix in ("timm", "hf", "diffusers", "zoo") and not rest.strip():
        raise ModelSpecError(f"{prefix}: needs a name after the colon, e.g. {_EXAMPLES[prefix]}")
    rest = rest.strip()
    args = kwargs = None
    if prefix == "zoo":
        if pretrained:
            raise ModelSpecError("zoo models have no pretrained weights; drop --pretrained or pass --weights FILE")
        from dittofx.models import zoo

        with allocating(f"the example inputs of zoo:{rest} at batch {batch}"):
            z = zoo.build(rest, batch=batch)
        model, family, name, args, kwargs = z.model, z.family, rest, z.example_inputs, z.example_kwargs
    elif prefix == "timm":
        model, name = _load_timm(rest, pretrained=pretrained and weights is None), rest
        family = "timm"
    elif prefix == "hf":
        model, name = _load_hf(rest, pretrained=pretrained), _short_name(rest)
        family = "transformers"
    elif prefix == "diffusers":
        model, name = _load_diffusers(rest, pretrained=pretrained)
        family = "diffusers"
    elif _is_file_spec(spec):
        if pretrained:
            raise ModelSpecError("--pretrained applies to timm: specs only; a FILE.py function builds its own weights")
        path, _, func = spec.rpartition(":")
        model, args, kwargs = _load_file(path, func)
        family, name = _family_of(model), func
    else:
        if spec.endswith(".py"):
            raise ModelSpecError(f"{spec!r} names a file but no function; use FILE.py:FUNCTION")
        raise ModelSpecError(f"unknown MODEL spec {spec!r}; accepted forms: {SPEC_FORMS}")

    if weights is not None:
        load_weights(model, weights)
    model.eval()

    if args is not None and shape is not None:  # zoo or FILE.py inputs: only the main input changes
        full = (args[0].shape[0] if torch.is_tensor(args[0]) else batch, *shape)
        check_input_size(full)
        with allocating(f"an example input of shape {full}"):
            args = (_like(args[0], full),) + tuple(args[1:])
    if args is None:
        inferred = example_inputs_for(model, input_shape=shape, batch=batch)
        if inferred is None and shape is not None:
            raise ModelSpecError(
                f"cannot infer the inputs of {name} ({type(model).__name__}) besides the main one; "
                "write FILE.py:FUNCTION returning (model, example_inputs, example_kwargs)"
            )
        if inferred is None:
            raise ModelSpecError(
                f"cannot infer example inputs for {name} ({type(model).__name__}); "
                "pass --input-shape with the main input's shape without the batch, e.g. 3,224,224"
            )
        args, kwargs = inferred
    return ResolvedModel(model, tuple(args), dict(kwargs or {}), name=name, family=family)


_EXAMPLES = {
    "timm": "timm:vit_small_patch16_224",
    "hf": "hf:./my-vit (a local folder) or hf:google/vit-base-patch16-224",
    "diffusers": "diffusers:./pixart#transformer",
    "zoo": "zoo:vit",
}


def _is_file_spec(spec: str) -> bool:
    path, sep, func = spec.rpartition(":")
    return bool(sep) and path.endswith(".py")


def _short_name(path_or_id: str) -> str:
    return os.path.basename(os.path.normpath(path_or_id)) or path_or_id


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = first_line(exc, limit)
    return text if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


# ---------------------------------------------------------------------------------------------
# timm


def _load_timm(name: str, *, pretrained: bool) -> nn.Module:
    import timm

    if not timm.is_model(name):
        arch = name.split(".")[0]
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        if not close:
            stem = arch.split("_")[0]
            close = timm.list_models(f"*{stem}*")[:5] if stem else []
        hint = f"close names: {', '.join(close)}" if close else "see timm.list_models()"
        raise ModelSpecError(f"unknown timm model {name!r}; {hint}")
    offline = _hub_refusal(True) if pretrained and _timm_on_hub(name) else None
    try:
        with _hub_offline(offline is not None):
            return timm.create_model(name, pretrained=pretrained)
    except Exception as e:
        if pretrained:
            why = f"{offline} and they are not in the local cache" if offline else "no network and not in the cache?"
            raise ModelSpecError(
                f"could not get pretrained weights for timm:{name} ({why}): "
                f"{_one_line(e)}; pass --weights FILE with a local checkpoint instead"
            ) from e
        raise ModelSpecError(f"timm could not build {name!r}: {_one_line(e)}") from e


def _timm_on_hub(name: str) -> bool:
    """Whether timm gets `name`'s pretrained weights from the Hugging Face hub (not another URL)."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown tag: create_model says so
        return True
    return cfg is None or bool(getattr(cfg, "hf_hub_id", None))


# ---------------------------------------------------------------------------------------------
# transformers


HUB_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=8)
def _hub_answer(endpoint: str) -> str | None:
    """None when the hub at `endpoint` answers a HEAD within HUB_TIMEOUT_S (any HTTP status), else why not."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - any failure to get an answer is "unreachable"
        return f"the Hugging Face hub at {endpoint} did not answer within {HUB_TIMEOUT_S:g} s ({_one_line(e, 120)})"
    return None


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub (HF_ENDPOINT) cannot be reached, or None; checked once per process."""
    from huggingface_hub import constants

    return _hub_answer(constants.ENDPOINT)


def _hub_refusal(pretrained: bool) -> str | None:
    """Why the hub is not to be contacted (then only the local cache is read), or None to download."""
    from huggingface_hub import constants

    if not pretrained:
        return "without --pretrained dittofx does not contact the Hugging Face hub"
    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    return hub_unreachable()


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """huggingface_hub's offline mode while the block runs (timm has no local_files_only)."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _hub_hint(what: str, refusal: str | None, e: BaseException) -> str:
    """One line for a hub id that could not be loaded: why, and what to do."""
    from huggingface_hub import constants

    kind = what.partition(":")[0]
    folder = f"a local folder {kind}:DIR (saved with save_pretrained)"
    if refusal is None:
        return (f"{what} is not a local folder and could not be fetched from the Hugging Face hub "
                f"({_one_line(e)}); check the id, or pass {folder}")
    cached = f"{what} is not a local folder nor in the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    if refusal.startswith("without"):
        todo = "pass --pretrained to download it"
    elif refusal.startswith("HF_HUB_OFFLINE"):
        todo = "unset HF_HUB_OFFLINE and pass --pretrained to download it"
    else:
        todo = "connect to the network (or set HF_ENDPOINT to a mirror)"
    return f"{cached}, and {refusal}: {todo}, or pass {folder}"


def _looks_like_path(s: str) -> bool:
    # hub ids are NAME or ORG/NAME; anything else that does not exist is a mistyped path
    return s.startswith((".", "/", "~")) or "\\" in s or s.count("/") > 1


def _check_local_or_hub(kind: str, path: str) -> bool:
    """True for an existing local folder; raises for a missing path; False for a hub id."""
    if os.path.isdir(os.path.expanduser(path)):
        return True
    if os.path.exists(os.path.expanduser(path)):
        raise ModelSpecError(f"{kind}:{path} is a file; expected a model folder (with config.json) or a hub id")
    if _looks_like_path(path):
        raise ModelSpecError(
            f"{kind}:{path}: no such folder (expected a model folder with config.json, or a hub id ORG/NAME)"
        )
    return False


def _load_hf(path: str, *, pretrained: bool = False) -> nn.Module:
    local = _check_local_or_hub("hf", path)
    if local:
        path = os.path.expanduser(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelSpecError(f"hf:{path} has no config.json; expected a folder written by save_pretrained")
    refusal = None if local else _hub_refusal(pretrained)
    hub = {"local_files_only": True} if refusal else {}
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path, **hub)
    except Exception as e:
        if local:
            raise ModelSpecError(f"could not read the transformers config in {path}: {_one_line(e)}") from e
        raise ModelSpecError(_hub_hint("hf:" + path, refusal, e)) from e

    cls = None
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            break
    if cls is None:
        cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(path, **hub)
    except Exception as e:
        if local:
            raise ModelSpecError(f"could not load {cls.__name__} from {path}: {_one_line(e)}") from e
        raise ModelSpecError(_hub_hint("hf:" + path, refusal, e)) from e
    return model


# ---------------------------------------------------------------------------------------------
# diffusers


def _load_diffusers(spec: str, *, pretrained: bool = False) -> tuple[nn.Module, str]:
    path, _, subfolder = spec.partition("#")
    path, subfolder = path.strip(), subfolder.strip().strip("/") or None
    if not path:
        raise ModelSpecError("diffusers: needs a folder or hub id, e.g. diffusers:./pixart#transformer")
    local = _check_local_or_hub("diffusers", path)
    refusal = None if local else _hub_refusal(pretrained)
    hub = {"local_files_only": True} if refusal else {}
    name = _short_name(path) + (f"/{subfolder}" if subfolder else "")
    import diffusers

    if local:
        path = os.path.expanduser(path)
        folder = os.path.join(path, subfolder) if subfolder else path
        cfg_file = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_file):
            subs = sorted(d for d in _listdir(path) if os.path.isfile(os.path.join(path, d, "config.json")))
            if subfolder and not os.path.isdir(folder):
                what = f"{path} has no subfolder {subfolder!r}"
            else:
                what = f"{folder} has no config.json"
            hint = f"; models in it: {', '.join(f'{path}#{s}' for s in subs)}" if subs else ""
            raise ModelSpecError(f"diffusers:{spec}: {what}{hint} (accepted: diffusers:DIR[#SUBFOLDER])")
        try:
            with open(cfg_file) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ModelSpecError(f"could not read {cfg_file}: {_one_line(e)}") from e
    else:
        try:
            from huggingface_hub import hf_hub_download

            with open(hf_hub_download(path, "config.json", subfolder=subfolder, **hub)) as f:
                config = json.load(f)
        except Exception as e:
            raise ModelSpecError(_hub_hint("diffusers:" + spec, refusal, e)) from e

    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if not class_name:
        raise ModelSpecError(
            f"diffusers:{spec}: config.json has no _class_name "
            "(a pipeline folder? pick its model with #transformer or #unet)"
        )
    cls = getattr(diffusers, class_name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelSpecError(
            f"diffusers:{spec}: {class_name!r} is not a model class of diffusers {diffusers.__version__}"
        )
    try:
        model = cls.from_pretrained(path, subfolder=subfolder, **hub)
    except Exception as e:
        if local:
            raise ModelSpecError(f"could not load {class_name} from diffusers:{spec}: {_one_line(e)}") from e
        raise ModelSpecError(_hub_hint("diffusers:" + spec, refusal, e)) from e
    return model, name


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------
# FILE.py:FUNCTION


def _load_file(path: str, func: str) -> tuple[nn.Module, tuple | None, dict | None]:
    forms = "a model, (model, example_inputs) or (model, example_inputs, example_kwargs)"
    if not func.isidentifier():
        raise ModelSpecError(f"{path}:{func}: {func!r} is not a function name (accepted: FILE.py:FUNCTION)")
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise ModelSpecError(f"{path}: no such file (accepted: FILE.py:FUNCTION)")
    mod_name = "dittofx_user_" + hashlib.sha1(full.encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(mod_name, full)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(full)
    sys.path.insert(0, folder)  # let the file import its neighbours
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except SystemExit as e:  # the file's own sys.exit() must not end dittofx with its status, in silence
        sys.modules.pop(mod_name, None)
        raise ModelSpecError(f"importing {path} called {_exit_call(e)}; a MODEL file must define a function, "
                             f"not exit (put the script part under `if __name__ == \"__main__\":`)") from None
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise ModelSpecError(f"importing {path} failed: {_one_line(e)}") from e
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass

    fn = getattr(module, func, None)
    if not callable(fn):
        funcs = sorted(
            n
            for n, v in vars(module).items()
            if inspect.isfunction(v) and v.__module__ == mod_name and not n.startswith("_")
        )
        listed = f"functions defined there: {', '.join(funcs)}" if funcs else "it defines no functions"
        raise ModelSpecError(f"{path} has no function {func!r}; {listed}")
    try:
        result = fn()
    except SystemExit as e:
        raise ModelSpecError(f"{path}:{func}() called {_exit_call(e)} instead of returning {forms}") from None
    except Exception as e:
        raise ModelSpecError(f"{path}:{func}() raised {_one_line(e)}") from e

    args = kwargs = None
    if isinstance(result, nn.Module):
        model = result
    elif isinstance(result, (tuple, list)) and len(result) in (2, 3) and isinstance(result[0], nn.Module):
        model, args = result[0], result[1]
        if torch.is_tensor(args):
            args = (args,)
        elif isinstance(args, list):
            args = tuple(args)
        if not isinstance(args, tuple):
            raise ModelSpecError(
                f"{path}:{func}() returned example_inputs of type {type(args).__name__}; expected a tuple or a tensor"
            )
        kwargs = result[2] if len(result) == 3 else {}
        if not isinstance(kwargs, dict):
            raise ModelSpecError(
                f"{path}:{func}() returned example_kwargs of type {type(kwargs).__name__}; expected a dict"
            )
    else:
        got = type(result).__name__
        if isinstance(result, (tuple, list)):
            got = f"a {got} of {len(result)} ({', '.join(type(r).__name__ for r in result[:4])})"
        raise ModelSpecError(f"{path}:{func}() returned {got}; expected {forms}")
    return model, args, kwargs


def _exit_call(e: SystemExit) -> str:
    return f"sys.exit({e.code!r})" if e.code is not None else "sys.exit()"
