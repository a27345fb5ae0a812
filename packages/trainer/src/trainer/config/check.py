"""``check_run``: the rules that involve several sections and the world size, checked before launch."""

from __future__ import annotations

from pp_sched import PipelineScheduleError, build
from pp_sched.schedules import PAIRED_SCHEDULES
from pstate import ParallelConfigError, layout

from ..errors import TrainerError
from .fast_paths import check_fast_paths
from .resolved import COMPUTE_DTYPES, RunPlan, param_dtype
from .run import RunConfig


def _moe_overlap_rules(cfg: RunConfig) -> list[tuple[bool, str]]:
    """What ``train.moe_overlap`` (MoE all-to-alls hidden behind another micro-batch) needs, and why."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if not t.moe_overlap:
        return []
    flag = "train.moe_overlap=true"
    return [
        (p.ep == 1, f"{flag} needs parallel.ep > 1, got ep={p.ep}: with one EP rank there is no all-to-all to hide"),
        (
            m.num_experts > 0 and m.moe_dispatcher != "alltoall",
            f"{flag} needs model.moe_dispatcher='alltoall', got {m.moe_dispatcher!r}",
        ),
        (
            p.pp > 1 and t.pipeline_schedule not in PAIRED_SCHEDULES,
            f"{flag} needs a schedule with overlapped pairs ({', '.join(PAIRED_SCHEDULES)}), got "
            f"--pipeline-schedule {t.pipeline_schedule}",
        ),
        (
            t.precision != "fp32",
            f"{flag} with train.precision={t.precision!r} is not supported yet (the cut chunks run outside autocast)",
        ),
        (
            m.dropout > 0,
            f"{flag} needs model.dropout=0, got {m.dropout}: interleaved micro-batches would draw their dropout masks "
            "in another order",
        ),
        (t.recompute == "full", f"{flag} with train.recompute='full' is not supported (cut layers are not recomputed)"),
        (t.zero == 3, f"{flag} with --zero 3 is not supported (the cut layers bypass FSDP's per-layer gathers)"),
        (m.mtp_depth > 0, f"{flag} with model.mtp_depth={m.mtp_depth} is not supported yet"),
        (m.layer_pattern is not None, f"{flag} with a hybrid model.layer_pattern is not supported yet"),
    ]


def _mtp_rules(cfg: RunConfig) -> list[tuple[bool, str]]:
    """What multi-token prediction (``model.mtp_depth > 0``) does not combine with, and why."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if not m.mtp_depth:
        return []
    mtp = f"model.mtp_depth={m.mtp_depth}"
    return [
        (p.cp > 1, f"{mtp} with cp={p.cp} is not supported: the tokens t+k it embeds live on other CP ranks"),
        (
            cfg.data.packing != "none",
            f"{mtp} with data.packing={cfg.data.packing!r} is not supported: its shifted targets would cross documents",
        ),
        (
            p.pp > 1 and not m.tied_embeddings,
            f"{mtp} with pp={p.pp} needs model.tied_embeddings=true: the last stage embeds the tokens t+k, and only "
            "a tied embedding has a copy there",
        ),
        (
            t.zero == 3,
            f"{mtp} with --zero 3 is not supported yet (the MTP modules run in the loss, outside FSDP's units)",
        ),
        (m.mtp_depth >= t.seq_len, f"{mtp} must be below seq_len={t.seq_len}"),
        (
            m.layer_pattern is not None,
            f"{mtp} with a hybrid model.layer_pattern is not supported yet (the MTP blocks are transformer layers)",
        ),
    ]


def _cp_attention_rules(cfg: RunConfig) -> list[tuple[bool, str]]:
    """What the all-to-all context-parallel attentions need: each splits every TP rank's query and key/value
    heads over its all-to-all group (Ulysses: the whole CP group; hierarchical: ``parallel.cp_a2a`` ranks)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    heads, kv_heads = m.heads // p.tp, m.num_kv_heads // p.tp  # per TP rank (tp | kv heads is checked before)
    a2a = {"ulysses": ("parallel.cp", p.cp), "hierarchical": ("parallel.cp_a2a", p.cp_a2a)}.get(t.cp_attention)
    hierarchical = t.cp_attention == "hierarchical"
    rules = [
        (
            p.cp_a2a > 1 and not hierarchical,
            f"parallel.cp_a2a={p.cp_a2a} is the inner all-to-all group of train.cp_attention='hierarchical', but "
            f"train.cp_attention={t.cp_attention!r}; set cp_attention='hierarchical' or leave cp_a2a at 1",
        ),
        (
            hierarchical and p.cp > 1 and p.cp_a2a == 1,
            f"train.cp_attention='hierarchical' with cp={p.cp} needs parallel.cp_a2a > 1 (the size of the inner "
            "all-to-all group, a divisor of cp; cp_a2a=1 is plain ring attention)",
        ),
    ]
    if a2a is not None and p.cp > 1:
        field, size = a2a
        rules.append(
            (
                heads % size or kv_heads % size,
                f"{field}={size} must divide the query heads ({heads}) and key/value heads ({kv_heads}) per TP rank "
                f"(tp={p.tp}): train.cp_attention={t.cp_attention!r} splits each TP rank's heads over {size} ranks",
            )
        )
    return rules


def check_run(cfg: RunConfig, world_size: int) -> RunPlan:
    """Raise :class:`TrainerError` naming the rule a run breaks; return the resolved :class:`RunPlan`
    (layout sizes, HSDP and hierarchical-CP groups, CP attention, layers per stage,
    ``microbatches = global_batch / (micro_batch * dp)``, dtypes, schedule)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    check_fast_paths(cfg)
    try:
        lay = layout(p, world_size)
    except ParallelConfigError as error:
        raise TrainerError(str(error)) from None
    dp = lay.sizes["dp"]
    rules = [
        (t.sequence_parallel and p.tp == 1, "--sequence-parallel needs --tp > 1"),
        (
            t.keep_gathered_input and not t.sequence_parallel,
            "train.keep_gathered_input=true needs --sequence-parallel: only then is a layer's input gathered",
        ),
        (
            m.num_kv_heads % p.tp != 0,
            f"tp={p.tp} must divide the model's {m.num_kv_heads} {'' if m.attention == 'mla' else 'key/value '}heads",
        ),
        (m.ffn % p.tp != 0, f"tp={p.tp} must divide the model's FFN size {m.ffn}"),
        (
            "M" in (m.layer_pattern or "") and m.mamba_groups % (p.tp * p.cp) != 0,
            f"tp*cp={p.tp * p.cp} must divide the model's mamba_groups ({m.mamba_groups}): TP and CP split its heads",
        ),
        (
            m.layer_pattern is not None and cfg.data.packing != "none",
            f"data.packing={cfg.data.packing!r} with a hybrid model (model.layer_pattern) is not supported yet: the "
            "Mamba scan would carry its state across documents",
        ),
        (
            p.pipeline_layout is None and m.layers % (p.pp * p.vpp) != 0,
            f"layers={m.layers} must be divisible by pp*vpp={p.pp * p.vpp} (or set parallel.pipeline_layout)",
        ),
        (
            p.pipeline_layout is not None and sum(p.pipeline_layout) != m.layers,
            f"parallel.pipeline_layout={list(p.pipeline_layout or ())} sums to {sum(p.pipeline_layout or ())} "
            f"layers, but the model has layers={m.layers}",
        ),
        (p.cp > 1 and t.seq_len % (2 * p.cp) != 0, f"seq_len={t.seq_len} must be divisible by 2*cp={2 * p.cp}"),
        *_cp_attention_rules(cfg),
        (
            t.sequence_parallel and t.seq_len // p.cp % p.tp != 0,
            f"seq_len/cp={t.seq_len // p.cp} must be divisible by tp={p.tp} for sequence parallelism",
        ),
        (p.ep > 1 and m.num_experts == 0, f"ep={p.ep} needs a model with experts (model.num_experts > 0)"),
        (m.num_experts and m.num_experts % p.ep != 0, f"ep={p.ep} must divide the {m.num_experts} experts"),
        (m.num_experts and m.moe_ffn % p.etp != 0, f"etp={p.etp} must divide the expert FFN size {m.moe_ffn}"),
        (
            m.num_experts and p.tp > 1 and not t.sequence_parallel,
            "MoE with tp > 1 needs --sequence-parallel (each TP rank routes its own tokens)",
        ),
        (
            m.position == "learned" and t.seq_len > m.max_seq_len,
            f"seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}",
        ),
        (
            p.dp_shard is not None and p.dp_shard != dp and t.zero != 3,
            f"parallel.dp_shard={p.dp_shard} (HSDP) needs train.zero=3; with zero={t.zero} leave it out",
        ),
        *_mtp_rules(cfg),
        *_moe_overlap_rules(cfg),
        (
            t.eval_every > 0 and cfg.data.valid_fraction == 0,
            f"train.eval_every={t.eval_every} needs a validation set: set data.valid_fraction > 0",
        ),
    ]
    for broken, rule in rules:
        if broken:
            raise TrainerError(rule)
    global_batch = t.global_batch or t.micro_batch * dp
    if global_batch % (t.micro_batch * dp):
        raise TrainerError(
            f"global_batch={global_batch} must be divisible by micro_batch*dp={t.micro_batch}*{dp}={t.micro_batch * dp}"
        )
    microbatches = global_batch // (t.micro_batch * dp)
    if p.pp > 1:
        try:
            schedule = build(t.pipeline_schedule, pp=p.pp, microbatches=microbatches, vpp=p.vpp, overlap=t.moe_overlap)
        except PipelineScheduleError as error:
            raise TrainerError(f"--pipeline-schedule {t.pipeline_schedule}: {error}") from None
        if t.zero == 3 and any(a.kind == "W" for actions in schedule.actions for a in actions):
            raise TrainerError(
                f"--zero 3 with --pipeline-schedule {t.pipeline_schedule} is not supported yet (its weight-gradient "
                "pass runs after FSDP has freed the layer's gathered weights); use 1f1b, interleaved-1f1b or gpipe"
            )
    sizes = lay.sizes
    return RunPlan(
        world_size=world_size, tp=sizes["tp"], pp=sizes["pp"], vpp=p.vpp, cp=sizes["cp"], ep=sizes["ep"],
        etp=sizes["etp"], dp=dp, edp=sizes["edp"], dp_shard=lay.dp_shard, cp_a2a=p.cp_a2a,
        cp_attention=t.cp_attention, pipeline_layout=p.pipeline_layout, micro_batch=t.micro_batch,
        microbatches=microbatches,
        global_batch=global_batch, seq_len=t.seq_len, precision=t.precision,
        param_dtype=param_dtype(t.precision, t.zero), compute_dtype=COMPUTE_DTYPES[t.precision],
        grad_reduce_dtype=t.grad_reduce_dtype, zero=t.zero,
        sequence_parallel=t.sequence_parallel, schedule=t.pipeline_schedule if p.pp > 1 else None,
    )  # fmt: skip
