"""Weight files that lie (issue 11): a bit flipped inside a torch.save archive, a torch.save
file named ``.safetensors``, and the transformer token layout recorded on LoadedModel."""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402

from interptool.errors import CheckpointError  # noqa: E402
from interptool.loading import load_model, read_state_dict  # noqa: E402
from interptool.loading._zoo import ZOO  # noqa: E402

ARCH = "timm:resnet10t"


@pytest.fixture(scope="module")
def src() -> torch.nn.Module:
    torch.manual_seed(3)
    return timm.create_model("resnet10t", pretrained=False, num_classes=4).eval()


def _data_offset(path: Path, member: str) -> tuple[int, int]:
    """Byte offset and size of ``member``'s stored data, from its local zip header."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    assert head[:4] == b"PK\x03\x04" and info.compress_type == zipfile.ZIP_STORED
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _largest_tensor_member(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        data = [i for i in z.infolist() if "/data/" in i.filename]
    return max(data, key=lambda i: i.file_size).filename


def test_bit_flip_inside_a_tensor_is_refused_naming_the_member(tmp_path, src):
    path = tmp_path / "student.pth"
    torch.save(src.state_dict(), path)
    member = _largest_tensor_member(path)
    start, size = _data_offset(path, member)
    raw = bytearray(path.read_bytes())
    raw[start + size // 2] ^= 0x10  # one bit, in the middle of the largest weight
    path.write_bytes(bytes(raw))
    # the fault: torch itself loads the archive and hands back a wrong weight
    bad = torch.load(path, weights_only=True)
    changed = [k for k, v in src.state_dict().items() if not torch.equal(v, bad[k])]
    assert len(changed) == 1
    with pytest.raises(CheckpointError) as err:
        load_model(ARCH, path)
    msg = str(err.value)
    assert f"checkpoint {path} is corrupt: member {member!r} fails its CRC-32 check" in msg
    assert "re-download or re-save it" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        read_state_dict(path, trust_pickle=True)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_bit_flip_in_a_torchscript_archive_is_refused(tmp_path):
    model = ZOO["cw-student"]().eval()
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    member = _largest_tensor_member(path)
    start, size = _data_offset(path, member)
    raw = bytearray(path.read_bytes())
    raw[start + 3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"member {member!r} fails its CRC-32"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match=f"member {member!r} fails its CRC-32"):
        load_model(str(path), image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)


def test_archives_saved_without_checksums_still_load(tmp_path, src):
    """torch can skip the CRCs (they are then recorded as 0): nothing to verify, no refusal."""
    path = tmp_path / "nocrc.pth"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(src.state_dict(), path)
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(path) as z:
        assert all(i.CRC == 0 for i in z.infolist())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_model(ARCH, path).model(x), src(x))


@pytest.mark.parametrize("wrap", [False, True])
def test_torch_zip_named_safetensors_loads_by_content(tmp_path, src, wrap):
    path = tmp_path / "student.safetensors"
    sd = src.state_dict()
    torch.save({"state_dict": sd, "epoch": 7} if wrap else sd, path)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    # the fault: torch dispatches on the suffix and hands the zip to the safetensors reader
    with pytest.raises(Exception, match="header"):
        torch.load(path, weights_only=True)
    loaded = load_model(ARCH, path)
    assert loaded.load_report.format == "zip"
    assert loaded.load_report.source_keys == ("state_dict" if wrap else "")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), src(x))


def test_real_safetensors_named_pth_loads_by_content(tmp_path, src):
    from safetensors.torch import save_file

    path = tmp_path / "student.pth"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    loaded = load_model(ARCH, path)
    assert loaded.load_report.format == "safetensors"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), src(x))


def test_unsafe_pickle_in_a_misnamed_file_is_still_refused(tmp_path):
    path = tmp_path / "evil.safetensors"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "cfg": zipfile.ZipInfo("x")}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects .*zipfile.ZipInfo"):
        read_state_dict(path)


# ----------------------------------------------------------------------------- tokens
def test_deit_distilled_has_two_prefix_tokens_end_to_end():
    from interptool.loading import list_layers

    loaded = load_model("timm:deit_tiny_distilled_patch16_224")
    assert loaded.num_prefix_tokens == 2 and loaded.token_grid == (14, 14)
    d = loaded.to_dict()
    assert d["num_prefix_tokens"] == 2 and d["token_grid"] == [14, 14]
    shapes = dict(list_layers(loaded))
    assert shapes["blocks.11"] == (2 + 14 * 14, 192)  # the layout matches the real tokens


def test_register_tokens_and_dynamic_grids():
    from interptool.loading._builder import ArchSpec
    from interptool.loading._model import token_layout

    # DINOv2 with 4 registers, built small (no download): class + 4 registers lead
    reg = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56,
                            depth=1).eval()
    n, grid = token_layout(reg, ArchSpec("timm", "vit_small_patch14_reg4_dinov2"), (56, 56))
    assert (n, grid) == (5, (4, 4))
    with torch.no_grad():
        tokens = reg.forward_features(torch.zeros(1, 3, 56, 56))
    assert tokens.shape[1] == n + grid[0] * grid[1]
    # a model that accepts any size: the grid follows the preprocessing's input size
    loaded = load_model("timm:test_vit", image_size=(64, 48))
    assert loaded.num_prefix_tokens == 1 and loaded.token_grid == (4, 3)  # patch 16
    # CNNs and hierarchical transformers have no leading tokens and no single grid
    assert load_model("timm:resnet10t").token_grid is None
    assert load_model("timm:resnet10t").num_prefix_tokens == 0
    assert load_model("interptool:cw-student").to_dict()["num_prefix_tokens"] == 0


def test_torchvision_vit_token_layout():
    import torchvision

    from interptool.loading._builder import ArchSpec
    from interptool.loading._model import token_layout

    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1,
                                               num_heads=2, hidden_dim=16, mlp_dim=32)
    assert token_layout(vit, ArchSpec("torchvision", "vit_b_16"), (32, 32)) == (1, (4, 4))
    cnn = torchvision.models.resnet18()
    assert token_layout(cnn, ArchSpec("torchvision", "resnet18"), (32, 32)) == (0, None)


# ----------------------------------------------------------------------------- transforms
def _image(w: int, h: int, seed: int, mode: str = "RGB"):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def tiny_timm() -> torch.nn.Module:
    return timm.create_model("test_resnet", pretrained=False)


def _parity(model: torch.nn.Module, cfg: dict, images) -> None:
    """Our eval transform (via timm_preprocessing, as load_model resolves it) against timm's
    ``create_transform(**resolve_model_data_config(model))`` on the same images."""
    from timm.data import create_transform, resolve_model_data_config

    from interptool.loading import Preprocessing
    from interptool.loading._preprocess import timm_preprocessing

    model.pretrained_cfg = dict(cfg)
    ours = Preprocessing(**timm_preprocessing(model)).eval_transform()
    ref = create_transform(**resolve_model_data_config(model))
    for im in images:
        a, b = ours(im), ref(im)
        assert a.shape == b.shape and torch.equal(a, b), (cfg, im.size)


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("input_size", [(3, 32, 32), (3, 40, 24), (3, 24, 40)])
@pytest.mark.parametrize("crop_pct,interp", [(0.875, "bilinear"), (1.0, "bicubic")])
def test_eval_transform_equals_timm(tiny_timm, crop_mode, input_size, crop_pct, interp):
    cfg = dict(input_size=input_size, crop_mode=crop_mode, crop_pct=crop_pct,
               interpolation=interp, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    images = [_image(w, h, k) for k, (w, h) in enumerate([(50, 50), (80, 45), (33, 61)])]
    _parity(tiny_timm, cfg, images)


def test_eval_transform_equals_timm_for_real_pretrained_configs(tiny_timm):
    """One pretrained config (the stored numbers; nothing downloaded) of every combination
    found in timm's registry: centre / squash / border, square and non-square inputs."""
    from timm.models import get_pretrained_cfg

    picked: dict[tuple, dict] = {}
    for name in timm.list_pretrained():
        cfg = get_pretrained_cfg(name)
        if cfg is None:
            continue
        d = cfg.to_dict()
        key = (d.get("crop_mode"), d["input_size"][1] != d["input_size"][2],
               d.get("interpolation"), d.get("crop_pct") == 1.0)
        if key not in picked and d["input_size"][0] == 3 and max(d["input_size"]) <= 1024:
            picked[key] = {k: d[k] for k in ("input_size", "interpolation", "mean", "std",
                                             "crop_pct", "crop_mode") if k in d}
    assert {k[0] for k in picked} == {"center", "squash", "border"}
    assert any(k[1] for k in picked)  # a non-square input size is among them
    for cfg in picked.values():
        _parity(tiny_timm, cfg, [_image(120, 90, 1), _image(70, 100, 2)])


def test_loaded_timm_models_use_timms_transform():
    from timm.data import create_transform, resolve_model_data_config

    im = _image(97, 61, 3)
    for name in ("resnet10t", "test_vit", "test_convnext"):
        loaded = load_model(f"timm:{name}")
        ref = create_transform(**resolve_model_data_config(loaded.model))
        assert torch.equal(loaded.preprocessing.eval_transform()(im), ref(im)), name


def test_crop_modes_keep_the_documented_part_of_the_image():
    """Known answer, independent of timm: a 64 x 32 image whose left quarter is red."""
    import numpy as np
    from PIL import Image

    from interptool.loading import Preprocessing

    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    arr[:, :16, 0] = 255
    arr[:, 16:, 2] = 255
    im = Image.fromarray(arr)

    def run(mode):
        pre = Preprocessing((3, 32, 32), (0.0,) * 3, (1.0,) * 3, "bilinear", 1.0, mode)
        return pre.eval_transform()(im)

    center, squash, border = run("center"), run("squash"), run("border")
    assert center[0].max() == 0 and torch.all(center[2] == 1)  # the red quarter is cut off
    assert torch.all(squash[0, :, :7] == 1) and torch.all(squash[0, :, 9:] == 0)
    # border: the whole image fitted in 32 x 16, padded above and below with the mean (0)
    assert torch.all(border[:, :7] == 0) and torch.all(border[:, 25:] == 0)
    assert torch.all(border[0, 9:23, :7] == 1) and torch.all(border[2, 9:23, 9:] == 1)


def test_eval_transform_pickles_and_handles_grayscale():
    import pickle

    from interptool.loading import Preprocessing

    pre = Preprocessing((1, 24, 40), (0.5,), (0.25,), "bicubic", 0.9, "center")
    tf = pre.eval_transform()
    im = _image(60, 50, 4)
    out = tf(im)
    assert out.shape == (1, 24, 40)
    assert torch.equal(pickle.loads(pickle.dumps(tf))(im), out)
    with pytest.raises(CheckpointError, match="crop_mode 'fill' is unknown"):
        Preprocessing((3, 8, 8), (0.5,) * 3, (0.5,) * 3, crop_mode="fill")
