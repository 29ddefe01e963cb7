"""The output-directory protocol (``outputs.py``) in a world of one: what a new, a resumed, a
mismatched and a foreign directory give, and the serving export's whole-directory publish."""

from __future__ import annotations

import json

import pytest

from aitm_torchrec.outputs import JobOutput, describe_difference, publish_dir


class Refused(ValueError):
    pass


def _output(path) -> JobOutput:
    return JobOutput(path, "job.json", "scores of another job",
                     lambda old, new: describe_difference(old, new, {"step": "the checkpoint"}, {"step": str}), Refused)


def test_describe_difference_names_each_differing_key_in_order_with_values_where_asked():
    old, new = {"a": 1, "step": 12, "c": [1]}, {"a": 1, "step": 6, "c": [2], "d": True}
    assert describe_difference(old, new, {"step": "the checkpoint"}, {"step": str}) == \
        "the checkpoint (was 12, now 6), c, d"
    assert describe_difference(old, old) == ""


def test_a_new_directory_is_claimed_and_the_same_job_resumes_keeping_its_parts(tmp_path):
    out = tmp_path / "out"
    job = _output(out)
    assert job.prepare({"step": 12}, overwrite=False, is_main=True) is False
    assert json.loads((out / "job.json").read_text()) == {"step": 12}
    (out / "part-0.parquet").write_text("kept")
    (out / ".part-1.parquet.tmp").write_text("a crash's half part")
    assert job.prepare({"step": 12}, overwrite=False, is_main=True) is False
    assert (out / "part-0.parquet").read_text() == "kept" and not (out / ".part-1.parquet.tmp").exists()
    job.finish(lambda: {"parts": 1}, is_main=True)
    assert job.complete and job.manifest() == {"parts": 1}
    assert job.prepare({"step": 12}, overwrite=False, is_main=True) is True  # complete: nothing to do


def test_another_job_is_refused_naming_the_difference_then_replaced_under_overwrite(tmp_path):
    out = tmp_path / "out"
    job = _output(out)
    job.prepare({"step": 12}, overwrite=False, is_main=True)
    (out / "part-0.parquet").write_text("old")
    with pytest.raises(Refused, match=r"holds scores of another job: the checkpoint \(was 12, now 6\) differ from"):
        job.prepare({"step": 6}, overwrite=False, is_main=True)
    assert (out / "part-0.parquet").exists()
    assert job.prepare({"step": 6}, overwrite=True, is_main=True) is False
    assert not (out / "part-0.parquet").exists() and json.loads((out / "job.json").read_text()) == {"step": 6}


def test_a_directory_that_is_no_job_output_is_never_written_into(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(Refused, match="is not the output of this kind of job"):
        _output(tmp_path).prepare({"step": 1}, overwrite=True, is_main=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_publish_dir_replaces_its_own_kind_whole_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "model"

    def build(version):
        def write(tmp):
            (tmp / "meta.json").write_text(version)
            return version
        return write

    assert publish_dir(build("1"), out, "meta.json", "serving model") == "1"
    assert publish_dir(build("2"), out, "meta.json", "serving model") == "2"
    assert (out / "meta.json").read_text() == "2"

    def fail(tmp):
        (tmp / "meta.json").write_text("3")
        raise RuntimeError("scripting failed")

    with pytest.raises(RuntimeError):
        publish_dir(fail, out, "meta.json", "serving model")
    assert (out / "meta.json").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(FileExistsError, match="holds no serving model"):
        publish_dir(build("4"), tmp_path / "other", "meta.json", "serving model")


def test_a_text_write_that_fails_part_way_leaves_the_previous_file_and_no_temporary(tmp_path):
    """What ``benchmarks family`` / ``study`` keep after each run (hours of runs in one file) and
    ``easyrec --to-yaml`` write: a write that fails leaves the file as it was."""
    from aitm_torchrec.files import write_text_atomic

    path = tmp_path / "runs" / "kept.results.json"
    write_text_atomic(path, '{"a@1": 1}')
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, '{"a@1": 1, "b@1": "' + "x" * 100_000 + '\ud800"}')  # fails after the file opened
    assert path.read_text() == '{"a@1": 1}' and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    write_text_atomic(path, '{"a@1": 2}')
    assert path.read_text() == '{"a@1": 2}'
