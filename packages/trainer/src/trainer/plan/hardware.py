"""Hardware profiles: one GPU model and its links, read from TOML (the packaged ``profiles/`` or a user file).

A profile gives datasheet numbers (dense peak FLOP/s, memory, HBM bandwidth, per-GPU intra-node and
inter-node bandwidth per direction and a latency per message step) and the planner's assumptions on top
of them (the attainable fraction of peak per operation class, the bus efficiency of collectives, the
memory the framework keeps for itself). The assumptions have defaults here; a file may override any.
``device_names`` are substrings of ``torch.cuda.get_device_name()`` that identify the model: the training
loop takes its MFU peak from the same profile (:mod:`trainer.train.peak`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import tomllib

from ..errors import TrainerError


@dataclass(frozen=True)
class Hardware:
    """One GPU model in its node. Bandwidths are GB/s (1e9 bytes) per GPU and direction."""

    name: str
    memory_gib: float
    bf16_tflops: float
    fp32_tflops: float
    hbm_gbps: float
    intra_node_gbps: float
    inter_node_gbps: float
    fp8_tflops: float = 0.0
    vendor: str = ""
    device_names: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name() naming this model
    gpus_per_node: int = 8
    intra_node_latency_us: float = 5.0
    inter_node_latency_us: float = 15.0
    matmul_efficiency: float = 0.70  # dense GEMMs of transformer sizes
    attention_efficiency: float = 0.45  # fused (flash) attention, forward and backward
    expert_efficiency: float = 0.55  # grouped expert GEMMs: smaller, uneven
    link_efficiency: float = 0.80  # bus bandwidth a ring collective reaches over the nominal
    framework_gib: float = 2.0  # CUDA/HIP context, library workspaces, communicator buffers
    fragmentation: float = 0.05  # share of the memory the caching allocator cannot hand out

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and (not isinstance(value, (int, float)) or value < 0):
                raise TrainerError(f"hardware {self.name!r}: {f.name}={value!r} must be a number >= 0")
        for name in ("memory_gib", "bf16_tflops", "fp32_tflops", "hbm_gbps", "intra_node_gbps", "inter_node_gbps"):
            if not getattr(self, name) > 0:
                raise TrainerError(f"hardware {self.name!r}: {name}={getattr(self, name)!r} must be > 0")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise TrainerError(f"hardware {self.name!r}: gpus_per_node={self.gpus_per_node!r} must be an integer >= 1")

    def peak_flops(self, precision: str) -> float:
        """Dense peak FLOP/s for the training precision: ``fp32`` runs on TF32-class units, ``fp16`` at the
        ``bf16`` rate, ``fp8`` at the ``fp8`` rate where the GPU has FP8 units (else at ``bf16``'s)."""
        return 1e12 * getattr(self, f"{self.peak_dtype(precision)}_tflops")

    def peak_dtype(self, precision: str) -> str:
        """Which of the profile's peaks ``precision`` runs at: ``fp32`` (TF32), ``bf16`` or ``fp8``."""
        if precision == "fp32":
            return "fp32"
        return "fp8" if precision == "fp8" and self.fp8_tflops > 0 else "bf16"

    @property
    def usable_bytes(self) -> float:
        """What the model may use: the memory less the allocator's fragmentation and the framework."""
        return self.memory_gib * 2**30 * (1 - self.fragmentation) - self.framework_gib * 2**30

    def with_overrides(self, **changes: object) -> Hardware:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def known_hardware() -> list[str]:
    """The names of the packaged profiles."""
    folder = resources.files("trainer.plan") / "profiles"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_hardware(name_or_path: str) -> Hardware:
    """A packaged profile by name (``h100-sxm``) or a TOML file by path; unknown names list the known."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise TrainerError(f"--hardware {name_or_path}: no such file")
        text, source = path.read_text(), str(path)
    else:
        if name_or_path not in known_hardware():
            raise TrainerError(
                f"--hardware {name_or_path!r}: unknown; known profiles are {', '.join(known_hardware())} "
                "(or give the path of a TOML file)"
            )
        text = (resources.files("trainer.plan") / "profiles" / f"{name_or_path}.toml").read_text()
        source = name_or_path
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise TrainerError(f"hardware {source}: invalid TOML: {error}") from None
    known = {f.name for f in dataclasses.fields(Hardware)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TrainerError(f"hardware {source}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    raw.setdefault("name", path.stem if path.suffix else name_or_path)
    names = raw.get("device_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise TrainerError(f"hardware {source}: device_names={names!r} must be a list of non-empty strings")
    raw["device_names"] = tuple(names)
    try:
        return Hardware(**raw)
    except TypeError as error:
        raise TrainerError(f"hardware {source}: {error}") from None
