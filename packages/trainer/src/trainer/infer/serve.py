"""``trainer serve``: a checkpoint behind the OpenAI completions API, at TP = ``--tp`` ranks.

At ``--tp 1`` (or under torchrun) the ranks are this process (and torchrun's others); ``--tp N`` starts N
local ranks with PyTorch's elastic launcher, as ``trainer train --nproc`` does. Rank 0 runs the engine and
the HTTP server (uvicorn); the other ranks follow its steps. The socket is bound before the first line is
printed, ``trainer serve: listening on http://HOST:PORT``, so ``--port 0`` (a free port) can be used.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pstate.device import default_device

from ..errors import TrainerError
from ..launch import default_group, under_torchrun


@dataclass(frozen=True)
class ServeOptions:
    """What ``trainer serve`` was asked for; ``check`` refuses a bad field by name before any rank starts."""

    load: str
    tp: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    block_size: int = 16
    num_blocks: int | None = None
    max_batch_tokens: int = 256
    max_seqs: int = 32
    model_name: str | None = None

    def check(self) -> None:
        for name in ("tp", "block_size", "max_batch_tokens", "max_seqs"):
            if getattr(self, name) < 1:
                raise TrainerError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise TrainerError(f"--num-blocks {self.num_blocks}: must be >= 1")
        if not 0 <= self.port <= 65535:
            raise TrainerError(f"--port {self.port}: must be in [0, 65535] (0: any free port)")
        from .load import find_checkpoint

        find_checkpoint(self.load)


def serve(options: ServeOptions) -> int:
    """Serve until interrupted; returns the exit status."""
    options.check()
    if under_torchrun() or options.tp == 1:
        _serve_here(asdict(options), local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return 0
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=options.tp, run_id=f"serve-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
    )  # fmt: skip
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        elastic_launch(config, _serve_here)(asdict(options), options.tp)
    except (SignalException, KeyboardInterrupt):
        return 130  # interrupted: the launcher has stopped the ranks
    return 0


def _serve_here(options: dict, local_world: int) -> None:
    from .load import engine_for, inference_state, load_chunk

    opts = ServeOptions(**options)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    device = default_device()
    if device.type != "cpu":
        torch.cuda.set_device(device)
    with default_group(device), inference_state(opts.tp) as ps:
        chunk, _, tokenizer = load_chunk(opts.load, ps)
        runner, engine = engine_for(
            chunk.to(device), tokenizer, block_size=opts.block_size, num_blocks=opts.num_blocks,
            max_batch_tokens=opts.max_batch_tokens, max_seqs=opts.max_seqs,
        )  # fmt: skip
        if engine is None:
            runner.follow()
            return
        engine.start()
        try:
            _run_http(engine, opts)
        finally:
            engine.close()


def _run_http(engine, opts: ServeOptions) -> None:
    import uvicorn

    from .server import build_app

    family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((opts.host, opts.port))
    host, port = sock.getsockname()[:2]
    name = opts.model_name or Path(opts.load).resolve().name
    app = build_app(engine, name)
    print(f"trainer serve: listening on http://{host}:{port} (model {name!r}, tp={opts.tp})", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off")).run(sockets=[sock])
