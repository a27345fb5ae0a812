"""What a restarted job finds: ``latest``/``intact`` skip a broken newest checkpoint and say which,
``clean`` removes what interrupted saves left, a commit refuses data files it cannot see, and
``verify`` reads the data files' contents, not only their checksums."""

import json

import pytest
import torch
from safetensors.torch import save_file

import ckpt
from ckpt import files


def save_steps(root, steps):
    for step in steps:
        ckpt.save({"w": torch.full((4,), float(step)), "step": step}, ckpt.step_dir(root, step))


def test_latest_skips_a_newest_checkpoint_with_a_missing_file_and_names_it(tmp_path):
    save_steps(tmp_path, [1, 2, 3])
    (ckpt.step_dir(tmp_path, 3) / "rank_00000.safetensors").unlink()
    (ckpt.step_dir(tmp_path, 2) / "index.json").write_text("{not json")
    warnings = []
    assert ckpt.latest(tmp_path, warn=warnings.append) == ckpt.step_dir(tmp_path, 1)
    assert warnings[0].startswith(f"skipping checkpoint {ckpt.step_dir(tmp_path, 3)}: data file")
    assert warnings[1].startswith(f"skipping checkpoint {ckpt.step_dir(tmp_path, 2)}: ")
    assert ckpt.intact(tmp_path, warn=None) == [ckpt.step_dir(tmp_path, 1)]


def test_clean_removes_partials_and_index_less_step_directories_only(tmp_path):
    save_steps(tmp_path, [1])
    partial = tmp_path / ".step_00000002.partial-0123456789ab"
    partial.mkdir()
    (partial / "rank_00000.safetensors").write_bytes(b"half")
    deleting = tmp_path / ".step_00000000.deleting-abcdef012345"
    deleting.mkdir()
    orphan = ckpt.step_dir(tmp_path, 3)
    orphan.mkdir()
    other = tmp_path / "notes"
    other.mkdir()
    removed = ckpt.clean(tmp_path)
    assert sorted(removed) == sorted([partial, deleting, orphan])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step_00000001"]
    save_steps(tmp_path, [3])  # the step whose directory was left without an index saves again
    assert ckpt.latest(tmp_path) == ckpt.step_dir(tmp_path, 3)


def test_a_commit_refuses_data_files_it_cannot_see(tmp_path):
    tmp, path = tmp_path / ".step_1.partial-x", tmp_path / "step_1"
    tmp.mkdir()
    (tmp / "rank_00000.safetensors").write_bytes(b"1234")
    index = {"files": {"rank_00000.safetensors": {"size": 4}, "rank_00001.safetensors": {"size": 9}}}
    with pytest.raises(ckpt.CheckpointError, match=r"1 of 2 data files .* rank_00001.safetensors; every rank"):
        files.commit(tmp, path, index)
    assert not path.exists() and not (tmp / "index.json").exists()


def test_verify_reads_the_contents_not_only_the_checksums(tmp_path):
    save_steps(tmp_path, [1])
    path = ckpt.step_dir(tmp_path, 1)
    data = path / "rank_00000.safetensors"
    data.write_bytes(b"\xff" * data.stat().st_size)  # garbage, then the index records its checksum
    index = json.loads((path / "index.json").read_text())
    index["files"][data.name] = dict(zip(("size", "sha256"), files.sha256_file(data)))
    (path / "index.json").write_text(json.dumps(index))
    problems = ckpt.verify(path)
    assert len(problems) == 1 and problems[0].startswith(f"{data}: safetensors cannot read it")


def test_an_explicit_load_of_a_corrupt_checkpoint_names_the_file(tmp_path):
    save_steps(tmp_path, [1])
    data = ckpt.step_dir(tmp_path, 1) / "rank_00000.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match=f"{data}: checksum mismatch"):
        ckpt.load({"w": torch.zeros(4), "step": 0}, ckpt.step_dir(tmp_path, 1))


def test_a_tensor_missing_from_its_data_file_is_named_with_the_file(tmp_path):
    save_steps(tmp_path, [1])
    path = ckpt.step_dir(tmp_path, 1)
    data = path / "rank_00000.safetensors"
    save_file({"other": torch.zeros(4)}, str(data))  # a data file that lacks the indexed tensor
    index = json.loads((path / "index.json").read_text())
    index["files"][data.name] = dict(zip(("size", "sha256"), files.sha256_file(data)))
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ckpt.CheckpointError, match=f"data file {data} has no readable tensor 'w#0'"):
        ckpt.load({"w": torch.zeros(4), "step": 0}, path)
    assert "lacks the tensor(s) ['w#0']" in ckpt.verify(path)[0]
