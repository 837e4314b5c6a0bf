"""dittofx.models: MODEL specs, weight loading and example inputs (no network)."""

import textwrap

import pytest
import torch
from torch import nn

from dittofx import signature
from dittofx.errors import ModelSpecError
from dittofx.models import ResolvedModel, example_inputs_for, load_weights, parse_input_shape, resolve, zoo


def _out(o):
    if torch.is_tensor(o):
        return o
    if isinstance(o, (tuple, list)):
        return o[0]
    return o.logits if hasattr(o, "logits") else o.sample


def _run(r):
    with torch.no_grad():
        return _out(r.model(*r.example_inputs, **r.example_kwargs))


def _spec_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ModelSpecError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # a hub lookup must fail at once here instead of retrying for half a minute
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# ---------------------------------------------------------------------------------------------
# spec forms


def test_zoo_spec():
    r = resolve("zoo:deit_distilled", batch=2)
    assert isinstance(r, ResolvedModel) and r.name == "deit_distilled" and r.family == "timm"
    assert not r.model.training
    assert tuple(r.example_inputs[0].shape) == (2, 3, 64, 64)
    assert _run(r).shape == (2, 10)


def test_zoo_spec_input_shape_override_keeps_kwargs():
    r = resolve("zoo:dit", batch=2, input_shape=(4, 8, 8))
    assert tuple(r.example_inputs[0].shape) == (2, 4, 8, 8)
    assert set(r.example_kwargs) == {"timestep", "class_labels"}
    assert _run(r).shape == (2, 4, 8, 8)


def test_timm_spec_random_weights_and_inferred_input():
    r = resolve("timm:vit_tiny_patch16_224")
    assert r.family == "timm" and r.name == "vit_tiny_patch16_224"
    assert tuple(r.example_inputs[0].shape) == (1, 3, 224, 224) and r.example_kwargs == {}
    assert not r.model.training
    r2 = resolve("timm:vit_tiny_patch16_224", input_shape="3,112,112", batch=2)
    assert tuple(r2.example_inputs[0].shape) == (2, 3, 112, 112)


def test_hf_folder(tmp_path):
    z = zoo.build("hf_vit")
    z.model.save_pretrained(tmp_path / "vit")
    r = resolve(f"hf:{tmp_path / 'vit'}", batch=2)
    assert type(r.model).__name__ == "ViTForImageClassification"
    assert r.family == "transformers" and r.name == "vit" and not r.model.training
    assert tuple(r.example_inputs[0].shape) == (2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(_out(r.model(*z.example_inputs)), _out(z.model(*z.example_inputs)))


def test_hf_videomae_folder_infers_video_layout(tmp_path):
    z = zoo.build("videomae")
    z.model.save_pretrained(tmp_path)
    r = resolve(f"hf:{tmp_path}")
    assert type(r.model).__name__ == "VideoMAEForVideoClassification"
    assert tuple(r.example_inputs[0].shape) == (1, 8, 3, 32, 32)  # (B, T, C, H, W)
    assert _run(r).shape == (1, 10)


def test_diffusers_subfolder(tmp_path):
    z = zoo.build("dit")
    z.model.save_pretrained(tmp_path / "transformer")
    r = resolve(f"diffusers:{tmp_path}#transformer", batch=2)
    assert type(r.model).__name__ == "DiTTransformer2DModel"
    assert r.family == "diffusers" and r.name.endswith("/transformer")
    assert tuple(r.example_inputs[0].shape) == (2, 4, 16, 16)
    assert set(r.example_kwargs) == {"timestep", "class_labels"}
    assert r.example_kwargs["timestep"].shape == (2,) and r.example_kwargs["class_labels"].max() < 1000
    with torch.no_grad():
        torch.testing.assert_close(
            _out(r.model(*z.example_inputs, **z.example_kwargs)), _out(z.model(*z.example_inputs, **z.example_kwargs))
        )
    # the pipeline root is not a model: the error names the subfolder to pick
    msg = _spec_error(resolve, f"diffusers:{tmp_path}")
    assert "#transformer" in msg
    msg = _spec_error(resolve, f"diffusers:{tmp_path}#unet")
    assert "unet" in msg and "#transformer" in msg


def _write(tmp_path, body, name="mymodel.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


_FILE = """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(8, 4)

        def forward(self, x, scale=None):
            y = self.fc(x)
            return y if scale is None else y * scale

    def bare():
        return Net()

    def with_args():
        return Net(), torch.randn(3, 8)

    def with_kwargs():
        return Net(), (torch.randn(3, 8),), {"scale": torch.full((3, 1), 2.0)}

    def wrong():
        return 42

    def wrong_tuple():
        return Net(), torch.randn(3, 8), "not a dict"

    def boom():
        raise RuntimeError("user code failed")

    NOT_A_FUNCTION = 3
"""


def test_file_function_forms(tmp_path):
    path = _write(tmp_path, _FILE)
    r = resolve(f"{path}:with_args")
    assert r.name == "with_args" and r.family == "torch"
    assert tuple(r.example_inputs[0].shape) == (3, 8) and r.example_kwargs == {}
    r = resolve(f"{path}:with_kwargs")
    assert set(r.example_kwargs) == {"scale"}
    torch.testing.assert_close(_run(r), r.model.fc(r.example_inputs[0]) * 2)
    # a bare module needs --input-shape (nothing tells its input)
    msg = _spec_error(resolve, f"{path}:bare")
    assert "--input-shape" in msg
    r = resolve(f"{path}:bare", input_shape=(8,), batch=2)
    assert tuple(r.example_inputs[0].shape) == (2, 8) and _run(r).shape == (2, 4)


def test_file_function_returning_timm_model_gets_inputs(tmp_path):
    path = _write(
        tmp_path,
        """
        import timm

        def small_vit():
            return timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8)
        """,
        name="vitfile.py",
    )
    r = resolve(f"{path}:small_vit")
    assert r.family == "timm"
    assert tuple(r.example_inputs[0].shape) == (1, 3, 32, 32)  # the model's own size, not pretrained_cfg's 224
    assert _run(r).shape == (1, 1000)


@pytest.mark.parametrize(
    "func, words",
    [
        ("missing", ["missing", "bare", "with_args"]),
        ("NOT_A_FUNCTION", ["NOT_A_FUNCTION"]),
        ("wrong", ["int", "(model, example_inputs"]),
        ("wrong_tuple", ["example_kwargs", "str"]),
        ("boom", ["RuntimeError", "user code failed"]),
    ],
)
def test_file_function_errors(tmp_path, func, words):
    path = _write(tmp_path, _FILE)
    msg = _spec_error(resolve, f"{path}:{func}")
    for w in words:
        assert w in msg


def test_file_errors(tmp_path):
    assert "no such file" in _spec_error(resolve, f"{tmp_path / 'nope.py'}:build")
    bad = _write(tmp_path, "import not_a_module_anywhere_xyz\n", name="bad.py")
    msg = _spec_error(resolve, f"{bad}:build")
    assert "importing" in msg and "not_a_module_anywhere_xyz" in msg
    assert "FILE.py:FUNCTION" in _spec_error(resolve, str(bad))


# ---------------------------------------------------------------------------------------------
# weights


def test_load_weights_safetensors_roundtrip(tmp_path):
    from safetensors.torch import save_file

    src, dst = zoo.build("vit", seed=1), zoo.build("vit", seed=0)
    x = src.example_inputs
    with torch.no_grad():
        want = src.model(*x)
        assert not torch.allclose(dst.model(*x), want)
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert load_weights(dst.model, tmp_path / "w.safetensors") is dst.model
    with torch.no_grad():
        torch.testing.assert_close(dst.model(*x), want, rtol=0, atol=0)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_load_weights_torch_file_roundtrip(tmp_path, wrap):
    src, dst = zoo.build("dit", seed=1), zoo.build("dit", seed=0)
    sd = src.model.state_dict()
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd, "optimizer": {}},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    torch.save(obj, tmp_path / "w.pt")
    load_weights(dst.model, str(tmp_path / "w.pt"))
    with torch.no_grad():
        a = _out(dst.model(*src.example_inputs, **src.example_kwargs))
        b = _out(src.model(*src.example_inputs, **src.example_kwargs))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resolve_with_weights(tmp_path):
    from safetensors.torch import save_file

    src = zoo.build("hf_vit", seed=3)
    save_file(src.model.state_dict(), str(tmp_path / "w.safetensors"))
    r = resolve("zoo:hf_vit", weights=str(tmp_path / "w.safetensors"), batch=2)
    with torch.no_grad():
        torch.testing.assert_close(_out(r.model(*src.example_inputs)), _out(src.model(*src.example_inputs)))


def test_load_weights_mismatch_names_keys_and_counts(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["1.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(3, 4)
    torch.save(sd, tmp_path / "w.pt")
    before = model[0].weight.clone()
    msg = _spec_error(load_weights, model, tmp_path / "w.pt")
    assert "1 missing (1.bias)" in msg and "1 unexpected (extra.weight)" in msg
    assert "0.weight" in msg and "(3, 4)" in msg
    assert torch.equal(model[0].weight, before)  # nothing loaded half-way


def test_load_weights_lists_at_most_five_keys(tmp_path):
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(8)])
    torch.save({"other": torch.zeros(1)}, tmp_path / "w.pt")
    msg = _spec_error(load_weights, model, tmp_path / "w.pt")
    assert "16 missing" in msg and "1 unexpected (other)" in msg and ", ..." in msg
    assert msg.count(".weight") + msg.count(".bias") == 5


def test_load_weights_accepts_absent_tied_keys(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    src, dst = Tied(), Tied()
    torch.save({"emb.weight": src.emb.weight.detach().clone()}, tmp_path / "w.pt")
    load_weights(dst, tmp_path / "w.pt")
    assert torch.equal(dst.head.weight, src.emb.weight)


def test_load_weights_bad_files(tmp_path):
    model = nn.Linear(2, 2)
    assert "does not exist" in _spec_error(load_weights, model, tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    assert "safetensors" in _spec_error(load_weights, model, tmp_path / "junk.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    assert "state dict" in _spec_error(load_weights, model, tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "list" in _spec_error(load_weights, model, tmp_path / "list.pt")
    torch.save(model, tmp_path / "module.pt")  # a pickled module is refused by weights_only=True
    assert "weights_only" in _spec_error(load_weights, model, tmp_path / "module.pt")
    assert "does not exist" in _spec_error(resolve, "zoo:vit", weights=str(tmp_path / "none.pt"))


# ---------------------------------------------------------------------------------------------
# example inputs


# configs that state no input size (the latent's frames and size are the pipeline's choice)
NO_INPUT_SIZE = {"wan", "hunyuanvideo", "mochi", "ltx_video", "flux", "easyanimate"}


@pytest.mark.parametrize("name", zoo.NAMES)
def test_example_inputs_for_matches_zoo_layout(name):
    z = zoo.build(name, batch=2)
    inferred = example_inputs_for(z.model, batch=2)
    if name in NO_INPUT_SIZE:
        assert inferred is None
        return
    assert inferred is not None
    args, kwargs = inferred
    assert [tuple(a.shape) for a in args] == [tuple(a.shape) for a in z.example_inputs]
    assert set(kwargs) <= set(z.example_kwargs)  # the zoo may add what a pipeline passes too (masks)
    for k, v in kwargs.items():
        want = dict(signature.tensor_leaves(z.example_kwargs[k]))
        got = dict(signature.tensor_leaves(v))
        assert {p: t.dtype for p, t in got.items()} == {p: t.dtype for p, t in want.items()}, k
    with torch.no_grad():
        _out(z.model(*args, **kwargs))


def test_example_inputs_for_pixart_additional_conditions():
    from diffusers import PixArtTransformer2DModel

    m = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, num_layers=1, sample_size=8, patch_size=2,
        cross_attention_dim=24, caption_channels=8, use_additional_conditions=True,  # inner dim divisible by 3
    ).eval()
    args, kwargs = example_inputs_for(m, batch=2)
    assert set(kwargs["added_cond_kwargs"]) == {"resolution", "aspect_ratio"}
    with torch.no_grad():
        assert _out(m(*args, **kwargs)).shape[0] == 2


def test_example_inputs_for_input_shape_and_unknown():
    z = zoo.build("videomae")
    args, _ = example_inputs_for(z.model, input_shape=(16, 3, 32, 32), batch=2)
    assert tuple(args[0].shape) == (2, 16, 3, 32, 32)
    assert example_inputs_for(nn.Linear(3, 3)) is None
    args, kwargs = example_inputs_for(nn.Linear(3, 3), input_shape=(5, 3))
    assert tuple(args[0].shape) == (1, 5, 3) and kwargs == {}


def test_parse_input_shape():
    assert parse_input_shape("3,224,224") == (3, 224, 224)
    assert parse_input_shape("3x32x32") == (3, 32, 32)
    assert parse_input_shape([8, 3, 32, 32]) == (8, 3, 32, 32)
    for bad in ["", "3,a", "3,0,4", (3, -1), "3.5,2"]:
        _spec_error(parse_input_shape, bad)


# ---------------------------------------------------------------------------------------------
# spec errors: one line each, naming what is accepted


def test_unknown_prefix_lists_forms():
    msg = _spec_error(resolve, "torchvision:resnet50")
    for form in ("timm:NAME", "hf:DIR_OR_ID", "diffusers:DIR_OR_ID", "FILE.py:FUNCTION", "zoo:NAME"):
        assert form in msg
    assert "accepted" in _spec_error(resolve, "   ")


def test_unknown_timm_name_suggests():
    msg = _spec_error(resolve, "timm:vit_tiny_patch16")
    assert "vit_tiny_patch16_224" in msg
    assert "convnext_tiny" in _spec_error(resolve, "timm:convnxt_tiny")


def test_timm_pretrained_without_network_is_wrapped(monkeypatch):
    import timm

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(timm, "create_model", offline)
    msg = _spec_error(resolve, "timm:vit_tiny_patch16_224", pretrained=True)
    assert "--weights" in msg and "OSError" in msg


def test_hub_ids_without_network():
    assert "local folder" in _spec_error(resolve, "hf:google/vit-base-patch16-224")
    assert "local folder" in _spec_error(resolve, "diffusers:facebook/DiT-XL-2-256#transformer")


def test_missing_folders_and_empty_names(tmp_path):
    assert "no such folder" in _spec_error(resolve, f"hf:{tmp_path / 'missing'}")
    assert "no such folder" in _spec_error(resolve, f"diffusers:{tmp_path / 'missing'}#transformer")
    assert "config.json" in _spec_error(resolve, f"hf:{tmp_path}")
    for prefix in ("zoo:", "timm:", "hf:", "diffusers:"):
        _spec_error(resolve, prefix)


def test_unknown_zoo_name_and_bad_flags():
    msg = _spec_error(resolve, "zoo:resnet")
    assert "vit" in msg and "cogvideox" in msg
    assert "--weights" in _spec_error(resolve, "zoo:vit", pretrained=True)
    _spec_error(resolve, "zoo:vit", batch=0)


def test_wrapped_library_errors_are_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "DiTTransformer2DModel", "num_layers": "lots"}')
    msg = _spec_error(resolve, f"diffusers:{tmp_path}")
    assert "DiTTransformer2DModel" in msg
    (tmp_path / "config.json").write_text('{"_class_name": "NoSuchModel"}')
    assert "NoSuchModel" in _spec_error(resolve, f"diffusers:{tmp_path}")


def test_file_calling_sys_exit_is_one_line_not_the_end_of_dittofx(tmp_path):
    path = _write(tmp_path, "import sys\n\ndef build():\n    sys.exit(3)\n", name="exits.py")
    assert "build() called sys.exit(3) instead of returning a model" in _spec_error(resolve, f"{path}:build")
    path = _write(tmp_path, "import sys\nsys.exit()\n", name="script.py")
    msg = _spec_error(resolve, f"{path}:build")
    assert "importing" in msg and "called sys.exit()" in msg and "__main__" in msg


# ---------------------------------------------------------------------------------------------
# inputs too large to make


def test_inputs_too_large_are_refused_before_allocating():
    msg = _spec_error(resolve, "zoo:vit", input_shape=(3, 99999999, 99999999))
    assert "(1, 3, 99999999, 99999999)" in msg and "2^31" in msg
    assert "2^31" in _spec_error(example_inputs_for, nn.Linear(2, 2), input_shape=(2**30 + 1,), batch=2)
    assert example_inputs_for(nn.Linear(2, 2), input_shape=(2,), batch=2) is not None


def test_a_failed_allocation_of_inputs_is_one_line(monkeypatch):
    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1200 bytes.\nsecond line")

    monkeypatch.setattr(torch, "randn", no_memory)
    msg = _spec_error(example_inputs_for, nn.Linear(2, 2), input_shape=(300,))
    assert msg.startswith("not enough memory for the example inputs of Linear") and "can't allocate" in msg


# ---------------------------------------------------------------------------------------------
# the Hugging Face hub: contacted only with --pretrained, once it answered; else the local cache


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty local cache and a hub endpoint where nothing listens (a connection is refused at once);
    online mode, so that only dittofx's own rules keep the hub out."""
    import huggingface_hub.constants as constants

    from dittofx.models import specs

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    specs._hub_answer.cache_clear()
    yield tmp_path / "hub-cache"
    specs._hub_answer.cache_clear()


def _cache_tiny_vit(cache, repo):
    """A tiny ViT saved as the hub cache keeps a download of `repo` (refs/main -> snapshots/COMMIT)."""
    import transformers

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    folder, commit = cache / f"models--{repo.replace('/', '--')}", "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    model.save_pretrained(folder / "snapshots" / commit)
    return model


def test_hub_reachability_is_checked_once_with_a_short_timeout(hub, monkeypatch):
    import http.server
    import threading

    from dittofx.models import specs

    assert specs.HUB_TIMEOUT_S <= 3
    msg = specs.hub_unreachable()
    assert "did not answer within 3 s" in msg and "ConnectError" in msg and "\n" not in msg

    heads = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            heads.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        import huggingface_hub.constants as constants

        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert specs.hub_unreachable() is None and specs.hub_unreachable() is None
        assert len(heads) == 1  # once per process
    finally:
        server.shutdown()
        server.server_close()


def test_a_hub_id_without_pretrained_is_read_from_the_cache_only(hub, monkeypatch):
    from dittofx.models import specs

    def contacted():
        raise AssertionError("the hub was asked without --pretrained")

    monkeypatch.setattr(specs, "hub_unreachable", contacted)
    saved = _cache_tiny_vit(hub, "someone/tiny-vit")
    r = resolve("hf:someone/tiny-vit")
    assert r.family == "transformers" and tuple(r.example_inputs[0].shape) == (1, 3, 32, 32)
    for k, v in saved.state_dict().items():
        assert torch.equal(r.model.state_dict()[k], v), k  # the cached weights, not random ones
    msg = _spec_error(resolve, "hf:someone/not-cached")
    assert "not a local folder nor in the local Hugging Face cache" in msg and "pass --pretrained" in msg
    assert "pass --pretrained" in _spec_error(resolve, "diffusers:someone/not-cached#transformer")


@pytest.mark.parametrize("spec", ["hf:someone/not-cached", "diffusers:someone/not-cached#transformer",
                                  "timm:vit_tiny_patch16_224"])
def test_pretrained_with_the_hub_unreachable_fails_at_once(hub, spec):
    import time

    start = time.perf_counter()
    msg = _spec_error(resolve, spec, pretrained=True)
    assert time.perf_counter() - start < 15  # not a minute of retries
    assert "did not answer within 3 s" in msg
    assert ("--weights" if spec.startswith("timm") else "connect to the network") in msg


def test_pretrained_with_the_hub_unreachable_uses_the_cache(hub):
    saved = _cache_tiny_vit(hub, "someone/tiny-vit")
    r = resolve("hf:someone/tiny-vit", pretrained=True)
    assert torch.equal(r.model.classifier.weight, saved.classifier.weight)


def test_hf_hub_offline_skips_the_hub(hub, monkeypatch):
    import huggingface_hub.constants as constants

    from dittofx.models import specs

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(specs, "hub_unreachable", lambda: pytest.fail("HF_HUB_OFFLINE must skip the check"))
    msg = _spec_error(resolve, "hf:someone/not-cached", pretrained=True)
    assert "HF_HUB_OFFLINE is set" in msg and "unset HF_HUB_OFFLINE" in msg
