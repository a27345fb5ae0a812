"""Conversion hooks with a toy Llama/GPT-2-like mapping: fused tensors split into the right parts,
transposes, renames, and export/import of the HF format round-trip exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

import ckpt
from ckpt import Adapter, Rename, Split, Transpose

H, KV, F = 8, 4, 12  # hidden, grouped key/value width, MLP width

ADAPTER = Adapter(
    (
        Rename("embed.weight", "model.embed_tokens.weight"),
        Split(
            "layers.{i}.qkv.weight",
            ("model.layers.{i}.q.weight", "model.layers.{i}.k.weight", "model.layers.{i}.v.weight"),
            0,
            (H, KV, KV),
        ),
        Split("layers.{i}.gate_up.weight", ("model.layers.{i}.gate.weight", "model.layers.{i}.up.weight")),
        Transpose("layers.{i}.down.weight", "model.layers.{i}.c_proj.weight"),
        Rename("layers.{i}.norm.{p}", "model.layers.{i}.ln.{p}"),
    )
)


def ours():
    gen = torch.Generator().manual_seed(0)
    state = {"embed.weight": torch.randn(16, H, generator=gen)}
    for i in range(2):
        state[f"layers.{i}.qkv.weight"] = torch.randn(H + 2 * KV, H, generator=gen)
        state[f"layers.{i}.gate_up.weight"] = torch.randn(2 * F, H, generator=gen).to(torch.bfloat16)
        state[f"layers.{i}.down.weight"] = torch.randn(H, F, generator=gen)
        state[f"layers.{i}.norm.weight"] = torch.randn(H, generator=gen)
        state[f"layers.{i}.norm.bias"] = torch.randn(H, generator=gen)
    return state


def same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_fused_tensors_split_into_the_right_parts():
    s = ours()
    hf = ADAPTER.to_hf(s)
    qkv = s["layers.1.qkv.weight"]
    assert torch.equal(hf["model.layers.1.q.weight"], qkv[:H])
    assert torch.equal(hf["model.layers.1.k.weight"], qkv[H : H + KV])
    assert torch.equal(hf["model.layers.1.v.weight"], qkv[H + KV :])
    gate_up = s["layers.0.gate_up.weight"]
    assert torch.equal(hf["model.layers.0.gate.weight"], gate_up[:F])
    assert torch.equal(hf["model.layers.0.up.weight"], gate_up[F:])
    assert torch.equal(hf["model.layers.0.c_proj.weight"], s["layers.0.down.weight"].t())
    assert torch.equal(hf["model.layers.1.ln.bias"], s["layers.1.norm.bias"])
    assert len(hf) == 1 + 2 * 8


def test_the_adapter_round_trips_exactly():
    assert same(ADAPTER.from_hf(ADAPTER.to_hf(ours())), ours())


def test_unmatched_and_incomplete_keys_are_errors():
    with pytest.raises(ckpt.CheckpointError, match=r"no rule matches \['lm_head.weight'\]"):
        ADAPTER.to_hf({**ours(), "lm_head.weight": torch.ones(1)})
    assert "lm_head.weight" in Adapter(ADAPTER.rules, passthrough=True).to_hf(
        {**ours(), "lm_head.weight": torch.ones(1)}
    )
    hf = ADAPTER.to_hf(ours())
    del hf["model.layers.0.v.weight"]
    with pytest.raises(ckpt.CheckpointError, match=r"model.layers.0.v.weight'\] are missing"):
        ADAPTER.from_hf(hf)
    with pytest.raises(ckpt.CheckpointError, match="cannot be split"):
        ADAPTER.to_hf({**ours(), "layers.0.qkv.weight": torch.ones(5, H)})


@pytest.mark.parametrize("max_shard_bytes", [None, 1000])
def test_export_and_import_hf(tmp_path, max_shard_bytes):
    config = {"model_type": "toy", "hidden_size": H, "num_hidden_layers": 2}
    out = ckpt.export_hf(ours(), tmp_path / "hf", adapter=ADAPTER, config=config, max_shard_bytes=max_shard_bytes)
    names = sorted(p.name for p in out.iterdir())
    if max_shard_bytes is None:
        assert names == ["config.json", "model.safetensors"]
        on_disk = load_file(out / "model.safetensors")
    else:
        shards = [n for n in names if n.startswith("model-")]
        assert len(shards) > 1 and "model.safetensors.index.json" in names
        weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        on_disk = {k: t for n in shards for k, t in load_file(out / n).items()}
        assert {k: n for n in shards for k in load_file(out / n)} == weight_map
    assert same(on_disk, ADAPTER.to_hf(ours()))  # the files hold HF names and values
    state, got_config = ckpt.import_hf(out, adapter=ADAPTER)
    assert same(state, ours()) and got_config == config
    with pytest.raises(ckpt.CheckpointError, match="already exists"):
        ckpt.export_hf(ours(), out, adapter=ADAPTER)


def test_import_refuses_an_index_that_escapes(tmp_path):
    out = ckpt.export_hf({"v": torch.ones(2), "w": torch.ones(2)}, tmp_path / "hf", max_shard_bytes=8)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"] = {"w": "../elsewhere.safetensors"}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ckpt.CheckpointError, match="escapes the checkpoint directory"):
        ckpt.import_hf(out)


def test_stacked_experts_unstack_into_one_tensor_each_and_back():
    from ckpt import CheckpointError, Stack

    stack = Adapter((Stack("layers.{i}.experts.fc2", "model.layers.{i}.experts.{e}.down.weight"),))
    experts = torch.randn(3, H, F, generator=torch.Generator().manual_seed(1))
    hf = stack.to_hf({"layers.0.experts.fc2": experts})
    assert sorted(hf) == [f"model.layers.0.experts.{e}.down.weight" for e in range(3)]
    assert torch.equal(hf["model.layers.0.experts.2.down.weight"], experts[2])
    assert torch.equal(stack.from_hf(hf)["layers.0.experts.fc2"], experts)
    del hf["model.layers.0.experts.1.down.weight"]
    with pytest.raises(CheckpointError, match=r"experts \[1\]"):
        stack.from_hf(hf)
