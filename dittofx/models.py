"""Turn a MODEL spec (CLI argument or Python string) into a model in eval mode plus example inputs.

Accepted specs:

    timm:NAME                        timm.create_model(NAME); random weights unless pretrained/weights
    hf:DIR_OR_ID                     transformers model class named by the config's `architectures`
    diffusers:DIR_OR_ID[#SUBFOLDER]  diffusers model class named by config.json's `_class_name`
    FILE.py:FUNCTION                 FUNCTION() returns model, (model, args) or (model, args, kwargs)
    zoo:NAME                         a small random-config model from dittofx.zoo

`weights=FILE` loads a safetensors file or a torch state dict into the model afterwards
(`load_weights`). Example inputs are inferred from the model's config (`example_inputs_for`);
`input_shape` overrides the shape of the main input and is given WITHOUT the batch dimension,
e.g. (3, 224, 224) for an image model or (16, 3, 224, 224) (T, C, H, W) for VideoMAE.

Every user error is a `ModelSpecError` with a one-line message. timm, transformers and diffusers
are imported only when a spec needs them.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dittofx.errors import ModelSpecError, first_line

SPEC_FORMS = "timm:NAME, hf:DIR_OR_ID, diffusers:DIR_OR_ID[#SUBFOLDER], FILE.py:FUNCTION, zoo:NAME"
_WEIGHT_FORMS = "accepted: a .safetensors file, or a torch.save'd state dict (optionally under 'state_dict' or 'model')"


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

    `pretrained` downloads timm's pretrained weights (hf: and diffusers: always load the folder's
    weights). `weights` is a local checkpoint loaded after the model is built (strictly: every key
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
            raise ModelSpecError(f"weights file {weights!r} does not exist ({_WEIGHT_FORMS})")

    prefix, _, rest = spec.partition(":")
    if prefix in ("timm", "hf", "diffusers", "zoo") and not rest.strip():
        raise ModelSpecError(f"{prefix}: needs a name after the colon, e.g. {_EXAMPLES[prefix]}")
    rest = rest.strip()
    args = kwargs = None
    if prefix == "zoo":
        if pretrained:
            raise ModelSpecError("zoo models have no pretrained weights; drop --pretrained or pass --weights FILE")
        from dittofx import zoo

        z = zoo.build(rest, batch=batch)
        model, family, name, args, kwargs = z.model, z.family, rest, z.example_inputs, z.example_kwargs
    elif prefix == "timm":
        model, name = _load_timm(rest, pretrained=pretrained and weights is None), rest
        family = "timm"
    elif prefix == "hf":
        model, name = _load_hf(rest), _short_name(rest)
        family = "transformers"
    elif prefix == "diffusers":
        model, name = _load_diffusers(rest)
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
        args = (_like(args[0], (args[0].shape[0] if torch.is_tensor(args[0]) else batch, *shape)),) + tuple(args[1:])
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


def parse_input_shape(value: tuple[int, ...] | list[int] | str) -> tuple[int, ...]:
    """Parse "3,224,224" (or "3x224x224") or a sequence of ints into a tuple of positive ints."""
    what = "input shape must be positive integers without the batch dimension, e.g. 3,224,224"
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").replace(" ", ",").split(",") if p]
        try:
            value = tuple(int(p) for p in parts)
        except ValueError:
            raise ModelSpecError(f"{what}; got {value!r}") from None
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ModelSpecError(f"{what}; got {value!r}") from None
    if not shape or any(v < 1 for v in shape) or any(isinstance(v, float) and v != int(v) for v in value):
        raise ModelSpecError(f"{what}; got {value!r}")
    return shape


def _is_file_spec(spec: str) -> bool:
    path, sep, func = spec.rpartition(":")
    return bool(sep) and path.endswith(".py")


def _short_name(path_or_id: str) -> str:
    return os.path.basename(os.path.normpath(path_or_id)) or path_or_id


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = first_line(exc, limit)
    return text if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


def _family_of(model: nn.Module) -> str:
    for cls in type(model).__mro__:
        root = cls.__module__.split(".")[0]
        if root in ("timm", "transformers", "diffusers"):
            return root
    return "torch"


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
    try:
        return timm.create_model(name, pretrained=pretrained)
    except Exception as e:
        if pretrained:
            raise ModelSpecError(
                f"could not get pretrained weights for timm:{name} (no network and not in the cache?): "
                f"{_one_line(e)}; pass --weights FILE with a local checkpoint instead"
            ) from e
        raise ModelSpecError(f"timm could not build {name!r}: {_one_line(e)}") from e


# ---------------------------------------------------------------------------------------------
# transformers


def _hub_hint(what: str) -> str:
    return (
        f"{what} is not a local folder and could not be fetched from the Hugging Face hub "
        "(no network, or not cached?); download it to a local folder and pass that folder, "
        "or build the model in FILE.py:FUNCTION and pass --weights FILE"
    )


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


def _load_hf(path: str) -> nn.Module:
    local = _check_local_or_hub("hf", path)
    if local:
        path = os.path.expanduser(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelSpecError(f"hf:{path} has no config.json; expected a folder written by save_pretrained")
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as e:
        if local:
            raise ModelSpecError(f"could not read the transformers config in {path}: {_one_line(e)}") from e
        raise ModelSpecError(f"{_hub_hint('hf:' + path)} ({_one_line(e)})") from e

    cls = None
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            break
    if cls is None:
        cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(path)
    except Exception as e:
        if local:
            raise ModelSpecError(f"could not load {cls.__name__} from {path}: {_one_line(e)}") from e
        raise ModelSpecError(f"{_hub_hint('hf:' + path)} ({_one_line(e)})") from e
    return model


# ---------------------------------------------------------------------------------------------
# diffusers


def _load_diffusers(spec: str) -> tuple[nn.Module, str]:
    path, _, subfolder = spec.partition("#")
    path, subfolder = path.strip(), subfolder.strip().strip("/") or None
    if not path:
        raise ModelSpecError("diffusers: needs a folder or hub id, e.g. diffusers:./pixart#transformer")
    local = _check_local_or_hub("diffusers", path)
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

            with open(hf_hub_download(path, "config.json", subfolder=subfolder)) as f:
                config = json.load(f)
        except Exception as e:
            raise ModelSpecError(f"{_hub_hint('diffusers:' + spec)} ({_one_line(e)})") from e

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
        model = cls.from_pretrained(path, subfolder=subfolder)
    except Exception as e:
        if local:
            raise ModelSpecError(f"could not load {class_name} from diffusers:{spec}: {_one_line(e)}") from e
        raise ModelSpecError(f"{_hub_hint('diffusers:' + spec)} ({_one_line(e)})") from e
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


# ---------------------------------------------------------------------------------------------
# weights


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a safetensors file or a torch state dict file into `model`, strictly; returns `model`.

    A torch file may hold the state dict itself or a dict with it under "state_dict" or "model".
    A `module.` (DataParallel) or `_orig_mod.` (torch.compile) prefix common to all keys is
    dropped. Keys the model ties to another present key (shared weights) may be absent.
    Any missing, unexpected or differently shaped key is a ModelSpecError naming up to 5 of each.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelSpecError(f"weights file {path!r} does not exist ({_WEIGHT_FORMS})")
    state = _read_state_dict(path)

    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing:  # tied weights: a key sharing storage with a key the file has is filled by it
        groups: dict[tuple, list[str]] = {}
        for k, t in own.items():
            groups.setdefault(_storage_key(t), []).append(k)
        missing = [k for k in missing if not any(o in state for o in groups[_storage_key(own[k])])]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        if wrong:
            shown = ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:5])
            parts.append(f"{len(wrong)} with another shape ({shown}{', ...' if len(wrong) > 5 else ''})")
        raise ModelSpecError(
            f"weights {path} do not match {type(model).__name__} ({len(own)} keys, file has {len(state)}): "
            + "; ".join(parts)
        )
    model.load_state_dict(state, strict=False)
    return model


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
    except Exception:  # tensors without storage (meta, some subclasses): never tied
        return (id(t),)


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    accepted = _WEIGHT_FORMS
    with open(path, "rb") as f:
        head = f.read(9)
    if path.endswith(".safetensors") or (len(head) == 9 and head[8:9] == b"{"):
        try:
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        except Exception as e:
            raise ModelSpecError(f"cannot read {path} as safetensors: {_one_line(e)} ({accepted})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelSpecError(
            f"cannot read {path} as a torch state dict (weights_only=True): {_one_line(e)} ({accepted})"
        ) from e
    for _ in range(2):
        if isinstance(obj, dict):
            inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ModelSpecError(f"{path} holds {type(obj).__name__}, not a state dict ({accepted})")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise ModelSpecError(
            f"{path} is not a state dict: {len(bad)} entries are not named tensors "
            f"({_few([str(b) for b in bad])}; {accepted})"
        )
    return obj


# ---------------------------------------------------------------------------------------------
# example inputs


def example_inputs_for(
    model: nn.Module, input_shape: tuple[int, ...] | None = None, batch: int = 1
) -> tuple[tuple, dict] | None:
    """Infer (args, kwargs) that run `model`, or None when nothing tells the input's shape.

    - timm: (C, H, W) from the patch embedding's image size, else `pretrained_cfg["input_size"]`.
    - transformers: pixel_values (C, H, W) from `image_size`/`num_channels`, (T, C, H, W) when the
      config has `num_frames` (VideoMAE, TimeSformer, ViViT); input_ids (16,) for text models.
    - diffusers: hidden_states from `sample_size`/`in_channels` (+ `video_length` for Latte as
      (C, F, H, W), `sample_frames` for CogVideoX as (F, C, H, W)); timestep; class_labels (DiT);
      encoder_hidden_states from `caption_channels`/`text_embed_dim`/`cross_attention_dim`;
      PixArt's resolution/aspect_ratio and SDXL's text_embeds/time_ids when the model needs them.
    - anything else: only with `input_shape`.

    `input_shape` is the main input's shape WITHOUT the batch dimension; it replaces the inferred
    one. Inputs are random but deterministic, of the model's floating dtype and on its device.
    """
    shape = parse_input_shape(input_shape) if input_shape is not None else None
    gen = torch.Generator().manual_seed(0)
    family = _family_of(model)
    if family == "timm":
        out = _timm_inputs(model, shape, batch, gen)
    elif family == "transformers":
        out = _hf_inputs(model, shape, batch, gen)
    elif family == "diffusers":
        out = _diffusers_inputs(model, shape, batch, gen)
    else:
        out = None
    if out is None and shape is not None and family != "diffusers":
        out = ((torch.randn((batch, *shape), generator=gen),), {})
    if out is None:
        return None
    dtype, device = _dtype_device(model)

    def cast(t):
        if isinstance(t, dict):
            return {k: cast(v) for k, v in t.items()}
        if torch.is_tensor(t):
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return t

    args, kwargs = out
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def _like(old: Any, shape: tuple[int, ...]) -> torch.Tensor:
    new = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if torch.is_tensor(old):
        new = new.to(device=old.device, dtype=old.dtype if old.is_floating_point() else torch.float32)
    return new


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) >= 2:
        return (int(v[-2]), int(v[-1]))
    return None


def _timm_inputs(model, shape, batch, gen):
    if shape is None:
        pe = getattr(model, "patch_embed", None)
        img = _pair(getattr(pe, "img_size", None)) if pe is not None else None
        proj = getattr(pe, "proj", None)
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        size = cfg.get("input_size")
        if img is not None:
            chans = getattr(proj, "in_channels", None) or (size[0] if size else 3)
            shape = (chans, *img)
        elif size:
            shape = tuple(size)
        else:
            return None
    return (torch.randn((batch, *shape), generator=gen),), {}


def _hf_inputs(model, shape, batch, gen):
    config = model.config
    main = getattr(model, "main_input_name", "pixel_values")
    if main == "pixel_values":
        cfg = config if getattr(config, "image_size", None) is not None else getattr(config, "vision_config", None)
        if shape is None:
            if cfg is None or _pair(getattr(cfg, "image_size", None)) is None:
                return None
            chans = getattr(cfg, "num_channels", 3) or 3
            shape = (chans, *_pair(cfg.image_size))
            frames = getattr(cfg, "num_frames", None)
            if frames:
                shape = (int(frames), *shape)
        return (torch.randn((batch, *shape), generator=gen),), {}
    if main == "input_ids":
        vocab = getattr(config, "vocab_size", None)
        if not vocab:
            return None
        if shape is None:
            shape = (min(16, getattr(config, "max_position_embeddings", 16) or 16),)
        return (torch.randint(0, vocab, (batch, *shape), generator=gen),), {}
    return None


def _diffusers_inputs(model, shape, batch, gen):
    cfg = dict(model.config)
    params = inspect.signature(model.forward).parameters
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not names:
        return None
    if shape is None:
        shape = _diffusers_main_shape(cfg)
        if shape is None:
            return None
    x = torch.randn((batch, *shape), generator=gen)
    kwargs: dict[str, Any] = {}
    if "timestep" in params:
        kwargs["timestep"] = torch.randint(100, 800, (batch,), generator=gen)
    if cfg.get("norm_type") == "ada_norm_zero":  # DiT: class-conditional adaLN
        n_classes = cfg.get("num_embeds_ada_norm")
    else:
        n_classes = cfg.get("num_class_embeds")
    if "class_labels" in params and n_classes:
        kwargs["class_labels"] = torch.randint(0, int(n_classes), (batch,), generator=gen)
    if "encoder_hidden_states" in params:
        text_keys = ("caption_channels", "text_embed_dim", "joint_attention_dim", "cross_attention_dim")
        dim = next((cfg[k] for k in text_keys if cfg.get(k)), None)
        if isinstance(dim, (tuple, list)):
            dim = dim[0] if len(set(dim)) == 1 else None
        if dim:
            seq = int(cfg.get("max_text_seq_length") or 8)
            kwargs["encoder_hidden_states"] = torch.randn((batch, seq, int(dim)), generator=gen)
        elif params["encoder_hidden_states"].default is inspect.Parameter.empty:
            return None
    if "pooled_projections" in params and cfg.get("pooled_projection_dim"):
        kwargs["pooled_projections"] = torch.randn((batch, int(cfg["pooled_projection_dim"])), generator=gen)
    if "added_cond_kwargs" in params:
        if getattr(model, "use_additional_conditions", False):  # PixArt-alpha at 1024 px
            h, w = shape[-2:]
            kwargs["added_cond_kwargs"] = {
                "resolution": torch.tensor([[h * 8.0, w * 8.0]] * batch),
                "aspect_ratio": torch.tensor([[h / w]] * batch),
            }
        elif cfg.get("addition_embed_type") == "text_time":  # SDXL UNet
            time_dim = int(cfg.get("addition_time_embed_dim") or 0)
            text_dim = int(cfg.get("projection_class_embeddings_input_dim") or 0) - 6 * time_dim
            if text_dim <= 0:
                return None
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn((batch, text_dim), generator=gen),
                "time_ids": torch.randint(0, 1024, (batch, 6), generator=gen).float(),
            }
    for n, p in params.items():  # a required input we know nothing about: cannot infer
        if n != names[0] and p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            if n not in kwargs:
                return None
    return (x,), kwargs


def _diffusers_main_shape(cfg: dict) -> tuple[int, ...] | None:
    chans = cfg.get("in_channels")
    if not chans:
        return None
    if cfg.get("sample_frames") and cfg.get("sample_height") and cfg.get("sample_width"):  # CogVideoX: (F, C, H, W)
        ratio = int(cfg.get("temporal_compression_ratio") or 4)
        frames = (int(cfg["sample_frames"]) - 1) // ratio + 1
        return (frames, chans, int(cfg["sample_height"]), int(cfg["sample_width"]))
    hw = _pair(cfg.get("sample_size"))
    if hw is None:
        return None
    if cfg.get("video_length"):  # Latte: (C, F, H, W)
        return (chans, int(cfg["video_length"]), *hw)
    if any(k in cfg for k in ("num_frames", "sample_frames", "patch_size_t")) or "3D" in cfg.get("_class_name", ""):
        return None  # a video model whose layout we do not know
    return (chans, *hw)
