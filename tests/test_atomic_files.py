"""ddpm_hf.utils.atomic_files: a file is replaced whole or not at all, and a failed write leaves nothing behind."""

import json
import os

import pytest

from ddpm_hf.training.durable_io import remove_debris
from ddpm_hf.utils.atomic_files import (
    atomic_write,
    write_json_atomically,
    write_text_atomically,
)


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "new folder" / "record.json"  # the folder is created
    write_json_atomically(path, {"step": 1})
    write_json_atomically(path, {"step": 2})
    assert json.loads(path.read_text()) == {"step": 2}
    assert sorted(os.listdir(path.parent)) == ["record.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = tmp_path / "samples.png"
    path.write_bytes(b"the old grid")
    with pytest.raises(RuntimeError, match="the writer failed"), atomic_write(path) as temporary:
        temporary.write_bytes(b"half a gr")
        raise RuntimeError("the writer failed")
    assert path.read_bytes() == b"the old grid"
    assert sorted(os.listdir(tmp_path)) == ["samples.png"]


def test_the_temporary_name_is_hidden_per_process_and_cleared_as_debris(tmp_path):
    path = tmp_path / "README.md"
    with atomic_write(path) as temporary:
        temporary.write_text("written by a process killed before the rename")
        assert temporary.parent == tmp_path and temporary.name.startswith(".README.md.")
        assert str(os.getpid()) in temporary.name
        assert remove_debris(tmp_path) == [temporary.name]  # what a SIGKILL here would leave, and the next run removes
        temporary.write_text("# card")
    assert path.read_text() == "# card"


def test_text_is_written_as_utf8(tmp_path):
    write_text_atomically(tmp_path / "card.md", "Fréchet distance: 5.0 ± 0.5")
    assert (tmp_path / "card.md").read_bytes().decode("utf-8") == "Fréchet distance: 5.0 ± 0.5"
