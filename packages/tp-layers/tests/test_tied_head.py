"""A tiny language model with tied input and output embeddings: ``VocabParallelEmbedding`` for the lookup,
``column_parallel_linear`` on the same (padded) table for the logits, ``vocab_parallel_cross_entropy``
for the loss. At TP = 1, 2 and 4 and an odd vocabulary, with and without SP, the loss and the table's
gradient equal ``nn.Embedding`` + ``F.linear`` + ``F.cross_entropy``: the padding never changes the loss."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tp_layers import VocabParallelEmbedding, column_parallel_linear, vocab_parallel_cross_entropy

VOCAB, DIM, SEQ, BATCH, SEED = 11, 8, 8, 2, 17


def data():
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (SEQ, BATCH), generator=generator)
    return ids, ids.roll(-1, 0)


def reference():
    torch.manual_seed(SEED)
    table = nn.Embedding(VOCAB, DIM)
    ids, target = data()
    hidden = torch.tanh(table(ids))
    loss = F.cross_entropy(F.linear(hidden, table.weight).reshape(-1, VOCAB), target.reshape(-1), label_smoothing=0.1)
    loss.backward()
    return loss.detach(), table.weight.grad


def run_tied(sequence_parallel):
    group = dist.group.WORLD
    torch.manual_seed(SEED)
    table = VocabParallelEmbedding(VOCAB, DIM, group=group, sequence_parallel=sequence_parallel)
    ids, target = data()
    hidden = torch.tanh(table(ids))  # [seq/tp, batch, dim] under SP
    logits = column_parallel_linear(hidden, table.weight, group=group, sequence_parallel=sequence_parallel)
    losses = vocab_parallel_cross_entropy(logits, target, group=group, vocab_size=VOCAB, label_smoothing=0.1)
    loss = losses.mean()
    loss.backward()
    return loss.detach(), table.weight.grad


@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tied_embedding_model_equals_the_unsharded_model(run_ranks, tp, sequence_parallel):
    loss, grad = reference()
    results = run_ranks(tp, run_tied, sequence_parallel)
    table_grad = torch.cat([g for _, g in results])
    for loss_r, _ in results:
        torch.testing.assert_close(loss_r, loss)
    torch.testing.assert_close(table_grad[:VOCAB], grad)
    assert not table_grad[VOCAB:].any()
