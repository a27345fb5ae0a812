"""The data pipeline: tokenizers, the indexed dataset format, preprocessing, samples, blending and sampling.

Typical use in a training run::

    data = build_datasets(DataConfig(), seq_len=128, seed=0)  # the embedded default corpus
    loader = DataIterator(data.train, global_batch=16, micro_batch=2, dp_size=dp, dp_rank=r)
    for micro_batches in loader: ...  # this rank's [2, 129] int64 arrays of the step ([2, 3, 128] packed)
    checkpoint["data"] = loader.state_dict()  # {"consumed_samples": ..., "dataset": ...}
"""

from .blending import BlendedDataset, blend_counts
from .build import DataConfig, Datasets, build_datasets
from .corpus import default_cache_dir, default_corpus
from .errors import DataError
from .indexed import IndexedDataset, dataset_paths, write_dataset
from .packing import IGNORE, PackedDataset
from .preprocess import preprocess
from .sampler import DataIterator, microbatches_per_step, rank_microbatches
from .samples import SampleDataset, split_documents
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "IGNORE",
    "BlendedDataset",
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "DataIterator",
    "Datasets",
    "HFTokenizer",
    "IndexedDataset",
    "PackedDataset",
    "SampleDataset",
    "Tokenizer",
    "blend_counts",
    "build_datasets",
    "dataset_paths",
    "default_cache_dir",
    "default_corpus",
    "load_tokenizer",
    "microbatches_per_step",
    "preprocess",
    "rank_microbatches",
    "split_documents",
    "write_dataset",
]
