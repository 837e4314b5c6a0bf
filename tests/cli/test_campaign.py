"""The bad-input campaign, kept in the suite where it is cheap: random malformed pass specs and MODEL
strings thrown at the CLI in-process. Each must be refused the way every user error is: exit 2, one
plain line on stderr, nothing on stdout, no traceback, and nothing left in the output folder.

Every generated input is malformed by construction (an unknown name, an unknown or repeated option,
a non-finite number, a missing '='; a MODEL of no known form, naming what does not exist, a FILE.py
that calls sys.exit() or raises a coloured error, an input too large to make), so each refusal
comes before any capture. `inspect` parses its passes before loading the model: the pass cases cost
no model load."""

import os
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dittofx.cli import main
from dittofx.models import zoo
from dittofx.passes.spec import REGISTRY, pass_class

NAME = st.text(string.ascii_lowercase + string.digits + "_", min_size=1, max_size=10)
# any printable text, control characters and escape codes included (an argument cannot hold NUL)
TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=16)
VALUE = st.sampled_from(["1", "0.5", "-3", "(1,2)", "[8,8]", "None", "true", "abc", "'x'"])
NOT_FINITE = st.sampled_from(["inf", "-inf", "nan", "1e309", "-1e999", "Infinity", "(1,inf)", "[0,nan]"])


# the model each pass applies to, so that a malformed spec would otherwise run (and the test notice)
MODEL_OF = {"sdpa": "zoo:vit", "tome": "zoo:vit", "rlt": "zoo:videomae", "pab": "zoo:latte"}


@st.composite
def bad_pass_specs(draw) -> tuple[str, str]:
    """(MODEL, a malformed spec for a pass that applies to MODEL, or for no pass at all)."""
    kind = draw(st.sampled_from(["unknown pass", "unknown option", "repeated option", "no =", "not finite"]))
    if kind == "unknown pass":
        name = draw(NAME.filter(lambda n: n not in REGISTRY))
        return "zoo:vit", f"{name}:{draw(NAME)}={draw(VALUE)}" if draw(st.booleans()) else name
    name = draw(st.sampled_from(sorted(MODEL_OF)))
    cls, model = pass_class(name), MODEL_OF[name]
    keys = cls.option_names()
    if kind == "unknown option" or not keys:  # sdpa takes no option: any key is unknown
        return model, f"{name}:{draw(NAME.filter(lambda k: k not in keys))}={draw(VALUE)}"
    if kind == "no =":
        return model, f"{name}:{draw(NAME)}"
    key = draw(st.sampled_from(keys))
    if kind == "repeated option":  # its default, valid, twice
        value = repr(getattr(cls(), key)).replace(" ", "")
        return model, f"{name}:{key}={value},{key}={value}"
    return model, f"{name}:{key}={draw(NOT_FINITE)}"


@st.composite
def bad_models(draw) -> list[str]:
    """MODEL (and its flags) that name no model, or one that cannot be made."""
    kind = draw(st.sampled_from(["prefix", "zoo", "empty name", "missing path", "hub id", "file", "text",
                                 "file exits", "huge input"]))
    if kind == "prefix":
        return [f"{draw(NAME.filter(lambda p: p not in ('timm', 'hf', 'diffusers', 'zoo')))}:{draw(TEXT)}"]
    if kind == "zoo":
        return [f"zoo:{draw(NAME.filter(lambda n: n not in zoo.NAMES))}"]
    if kind == "empty name":
        return [draw(st.sampled_from(["timm:", "hf:", "diffusers:", "zoo:", "zoo:  ", "", "   "]))]
    if kind == "missing path":
        return [f"{draw(st.sampled_from(['hf', 'diffusers']))}:./no-such-folder-{draw(NAME)}"]
    if kind == "hub id":  # not cached, and no --pretrained: the hub is not asked
        return [f"hf:nobody-{draw(NAME)}/no-model-{draw(NAME)}"]
    if kind == "file":
        return [draw(st.sampled_from([f"/no/such/{draw(NAME)}.py:build", f"{draw(NAME)}.py",
                                      f"/no/such/m.py:{draw(st.sampled_from(['1x', 'a-b', 'x y']))}"]))]
    if kind == "file exits":  # the user's file ends the process or raises a coloured error
        return ["{models}:" + draw(st.sampled_from(sorted(FUNCTIONS)))]
    if kind == "huge input":  # > 2^31 elements, and more than any address space holds: never allocated
        dims = draw(st.lists(st.integers(10**7, 10**9), min_size=2, max_size=3))
        return ["zoo:vit", "--input-shape", ",".join(map(str, [3, *dims]))]
    return [draw(TEXT.filter(lambda t: ":" not in t and not t.strip().endswith(".py") and not t.startswith("-")))]


FUNCTIONS = {
    "exits_0": "sys.exit(0)", "exits_3": "sys.exit(3)", "exits_none": "sys.exit()", "exits_text": "sys.exit('bye')",
    "coloured": "raise ValueError('\\x1b[1;31mbad layer\\x1b[0m\\n  at line 2')",
}


@pytest.fixture(scope="module")
def models_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "models.py"
    path.write_text("import sys\n" + "".join(f"\n\ndef {f}():\n    {body}\n" for f, body in FUNCTIONS.items()))
    return path


def _refused(capsys, out_dir, argv) -> None:
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and lines[0].startswith("dittofx"), (argv, err)
    assert "Traceback" not in err and "\x1b" not in err, (argv, err)
    assert out == "", (argv, out)
    assert os.listdir(out_dir) == [], (argv, os.listdir(out_dir))


CAMPAIGN = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # nothing here may reach a network


@CAMPAIGN
@given(case=bad_pass_specs())
def test_malformed_pass_specs_are_refused_in_one_line(capsys, tmp_path, offline, case):
    model, spec = case
    _refused(capsys, tmp_path, ["inspect", model, "--pass", spec, "--quiet"])


@CAMPAIGN
@given(args=bad_models(), command=st.sampled_from(["inspect", "export"]))
def test_malformed_models_are_refused_in_one_line(capsys, tmp_path, offline, models_file, args, command):
    out = ["-o", str(tmp_path / "model.onnx")] if command == "export" else []
    _refused(capsys, tmp_path, [command, *(a.replace("{models}", str(models_file)) for a in args), *out, "--quiet"])
