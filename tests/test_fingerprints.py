"""Fingerprints read no unchanged byte: bytes actually read (FileSystems.open, S3 GETs) are counted."""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import threading

import pyarrow as pa
import pytest
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import Pipeline, artifact_io, fingerprints, launcher, remote_fs
from beam_pipeline.artifacts import COMMIT_MARKER
from transforms._input_files import SAMPLE_BYTES, match_metadata
from transforms.example_gen import ExampleGen
from transforms.statistics_gen import StatisticsGen


@pytest.fixture(autouse=True)
def memo(tmp_path, monkeypatch) -> str:
    """This test's own memo directory, not the user's cache."""
    path = str(tmp_path / "memo")
    monkeypatch.setenv(fingerprints.CACHE_DIR_ENV, path)
    return path


class _Counted:
    """A file opened through FileSystems.open whose reads are added to a counter."""

    def __init__(self, f, path: str, counter: collections.Counter):
        self._f, self._path, self._counter = f, path, counter

    def read(self, *args):
        data = self._f.read(*args)
        self._counter[self._path] += len(data)
        return data

    def readline(self, *args):
        data = self._f.readline(*args)
        self._counter[self._path] += len(data)
        return data

    def __iter__(self):
        return iter(self.readline, b"")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


class _Reads:
    """Bytes read through FileSystems.open, by path: every reader in ExampleGen and artifact_io opens through it."""

    def __init__(self, monkeypatch):
        self.bytes: collections.Counter = collections.Counter()
        real = FileSystems.open

        def counting_open(path, *args, **kwargs):
            return _Counted(real(path, *args, **kwargs), path, self.bytes)

        monkeypatch.setattr(FileSystems, "open", staticmethod(counting_open))

    def of(self, prefix: str) -> int:
        return sum(n for path, n in self.bytes.items() if path.startswith(prefix))


class _S3Gets:
    """Keys of every S3 GetObject (a request that downloads a body) this process makes, through any boto3 client."""

    def __init__(self, monkeypatch):
        import botocore.client

        self.keys: list[str] = []
        real = botocore.client.BaseClient._make_api_call

        def call(client, operation, params):
            if operation == "GetObject":
                self.keys.append(params["Key"])
            return real(client, operation, params)

        monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", call)

    def of_data(self) -> list[str]:
        """Downloaded keys other than commit markers (the launcher reads those to check a commit)."""
        return [k for k in self.keys if not k.endswith(COMMIT_MARKER)]


def _blake(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _rows(n: int, start: int = 0) -> str:
    return "".join(f"{i},{i * 0.5},s{i % 7}\n" for i in range(start, start + n))


# -- local files -------------------------------------------------------------------------------------
def test_a_local_file_is_read_once_until_it_changes_and_touching_it_keeps_its_fingerprint(tmp_path, monkeypatch):
    path = tmp_path / "d.bin"
    path.write_bytes(b"x" * 100_000)
    reads = _Reads(monkeypatch)
    first = fingerprints.file_fingerprint(str(path))
    assert first == _blake(b"x" * 100_000) and reads.of(str(path)) == 100_000
    assert fingerprints.file_fingerprint(str(path)) == first and reads.of(str(path)) == 100_000  # not re-read
    os.utime(path, (1, 1))  # mtime changes, content does not: hashed once more, same fingerprint
    assert fingerprints.file_fingerprint(str(path)) == first and reads.of(str(path)) == 200_000
    assert fingerprints.file_fingerprint(str(path)) == first and reads.of(str(path)) == 200_000
    path.write_bytes(b"y" * 100_000)  # same size, new content
    assert fingerprints.file_fingerprint(str(path)) == _blake(b"y" * 100_000)


def test_a_file_rewritten_at_once_with_the_same_size_is_never_given_its_old_digest(tmp_path):
    # Writes within one tick of the kernel's coarse clock share a ctime: a digest recorded then would
    # stand for the next write too. The memo waits the tick out before it records.
    path = tmp_path / "d.bin"
    for i in range(20):
        content = bytes([i]) * 4096
        path.write_bytes(content)
        assert fingerprints.file_fingerprint(str(path)) == _blake(content), f"write {i}"


def test_the_memo_lives_in_the_users_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(fingerprints.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fingerprints.cache_dir() == str(tmp_path / "xdg" / "beam-pipeline")
    path = tmp_path / "d.bin"
    path.write_bytes(b"z" * 10)
    fingerprints.file_fingerprint(str(path))
    [entry] = os.listdir(tmp_path / "xdg" / "beam-pipeline" / fingerprints.FILE_DIGESTS)
    assert entry.endswith(".json")


def test_an_unreadable_memo_entry_is_a_miss_and_is_rewritten(tmp_path, monkeypatch, memo):
    path = tmp_path / "d.bin"
    path.write_bytes(b"q" * 1000)
    fingerprints.file_fingerprint(str(path))
    [entry] = os.listdir(os.path.join(memo, fingerprints.FILE_DIGESTS))
    entry = os.path.join(memo, fingerprints.FILE_DIGESTS, entry)
    with open(entry, "w") as f:
        f.write('{"name": ')  # what only a foreign hand leaves
    reads = _Reads(monkeypatch)
    assert fingerprints.file_fingerprint(str(path)) == _blake(b"q" * 1000) and reads.of(str(path)) == 1000
    assert fingerprints.file_fingerprint(str(path)) == _blake(b"q" * 1000) and reads.of(str(path)) == 1000


def test_concurrent_writers_of_one_entry_never_show_a_reader_part_of_one():
    values = [{"writer": w, "payload": "v" * 200_000} for w in range(4)]
    seen: list = []
    done = threading.Event()

    def write(value):
        for _ in range(25):
            fingerprints.remember("race", "one-name", "valid", value)

    def read():
        while not done.is_set():
            seen.append(fingerprints.recall("race", "one-name", "valid"))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(v,)) for v in values]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    reader.join()
    seen.append(fingerprints.recall("race", "one-name", "valid"))
    assert seen[-1] in values
    assert all(v is None or v in values for v in seen)  # whole entries only (None: before the first rename)


# -- ExampleGen, local ------------------------------------------------------------------------------------
def _pipeline(data: str, root: str) -> Pipeline:
    gen = ExampleGen(input_base=data)
    return Pipeline("fingerprints", root, [gen, StatisticsGen(examples=gen.outputs.examples)])


def _states(result) -> dict[str, str]:
    return {c.id: c.state for c in result.components.values()}


def test_an_unchanged_local_pipeline_reruns_reading_no_data_byte(tmp_path, taxi_small_csv, monkeypatch):
    data = str(tmp_path / "in" / "data.csv")
    os.makedirs(os.path.dirname(data))
    shutil.copy(taxi_small_csv, data)
    root = str(tmp_path / "root")
    assert set(_states(launcher.run(_pipeline(data, root))).values()) == {"COMPLETE"}
    reads = _Reads(monkeypatch)
    assert set(_states(launcher.run(_pipeline(data, root))).values()) == {"CACHED"}
    assert reads.of(data) == 0
    assert [p for p in reads.bytes if p.startswith(root) and not p.endswith(COMMIT_MARKER)] == []  # no output
    os.utime(data, (1, 1))  # touched: hashed once more (no type scan), still cached
    assert set(_states(launcher.run(_pipeline(data, root))).values()) == {"CACHED"}
    assert reads.of(data) == os.path.getsize(data)
    assert set(_states(launcher.run(_pipeline(data, root))).values()) == {"CACHED"}
    assert reads.of(data) == os.path.getsize(data)  # and not again


def test_the_type_scan_is_remembered_by_the_inputs_fingerprint(tmp_path, monkeypatch):
    path = tmp_path / "d.csv"
    path.write_text("a,b,c\n" + _rows(20000))
    gen = ExampleGen(input_base=str(path))
    reads = _Reads(monkeypatch)
    assert gen.static_outputs({})["examples"]["flat_schema"].field("a").type == pa.int64()
    assert reads.of(str(path)) > os.path.getsize(path)  # hashed, then scanned
    before = reads.of(str(path))
    again = ExampleGen(input_base=str(path)).static_outputs({})["examples"]
    assert reads.of(str(path)) == before  # nothing read: the fingerprint and the types are remembered
    assert again["flat_schema"].field("a").type == pa.int64() and again["column_type_notes"] == []
    text = path.read_text()
    path.write_text(text[: -len("19999,9999.5,s0\n")] + "199.9,9999.5,s0\n")  # same size, a float in `a`
    assert os.path.getsize(path) == len(text)
    changed = ExampleGen(input_base=str(path)).static_outputs({})["examples"]
    assert changed["flat_schema"].field("a").type == pa.float64()
    assert "column 'a' read as float64" in changed["column_type_notes"][0]


def test_column_types_for_every_column_read_only_the_header(tmp_path, monkeypatch):
    path = tmp_path / "d.csv"
    path.write_text("a,b,c\n" + _rows(100_000))  # ~1.8 MB, far more than a header read
    size = os.path.getsize(path)
    gen = ExampleGen(input_base=str(path), column_types={"a": "int", "b": "float", "c": "string"})
    reads = _Reads(monkeypatch)
    static = gen.static_outputs({})["examples"]
    assert static["flat_schema"].types == [pa.int64(), pa.float64(), pa.string()]
    # One pass to fingerprint the file (the memo has not seen it), and the header: no scan.
    assert reads.of(str(path)) <= size + SAMPLE_BYTES < 2 * size


# -- S3 ------------------------------------------------------------------------------------------------
def _put(s3_server, uri: str, data: bytes) -> None:
    bucket, key = uri[len("s3://") :].split("/", 1)
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=data)


def test_a_file_on_s3_is_fingerprinted_from_its_checksum_without_a_download(s3_server, s3_bucket, monkeypatch):
    remote_fs.enable_for([s3_bucket])
    path = f"{s3_bucket}/data/d.bin"
    _put(s3_server, path, b"a" * 5000)
    gets = _S3Gets(monkeypatch)
    first = fingerprints.file_fingerprint(path)
    [found] = match_metadata([path])
    assert fingerprints.file_fingerprints([found]) == {path: first}
    _put(s3_server, path, b"a" * 5000)  # the same bytes again: the same fingerprint
    assert fingerprints.file_fingerprint(path) == first
    _put(s3_server, path, b"b" * 5000)  # same size, new content
    assert fingerprints.file_fingerprint(path) != first
    assert gets.keys == []


def test_an_output_tree_on_s3_is_fingerprinted_from_its_listing_and_checksums(s3_server, s3_bucket, monkeypatch):
    remote_fs.enable_for([s3_bucket])
    uri = f"{s3_bucket}/root/Comp/out/1"
    _put(s3_server, f"{uri}/Split-train/part-0.parquet", b"p" * 3000)
    _put(s3_server, f"{uri}/Split-eval/part-0.parquet", b"q" * 1000)
    gets = _S3Gets(monkeypatch)
    files = artifact_io.payload_files(uri)
    first = artifact_io.fingerprint_tree(uri, files)
    assert artifact_io.manifest(uri, files) == {"Split-eval/part-0.parquet": 1000, "Split-train/part-0.parquet": 3000}
    assert artifact_io.fingerprint_tree(uri) == first
    _put(s3_server, f"{uri}/Split-eval/part-0.parquet", b"r" * 1000)
    assert artifact_io.fingerprint_tree(uri) != first
    assert gets.keys == []


@pytest.mark.slow
def test_a_pipeline_on_s3_reruns_unchanged_without_downloading_and_reruns_on_new_content(
    s3_server, s3_bucket, tmp_path, taxi_small_csv, monkeypatch
):
    remote_fs.enable_for([s3_bucket])
    data, root, metadata = f"{s3_bucket}/in/data.csv", f"{s3_bucket}/root", str(tmp_path / "metadata.sqlite")
    raw = open(taxi_small_csv, "rb").read()
    _put(s3_server, data, raw)
    gets = _S3Gets(monkeypatch)
    first = launcher.run(_pipeline(data, root), metadata_uri=metadata)
    assert set(_states(first).values()) == {"COMPLETE"}
    examples = first.artifact("ExampleGen", "examples")
    assert artifact_io.is_intact(examples.uri)
    # The commits fingerprinted what they wrote from the listing and checksums: no Parquet downloaded.
    assert [k for k in gets.of_data() if k.startswith("root/")] == []
    gets.keys.clear()

    again = launcher.run(_pipeline(data, root), metadata_uri=metadata)
    assert set(_states(again).values()) == {"CACHED"}
    assert again.artifact("ExampleGen", "examples").id == examples.id
    assert gets.of_data() == []  # neither the input nor any output was downloaded

    # Same size, new content (one digit of the first row): the store's checksum changes, so the key.
    header, _, rest = raw.partition(b"\n")
    first_row, _, tail = rest.partition(b"\n")
    digit = next(i for i, ch in enumerate(first_row) if chr(ch).isdigit())
    row = first_row[:digit] + (b"1" if first_row[digit : digit + 1] != b"1" else b"2") + first_row[digit + 1 :]
    changed = header + b"\n" + row + b"\n" + tail
    assert len(changed) == len(raw) and changed != raw
    _put(s3_server, data, changed)
    rerun = launcher.run(_pipeline(data, root), metadata_uri=metadata)
    assert _states(rerun) == {"ExampleGen": "COMPLETE", "StatisticsGen": "COMPLETE"}
    assert rerun.artifact("ExampleGen", "examples").properties["fingerprint"] != examples.properties["fingerprint"]


def test_a_committed_gz_file_is_fingerprinted_by_its_stored_bytes(tmp_path):
    import gzip

    # Same content, two gzip encodings: the files differ, so the fingerprints must (and hashing
    # the stored bytes never inflates them).
    fast, small = tmp_path / "a", tmp_path / "b"
    for directory, level in ((fast, 1), (small, 9)):
        directory.mkdir()
        (directory / "part-0.gz").write_bytes(gzip.compress(b"record " * 10_000, compresslevel=level))
    assert artifact_io.fingerprint_tree(str(fast)) != artifact_io.fingerprint_tree(str(small))
    expected = hashlib.blake2b(digest_size=16)
    expected.update(b"/part-0.gz")
    expected.update((fast / "part-0.gz").read_bytes())
    assert artifact_io.fingerprint_tree(str(fast)) == expected.hexdigest()
