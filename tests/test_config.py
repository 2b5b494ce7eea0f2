"""Validation of the `interptool compare` config: every error names the file and the field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from interptool.errors import ConfigError
from interptool.pipeline import load_config, parse_config, write_template
from interptool.pipeline._config import template_text


def _write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


BASE = """
[data]
eval = "builtin:concept-world?version=1&n=40&size=32&seed=0&split=eval"
probe = "builtin:concept-world?version=1&n=40&size=32&seed=0&split=probe"
[models.teacher]
arch = "interptool:cw-teacher"
layers = ["layer3", "layer4"]
role = "teacher"
[models.kd]
arch = "interptool:cw-student"
layers = ["layer3", "layer4"]
"""


def test_valid_config_defaults_and_teacher(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert list(cfg.models) == ["teacher", "kd"]
    assert cfg.teacher.name == "teacher"
    assert [m.name for m in cfg.students] == ["kd"]
    assert cfg.analysis.enabled() == ["dissection", "similarity", "attribution"]
    # quantile and IoU threshold default to the dissection protocol's (None = the preset's)
    assert cfg.analysis.dissection.protocol == "netdissect-lite"
    assert cfg.analysis.dissection.quantile is None
    assert cfg.run.device == "cpu" and cfg.run.seed == 0
    assert cfg.source == "config.toml"


def test_first_model_is_teacher_without_role(tmp_path):
    text = BASE.replace('role = "teacher"\n', "")
    cfg = load_config(_write(tmp_path, text))
    assert cfg.teacher.name == "teacher"
    # order decides: swap the tables and the student becomes the reference
    swapped = parse_config(
        {"data": {"eval": "builtin:x", "probe": "builtin:y"},
         "models": {"b": {"arch": "interptool:cw-student", "layers": ["layer4"]},
                    "a": {"arch": "interptool:cw-teacher", "layers": ["layer4"]}}}
    )
    assert swapped.teacher.name == "b"


def test_relative_paths_resolve_against_config_folder(tmp_path, monkeypatch):
    sub = tmp_path / "proj"
    (sub / "ckpt").mkdir(parents=True)
    (sub / "ckpt" / "kd.pth").write_bytes(b"x")
    (sub / "val").mkdir()
    (sub / "rules.toml").write_text("")
    text = BASE.replace(
        'eval = "builtin:concept-world?version=1&n=40&size=32&seed=0&split=eval"', 'eval = "imagefolder:val"'
    ).replace(
        '[models.kd]\narch = "interptool:cw-student"',
        '[models.kd]\narch = "interptool:cw-student"\ncheckpoint = "ckpt/kd.pth"\n'
        'key_map = "rules.toml"',
    ) + '[analysis.dissection]\nmask_store = "masks"\n'  # an analyzer's path field too
    path = _write(sub, text)
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    cfg = load_config(Path("proj") / "config.toml")
    assert cfg.models["kd"].checkpoint == str((sub / "ckpt" / "kd.pth").resolve())
    assert cfg.models["kd"].key_map == str((sub / "rules.toml").resolve())
    assert cfg.data.eval == f"imagefolder:{(sub / 'val').resolve()}"
    assert cfg.analysis.dissection.mask_store == str((sub / "masks").resolve())
    assert path.exists()


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_path_field_is_refused_not_resolved_to_the_config_folder(tmp_path, value):
    text = BASE + f'[analysis.dissection]\nmask_store = "{value}"\n'
    with pytest.raises(ConfigError, match=r"config\.toml: analysis\.dissection\.mask_store: "
                                          r"expected the name of a folder"):
        load_config(_write(tmp_path, text))


def test_missing_checkpoint_names_field_file_and_abs_path(tmp_path):
    text = BASE.replace(
        '[models.kd]\narch = "interptool:cw-student"',
        '[models.kd]\narch = "interptool:cw-student"\ncheckpoint = "ckpt/resnet18_kd.pth"',
    )
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    expected = str((tmp_path / "ckpt" / "resnet18_kd.pth").resolve())
    assert str(e.value) == (
        f"config.toml: models.kd.checkpoint: file not found: {expected} "
        "(paths are relative to the config's folder)"
    )


@pytest.mark.parametrize(
    "old,new,field,fragment",
    [
        ('layers = ["layer3", "layer4"]\nrole', 'layrs = ["layer3"]\nrole', "models.teacher.layrs",
         "did you mean 'layers'?"),
        ("[data]", "[dataa]\n[data]", "dataa", "did you mean 'data'?"),
        ('[models.kd]\narch = "interptool:cw-student"',
         '[models.kd]\narch = "interptool:cw-student"\nnum_classes = "ten"',
         "models.kd.num_classes", "expected an integer, got str 'ten'"),
        ('[models.kd]\narch = "interptool:cw-student"',
         '[models.kd]\narch = "interptool:cw-student"\ntrust_pickle = 1',
         "models.kd.trust_pickle", "expected true or false"),
        ('[models.kd]\narch = "interptool:cw-student"', '[models.kd]\narch = "resnet18"',
         "models.kd.arch", "expected 'timm:NAME'"),
        ('[models.kd]\narch = "interptool:cw-student"',
         '[models.kd]\narch = "interptool:cw-student"\nimage_size = [64, 64, 3]',
         "models.kd.image_size", "expected one integer or [H, W]"),
        ('[models.kd]\narch = "interptool:cw-student"',
         '[models.kd]\narch = "interptool:cw-student"\nmean = [0.5, 0.5]',
         "models.kd.mean", "expected 1 or 3 numbers"),
        ('probe = "builtin', 'probe = "brodn:/x"\n#', "data.probe", "did you mean 'broden'?"),
        ("", "[run]\nbatch_size = 0", "run.batch_size", "expected an integer >= 1, got 0"),
        ("", "[run]\ndevice = \"gpu\"", "run.device", "expected 'cpu', 'cuda'"),
        ("", "[run]\nworkers = -1", "run.workers", "expected an integer >= 0, got -1"),
        ("", "[run]\nworkers = \"all\"", "run.workers", "expected an integer >= 0 or \"auto\", got 'all'"),
        ("", "[run]\nworkers = true", "run.workers", "expected an integer, got True"),
        ("", "[run]\ndevice = \"mps\"", "run.device", "expected 'cpu', 'cuda' or 'cuda:N'"),
        ("", "[analysis]\nsimilarity = { temperatures = [1, -4] }",
         "analysis.similarity.temperatures[1]", "expected a number > 0.0"),
        ("", "[analysis]\nattribution = { methods = [\"gradcam\"] }",
         "analysis.attribution.methods[0]", "did you mean 'grad_cam'?"),
        ("", "[analysis]\nattribution = { internal_batch_size = 0 }",
         "analysis.attribution.internal_batch_size", "expected an integer >= 1, got 0"),
        ("", "[analysis]\ndissection = { quantil = 0.01 }", "analysis.dissection.quantil",
         "did you mean 'quantile'?"),
        ("", "[analysis]\ndissection = { quantile = 1.5 }", "analysis.dissection.quantile",
         "expected a number < 1.0"),
    ],
)
def test_field_errors(tmp_path, old, new, field, fragment):
    text = BASE + "\n" + new if old == "" else BASE.replace(old, new, 1)
    assert text != BASE
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    msg = str(e.value)
    assert msg.startswith(f"config.toml: {field}: "), msg
    assert fragment in msg, msg


def test_attribution_internal_batch_size_key(tmp_path):
    """issue 13: the internal batch is settable in the config (unset: derived from the batch
    size, None here)."""
    assert load_config(_write(tmp_path, BASE)).analysis.attribution.internal_batch_size is None
    cfg = load_config(_write(tmp_path, BASE + "\n[analysis]\nattribution = "
                                              "{ internal_batch_size = 24 }\n"))
    assert cfg.analysis.attribution.internal_batch_size == 24


def test_run_workers_default_to_the_plan(tmp_path):
    """issue 13: `compare` decodes with DataLoader workers chosen like `interptool cache`'s
    (None: interptool._resources.plan_threads decides per cache); an integer is kept."""
    assert load_config(_write(tmp_path, BASE)).run.workers is None
    for n in (0, 3):
        cfg = load_config(_write(tmp_path, BASE + f"\n[run]\nworkers = {n}\n"))
        assert cfg.run.workers == n
    # the template leaves it to the plan too, and "auto" says so explicitly
    assert load_config(write_template(tmp_path / "t.toml")).run.workers is None
    assert load_config(_write(tmp_path, BASE + '\n[run]\nworkers = "auto"\n')).run.workers is None
    with pytest.raises(ConfigError, match=r'run.workers: expected an integer >= 0 or "auto", '
                                          r"got 'many'"):
        load_config(_write(tmp_path, BASE + '\n[run]\nworkers = "many"\n'))


def test_compare_workers_flag_overrides_the_config(tmp_path, monkeypatch, capsys):
    """`compare --workers N` as `cache --workers N`: overrides [run] workers; validated the
    same way (a one-line error, exit 2, before anything runs)."""
    import interptool.pipeline as pipeline
    from interptool.cli import main

    seen = []

    def fake_run_compare(cfg, out, **kw):
        seen.append(cfg.run.workers)
        return Path(out) / "report.html"

    monkeypatch.setattr(pipeline, "run_compare", fake_run_compare, raising=False)
    cfg = _write(tmp_path, BASE + "\n[run]\nworkers = 2\n")
    out = str(tmp_path / "out")
    assert main(["compare", str(cfg), "--out", out, "--quiet"]) == 0
    assert main(["compare", str(cfg), "--out", out, "--workers", "0", "--quiet"]) == 0
    assert main(["compare", str(_write(tmp_path, BASE, "plain.toml")), "--out", out,
                 "--quiet"]) == 0
    assert seen == [2, 0, None]
    capsys.readouterr()
    assert main(["compare", str(cfg), "--out", out, "--workers", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interptool compare: error: --workers must be 0 or more, got -1"]
    assert seen == [2, 0, None]


def test_two_teachers_is_an_error(tmp_path):
    text = BASE.replace(
        '[models.kd]\narch = "interptool:cw-student"',
        '[models.kd]\narch = "interptool:cw-student"\nrole = "teacher"',
    )
    with pytest.raises(ConfigError, match=r"config.toml: models: 2 models have role = \"teacher\" "
                                          r"\(teacher, kd\); exactly one"):
        load_config(_write(tmp_path, text))


def test_analysis_needs_its_data(tmp_path):
    text = BASE.replace('probe = "builtin:concept-world?version=1&n=40&size=32&seed=0&split=probe"\n', "")
    with pytest.raises(ConfigError, match="config.toml: data.probe: missing; dissection needs"):
        load_config(_write(tmp_path, text))
    # switching dissection off makes the same config valid
    cfg = load_config(_write(tmp_path, text + "\n[analysis]\ndissection = false\n"))
    assert cfg.analysis.enabled() == ["similarity", "attribution"]
    assert cfg.only(["similarity"]).analysis.enabled() == ["similarity"]
    with pytest.raises(ConfigError, match="did you mean 'similarity'"):
        cfg.only(["similarty"])


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found.*--init"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(_write(tmp_path, "[data\n", name="bad.toml"))


def test_init_template_validates(tmp_path):
    path = write_template(tmp_path / "sub" / "compare.toml")
    cfg = load_config(path)
    assert cfg.teacher.name == "teacher"
    assert cfg.analysis.attribution.n_images == 16
    assert path.read_text() == template_text()
    with pytest.raises(ConfigError, match="already exists"):
        write_template(path)


def test_cli_init_and_error_exit_code(tmp_path, capsys):
    from interptool.cli import main

    target = tmp_path / "c.toml"
    assert main(["compare", "--init", str(target)]) == 0
    assert target.exists()
    load_config(target)
    bad = _write(tmp_path, BASE.replace("layers", "layer", 1))
    rc = main(["compare", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "interptool compare: error: config.toml: models.teacher.layer: unknown key" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing done before validation passed
