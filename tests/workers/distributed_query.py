"""Fit and answer prompt/completion queries under torchrun / accelerate launch or alone; rank 0 writes OUT/.

    torchrun --nproc_per_node 2 tests/workers/distributed_query.py OUT
"""

import sys
from pathlib import Path

import json

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import bpe_tokenizer, corpus_batches  # noqa: E402

import ekfac_influence as ei  # noqa: E402
from ekfac_influence.config import QueryConfig  # noqa: E402
from ekfac_influence.data import pack  # noqa: E402
from ekfac_influence.demo import pydoc_documents  # noqa: E402
from ekfac_influence.query_inputs import Query  # noqa: E402
from ekfac_influence import distributed  # noqa: E402
from ekfac_influence.query import query_influence  # noqa: E402
from distributed_fit_and_score import count_preconditioned_queries  # noqa: E402

QUERIES = [Query("The assert statement", " is a debugging aid", id="a"), Query("x = 1", " and y = 2", " or y = 3", id="b"),
           Query("The while loop", id="greedy")]


def run(out: str):
    count = count_preconditioned_queries()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    tokenizer = bpe_tokenizer()
    corpus = pack(pydoc_documents()[:3], tokenizer, length=16)
    corpus = type(corpus)(corpus.tokens_NT[:27], corpus.lengths_N[:27], corpus.provenance[:27], corpus.pad_token_id,
                          corpus.tokenizer_id, corpus.corpus_id)  # 27 sequences in batches of 4: uneven over 2 processes
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                         attn_implementation="sdpa")).double().eval()
    factors = ei.fit_factors(model, corpus_batches(corpus, 4), ei.CausalLMObjective(), ei.FactorConfig(factor_dtype="float64"),
                             show_progress=False)
    config = QueryConfig(rank=2, rerank=5, top_k=3, batch_size=4, query_batch_size=1, max_new_tokens=4,
                         compute_dtype="float64")
    candidates = [list(range(20)), list(range(0, 27, 2)), list(range(5, 20))]  # union misses 21, 23, 25
    results = query_influence(model, tokenizer, factors, corpus, QUERIES, config, candidates=candidates, out=out,
                              show_progress=False)
    split = distributed.gather_by_key({distributed.rank(): count[0]})
    if distributed.is_main():  # queries preconditioned by each process (scan at rank 2, then rescoring at full rank)
        Path(f"{out}.split.json").write_text(json.dumps([split[rank] for rank in sorted(split)]))
    return results


if __name__ == "__main__":
    run(sys.argv[1])
