"""The loop each warm rank process runs: join the default group once, then run functions on request.

Imported by the forkserver before it forks workers, so each worker starts with torch already loaded.
"""

from __future__ import annotations

import faulthandler
import importlib
import importlib.util
import os
import pickle
import signal
import sys
import traceback
import types
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

STACK_SIGNAL = signal.SIGUSR1
READY = "ready"
STOP = b"stop"


def dump_is_complete(text: str) -> bool:
    """Whether a faulthandler dump has reached this module's serve loop in the main thread's stack: every
    frame of the call the rank is stuck in (written innermost first) is then in the dump."""
    frame = f'File "{__file__}", line '
    return any(frame in line and line.rstrip().endswith(" in main") for line in text.splitlines())


def resolve(module_name: str, module_file: str | None, qualname: str) -> Callable[..., Any]:
    """Find a module-level function, loading its module from ``module_file`` when it is not importable
    by name (test modules that pytest imported from a path)."""
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
        if (
            module is not None
            and module_file
            and os.path.realpath(getattr(module, "__file__", "") or "") != (os.path.realpath(module_file))
        ):
            module = None
    if module is None:
        if not module_file:
            raise ImportError(f"cannot import {module_name!r} in the worker and it has no file")
        spec = importlib.util.spec_from_file_location(module_name, module_file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        parts = module_name.split(".")
        for i in range(1, len(parts)):  # so that pickle can find classes of a dotted test module
            sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _outcome(header: bytes, payload: bytes) -> bytes:
    try:
        fn = resolve(*pickle.loads(header))
        args, kwargs = pickle.loads(payload)
        result = fn(*args, **kwargs)
        return pickle.dumps(("ok", result))
    except BaseException as exc:
        text = traceback.format_exc()
        try:
            original = pickle.dumps(exc)
            pickle.loads(original)
        except Exception:
            original = None
        return pickle.dumps(("error", text, original))


def main(
    rank: int,
    world_size: int,
    store_path: str,
    backend: str,
    conn: Connection,
    stack_path: str,
    threads: int,
    start_timeout_s: float,
) -> None:
    """Worker entry point: set up, report ready, then serve requests until told to stop."""
    stack_file = open(stack_path, "w")  # noqa: SIM115 - stays open for faulthandler for the process lifetime
    faulthandler.register(STACK_SIGNAL, file=stack_file, all_threads=True)
    torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=start_timeout_s)
        )
        conn.send_bytes(pickle.dumps((READY, None)))
    except BaseException:
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc(), None)))
        return
    default_dtype = torch.get_default_dtype()
    while True:
        try:
            header = conn.recv_bytes()
        except (EOFError, OSError):
            os._exit(1)  # the parent is gone: nobody to barrier with
        if header == STOP:
            break
        payload = conn.recv_bytes()
        reply = _outcome(header, payload)
        torch.set_default_dtype(default_dtype)
        torch.set_grad_enabled(True)
        conn.send_bytes(reply)
    dist.barrier()
    dist.destroy_process_group()
