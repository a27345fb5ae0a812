"""The Mamba-2 mixer against ``transformers``' reference ``Mamba2Mixer`` (its plain-PyTorch path).

The same random weights go into both (every parameter drawn, including ``A_log``, ``D`` and the norm, so
that each one matters); outputs and the gradients of the input and of every parameter must match.
Tolerance: rtol 1e-4, atol 1e-5 on fp32: the two scans sum the same terms in another order (the
chunk-state recurrence is a loop here, a quadratic form there), and the gated norm divides by a small
RMS; a wrong decay, group or gate is off by O(1). The sequence (21) is not a multiple of the chunk (8),
so the padding of the last chunk is covered; two groups of two heads cover the group broadcast.
"""

import pytest
import torch

import pstate
from trainer.config import RunConfig, check_run
from trainer.errors import TrainerError
from trainer.model import ModelConfig, ModelGroups, build_chunks, preset
from trainer.model.mamba import Mamba2Mixer
from trainer.plan.models import parameter_count

HIDDEN, HEADS, HEAD_DIM, GROUPS, STATE, CONV, CHUNK, BATCH, SEQ = 16, 4, 8, 2, 6, 4, 8, 2, 21


def config(**changes) -> ModelConfig:
    fields = dict(
        hidden=HIDDEN, layers=1, heads=2, vocab_size=11, layer_pattern="M", mamba_state=STATE, mamba_conv=CONV,
        mamba_expand=2, mamba_head_dim=HEAD_DIM, mamba_groups=GROUPS, mamba_chunk=CHUNK,
    )  # fmt: skip
    return ModelConfig(**{**fields, **changes})


def reference_mixer():
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as Reference

    hf = Mamba2Config(
        hidden_size=HIDDEN, num_heads=HEADS, head_dim=HEAD_DIM, expand=2, n_groups=GROUPS, state_size=STATE,
        conv_kernel=CONV, chunk_size=CHUNK, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
        num_hidden_layers=1, vocab_size=11,
    )  # fmt: skip
    return Reference(hf, layer_idx=0)


def random_weights(mixer: Mamba2Mixer) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            scale = 0.5 if name in ("A_log", "dt_bias") else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name in ("D", "norm.weight") else 0.0))


def load_into_reference(mixer: Mamba2Mixer, ref) -> None:
    with torch.no_grad():
        ref.in_proj.weight.copy_(mixer.in_proj.weight)
        ref.conv1d.weight.copy_(mixer.conv.weight.unsqueeze(1))
        ref.conv1d.bias.copy_(mixer.conv.bias)
        for name in ("A_log", "D", "dt_bias"):
            getattr(ref, name).copy_(getattr(mixer, name))
        ref.norm.weight.copy_(mixer.norm.weight)
        ref.out_proj.weight.copy_(mixer.out_proj.weight)


def against_reference():
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        mixer = Mamba2Mixer(config(), ModelGroups.from_state(ps), layer=0)
        random_weights(mixer)
        ref = reference_mixer()
        load_into_reference(mixer, ref)
        x = torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(6))
        mine_in, ref_in = x.transpose(0, 1).clone().requires_grad_(), x.clone().requires_grad_()
        mine, theirs = mixer(mine_in).transpose(0, 1), ref(ref_in)
        probe = torch.randn(mine.shape, generator=torch.Generator().manual_seed(7))
        (mine * probe).sum().backward()
        (theirs * probe).sum().backward()
        grads = {
            "input": (mine_in.grad.transpose(0, 1), ref_in.grad),
            "in_proj": (mixer.in_proj.weight.grad, ref.in_proj.weight.grad),
            "conv.weight": (mixer.conv.weight.grad, ref.conv1d.weight.grad.squeeze(1)),
            "conv.bias": (mixer.conv.bias.grad, ref.conv1d.bias.grad),
            "norm": (mixer.norm.weight.grad, ref.norm.weight.grad),
            "out_proj": (mixer.out_proj.weight.grad, ref.out_proj.weight.grad),
        }
        grads.update({n: (getattr(mixer, n).grad, getattr(ref, n).grad) for n in ("A_log", "D", "dt_bias")})
        return mine.detach(), theirs.detach(), grads


def test_mixer_matches_transformers(run_ranks):
    ((mine, theirs, grads),) = run_ranks(1, against_reference)
    assert theirs.abs().mean() > 0.05
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    for name, (got, want) in grads.items():
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(layer_pattern="M*"), "model.layer_pattern='M*': has 2 layers, model.layers=1"),
        (dict(layer_pattern="MX"), "model.layer_pattern='MX': must be a string of M*-E"),
        (dict(layer_pattern="E"), "model.layer_pattern='E': E layers need model.num_experts > 0"),
        (dict(mamba_head_dim=5), "model.mamba_head_dim=5: must divide mamba_expand*hidden=32"),
        (dict(mamba_groups=3), "model.mamba_groups=3: must divide the 4 Mamba heads"),
        (dict(mamba_chunk=0), "model.mamba_chunk=0: must be a positive integer"),
    ],
)
def test_bad_mamba_config_is_refused_by_name(changes, message):
    with pytest.raises(TrainerError) as error:
        config(**changes)
    assert str(error.value) == message


def built_parameters() -> int:
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        cfg = preset("tiny-hybrid").with_overrides(vocab_size=97)
        (chunk,) = build_chunks(cfg, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=0)
        return sum(p.numel() for p in chunk.parameters())


def test_the_planner_counts_the_hybrid_models_parameters(run_ranks):
    (built,) = run_ranks(1, built_parameters)
    assert sum(parameter_count(preset("tiny-hybrid").with_overrides(vocab_size=97))) == built


def test_a_layout_that_splits_a_mamba_group_is_refused_before_launch():
    model = preset("tiny-hybrid").with_overrides(mamba_groups=2)
    cfg = RunConfig(model=model, parallel=pstate.ParallelConfig(tp=2, cp=2))
    with pytest.raises(TrainerError) as error:
        check_run(cfg, 4)
    assert str(error.value) == "tp*cp=4 must divide the model's mamba_groups (2): TP and CP split its heads"
