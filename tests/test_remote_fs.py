"""remote_fs: TensorFlow and Beam both reach the loopback S3 server with the one AWS_ENDPOINT_URL setting."""

from __future__ import annotations

import subprocess
import sys

from beam_pipeline import remote_fs


def test_scheme_and_remote():
    assert remote_fs.scheme("s3://b/k") == "s3"
    assert remote_fs.scheme("/tmp/x") == ""
    assert remote_fs.is_remote("gs://b/k") and remote_fs.is_remote("s3://b")
    assert not remote_fs.is_remote("/a/b") and not remote_fs.is_remote("file:///a/b")
    assert remote_fs.enable_for(["/a", "gs://b/c"]) == []


def test_tensorflow_and_beam_see_the_same_objects(s3_bucket):
    import tensorflow as tf
    from apache_beam.io.filesystems import FileSystems

    assert remote_fs.enable_for([s3_bucket]) == [f"--beam_plugins={remote_fs.WORKER_PLUGIN}"]
    with FileSystems.create(f"{s3_bucket}/beam.txt") as f:
        f.write(b"written by beam")
    assert tf.io.gfile.GFile(f"{s3_bucket}/beam.txt", "rb").read() == b"written by beam"
    with tf.io.gfile.GFile(f"{s3_bucket}/dir/tf.txt", "wb") as f:
        f.write(b"written by tensorflow")
    with FileSystems.open(f"{s3_bucket}/dir/tf.txt") as f:
        assert f.read() == b"written by tensorflow"


def test_a_process_that_used_s3_exits_with_its_own_status(s3_bucket):
    code = (
        "import sys, tensorflow as tf\n"
        "from beam_pipeline import remote_fs\n"
        f"remote_fs.enable_for([{s3_bucket!r}])\n"
        f"assert not tf.io.gfile.exists({s3_bucket!r} + '/nothing')\n"
        "remote_fs.exit_now(7)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 7, done.stderr[-2000:]
    assert "pure virtual method" not in done.stderr
