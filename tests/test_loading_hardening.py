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
