"""The run-directory helpers on every kind of location they take: a local path, a `file://` URI,
and pyarrow's in-memory filesystem (`mock:///`); and the copy-into-place path that object stores
take (they cannot rename a directory), on an in-memory filesystem with that same restriction."""

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from lossaverse.pipeline.data.rundir import Manifest, read_json, read_table, replace_dir, resolve, write_json, write_table

SCHEMA = pa.schema([("id", pa.string()), ("n", pa.int32())])


def _table(*ids: str) -> pa.Table:
    return pa.table({"id": list(ids), "n": list(range(len(ids)))}, schema=SCHEMA)


@pytest.fixture(params=["path", "file-uri", "mock"])
def root(request, tmp_path):
    """A fresh run directory of each kind (a unique mock folder per test: the mock is per process)."""
    if request.param == "path":
        return tmp_path / "run"
    if request.param == "file-uri":
        return f"file://{tmp_path}/run"
    return f"mock:///{os.getpid()}/{request.node.name}/run"


def _sub(root, name):
    return root / name if isinstance(root, Path) else f"{root}/{name}"


def test_write_then_read_round_trips(root):
    write_table(_table("a", "b"), _sub(root, "items"))
    assert read_table(_sub(root, "items"), SCHEMA).to_pydict() == {"id": ["a", "b"], "n": [0, 1]}


def test_write_replaces_the_whole_folder_and_leaves_no_tmp(root):
    write_table(_table("a", "b"), _sub(root, "items"), name="part-0.parquet")
    write_table(_table("c"), _sub(root, "items"), name="part-9.parquet")
    assert read_table(_sub(root, "items")).column("id").to_pylist() == ["c"]  # part-0 is gone
    fs, path = resolve(root)
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path))]
    assert names == ["items"], names  # no items.tmp-* or items.old-* left behind


def test_read_takes_only_the_files_directly_in_the_folder_in_name_order(root):
    tmp = _sub(root, "items.tmp")
    write_table(_table("b"), tmp, name="part-1.parquet")
    fs, tmp_path = resolve(tmp)
    pq.write_table(_table("a"), f"{tmp_path}/part-0.parquet", filesystem=fs)
    write_table(_table("q"), _sub(tmp, "quarantine"))  # a sub-folder is not part of the table
    replace_dir(tmp, _sub(root, "items"))
    assert read_table(_sub(root, "items")).column("id").to_pylist() == ["a", "b"]
    assert read_table(_sub(_sub(root, "items"), "quarantine")).column("id").to_pylist() == ["q"]


def test_missing_folder_is_empty_with_a_schema_and_an_error_without(root):
    assert read_table(_sub(root, "nothing"), SCHEMA).num_rows == 0
    with pytest.raises(FileNotFoundError, match="no Parquet files under"):
        read_table(_sub(root, "nothing"))


def test_json_and_manifest_survive_a_reopen(root):
    write_json({"b": 1, "a": [1, 2]}, _sub(root, "datasets/stats.json"))
    assert read_json(_sub(root, "datasets/stats.json")) == {"a": [1, 2], "b": 1}
    assert read_json(_sub(root, "absent.json"), {"none": True}) == {"none": True}
    m = Manifest(root)
    m.update(config={"name": "x"})
    m.record("items", "fp1", 1.234, rows=2)
    again = Manifest(root)
    assert again.done("items", "fp1") and not again.done("items", "fp2")
    assert again.stage("items")["rows"] == 2 and again.data["config"] == {"name": "x"}
    again.invalidate("items")
    assert not Manifest(root).done("items", "fp1")


def test_a_uri_joined_as_a_path_still_resolves(tmp_path):
    """`Path("s3://b/x") / "items"` prints as `s3:/b/x/items`; the helpers restore the URI."""
    joined = Path(f"mock:///{os.getpid()}/joined") / "items"
    write_table(_table("z"), joined)
    assert read_table(f"mock:///{os.getpid()}/joined/items").column("id").to_pylist() == ["z"]
    fs, path = resolve(Path(f"file://{tmp_path}") / "x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/x"


def test_local_and_file_uri_are_the_same_place(tmp_path):
    write_table(_table("a"), tmp_path / "items")
    assert read_table(f"file://{tmp_path}/items").column("id").to_pylist() == ["a"]
    assert (tmp_path / "items" / "part-0.parquet").is_file()


def test_replace_across_filesystems_is_refused(tmp_path):
    write_table(_table("a"), tmp_path / "t")
    with pytest.raises(ValueError, match="different filesystems"):
        replace_dir(tmp_path / "t", f"mock:///{os.getpid()}/elsewhere")


def test_without_directory_rename_the_folder_is_copied_into_place():
    """S3 and GCS refuse to move a directory; replace_dir then copies it and deletes the tmp."""
    from fsspec.implementations.memory import MemoryFileSystem

    from lossaverse.pipeline.data.rundir import _move_dir

    class NoDirectoryMove(pafs.FSSpecHandler):
        def move(self, src, dest):
            if self.fs.isdir(src):
                raise OSError("directory moves are not supported")  # as S3FileSystem answers
            super().move(src, dest)

    fs = pafs.PyFileSystem(NoDirectoryMove(MemoryFileSystem()))
    root = f"/{os.getpid()}-copy"
    fs.create_dir(f"{root}/items.tmp")
    pq.write_table(_table("a", "b"), f"{root}/items.tmp/part-0.parquet", filesystem=fs)
    with pytest.raises(OSError):
        fs.move(f"{root}/items.tmp", f"{root}/items")
    _move_dir(fs, f"{root}/items.tmp", f"{root}/items")
    assert fs.get_file_info(f"{root}/items.tmp").type == pafs.FileType.NotFound
    assert pq.read_table(f"{root}/items/part-0.parquet", filesystem=fs).column("id").to_pylist() == ["a", "b"]
