"""The paper-scale arithmetic of docs/scaling.md: EK-FAC factors of a 52B dense decoder, on paper.

    python scripts/scaling_arithmetic.py            # prints the markdown tables of docs/scaling.md
    python scripts/scaling_arithmetic.py --dry-run  # only the last: `fit --dry-run`'s plan (ekfac_influence.plan)
                                                    # of a Llama-7B-like and the 52B model built on the meta device

Assumptions (each stated again beside its table in docs/scaling.md):
- the model: 64 blocks, d_model 8192, MLP width 32768 (4 × d_model), 64 × 12 × 8192² ≈ 51.5B parameters;
- tracked: the two MLP linears of every block, no biases: fc_in 8192 → 32768 (O × I = 32768 × 8192),
  fc_out 32768 → 8192 (8192 × 32768); with biases every I grows by one, changing no figure beyond 0.01%;
- factors per linear: A (I × I), S (O × O), Λ (O × I), eigenvectors Q_A (I × I), Q_S (O × O);
- block-diagonal: the 32768-wide factors (S of fc_in, A of fc_out) as b = 2 blocks of 16384;
- eigh of an n × n symmetric matrix with eigenvectors ≈ 9 n³ flops (Golub & Van Loan, symmetric QR), at an
  assumed 5 TFLOP/s sustained in float64 on one H100 (its FP64 tensor-core peak is 67 TFLOP/s; eigh is bound
  by the memory-bound tridiagonal reduction, so a small fraction of peak);
- links: 50 GB/s per GPU between machines (one 400 Gb/s NIC per GPU);
- scoring: 10M sequences × 2048 tokens; a training-gradient pass ≈ 3 × forward ≈ 6 × 52e9 flops per token;
  512 H100 at 40% of 989 TFLOP/s (dense bf16); Q = 128 queries stored at rank K = 32.
"""

from __future__ import annotations

GiB = 2**30
BLOCKS, D_MODEL, D_MLP, SEQ = 64, 8192, 32768, 2048
PARAMS = 52e9
LINEARS = [("fc_in", D_MLP, D_MODEL), ("fc_out", D_MODEL, D_MLP)]  # (name, O, I) per block
NUM_LINEARS = BLOCKS * len(LINEARS)
DTYPES = {"float32": 4, "float64": 8}
GPUS = (64, 128, 512)
EIGH_FLOPS_PER_N3, EIGH_FLOPS_PER_S = 9, 5e12
LINK_BYTES_PER_S = 50e9
SEQUENCES, QUERIES, RANK = 10_000_000, 128, 32
CLUSTER_GPUS, PEAK_BF16, MFU = 512, 989e12, 0.40


def blocked_square(n: int, blocks: int) -> int:
    """Elements of an n × n factor kept as `blocks` diagonal blocks of n/blocks."""
    return blocks * (n // blocks) ** 2


def linear_elements(O: int, I: int, blocks: int = 1) -> dict[str, int]:
    """Elements of each factor of one linear; only factors of width 32768 are blocked."""
    b_in, b_out = (blocks if I == D_MLP else 1), (blocks if O == D_MLP else 1)
    return {"A": blocked_square(I, b_in), "S": blocked_square(O, b_out), "Λ": O * I,
            "Q_A": blocked_square(I, b_in), "Q_S": blocked_square(O, b_out)}


def eigh_seconds(n: int, blocks: int = 1) -> float:
    return blocks * EIGH_FLOPS_PER_N3 * (n // blocks) ** 3 / EIGH_FLOPS_PER_S


def gib(elements: float, dtype: str) -> str:
    return f"{elements * DTYPES[dtype] / GiB:,.2f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def memory_tables(blocks: int) -> None:
    rows = []
    for name, O, I in LINEARS:
        e = linear_elements(O, I, blocks)
        for factor, shape in (("A", f"{I}×{I}"), ("S", f"{O}×{O}"), ("Λ", f"{O}×{I}"), ("Q_A", f"{I}×{I}"),
                              ("Q_S", f"{O}×{O}")):
            rows.append([name, factor, shape, f"{e[factor]:,}", gib(e[factor], "float32"), gib(e[factor], "float64")])
    print(table(["linear", "factor", "shape (O×I)", "elements", "GiB float32", "GiB float64"], rows))
    print()
    per_block = {k: sum(linear_elements(O, I, blocks)[k] for _, O, I in LINEARS) for k in ("A", "S", "Λ", "Q_A", "Q_S")}
    cov = per_block["A"] + per_block["S"]
    stored = per_block["Q_A"] + per_block["Q_S"] + per_block["Λ"]
    rows = [["covariances A + S (fit, before eigh)", gib(cov, "float32"), gib(cov, "float64"),
             gib(BLOCKS * cov, "float32"), gib(BLOCKS * cov, "float64")],
            ["EK-FAC kept: Q_A + Q_S + Λ", gib(stored, "float32"), gib(stored, "float64"),
             gib(BLOCKS * stored, "float32"), gib(BLOCKS * stored, "float64")],
            ["peak while fitting: A + S + Q_A + Q_S + Λ", gib(cov + stored, "float32"), gib(cov + stored, "float64"),
             gib(BLOCKS * (cov + stored), "float32"), gib(BLOCKS * (cov + stored), "float64")]]
    print(table(["", "per block (2 linears), GiB f32", "GiB f64", f"all {BLOCKS} blocks, GiB f32", "GiB f64"], rows))


def work_units(blocks: int) -> list[dict[str, float]]:
    """What one GPU can own when factors are divided by layer: a linear, or (b = 2) one block of its wide factor
    with that block's rows/columns of Λ and the whole narrow factor (needed by every block)."""
    units = []
    for _, O, I in LINEARS:
        wide, narrow = max(O, I), min(O, I)
        stored = (wide // blocks) ** 2 + O * I // blocks + narrow**2  # Q_wide block, its share of Λ, Q_narrow
        eigh = eigh_seconds(wide // blocks) + eigh_seconds(narrow)  # the narrow eigh is repeated by each block's owner
        units += [{"stored": stored, "eigh": eigh}] * blocks
    return units * BLOCKS


def per_gpu(blocks: int, G: int, key: str) -> float:
    """The largest per-GPU share when GPUs own whole linears (G ≤ linears) or single blocks of them."""
    if G <= NUM_LINEARS:  # whole linears: the narrow factor once per linear
        stored = sum(sum(linear_elements(O, I, blocks)[k] for k in ("Q_A", "Q_S", "Λ")) for _, O, I in LINEARS)
        eigh = sum(eigh_seconds(max(O, I), blocks) + eigh_seconds(min(O, I)) for _, O, I in LINEARS)
        return -(-NUM_LINEARS // G) * {"stored": stored, "eigh": eigh}[key] / len(LINEARS)
    units = work_units(blocks)
    return max(u[key] for u in units) if G >= len(units) else -(-len(units) // G) * max(u[key] for u in units)


def per_gpu_table() -> None:
    rows = []
    for blocks in (1, 2):
        stored = BLOCKS * sum(sum(linear_elements(O, I, blocks)[k] for k in ("Q_A", "Q_S", "Λ")) for _, O, I in LINEARS)
        rows.append([f"b = {blocks}", gib(stored, "float32")] + [gib(per_gpu(blocks, G, "stored"), "float32") for G in GPUS])
    print(table(["factors (Q_A + Q_S + Λ)", "replicated (every GPU), GiB f32"]
                + [f"divided by layer, G = {G}, GiB f32" for G in GPUS], rows))


def allreduce_table() -> None:
    cov = NUM_LINEARS * sum(I * I + O * O for _, O, I in LINEARS) // len(LINEARS)
    lam = NUM_LINEARS * sum(O * I for _, O, I in LINEARS) // len(LINEARS)
    rows = []
    for name, elements in (("covariance pass: all A and S", cov), ("correction pass: all Λ", lam)):
        size = elements * DTYPES["float64"]
        row = [name, f"{size / GiB:,.0f}"]
        for G in GPUS:
            ring = 2 * (G - 1) / G * size
            row.append(f"{ring / GiB:,.0f} GiB, {ring / LINK_BYTES_PER_S:,.0f} s")
        rows.append(row)
    print(table(["pass (float64 sums)", "size S, GiB"] + [f"ring all-reduce per GPU, G = {G}" for G in GPUS], rows))


def eigh_table() -> None:
    rows = []
    for n, blocks in ((D_MLP, 1), (D_MLP, 2), (D_MODEL, 1)):
        flops = blocks * EIGH_FLOPS_PER_N3 * (n // blocks) ** 3
        rows.append([f"{n}² as {blocks} block{'s' if blocks > 1 else ''}", f"{flops:.3g}", f"{eigh_seconds(n, blocks):,.1f}"])
    print(table(["one factor", "flops (9 n³ per block)", "seconds on one H100"], rows))
    print()
    rows = []
    for blocks in (1, 2):
        per_linear = eigh_seconds(D_MLP, blocks) + eigh_seconds(D_MODEL)
        total = NUM_LINEARS * per_linear
        rows.append([f"b = {blocks}", f"{per_linear:,.1f}", f"{total:,.0f} s = {total / 3600:.2f} h"]
                    + [f"{per_gpu(blocks, G, 'eigh'):,.0f} s" for G in GPUS])
    print(table(["factors", "eigh per linear, s", f"all {NUM_LINEARS} linears, one GPU"]
                + [f"divided by layer, G = {G}" for G in GPUS], rows))


def fit_cost_table() -> None:
    """Flops per token of the two fitting passes (tokens first: T = 2048 < I, O)."""
    gradient = 6 * PARAMS
    covariance = 2 * BLOCKS * sum(I * I + O * O for _, O, I in LINEARS)
    correction = 2 * BLOCKS * sum(I * I + O * O + O * I for _, O, I in LINEARS)
    cluster = CLUSTER_GPUS * PEAK_BF16 * MFU
    rows = [["covariance pass", "6·P + 2·Σ_ℓ (I² + O²)", f"{gradient:.3g} + {covariance:.3g}",
             f"{(gradient + covariance) * 1e9 / cluster / 3600:.2f}"],
            ["eigenvalue-correction pass", "6·P + 2·Σ_ℓ (I² + O² + O·I)", f"{gradient:.3g} + {correction:.3g}",
             f"{(gradient + correction) * 1e9 / cluster / 3600:.2f}"]]
    print(table(["pass", "flops per token", "= gradient + factor work", "hours per 1e9 tokens on the cluster"], rows))


def scoring_table() -> None:
    tokens = SEQUENCES * SEQ
    gradient_flops = 6 * PARAMS * tokens
    contraction_macs = NUM_LINEARS // len(LINEARS) * sum(QUERIES * RANK * (O + I) for _, O, I in LINEARS) * tokens
    contraction_flops = 2 * contraction_macs
    cluster = CLUSTER_GPUS * PEAK_BF16 * MFU
    rows = [
        ["training-gradient pass", "6 × 52e9 × tokens", f"{gradient_flops:.3g}", f"{gradient_flops / cluster / 3600:.2f}"],
        ["rank-32 query contraction", "2 × Σ_ℓ Q·K·(O + I) × tokens", f"{contraction_flops:.3g}",
         f"{contraction_flops / cluster / 3600:.2f}"],
        ["total", "", f"{gradient_flops + contraction_flops:.3g}", f"{(gradient_flops + contraction_flops) / cluster / 3600:.2f}"],
    ]
    print(f"tokens = {SEQUENCES:,} × {SEQ} = {tokens:.4g}; cluster = {CLUSTER_GPUS} × {MFU:.0%} × {PEAK_BF16:.3g} "
          f"= {cluster:.4g} flop/s\n")
    print(table(["work", "formula", "flops", "hours on the cluster"], rows))
    stored = QUERIES * RANK * NUM_LINEARS // len(LINEARS) * sum(O + I for _, O, I in LINEARS)
    print(f"\nstored rank-32 query gradients: Q·K·Σ_ℓ(O + I) = {stored:,} elements = {gib(stored, 'float32')} GiB float32")


def replicated_summary() -> None:
    """What every process holds today (factors complete on every process), for two model sizes."""
    models = {
        "Llama-7B-like: 32 blocks, gate/up 4096→11008, down 11008→4096": (32, [(11008, 4096), (11008, 4096), (4096, 11008)]),
        "52B (this page): 64 blocks, fc_in 8192→32768, fc_out 32768→8192": (BLOCKS, [(O, I) for _, O, I in LINEARS]),
    }
    rows = []
    for name, (blocks, shapes) in models.items():
        cov = blocks * sum(I * I + O * O for O, I in shapes)
        lam = blocks * sum(O * I for O, I in shapes)
        rows.append([name, gib(cov, "float64"), gib(lam, "float64"), gib(cov + lam, "float32")])
    print(table(["model (tracked MLP linears, O×I)", "covariance sums A + S, GiB f64", "Λ sums, GiB f64",
                 "kept Q_A + Q_S + Λ, GiB f32"], rows))


def meta_models() -> dict:
    """The two models of the dry-run table, built from configs on the meta device (no weights, no download)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        llama = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                             num_attention_heads=32, vocab_size=32000, dtype=torch.bfloat16))
        # the 52B setting as a GPT-2-shaped decoder: fc_in/fc_out = c_fc/c_proj (with biases: I + 1)
        dense = GPT2LMHeadModel(GPT2Config(n_embd=D_MODEL, n_layer=BLOCKS, n_head=64, n_inner=D_MLP, n_positions=SEQ,
                                           vocab_size=65536, dtype=torch.bfloat16))
    return {"Llama-7B-like (bf16, 96 MLP linears)": (llama, 1), f"52B ({BLOCKS} blocks, bf16, {NUM_LINEARS} MLP linears, b = 2)": (dense, 2)}


def dry_run_table() -> None:
    """`ekfac-influence fit --dry-run`'s figures (ekfac_influence.plan.plan_fit), GiB per GPU, the busiest one."""
    from ekfac_influence.config import FactorConfig
    from ekfac_influence.model import select_layers
    from ekfac_influence.plan import STEPS, layer_groups, plan_fit

    device = 80 * GiB
    rows = []
    for name, (model, blocks) in meta_models().items():
        layers = select_layers(model, None)
        for G in (8, 64):
            for shard, accumulate, budget in (("none", "float64", None), ("auto", "float64", None),
                                              ("auto", "float32", None), ("auto", "float32", 64)):
                config = FactorConfig(shard=shard, accumulate_dtype=accumulate, blocks=blocks, block_min_dim=D_MLP,
                                      memory_budget_gb=budget)
                plan = plan_fit(model, layers, config, G, model_dtype="bfloat16", batch_size=1, length=SEQ, fsdp=True)
                if blocks == 2:
                    paper = gib(per_gpu(2, G, "stored") if shard == "auto" else
                                BLOCKS * sum(sum(linear_elements(O, I, 2)[k] for k in ("Q_A", "Q_S", "Λ"))
                                             for _, O, I in LINEARS), "float32")
                else:
                    paper = "—"
                groups = "" if budget is None else f", {len(layer_groups(layers, budget, config))} groups ({budget} GiB)"
                rows.append([name, G, shard + groups, accumulate] + [f"{plan.steps[s] / GiB:,.1f}" for s in STEPS]
                            + [f"{plan.stored_bytes / GiB:,.1f}", paper, f"{plan.peak / GiB:,.1f}",
                               "yes" if plan.fits(device) else "no"])
    print("ekfac, model weights sharded with FSDP, batches of 1 × 2048 tokens, factors stored in float32; GiB per GPU "
          "(the busiest); peak = weights + one batch of ā, g + a 256 MiB bucket + the largest factor step; with groups of "
          "layers a step is the largest group's, and the kept factors of the groups done wait in host memory\n")
    print(table(["model", "GPUs", "shard (memory_budget_gb)", "accumulate"] + list(STEPS)
                + ["kept after the fit (A, S, Q, Λ f32)", "on paper: kept Q_A + Q_S + Λ f32", "peak", "fits 80 GiB"], rows))


if __name__ == "__main__":
    import sys

    if "--dry-run" in sys.argv:
        dry_run_table()
        raise SystemExit(0)
    params = BLOCKS * 12 * D_MODEL**2
    print(f"model: {BLOCKS} × 12 × {D_MODEL}² = {params / 1e9:.1f}B parameters; tracked linears: {NUM_LINEARS}\n")
    print("## factor memory per linear (b = 1)\n")
    memory_tables(1)
    print("\n## factor memory per linear (b = 2)\n")
    memory_tables(2)
    print("\n## per GPU\n")
    per_gpu_table()
    print("\n## all-reduce per pass\n")
    allreduce_table()
    print("\n## eigendecomposition\n")
    eigh_table()
    print("\n## fitting passes\n")
    fit_cost_table()
    print("\n## scoring\n")
    scoring_table()
    print("\n## replicated on every process today\n")
    replicated_summary()
    print("\n## fit --dry-run: bytes per GPU, replicated or sharded by layer\n")
    dry_run_table()
