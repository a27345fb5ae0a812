"""Time of one training step for one layout, broken down into compute, exposed and hidden communication,
pipeline bubble and the optimizer.

- **Compute** is FLOPs over an attainable fraction of the peak, per operation class (dense matmuls,
  fused attention, grouped expert matmuls; the hardware profile states each fraction), plus the
  memory-bound element-wise work (the activations written and read again, over HBM bandwidth).
  Backward is two forwards; full recomputation adds a forward of the layers, selective the attention core.
- **Collectives** take ``volume / (bandwidth * link_efficiency) + steps * latency``, with ring volumes
  per GPU: all-reduce ``2(n-1)/n``, all-gather / reduce-scatter / all-to-all ``(n-1)/n`` of the data.
  A group uses the intra-node link when its ranks fit in one node, else the per-GPU network.
  Every data-parallel mode reduces the gradients once per step (ZeRO-1/2 over gloo with an all-reduce,
  which that backend runs faster than its reduce-scatter).
- **Overlap**, as this trainer does it: TP/SP collectives are exposed in forward; in backward they run
  while the weight gradients are computed. The CP ring overlaps the attention core; Ulysses and EP
  all-to-alls are exposed. The gradient reduction overlaps the last micro-batch's backward;
  the ZeRO-1/2 parameter all-gather after the step is exposed; ZeRO-3's per-micro-batch gathers and
  reduce-scatters overlap that micro-batch's compute (prefetch). Pipeline p2p is hidden except during
  fill and drain. The **bubble** is the simulator's mean idle time per rank, in micro-batch units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model import ModelConfig
from ..train.flops import flops_per_token
from .hardware import Hardware
from .layout import Layout, Workload
from .memory import layer_activations, moe_layers, stage_params
from .pipeline import PipelineCost


@dataclass(frozen=True)
class StepTime:
    """Seconds per step: ``parts`` add up to ``step``; ``hidden`` is communication overlapped by compute."""

    parts: dict[str, float]
    hidden: dict[str, float] = field(default_factory=dict)
    traffic: dict[str, float] = field(default_factory=dict)  # bytes one GPU sends per step, by axis

    @property
    def step(self) -> float:
        return sum(self.parts.values())


def ring_bytes(kind: str, nbytes: float, n: int) -> float:
    """Bytes one rank sends in a ring collective of ``nbytes`` (the whole tensor) over ``n`` ranks."""
    if n <= 1:
        return 0.0
    return {"all-reduce": 2 * (n - 1) / n, "gather": (n - 1) / n, "p2p": 1.0}[kind] * nbytes


def collective(kind: str, nbytes: float, n: int, gbps: float, latency_us: float, efficiency: float) -> float:
    """Seconds for one ring collective of ``nbytes`` (the whole tensor) over ``n`` ranks."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    steps = {"all-reduce": 2 * (n - 1), "gather": n - 1, "p2p": 1}[kind]
    return ring_bytes(kind, nbytes, n) / (gbps * 1e9 * efficiency) + steps * latency_us * 1e-6


def layer_flops(m: ModelConfig, seq_len: int, moe: bool) -> dict[str, float]:
    """Forward FLOPs per token of one layer by class (the attention core counted over the full sequence)."""
    h, q, kv = m.hidden, m.heads * m.head_dim, m.num_kv_heads * m.head_dim
    mats = 3 if m.mlp == "swiglu" else 2
    out = {"matmul": 2 * h * (q + 2 * kv) + 2 * q * h, "attention": 4 * seq_len * q, "experts": 0.0}
    if moe:
        out["matmul"] += 2 * h * m.num_experts + 2 * h * (m.moe_shared_ffn_hidden or 0) * mats
        out["experts"] = m.moe_topk * 2 * h * m.moe_ffn * mats
    else:
        out["matmul"] += 2 * h * m.ffn * mats
    return out


def step_time(work: Workload, L: Layout, hw: Hardware, pipe: PipelineCost) -> StepTime:
    m, gpn, eff = work.model, hw.gpus_per_node, hw.link_efficiency
    peak = hw.peak_flops(work.precision)
    act = 4 if work.precision == "fp32" else 2
    s_local, b = work.seq_len // L.cp, L.micro_batch
    tokens = s_local * b  # per micro-batch on one GPU of a TP group, before the TP split of the work
    layers = m.layers // L.pp
    moe = moe_layers(m, layers)
    fwd = {"matmul": 0.0, "attention": 0.0, "experts": 0.0}
    for is_moe, count in ((False, layers - moe), (True, moe)):
        for kind, flops in layer_flops(m, work.seq_len, is_moe).items():
            fwd[kind] += count * flops * tokens / L.tp
    head = 2 * m.hidden * (m.vocab_size or 0) * tokens / L.tp
    rate = {"matmul": hw.matmul_efficiency, "attention": hw.attention_efficiency, "experts": hw.expert_efficiency}
    secs = {k: 3 * v / (peak * rate[k]) for k, v in fwd.items()}
    secs["matmul"] += 3 * head / (peak * hw.matmul_efficiency)
    if L.recompute == "full":
        recompute = sum(v / (peak * rate[k]) for k, v in fwd.items())
    elif L.recompute == "selective":
        recompute = fwd["attention"] / (peak * rate["attention"])
    else:
        recompute = 0.0
    activations = sum(
        count * layer_activations(m, s_local, b, L.tp, sp=L.sequence_parallel, act_bytes=act, moe=is_moe)
        for is_moe, count in ((False, layers - moe), (True, moe))
    )
    memory_bound = 3 * activations / (hw.hbm_gbps * 1e9)
    compute_mb = sum(secs.values()) + recompute + memory_bound

    # tensor and sequence parallelism: 2 all-reduce-sized exchanges per layer in forward, 2 in backward
    # (3 with SP: the column-parallel layers gather their input again rather than keep it)
    tp_bytes = tokens * m.hidden * act
    tp_one = collective("all-reduce", tp_bytes, L.tp, hw.intra_node_gbps, hw.intra_node_latency_us, eff)
    fwd_count = 2 * (2 if L.recompute == "full" else 1)
    bwd_count = 3 if L.sequence_parallel else 2
    tp_fwd = fwd_count * layers * tp_one + (1.0 + (1.0 if L.pp == 1 else 0.0)) * tp_one  # embedding, head
    tp_bwd = bwd_count * layers * tp_one
    wgrad = secs["matmul"] / 3  # the weight-gradient matmuls the backward collectives overlap
    tp_bwd_exposed = max(0.0, tp_bwd - wgrad)

    cp_link = (hw.intra_node_gbps, hw.intra_node_latency_us) if L.tp * L.cp <= gpn else (
        hw.inter_node_gbps, hw.inter_node_latency_us)  # fmt: skip
    kv_bytes = tokens * 2 * m.num_kv_heads * m.head_dim * act / L.tp
    cp_volume = 0.0
    if L.cp == 1:
        cp_total = cp_exposed = 0.0
    elif work.cp_attention == "ulysses":
        qkvo = tokens * (2 * m.heads + 2 * m.num_kv_heads) * m.head_dim * act / L.tp
        cp_total = cp_exposed = 2 * layers * collective("gather", qkvo, L.cp, *cp_link, eff)
        cp_volume = 2 * layers * ring_bytes("gather", qkvo, L.cp)
    elif work.cp_attention == "hierarchical":  # Ulysses' all-to-alls over cp_a2a, a ring of cp/cp_a2a blocks
        a, r = L.cp_a2a, L.cp // L.cp_a2a
        a2a_link = (hw.intra_node_gbps, hw.intra_node_latency_us) if L.tp * a <= gpn else cp_link
        qkvo = tokens * (2 * m.heads + 2 * m.num_kv_heads) * m.head_dim * act / L.tp
        a2a_total = 2 * layers * collective("gather", qkvo, a, *a2a_link, eff)
        ring_total = layers * (3 * r - 2) * collective("p2p", kv_bytes, 2, *cp_link, eff) if r > 1 else 0.0
        cp_total = a2a_total + ring_total
        cp_exposed = a2a_total + max(0.0, ring_total - secs["attention"])
        cp_volume = 2 * layers * ring_bytes("gather", qkvo, a) + (layers * (3 * r - 2) * kv_bytes if r > 1 else 0.0)
    else:  # ring: cp-1 K/V blocks in forward; in backward cp-1 K/V blocks and cp gradient blocks (home)
        per_block = collective("p2p", kv_bytes, 2, *cp_link, eff)
        cp_total = layers * (3 * L.cp - 2) * per_block
        cp_volume = layers * (3 * L.cp - 2) * kv_bytes
        cp_exposed = max(0.0, cp_total - secs["attention"])

    ep_link = (hw.intra_node_gbps, hw.intra_node_latency_us) if L.etp * L.ep <= gpn else (
        hw.inter_node_gbps, hw.inter_node_latency_us)  # fmt: skip
    rows = m.moe_topk * tokens / (L.tp if L.sequence_parallel else 1)
    ep_total = 4 * moe * collective("gather", rows * m.hidden * act, L.ep, *ep_link, eff)

    critical_mb = compute_mb + tp_fwd + tp_bwd_exposed + cp_exposed + ep_total
    microbatches = L.microbatches(work.global_batch)
    # the vocabulary-parallel embedding (stage 0) and head (last stage): one all-reduce-sized exchange
    # each, the head one and a half with SP (its input gathered again in backward)
    tp_volume = ring_bytes("all-reduce", tp_bytes, L.tp)
    vocab_count = 1.0 + ((1.5 if L.sequence_parallel else 1.0) if L.pp == 1 else 0.0)
    traffic = {
        "tp": microbatches * ((fwd_count + bwd_count) * layers + vocab_count) * tp_volume,
        "cp": microbatches * cp_volume,
        "ep": microbatches * 4 * moe * ring_bytes("gather", rows * m.hidden * act, L.ep),
    }
    parts = {
        "compute": microbatches * (sum(secs.values()) + memory_bound),
        "recompute": microbatches * recompute,
        "tp/sp exposed": microbatches * (tp_fwd + tp_bwd_exposed),
        "cp exposed": microbatches * cp_exposed,
        "ep all-to-all": microbatches * ep_total,
        "pipeline bubble": pipe.idle * critical_mb,
    }
    hidden = {"tp/sp": microbatches * (tp_bwd - tp_bwd_exposed), "cp": microbatches * (cp_total - cp_exposed)}

    p2p_link = (hw.intra_node_gbps, hw.intra_node_latency_us) if L.world // L.pp < gpn else (
        hw.inter_node_gbps, hw.inter_node_latency_us)  # fmt: skip
    shared = L.tp if L.sequence_parallel else 1
    p2p_one = collective("p2p", tokens * m.hidden * act / shared, 2, *p2p_link, eff) if L.pp > 1 else 0.0
    parts["pipeline p2p exposed"] = 2 * (L.pp - 1) * p2p_one
    # what stage 0 sends: activations forward for each chunk, gradients back for all but its first
    traffic["pp"] = microbatches * (2 * L.vpp - 1) * tokens * m.hidden * act / shared if L.pp > 1 else 0.0
    hidden["pipeline p2p"] = max(0.0, 2 * microbatches * L.vpp * p2p_one - parts["pipeline p2p exposed"])

    dense, expert, _ = stage_params(m, L)
    d, e = L.dp * L.cp, L.edp
    dp_link = (hw.intra_node_gbps, hw.intra_node_latency_us) if L.tp * d <= gpn else (
        hw.inter_node_gbps, hw.inter_node_latency_us)  # fmt: skip
    edp_link = (hw.intra_node_gbps, hw.intra_node_latency_us) if L.world // L.pp <= gpn else dp_link

    def over(kind: str, nbytes_dense: float, nbytes_expert: float) -> float:
        return collective(kind, nbytes_dense, d, *dp_link, eff) + collective(kind, nbytes_expert, e, *edp_link, eff)

    def volume(kind: str) -> float:
        return ring_bytes(kind, 4 * dense, d) + ring_bytes(kind, 4 * expert, e)

    last_backward = 2 / 3 * critical_mb
    # DDP all-reduces; ZeRO reduce-scatters (ZeRO-1/2 over gloo: an all-reduce, its own shard kept)
    kind = "gather" if L.zero == 3 or (L.zero and work.backend != "gloo") else "all-reduce"
    reduce = over(kind, 4 * dense, 4 * expert)  # once per step, in the last micro-batch's backward
    exposed = max(0.0, reduce - last_backward)
    traffic["dp"] = volume(kind)
    if L.zero in (1, 2):  # the updated parameters gathered after the step
        gather = over("gather", 4 * dense, 4 * expert)
        traffic["dp"] += volume("gather")
        exposed += gather
        hidden["data parallel"] = reduce + gather - exposed
    elif L.zero == 3:  # parameters gathered for every micro-batch's forward and backward (prefetched)
        per_mb = 2 * over("gather", 4 * dense, 4 * expert)
        traffic["dp"] += 2 * microbatches * volume("gather")
        exposed += microbatches * max(0.0, per_mb - critical_mb)
        hidden["data parallel"] = reduce + microbatches * per_mb - exposed
    else:
        hidden["data parallel"] = reduce - exposed
    parts["data parallel exposed"] = exposed
    shard = 1 if L.zero == 0 else None
    local = dense / (shard or d) + expert / (shard or e)
    parts["optimizer"] = 28 * local / (hw.hbm_gbps * 1e9)  # AdamW reads p, g, m, v and writes p, m, v (fp32)
    return StepTime(parts, hidden, traffic)


def model_flops(work: Workload) -> float:
    """Model FLOPs of one step (no recomputation), as MFU counts them."""
    return flops_per_token(work.model, work.seq_len) * work.seq_len * work.global_batch
