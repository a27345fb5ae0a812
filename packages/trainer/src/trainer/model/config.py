"""``ModelConfig``: the shape and the choices of the decoder-only transformer, and the named presets."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import TrainerError
from .router_checks import check_router

CHOICES = {
    "norm": ("layernorm", "rmsnorm"),
    "position": ("learned", "rotary"),
    "mlp": ("gelu", "swiglu"),
    "moe_dispatcher": ("alltoall", "allgather", "flex"),
    "rope_type": ("default", "linear", "llama3", "yarn"),
    "moe_score": ("softmax", "sigmoid"),
    "moe_drop_policy": ("probs", "position"),
    "attention": ("standard", "mla"),
    "backend": ("torch", "te"),
}

LAYER_KINDS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
"""The characters of ``ModelConfig.layer_pattern`` and the block each one stands for."""


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-style decoder. ``kv_heads < heads`` is grouped-query attention; ``num_experts > 0`` makes
    every ``moe_every``-th layer (layers ``0, k, 2k, ...``) a mixture of experts, except the first
    ``moe_first_dense`` layers.

    ``vocab_size=None`` takes the tokenizer's size when the model is built for training.
    ``ffn_hidden=None`` is ``4*hidden`` for GELU and ``8/3*hidden`` rounded up to a multiple of 64 for
    SwiGLU (the same parameter count). ``kv_channels``: the width of one attention head when it is not
    ``hidden/heads``.

    ``bias`` puts biases on every linear layer and LayerNorm (GPT-2); ``qkv_bias``, ``proj_bias`` and
    ``mlp_bias`` override it for the query/key/value projection, the attention output projection and the
    MLP (``None``: follow ``bias``). ``qk_norm``: RMSNorm over each query and key head before the rotary
    embedding (Qwen3). ``rope_type``: ``"default"``, ``"linear"`` (positions divided by ``rope_factor``) or
    ``"llama3"`` (Llama 3.1's frequency-dependent scaling with ``rope_factor``, ``rope_low_freq_factor``,
    ``rope_high_freq_factor`` and ``rope_original_max_len``) or ``"yarn"`` (YaRN, as DeepSeek-V3: frequencies
    blended between kept and divided by ``rope_factor`` by ``rope_beta_fast``/``rope_beta_slow``, cos and sin
    scaled by an attention factor from ``rope_mscale``/``rope_mscale_all_dim``, where
    ``mscale(m) = 0.1*m*ln(rope_factor) + 1``).

    Mixture of experts: ``moe_norm_topk`` renormalises the chosen experts' probabilities to sum to one
    (else they are the softmax over all experts); ``moe_shared_ffn_hidden`` adds a shared expert every
    token goes through, scaled by a sigmoid gate with ``moe_shared_gate``. The router's options
    (score function, group-limited top-k, z-loss, aux-loss-free expert bias, capacity) follow
    DeepSeek-V3's names and meanings; :mod:`trainer.model.router_checks` validates them.

    ``attention="mla"``: DeepSeek-V2/V3's multi-latent attention (``trainer.model.mla``): keys and values
    are up-projected per head from one compressed latent of ``kv_lora_rank`` per token (the KV cache
    stores that latent and the ``qk_rope_head_dim`` rotary key shared by all heads); ``head_dim`` is then
    ``qk_nope_head_dim + qk_rope_head_dim``.

    Hybrid models: ``layer_pattern`` gives each layer one block, ``M`` (Mamba-2, shaped by the ``mamba_*``
    fields), ``*`` (attention), ``-`` (MLP) or ``E`` (mixture of experts); see ``trainer.model.hybrid``.

    ``mtp_depth > 0``: DeepSeek-V3's multi-token prediction on the last pipeline stage
    (``trainer.model.mtp``); its loss, weighted by ``mtp_loss_weight``, is added to the main loss.
    """

    hidden: int
    """model width."""
    layers: int
    """transformer layers."""
    heads: int
    """attention heads."""
    kv_heads: int | None = None
    """key/value heads, fewer than heads for grouped-query attention (default: heads)."""
    ffn_hidden: int | None = None
    """MLP width (default: 4*hidden for gelu, 8/3*hidden rounded up to 64 for swiglu)."""
    vocab_size: int | None = None
    """vocabulary size (default: the tokenizer's)."""
    max_seq_len: int = 1024
    """longest sequence (the size of learned position embeddings)."""
    norm: str = "rmsnorm"
    """normalization layer."""
    norm_eps: float = 1e-5
    """normalization epsilon."""
    position: str = "rotary"
    """position encoding."""
    rope_theta: float = 10000.0
    """rotary base frequency."""
    rope_type: str = "default"
    """rotary scaling: default (none), linear (positions divided by rope_factor) or llama3 (Llama 3.1's)."""
    rope_factor: float = 1.0
    """rotary scaling factor (linear and llama3)."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling's low-frequency factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling's high-frequency factor."""
    rope_original_max_len: int | None = None
    """llama3 and yarn scaling's original context length (default: max_seq_len)."""
    rope_beta_fast: float = 32.0
    """yarn: rotations over the original context above which a frequency is kept (extrapolated)."""
    rope_beta_slow: float = 1.0
    """yarn: rotations over the original context below which a frequency is divided by rope_factor."""
    rope_mscale: float = 0.0
    """yarn: with rope_mscale_all_dim, the rotary attention factor is mscale(rope_mscale)/mscale(all_dim)
    (0: the factor is mscale(1) = 0.1*ln(rope_factor) + 1)."""
    rope_mscale_all_dim: float = 0.0
    """yarn: MLA's softmax scale is multiplied by mscale(rope_mscale_all_dim)**2 (DeepSeek; 0: not)."""
    kv_channels: int | None = None
    """width of one attention head (default: hidden/heads)."""
    mlp: str = "swiglu"
    """MLP kind."""
    bias: bool = False
    """biases on every linear layer and LayerNorm (GPT-2)."""
    qkv_bias: bool | None = None
    """biases on the query/key/value projection (default: bias)."""
    proj_bias: bool | None = None
    """biases on the attention output projection (default: bias)."""
    mlp_bias: bool | None = None
    """biases in the MLP (default: bias)."""
    qk_norm: bool = False
    """RMSNorm over each query and key head before the rotary embedding (Qwen3)."""
    tied_embeddings: bool = False
    """the output layer shares the input embedding's weights."""
    dropout: float = 0.0
    """dropout probability."""
    init_std: float = 0.02
    """standard deviation of the weights' normal initialization."""
    vocab_pad_multiple: int = 1
    """pad the vocabulary to a multiple of this (times tp)."""
    num_experts: int = 0
    """experts per MoE layer (0: a dense model)."""
    moe_topk: int = 2
    """experts each token is routed to."""
    moe_every: int = 1
    """every k-th layer is a mixture of experts (layers 0, k, 2k, ...)."""
    moe_first_dense: int = 0
    """the first k layers stay dense whatever moe_every says (DeepSeek-V3's first_k_dense_replace)."""
    moe_ffn_hidden: int | None = None
    """expert MLP width (default: ffn_hidden)."""
    moe_aux_loss_coeff: float = 0.0
    """weight of the router's load-balancing loss."""
    moe_dispatcher: str = "alltoall"
    """how tokens reach their experts (flex: DeepEP's fused kernels, needs the deep_ep package and GPUs)."""
    moe_norm_topk: bool = True
    """renormalize the chosen experts' probabilities to sum to one (else: the softmax over all experts)."""
    moe_shared_ffn_hidden: int | None = None
    """width of a shared expert every token goes through (default: none)."""
    moe_shared_gate: bool = False
    """scale the shared expert's output by a sigmoid gate."""
    moe_score: str = "softmax"
    """router score function: softmax, or sigmoid (DeepSeek-V3's scoring_func)."""
    moe_num_groups: int = 1
    """expert groups of consecutive experts for group-limited routing (DeepSeek-V3's n_group; 1: no limit)."""
    moe_topk_groups: int | None = None
    """groups a token routes into: its best by the sum of each group's top-2 scores (topk_group; default: all)."""
    moe_routed_scaling: float = 1.0
    """factor on the routed experts' weights, after renormalization (DeepSeek-V3's routed_scaling_factor)."""
    moe_z_loss_coeff: float = 0.0
    """weight of the router's z-loss (mean squared log-sum-exp of the router logits)."""
    moe_expert_bias: bool = False
    """aux-loss-free balancing: a per-expert bias added to the scores to choose the experts only, moved after
    each optimizer step toward equal load (DeepSeek-V3's e_score_correction_bias; saved in checkpoints)."""
    moe_expert_bias_rate: float = 1e-3
    """how far each step moves the expert bias: bias += rate * sign(mean load - expert's load)."""
    moe_capacity_factor: float | None = None
    """each expert takes at most ceil(tokens*topk/num_experts*factor) of a rank's micro-batch tokens
    (default: dropless)."""
    moe_drop_policy: str = "probs"
    """tokens over an expert's capacity dropped first: the lowest-probability (probs) or the latest (position)."""
    moe_pad_to_capacity: bool = False
    """fill every expert up to exactly its capacity with zero-weight rows: static shapes, the same results."""
    attention: str = "standard"
    """attention kind: standard (multi-head or grouped-query) or mla (DeepSeek's multi-latent attention)."""
    q_lora_rank: int | None = None
    """MLA: width of the compressed query latent (default: none, queries projected directly from hidden)."""
    kv_lora_rank: int = 512
    """MLA: width of the compressed key/value latent (the KV cache stores it per token)."""
    qk_nope_head_dim: int = 128
    """MLA: per-head query/key width without rotary positions."""
    qk_rope_head_dim: int = 64
    """MLA: per-head query/key width with rotary positions (one rotary key shared by all heads)."""
    v_head_dim: int = 128
    """MLA: per-head value width."""
    rope_interleave: bool = False
    """rotary dimensions taken as interleaved pairs (DeepSeek's weights) instead of two halves."""
    backend: str = "torch"
    """layer implementation: torch (plain PyTorch) or te (Transformer Engine modules; GPUs only)."""
    layer_pattern: str | None = None
    """hybrid model, one character per layer: M Mamba-2, * attention, - MLP, E mixture of experts (each layer
    is norm, block, residual; Nemotron-H's pattern). None: every layer is attention then MLP."""
    mamba_state: int = 128
    """Mamba-2 state size per head (d_state)."""
    mamba_conv: int = 4
    """Mamba-2 causal convolution width (d_conv)."""
    mamba_expand: int = 2
    """Mamba-2 inner width as a multiple of hidden."""
    mamba_head_dim: int = 64
    """Mamba-2 head width (the inner width is split into heads of this size)."""
    mamba_groups: int = 1
    """Mamba-2 groups sharing one B and C (n_groups; must divide the heads)."""
    mamba_chunk: int = 256
    """Mamba-2 scan chunk length (the quadratic block size of the SSD scan)."""
    mtp_depth: int = 0
    """multi-token prediction modules (DeepSeek-V3's MTP): module k also predicts token t+k+1 (0: off)."""
    mtp_loss_weight: float = 0.1
    """weight of the MTP loss (the mean over the modules' cross entropies) added to the main loss."""

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "max_seq_len", "moe_every", "vocab_pad_multiple"):
            _positive(name, getattr(self, name))
        for name in (
            "kv_heads", "ffn_hidden", "vocab_size", "moe_ffn_hidden", "kv_channels", "rope_original_max_len",
            "moe_shared_ffn_hidden", "q_lora_rank",
        ):  # fmt: skip
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise TrainerError(f"model.{name}={getattr(self, name)!r}: must be one of {allowed}")
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _positive(name, getattr(self, name))
        if self.attention == "mla":
            _check_mla(self)
        elif self.kv_channels is None and self.hidden % self.heads:
            raise TrainerError(f"model.hidden={self.hidden}: must be divisible by heads={self.heads}")
        if self.heads % self.num_kv_heads:
            raise TrainerError(f"model.kv_heads={self.kv_heads}: must divide heads={self.heads}")
        if self.position == "rotary" and self.rotary_dim % 2:
            raise TrainerError(f"model: rotary positions need an even head_dim, got {self.rotary_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainerError(f"model.dropout={self.dropout}: must be in [0, 1)")
        if self.num_experts < 0:
            raise TrainerError(f"model.num_experts={self.num_experts}: must be >= 0 (0 = dense)")
        if self.rope_factor <= 0:
            raise TrainerError(f"model.rope_factor={self.rope_factor}: must be > 0")
        if self.rope_type != "default" and self.position != "rotary":
            raise TrainerError(f"model.rope_type={self.rope_type!r}: needs position='rotary'")
        if self.rope_type == "llama3" and not self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise TrainerError(
                f"model.rope_low_freq_factor={self.rope_low_freq_factor}: must be below "
                f"rope_high_freq_factor={self.rope_high_freq_factor}"
            )
        if self.rope_type == "yarn":
            _check_yarn(self)
        if self.moe_shared_gate and self.moe_shared_ffn_hidden is None:
            raise TrainerError("model.moe_shared_gate=True: needs a shared expert (model.moe_shared_ffn_hidden)")
        if self.num_experts and not 1 <= self.moe_topk <= self.num_experts:
            raise TrainerError(f"model.moe_topk={self.moe_topk}: must be in [1, num_experts={self.num_experts}]")
        if not isinstance(self.mtp_depth, int) or self.mtp_depth < 0:
            raise TrainerError(f"model.mtp_depth={self.mtp_depth!r}: must be an integer >= 0 (0: no MTP)")
        if not self.mtp_loss_weight >= 0.0:
            raise TrainerError(f"model.mtp_loss_weight={self.mtp_loss_weight}: must be >= 0")
        _check_first_dense(self)
        check_router(self)
        if self.layer_pattern is not None:
            self._check_pattern()
            if self.attention == "mla":
                raise TrainerError(
                    f"model.layer_pattern={self.layer_pattern!r}: hybrid models take standard attention only, "
                    "not attention='mla'"
                )

    def _check_pattern(self) -> None:
        pattern = self.layer_pattern
        if not isinstance(pattern, str) or set(pattern) - set(LAYER_KINDS):
            raise TrainerError(f"model.layer_pattern={pattern!r}: must be a string of {''.join(LAYER_KINDS)}")
        if len(pattern) != self.layers:
            raise TrainerError(
                f"model.layer_pattern={pattern!r}: has {len(pattern)} layers, model.layers={self.layers}"
            )
        if "E" in pattern and not self.num_experts:
            raise TrainerError(f"model.layer_pattern={pattern!r}: E layers need model.num_experts > 0")
        for name in ("mamba_state", "mamba_conv", "mamba_expand", "mamba_head_dim", "mamba_groups", "mamba_chunk"):
            _positive(name, getattr(self, name))
        if self.mamba_inner % self.mamba_head_dim:
            raise TrainerError(
                f"model.mamba_head_dim={self.mamba_head_dim}: must divide mamba_expand*hidden={self.mamba_inner}"
            )
        if self.mamba_heads % self.mamba_groups:
            raise TrainerError(
                f"model.mamba_groups={self.mamba_groups}: must divide the {self.mamba_heads} Mamba heads"
            )

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        """The query/key width of one head."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.kv_channels or self.hidden // self.heads

    @property
    def rotary_dim(self) -> int:
        """The width of each head that the rotary embedding turns (MLA: ``qk_rope_head_dim``)."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def has_bias(self, part: str) -> bool:
        """Whether ``part`` (``"qkv"``, ``"proj"`` or ``"mlp"``) has biases."""
        value = {"qkv": self.qkv_bias, "proj": self.proj_bias, "mlp": self.mlp_bias}[part]
        return self.bias if value is None else value

    @property
    def ffn(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.mlp == "gelu":
            return 4 * self.hidden
        return -(-(8 * self.hidden) // (3 * 64)) * 64

    @property
    def mamba_inner(self) -> int:
        """The Mamba-2 inner width (``mamba_expand * hidden``)."""
        return self.mamba_expand * self.hidden

    @property
    def mamba_heads(self) -> int:
        return self.mamba_inner // self.mamba_head_dim

    def layer_kind(self, layer: int) -> str | None:
        """``"mamba"``, ``"attention"``, ``"mlp"`` or ``"moe"`` for layer ``layer`` of a hybrid model, else ``None``."""
        return None if self.layer_pattern is None else LAYER_KINDS[self.layer_pattern[layer]]

    @property
    def moe_ffn(self) -> int:
        return self.moe_ffn_hidden or self.ffn

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer ``layer`` is a mixture of experts."""
        if self.layer_pattern is not None:
            return self.layer_pattern[layer] == "E"
        return self.num_experts > 0 and layer >= self.moe_first_dense and layer % self.moe_every == 0

    def with_overrides(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (unknown fields are refused by name)."""
        known = {f.name for f in fields(self)}
        for name in changes:
            if name not in known:
                raise TrainerError(f"model.{name}: no such field; known fields are {sorted(known)}")
        return replace(self, **changes)


def _check_mla(cfg: ModelConfig) -> None:
    """The choices multi-latent attention does not combine with, refused by field."""
    rules = (
        ("position", cfg.position != "rotary", "MLA needs position='rotary' (its decoupled rotary key)"),
        ("kv_heads", cfg.kv_heads not in (None, cfg.heads), "MLA up-projects keys/values for every head"),
        ("kv_channels", cfg.kv_channels is not None, "MLA sets head widths by qk_*_head_dim and v_head_dim"),
        ("qk_norm", cfg.qk_norm, "MLA normalizes its latents, not its heads"),
        ("qk_rope_head_dim", cfg.qk_rope_head_dim % 2, "must be even (rotary turns pairs of dimensions)"),
        ("qkv_bias", cfg.has_bias("qkv"), "MLA projections have no biases"),
        ("proj_bias", cfg.has_bias("proj"), "MLA projections have no biases"),
    )
    for name, broken, rule in rules:
        if broken:
            raise TrainerError(f"model.{name}={getattr(cfg, name)!r}: {rule} (attention='mla')")


def _check_first_dense(cfg: ModelConfig) -> None:
    k = cfg.moe_first_dense
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise TrainerError(f"model.moe_first_dense={k!r}: must be an integer >= 0")
    if k and not cfg.num_experts:
        raise TrainerError(f"model.moe_first_dense={k}: needs experts (model.num_experts > 0)")
    if k and not any(cfg.is_moe_layer(layer) for layer in range(cfg.layers)):
        rule = f"leaves no MoE layer among layers={cfg.layers} with moe_every={cfg.moe_every}"
        raise TrainerError(f"model.moe_first_dense={k}: {rule}")


def _check_yarn(cfg: ModelConfig) -> None:
    """YaRN's fields, each broken rule in one line."""
    rules = (
        ("rope_factor", cfg.rope_factor < 1, "must be >= 1 for yarn"),
        ("rope_beta_slow", cfg.rope_beta_slow <= 0, "must be > 0"),
        ("rope_beta_fast", not cfg.rope_beta_slow < cfg.rope_beta_fast, "must exceed rope_beta_slow"),
        ("rope_mscale", cfg.rope_mscale < 0, "must be >= 0"),
        ("rope_mscale_all_dim", cfg.rope_mscale_all_dim < 0, "must be >= 0"),
    )
    for name, broken, rule in rules:
        if broken:
            raise TrainerError(f"model.{name}={getattr(cfg, name)!r}: {rule} (rope_type='yarn')")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise TrainerError(f"model.{name}={value!r}: must be a positive integer")
