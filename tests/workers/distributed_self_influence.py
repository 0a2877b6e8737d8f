"""Self-influence and whitened gradients under torchrun or alone; rank 0 writes OUT (safetensors).

    torchrun --nproc_per_node 2 tests/workers/distributed_self_influence.py OUT
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import bpe_tokenizer, corpus_batches  # noqa: E402

import ekfac_influence as ei  # noqa: E402
from ekfac_influence import distributed, similarity  # noqa: E402
from ekfac_influence.data import pack  # noqa: E402
from ekfac_influence.demo import pydoc_documents  # noqa: E402


def run(out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    tokenizer = bpe_tokenizer()
    corpus = pack(pydoc_documents()[:3], tokenizer, length=16)
    train = corpus_batches(corpus, 4)[:7]  # 7 batches of 4: uneven over 2 processes
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                         attn_implementation="sdpa")).double().eval()
    objective = ei.CausalLMObjective()
    factors = ei.fit_factors(model, train, objective, ei.FactorConfig(factor_dtype="float64"), show_progress=False)
    config = ei.SelfInfluenceConfig(compute_dtype="float64", per_token=True)
    result = ei.self_influence(model, factors, train, objective, config, show_progress=False)
    W_ND = similarity.whitened_gradients(model, factors, train, objective, dtype=torch.float64)
    if distributed.is_main():
        tensors = {"values": result.values, "per_token": result.per_token, "sketch": result.sketch, "whitened": W_ND,
                   "world": torch.tensor(distributed.world())}
        tensors.update({f"layer/{name}": value for name, value in result.per_layer.items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, out)


if __name__ == "__main__":
    run(sys.argv[1])
