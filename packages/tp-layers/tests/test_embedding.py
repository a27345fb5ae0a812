"""``VocabParallelEmbedding`` against ``nn.Embedding`` at TP = 1, 2 and 4, odd vocabulary sizes
included (the table is padded to a multiple of TP; the padding rows stay zero and get no gradient)."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tp_layers import VocabParallelEmbedding, padded_vocab_size

SEED, SEQ, BATCH, DIM = 5, 8, 3, 6


def data(vocab):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (SEQ, BATCH), generator=generator)
    ids[0, 0], ids[1, 0] = 0, vocab - 1  # both ends of the vocabulary
    return ids, torch.randn(SEQ, BATCH, DIM, generator=generator)


def reference(vocab):
    torch.manual_seed(SEED)
    embedding = nn.Embedding(vocab, DIM)
    ids, c = data(vocab)
    y = embedding(ids)
    (y * c).sum().backward()
    return y.detach(), embedding.weight.detach(), embedding.weight.grad


def run_embedding(vocab, sequence_parallel, pad_to_multiple_of):
    rank, tp = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(SEED)
    layer = VocabParallelEmbedding(
        vocab, DIM, group=dist.group.WORLD, sequence_parallel=sequence_parallel, pad_to_multiple_of=pad_to_multiple_of
    )
    ids, c = data(vocab)
    weight = layer.weight.detach().clone()
    y = layer(ids)
    (y * (c.chunk(tp, 0)[rank] if sequence_parallel else c)).sum().backward()
    return y.detach(), weight, layer.weight.grad, layer.padded_num_embeddings


@pytest.mark.parametrize(("vocab", "pad_to_multiple_of"), [(13, 1), (16, 1), (13, 4)])
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_embedding_equals_nn_embedding(run_ranks, tp, sequence_parallel, vocab, pad_to_multiple_of):
    y, weight, grad = reference(vocab)
    results = run_ranks(tp, run_embedding, vocab, sequence_parallel, pad_to_multiple_of)
    padded = padded_vocab_size(vocab, tp, pad_to_multiple_of)
    assert padded % (tp * pad_to_multiple_of) == 0 and vocab <= padded < vocab + tp * pad_to_multiple_of
    assert [r[3] for r in results] == [padded] * tp
    table = torch.cat([r[1] for r in results])
    table_grad = torch.cat([r[2] for r in results])
    assert table.shape == (padded, DIM)
    torch.testing.assert_close(table[:vocab], weight, rtol=0, atol=0)
    assert not table[vocab:].any() and not table_grad[vocab:].any()  # padding: zero, and never touched
    torch.testing.assert_close(table_grad[:vocab], grad)
    for rank, (y_r, *_) in enumerate(results):
        torch.testing.assert_close(y_r, y.chunk(tp, 0)[rank] if sequence_parallel else y)
