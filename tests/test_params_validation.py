"""Bad analyzer parameters are refused up front, in one line naming the field and the value.

The same check serves Python, the CLI and the compare config: attribution method settings
(SmoothGrad noise, occlusion window and stride, integrated-gradients steps, ...), the Grad-CAM
layer (a layer without spatial maps), the sanity-check / faithfulness settings, the
dissection montage settings and the list-valued compare config keys (an empty list is refused
at config load, naming the file and the key).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
from test_config import BASE as BASE_CONFIG  # the same two-model config
from torch import nn

from interptool.errors import ConfigError, ParamsError


def _one_line(msg: str) -> None:
    assert msg.strip() and "\n" not in msg.strip(), msg


# ----------------------------------------------------------------- attribution method settings
BAD_METHOD_PARAMS = [
    ("smoothgrad", "stdevs", -1, "-1"),
    ("smoothgrad", "stdevs", 0.0, "0.0"),
    ("smoothgrad", "stdevs", float("nan"), "nan"),
    ("smoothgrad", "stdevs", float("inf"), "inf"),
    ("smoothgrad", "nt_samples", 0, "0"),
    ("smoothgrad", "nt_samples_batch_size", 0, "0"),
    ("smoothgrad", "nt_type", "smooth", "'smooth'"),
    ("smoothgrad", "seed", -1, "-1"),
    ("smoothgrad", "steps", 0, "0"),
    ("occlusion", "window", 0, "0"),
    ("occlusion", "window", (8, -2), "-2"),
    ("occlusion", "window", (8, 8, 8), "[8, 8, 8]"),
    ("occlusion", "stride", 0, "0"),
    ("occlusion", "stride", -4, "-4"),
    ("occlusion", "perturbations_per_eval", 0, "0"),
    ("occlusion", "baseline", "black", "'black'"),
    ("integrated_gradients", "steps", 0, "0"),
    ("integrated_gradients", "steps", 2.5, "2.5"),
    ("integrated_gradients", "internal_batch_size", 0, "0"),
    ("integrated_gradients", "ig_method", "simpson", "'simpson'"),
    ("grad_cam", "prefix_tokens", -1, "-1"),
    ("grad_cam", "grid", (0, 4), "0"),
    ("grad_cam", "interpolate_mode", "cubic", "'cubic'"),
]


@pytest.mark.parametrize("method,name,value,shown", BAD_METHOD_PARAMS,
                         ids=[f"{m}-{n}={v!r}" for m, n, v, _ in BAD_METHOD_PARAMS])
def test_method_params_refused_when_constructed(method, name, value, shown):
    from interptool.analyzers.attribution import METHODS, Attribution

    kw = {"layer": "features"} if method == "grad_cam" and name != "layer" else {}
    Attribution(method, **kw, **{name: METHODS[method].defaults[name]})  # the default is fine
    with pytest.raises(ParamsError) as err:
        Attribution(method, **kw, **{name: value})
    msg = str(err.value)
    _one_line(msg)
    assert err.value.field == name
    assert msg.startswith(f"{method}: {name}"), msg
    assert shown in msg and "expected" in msg, msg
    # and the way out: the flag (or keyword) with its meaning
    assert f"{name}=" in msg or f"--{name.replace('_', '-')}" in msg, msg


# --------------------------------------------------- checks that need the model / input size
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.head(self.features(x)))


def _batch(n: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.tensor([0, 1][:n])


RUN_TIME = [
    ("grad_cam", {"layer": "fc"}, "layer", ["'fc'", "(N, 3)", "features"]),
    ("grad_cam", {"layer": "head"}, "layer", ["'head'", "(N, 4)", "features"]),
    ("occlusion", {"window": 32}, "window", ["32", "16x16"]),
    ("occlusion", {"window": (4, 20)}, "window", ["20", "16x16"]),
    ("occlusion", {"window": 4, "stride": 6}, "stride", ["6", "window"]),
]


@pytest.mark.parametrize("method,kw,name,parts", RUN_TIME,
                         ids=[f"{m}-{k}" for m, k, _, _ in RUN_TIME])
def test_model_dependent_settings_refused_before_attributing(tmp_path, method, kw, name,
                                                             parts):
    """grad_cam on a layer without spatial maps used to end in captum's AssertionError;
    an occlusion stride larger than its window likewise; both now fail before any map is
    computed or any file written, naming the setting, the value and what fits."""
    from interptool.analyzers.attribution import Attribution

    x, y = _batch()
    model = _Tiny()
    with pytest.raises(ParamsError) as err:
        Attribution(method, **kw).run(model, x, labels=y, out=tmp_path / "out")
    msg = str(err.value)
    _one_line(msg)
    assert err.value.field == name, msg
    for part in parts:
        assert part in msg, msg
    assert not (tmp_path / "out").exists()
    # a layer with spatial maps (and a window and stride that fit) still runs
    good = {"layer": "features"} if method == "grad_cam" else {"window": 4, "stride": 4}
    assert Attribution(method, **good).run(model, x, labels=y).maps.shape == (2, 16, 16)


def test_attribution_check_without_attributing():
    """Attribution.check: the run's model/input-size checks alone, so that a caller (the
    attribute command) can check every method before the first one runs."""
    from interptool.analyzers.attribution import Attribution

    Attribution("grad_cam", layer="features").check(_Tiny(), (3, 16, 16))
    Attribution("occlusion", window=16, stride=16).check(_Tiny(), (3, 16, 16))  # whole image
    # captum asserts stride <= window on every side, even where the window covers it whole
    with pytest.raises(ParamsError, match=r"occlusion: stride: expected at most the window"):
        Attribution("occlusion", window=16, stride=32).check(_Tiny(), (3, 16, 16))
    with pytest.raises(ParamsError, match=r"grad_cam layer 'fc' outputs \(N, 3\)"):
        Attribution("grad_cam", layer="fc").check(_Tiny(), (3, 16, 16))
    with pytest.raises(ParamsError, match=r"occlusion: window: .* 8x8 px, got 12"):
        Attribution("occlusion", window=12).check(_Tiny(), (3, 8, 8))


# --------------------------------------------------------- sanity check / faithfulness settings
BAD_SCORING = [
    ("sanity_threshold", 2.0, "2.0"),
    ("sanity_threshold", -1.5, "-1.5"),
    ("sanity_threshold", float("nan"), "nan"),
    ("sanity_top_k", 0, "0"),
    ("sanity_n", -1, "-1"),
    ("faithfulness_steps", -1, "-1"),
    ("patch", 0, "0"),
    ("faithfulness_baseline", "noise", "'noise'"),
]


@pytest.mark.parametrize("name,value,shown", BAD_SCORING,
                         ids=[f"{n}={v!r}" for n, v, _ in BAD_SCORING])
def test_scoring_params(name, value, shown):
    from interptool.analyzers.attribution import ScoringParams

    ScoringParams()  # the CLI's defaults are valid
    with pytest.raises(ParamsError) as err:
        ScoringParams(**{name: value})
    msg = str(err.value)
    _one_line(msg)
    assert err.value.field == name and msg.startswith(name) and shown in msg, msg


@pytest.mark.parametrize("kw,name", [({"threshold": 2.0}, "sanity_threshold"),
                                     ({"threshold": -3}, "sanity_threshold"),
                                     ({"top_k": 0}, "sanity_top_k")])
def test_randomisation_check_refuses_bad_settings(kw, name):
    """A threshold outside (-1, 1) can never (or always) flag a method: the Spearman
    correlation it is compared with lies in [-1, 1]. It used to be accepted silently."""
    from interptool.analyzers.attribution import randomisation_check

    x, y = _batch()
    with pytest.raises(ParamsError) as err:
        randomisation_check(_Tiny(), "saliency", x, y, **kw)
    _one_line(str(err.value))
    assert err.value.field == name


@pytest.mark.parametrize("kw,name", [({"steps": -1}, "faithfulness_steps"),
                                     ({"patch": 0}, "patch"),
                                     ({"baseline": "noise"}, "faithfulness_baseline")])
def test_score_maps_refuses_bad_settings(kw, name):
    """score_maps(steps=-1) used to skip faithfulness silently; patch=0 failed deep inside."""
    from interptool.analyzers.attribution import Attribution, score_maps

    x, y = _batch()
    model = _Tiny()
    res = Attribution("saliency").run(model, x, labels=y)
    with pytest.raises(ParamsError) as err:
        score_maps({"t": res}, teacher="t", models={"t": model}, inputs=lambda n, r: x,
                   **kw)
    _one_line(str(err.value))
    assert err.value.field == name


def test_faithfulness_refuses_zero_steps():
    from interptool.analyzers.attribution import Attribution, faithfulness

    x, y = _batch()
    res = Attribution("saliency").run(_Tiny(), x, labels=y)
    with pytest.raises(ParamsError, match=r"steps: expected an integer >= 1, got 0"):
        faithfulness(_Tiny(), x, res.maps, res.targets, steps=0, n_boot=0)


# ------------------------------------------------------------------------- dissection montages
@pytest.mark.parametrize("kw,name,shown", [({"montages": -3}, "montages", "-3"),
                                           ({"montages": "some"}, "montages", "'some'"),
                                           ({"max_montages": -1}, "max_montages", "-1")])
def test_montage_params(kw, name, shown):
    from interptool.analyzers.dissection._params import MontageParams

    assert MontageParams(montages=0, max_montages=0).montages == 0
    assert MontageParams(montages="all").montages == "all"
    with pytest.raises(ParamsError) as err:
        MontageParams(**kw)
    msg = str(err.value)
    _one_line(msg)
    assert err.value.field == name and shown in msg and msg.startswith(name), msg


# ------------------------------------------------------------------ Params of the compare config
BAD_PARAMS = [
    ("similarity", "SimilarityParams", "temperatures", [], "[]"),
    ("similarity", "SimilarityParams", "temperatures", [1.0, math.inf], "inf"),
    ("dissection", "DissectionOptions", "iou_thresholds", [], "[]"),
    ("attribution", "AttributionOptions", "methods", [], "[]"),
    ("attribution", "AttributionOptions", "methods", ["saliency", "saliency"], "saliency"),
]


@pytest.mark.parametrize("pkg,cls,name,value,shown", BAD_PARAMS,
                         ids=[f"{c}.{n}={v!r}" for _, c, n, v, _ in BAD_PARAMS])
def test_params_refuse_empty_and_non_finite_lists(pkg, cls, name, value, shown):
    import importlib

    params = getattr(importlib.import_module(f"interptool.analyzers.{pkg}"), cls)
    with pytest.raises(ParamsError) as err:
        params(**{name: value})
    msg = str(err.value)
    _one_line(msg)
    assert err.value.field == name and msg.startswith(name) and shown in msg, msg


BAD_CONFIG = [
    ("[analysis.dissection]\niou_thresholds = []", "analysis.dissection.iou_thresholds", "[]"),
    ("[analysis.similarity]\ntemperatures = []", "analysis.similarity.temperatures", "[]"),
    ("[analysis.similarity]\ntemperatures = [1.0, inf]", "analysis.similarity.temperatures",
     "inf"),
    ("[analysis.dissection]\ncategories = []", "analysis.dissection.categories", "[]"),
    ("[analysis.dissection]\ncategories = \"object,object\"", "analysis.dissection.categories",
     "object"),
    ("[analysis.attribution]\nmethods = []", "analysis.attribution.methods", "[]"),
]


def _config(tmp_path: Path, extra: str) -> Path:
    p = tmp_path / "bad.toml"
    p.write_text(textwrap.dedent(BASE_CONFIG) + extra + "\n")
    return p


@pytest.mark.parametrize("extra,field,shown", BAD_CONFIG, ids=[f for _, f, _ in BAD_CONFIG])
def test_config_refuses_at_load_naming_file_and_key(tmp_path, extra, field, shown):
    """`iou_thresholds = []` used to pass the config check and end in a KeyError after the
    caches were built; `temperatures = []` in a message naming neither file nor key."""
    from interptool.pipeline import load_config

    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, extra))
    msg = str(err.value)
    _one_line(msg)
    # the key (with the item's index for one bad item of a list)
    assert msg.startswith(f"bad.toml: {field}") and "expected" in msg, msg
    assert shown in msg, msg


def test_dissection_params_check_probe_names_the_key():
    from interptool.analyzers.dissection import DissectionParams

    class Probe:
        categories = ["color", "object", "part"]
        spec = "builtin:concept-world"

    DissectionParams(categories=["object"]).check_probe(Probe())
    with pytest.raises(ParamsError) as err:
        DissectionParams(categories=["flavour", "object"]).check_probe(
            Probe(), where="run.toml: analysis.dissection")
    msg = str(err.value)
    _one_line(msg)
    assert msg.startswith("run.toml: analysis.dissection.categories: expected"), msg
    assert "'flavour'" in msg and "color, object, part" in msg


# ----------------------------------------------------------------------------------- the CLI
_DATA = "builtin:concept-world?version=1&n=24&size=32&split=eval"


def _cli(tmp_path, capsys, *extra):
    from interptool.cli import main

    capsys.readouterr()
    rc = main(["attribute", "--arch", "interptool:cw-student", "--data", _DATA, "-q", "--n",
               "2", "--sanity-n", "0", "--faithfulness-steps", "0", "--out",
               str(tmp_path / "out"), *extra])
    captured = capsys.readouterr()
    return rc, captured.err


@pytest.mark.parametrize("extra,parts", [
    (("--method", "smoothgrad", "--stdevs", "-1"), ["stdevs", "-1.0", "--stdevs"]),
    (("--method", "smoothgrad", "--stdevs", "nan"), ["stdevs", "nan", "--stdevs"]),
    (("--method", "occlusion", "--window", "0"), ["window", "0", "--window"]),
    (("--method", "occlusion", "--stride", "0"), ["stride", "0", "--stride"]),
])
def test_cli_refuses_method_settings_before_loading(tmp_path, capsys, extra, parts):
    rc, err = _cli(tmp_path, capsys, *extra)
    assert rc == 2, err
    _one_line(err)
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err
    assert not (tmp_path / "out").exists()


def test_cli_gradcam_layer_without_spatial_maps(tmp_path, capsys):
    rc, err = _cli(tmp_path, capsys, "--method", "grad_cam", "--layer", "fc")
    assert rc == 2, err
    _one_line(err)
    assert "Traceback" not in err and "AssertionError" not in err
    assert "'fc'" in err and "(N, 10)" in err and "layer4" in err
    assert "interptool layers --arch interptool:cw-student" in err
    assert not (tmp_path / "out" / "attributions.h5").exists()


def test_cli_checks_every_method_before_the_first_runs(tmp_path, capsys):
    # saliency would have run (and written its maps) before grad_cam's layer failed
    rc, err = _cli(tmp_path, capsys, "--method", "saliency", "--method", "grad_cam",
                   "--layer", "fc")
    assert rc == 2 and "'fc'" in err, err
    _one_line(err)
    assert not list((tmp_path / "out").rglob("*.h5"))


def test_cli_scoring_flags_checked_before_attributing(tmp_path, capsys):
    rc, err = _cli(tmp_path, capsys, "--method", "saliency", "--sanity-threshold", "2")
    assert rc == 2 and "sanity_threshold" in err and "2.0" in err, err
    _one_line(err)
    assert not (tmp_path / "out").exists()


def test_dissect_refuses_negative_montages(tmp_path, capsys):
    import numpy as np

    from interptool.cache import write_cache
    from interptool.cli import main

    path = write_cache(tmp_path / "c.h5", logits=np.zeros((2, 3), np.float32),
                       features={"layer4": np.ones((2, 4, 2, 2), np.float32)})
    for flags, shown in ((["--montages", "-3"], "montages"),
                         (["--max-montages", "-1"], "max_montages")):
        rc = main(["dissect", str(path), "--layer", "layer4", "--out", str(tmp_path / "o"),
                   "-q", *flags])
        err = capsys.readouterr().err
        assert rc == 2 and shown in err and "Traceback" not in err, err
        _one_line(err)
        assert not (tmp_path / "o").exists()


def test_compare_refuses_probe_categories_before_caching(tmp_path):
    from interptool.pipeline import load_config, run_compare

    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(textwrap.dedent("""
        [data]
        probe = "builtin:concept-world?version=1&n=24&size=32&split=probe"
        [models.t]
        arch = "interptool:cw-student"
        layers = ["layer4"]
        image_size = 32
        [analysis]
        similarity = false
        attribution = false
        dissection = { categories = ["flavour"], bootstrap = 0 }
        """))
    with pytest.raises(ParamsError, match=r"c.toml: analysis.dissection.categories: expected "
                                          r"categories of the probe .*'flavour'"):
        run_compare(load_config(cfg_path), tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.h5"))


def test_numpy_scalars_are_accepted_as_settings():
    import numpy as np

    from interptool.analyzers.attribution import Attribution

    a = Attribution("smoothgrad", seed=np.int64(3), stdevs=np.float32(0.25), nt_samples=np.int32(4))
    assert (a.params["seed"], a.params["nt_samples"]) == (3, 4)
    assert type(a.params["seed"]) is int and type(a.params["stdevs"]) is float
    with pytest.raises(ParamsError, match="seed"):
        Attribution("smoothgrad", seed=True)  # a bool is not a number here
