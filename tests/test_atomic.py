"""Writes that fail half-way leave the previous file whole: results, tables and pictures."""
import os

import pytest

from jaxtree_lora import atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    atomic.write_text(str(path), "old")

    def half_then_crash(temporary):
        with open(temporary, "w") as file:
            file.write("ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic.replace_atomically(str(path), half_then_crash)
    assert path.read_text() == "old", "a failed write replaced the previous file with part of the new one"
    assert os.listdir(tmp_path) == ["results.json"], "the temporary file was left behind"
    atomic.write_text(str(path), "new")
    assert path.read_text() == "new"


def test_a_figure_that_cannot_be_drawn_keeps_the_old_picture(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = tmp_path / "tree.png"
    figure = Figure()
    FigureCanvasAgg(figure)
    figure.add_subplot(1, 1, 1).plot([0, 1], [0, 1])
    atomic.save_figure(figure, str(path))
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    class Broken:
        def savefig(self, *args, **kwargs):
            raise RuntimeError("renderer failed")

    with pytest.raises(RuntimeError):
        atomic.save_figure(Broken(), str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["tree.png"]


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic.write_text(str(path), '{"old": true}\n')

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_text(str(path), '{"new": true}\n')
    assert path.read_text() == '{"old": true}\n', "a failed write must leave the previous file whole"
    assert sorted(os.listdir(tmp_path)) == ["results.json"], "the temporary file must be removed"
