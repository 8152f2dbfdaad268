"""Serving models' training logs in an in-process TensorBoard on loopback."""

from __future__ import annotations

import dataclasses
from typing import Any

from beam_pipeline._mlmd_reading import open_store
from beam_pipeline.errors import MetadataError
from beam_pipeline.metadata import MetadataStore
from beam_pipeline.model_lookup import model_run


# -- TensorBoard -------------------------------------------------------------------------------------
@dataclasses.dataclass
class TensorBoardServer:
    """A TensorBoard serving in this process on loopback; `stop()` ends its serving loop and closes its socket."""

    url: str
    logdirs: dict[str, str]
    _server: Any

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_tensorboard(store: MetadataStore | str, model_ids: list[int], port: int | None = None) -> TensorBoardServer:
    """Serve the models' training logs: one model as --logdir, several side by side via --logdir_spec."""
    import tensorflow as tf
    from tensorboard import program

    store = open_store(store)
    logdirs = {f"model_{mid}": model_run(store, mid).uri for mid in model_ids}
    for name, directory in logdirs.items():
        if not tf.io.gfile.isdir(directory):  # an object-store prefix counts as a directory here
            raise MetadataError(f"{name}: its TensorBoard log directory {directory} no longer exists")
    # Port 0: the OS picks a free one while binding, so no other process can take it in between.
    argv = [None, "--host", "127.0.0.1", "--port", str(port or 0), "--load_fast", "false"]
    if len(logdirs) == 1:
        argv += ["--logdir", next(iter(logdirs.values()))]
    else:
        argv += ["--logdir_spec", ",".join(f"{name}:{d}" for name, d in logdirs.items())]
    servers: list[Any] = []

    def server_class(wsgi_app: Any, flags: Any) -> Any:
        # launch() returns only the URL: keep the server it builds, the handle stop() needs.
        servers.append(program.WerkzeugServer(wsgi_app, flags))
        return servers[-1]

    board = program.TensorBoard(server_class=server_class)
    board.configure(argv=argv)
    url = board.launch()
    return TensorBoardServer(url, logdirs, servers[0])
