"""Imported first by SDK workers (Beam's --beam_plugins) so TensorFlow on a worker can read and write s3://."""

import atexit

from beam_pipeline import remote_fs

remote_fs.enable_s3()
# A worker that touched S3 would abort at exit (see remote_fs.exit_now); leave quietly instead.
atexit.register(remote_fs.exit_now, 0)
