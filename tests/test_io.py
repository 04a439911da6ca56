"""Atomic writes and weights-only loading (condconv_lightning.io)."""

import os
import stat

import pytest
import torch

from condconv_lightning.io import atomic_write, load_state_dict, save_state_dict
from condconv_lightning.wrappers import strip_keys


def test_atomic_write_renames_on_success_with_umask_permissions(tmp_path):
    target = tmp_path / "out.bin"
    old = os.umask(0o022)
    try:
        with atomic_write(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_bytes(b"payload")
            assert not target.exists()
    finally:
        os.umask(old)
    assert target.read_bytes() == b"payload"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # as open() would create it, not mkstemp's 0600
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_leaves_nothing_on_error_and_refuses_existing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--force"), atomic_write(target):
        pass
    with atomic_write(target, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(FileNotFoundError, match="does not exist"), atomic_write(tmp_path / "missing" / "out.bin"):
        pass


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_written_file_that_fails_its_verification_neither_appears_nor_replaces_one(tmp_path, suffix):
    """``verify`` sees the complete file under its temporary name; what it raises leaves the target as it was."""
    target = tmp_path / f"weights{suffix}"
    target.write_bytes(b"an earlier output")
    seen = []

    def refuse(path):
        seen.append((path.name, sorted(load_state_dict(path))))
        raise ValueError("outputs differ")

    with pytest.raises(ValueError, match="outputs differ"):
        save_state_dict({"w": torch.ones(2)}, target, overwrite=True, verify=refuse)
    assert seen == [(seen[0][0], ["w"])] and seen[0][0] != target.name
    assert target.read_bytes() == b"an earlier output" and os.listdir(tmp_path) == [target.name]
    save_state_dict({"w": torch.ones(2)}, target, overwrite=True, verify=lambda path: seen.append(path))
    assert torch.equal(load_state_dict(target)["w"], torch.ones(2)) and len(seen) == 2


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_round_trip_strips_wrapper_prefixes(tmp_path, suffix):
    weight = torch.randn(3, 2)
    state = {"module._orig_mod.fc.weight": weight, "module.fc.bias": torch.zeros(3)}
    path = save_state_dict(state, tmp_path / f"w{suffix}")
    loaded = load_state_dict(path)
    assert set(loaded) == {"fc.weight", "fc.bias"}
    assert torch.equal(loaded["fc.weight"], weight)


def test_lightning_checkpoint_yields_its_state_dict_and_non_state_dicts_are_refused(tmp_path):
    torch.save({"state_dict": {"model.w": torch.ones(1)}, "epoch": 3}, tmp_path / "a.ckpt")
    assert list(load_state_dict(tmp_path / "a.ckpt")) == ["model.w"]
    torch.save([1, 2, 3], tmp_path / "b.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "b.pt")
    assert strip_keys({"_orig_mod.module.x": 1}) == {"x": 1}
