# Cites: Gated DeltaNet (arXiv 2412.06464); the state-passing idea of fla's context parallelism
# (fla/ops/cp, read for the design, not copied) and Megatron-Core's all-gather KV context parallelism for attention.
"""Context parallelism: the ranks of a context-parallel (CP) group split every row of a batch along its length,
rank r holding tokens [r * T / CP, (r + 1) * T / CP) of each row, and the layers exchange just enough to compute
exactly what one rank would on the whole row.

Per layer kind, on every rank of the group:

    Gated DeltaNet   state passing (`context_parallel_gated_delta_rule`). The delta rule is affine in the state, so
                     a shard's final state is M @ S_in + S_local (M [K, K] per value head: the product of the
                     shard's transitions exp(g_t)(I - beta_t k_t k_t^T); S_local: the final state from a zero start).
                     ONE chunked call per shard computes both, and the output's dependence on S_in, by running the
                     value channels [v, 0] (V + K channels) from the initial state [0, I]: the K extra channels
                     evolve as the transition product (their v is 0) and read out q_t^T P_{<=t}, so
                     o_t = o_local_t + (q_t^T P_{<=t}) @ S_in needs no second pass over the shard (a rerun with the
                     true S_in would cost V more channels). Documents reset the state: a shard whose row has a
                     document start inside it (or at its first token) gets M = 0 by construction (the identity is
                     only given to a first document that continues the previous shard's, and a document starting
                     inside the shard starts from zero). Ranks all-gather (S_local, M), then each combines the
                     prefix of the ranks before it (a sequential product, O(CP * HV * K^2 * V) flops).
                     Communication: CP * B * HV * K * (K + V) floats per layer forward, and as much again in
                     backward, where autograd's all-gather sends each rank's state gradient back to the ranks
                     whose (S_local, M) it used: the state gradient flows from shard r to shard r - 1 and earlier.
    short conv       each rank receives the previous shard's last kernel - 1 inputs of every row (the halo; zero
                     for rank 0), masked at document starts by the conv's own position-in-document rule;
                     all-gathered with autograd, so the halo's gradient goes back to its owner (CP * B * C *
                     (kernel - 1) values: too few to be worth a point-to-point exchange).
    attention        queries stay local; keys and values (after RoPE, which uses the global positions) are
                     all-gathered from the ranks up to this one (later keys are never visible). Memory per rank per
                     layer: B * kv_heads * T * head_dim * 2 for the gathered keys and values (GQA's few KV heads
                     make that a fraction of the queries' full-length equivalent); with packed documents or a
                     window the SDPA mask is B * T/CP * T booleans per forward, shared by the layers.
    MLP / MoE        per token: nothing is exchanged (the MoE counts are summed over every rank already).

The loss of a shard is its share of the whole row's: summed cross-entropy over the number of targets of the whole
sequence, and the MoE router losses (means over tokens) divided by CP, so the shares sum to the loss of CP = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ContextParallelGroup:
    """Rank `rank` of the `size` ranks in `group` that split each row of the same batch."""

    group: dist.ProcessGroup | None
    size: int
    rank: int

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` (same shape) stacked in rank order [CP, ...]; differentiable: backward is a
        reduce-scatter (each rank receives the others' gradients for its tensor and sums them)."""
        return _GatherFromAll.apply(tensor, self)


@dataclass
class ContextShard:
    """This rank's slice of one batch of B rows of T tokens (`shard_layout` builds it): every position below is
    global (along the whole row), every index local (into this rank's B * T/CP tokens flattened, as the GDN and conv
    layers flatten them)."""

    cp: ContextParallelGroup
    seq_len: int  # T, the whole row
    start: int  # first token of each row held here: rank * T / CP
    cu_seqlens: torch.Tensor  # [N + 1] int32: local documents over the flattened B * T/CP tokens, row starts too
    position_in_doc: torch.Tensor  # [B, T/CP] position inside its document (0 at a document start)
    continues: torch.Tensor  # [B] bool: the row's first token here continues a document of the previous shard
    first_doc: torch.Tensor  # [B] local document of each row's first token
    last_doc: torch.Tensor  # [B] local document of each row's last token
    segment_ids: torch.Tensor | None  # [B, T] global document ids for attention; None: one document per row

    @property
    def rows(self) -> int:
        return self.position_in_doc.shape[0]

    @property
    def local_len(self) -> int:
        return self.position_in_doc.shape[1]

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This shard's slice [B, T/CP, ...] of a per-token tensor [B, T, ...] of the whole rows."""
        return tensor[:, self.start : self.start + self.local_len]


# The per-token fields of a batch (hybridlm.data.packing.collate) that shard_batch slices.
PER_TOKEN_FIELDS = ("input_ids", "labels", "position_ids")


def shard_batch(batch: dict, cp: ContextParallelGroup) -> dict:
    """The model's keyword arguments for this rank's contiguous slice of every row of `batch` (which every rank of
    `cp` holds whole): the per-token fields sliced to [B, T/CP] and `context=` the shard's layout in place of
    `cu_seqlens` (None or absent: one document per row)."""
    batch = dict(batch)
    cu_seqlens = batch.pop("cu_seqlens", None)
    shard = shard_layout(cu_seqlens, *batch["input_ids"].shape, cp, device=batch["input_ids"].device)
    return {key: shard.local(value) if key in PER_TOKEN_FIELDS and value is not None else value
            for key, value in batch.items()} | {"context": shard}  # fmt: skip


def shard_layout(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, cp: ContextParallelGroup,
                 device: torch.device | None = None) -> ContextShard:  # fmt: skip
    """The layout of this rank's slice of `batch` rows of `seq_len` tokens whose documents `cu_seqlens` [N + 1]
    marks over the flattened tokens (None: one document per row, on `device`), checked as for CP = 1."""
    from hybridlm.layout import check_packed_rows

    if seq_len % cp.size:
        raise ValueError(f"rows of T={seq_len} tokens do not split over context_parallel_size={cp.size} ranks; "
                         f"make trainer.seq_len a multiple of {cp.size} * 64")
    local_len = seq_len // cp.size
    start = cp.rank * local_len
    packed = cu_seqlens is not None and cu_seqlens.numel() > batch + 1
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, batch * seq_len + 1, seq_len, device=device)
    check_packed_rows(cu_seqlens, batch, seq_len)
    bounds = cu_seqlens.to(torch.int64)
    device = bounds.device
    index = torch.arange(batch * seq_len, device=device)
    segment_ids = torch.searchsorted(bounds[1:], index, right=True)
    global_position = (index - bounds[segment_ids]).view(batch, seq_len)
    position_in_doc = global_position[:, start : start + local_len]
    # A local document starts at every global document start and at every row start of the shard.
    starts = position_in_doc == 0
    starts[:, 0] = True
    flat_starts = starts.reshape(-1)
    doc_of_token = flat_starts.cumsum(0) - 1
    local_bounds = torch.cat([flat_starts.nonzero().flatten(), index.new_tensor([batch * local_len])])
    row_first = torch.arange(batch, device=device) * local_len
    return ContextShard(
        cp=cp, seq_len=seq_len, start=start, cu_seqlens=local_bounds.to(torch.int32), position_in_doc=position_in_doc,
        continues=position_in_doc[:, 0] > 0, first_doc=doc_of_token[row_first],
        last_doc=doc_of_token[row_first + local_len - 1],
        segment_ids=segment_ids.view(batch, seq_len) if packed else None,
    )  # fmt: skip


def _all_gather(tensor: torch.Tensor, cp: ContextParallelGroup) -> list[torch.Tensor]:
    gathered = [torch.empty_like(tensor) for _ in range(cp.size)]
    dist.all_gather(gathered, tensor.contiguous(), group=cp.group)
    return gathered


class _GatherFromAll(torch.autograd.Function):
    # Not torch.distributed.nn.functional.all_gather: its gloo backward scatters with group ranks as global ranks,
    # which fails on any group but the world's.
    @staticmethod
    def forward(ctx, tensor, cp: ContextParallelGroup):
        ctx.cp = cp
        return torch.stack(_all_gather(tensor, cp))

    @staticmethod
    def backward(ctx, grad):
        received = torch.empty_like(grad)
        dist.all_to_all_single(received, grad.contiguous(), group=ctx.cp.group)  # slot j: rank j's gradient for us
        return received.sum(dim=0), None


class _StateFromPreviousShards(torch.autograd.Function):
    """(S_local | M) [B, HV, K, V + K] of this shard's rows -> the state entering them [B, HV, K, V]:
    S_out_j = M_j S_out_{j-1} + S_local_j from S_out_{-1} = 0, and S_in_r = S_out_{r-1}.

    A Function rather than autograd's all-gather: rank 0 uses no other rank's values, so an autograd all-gather's
    backward (a collective) would never run there and the other ranks would wait for it. Here every rank's output
    is used, and backward all-gathers the state gradients dS_in_r and runs the adjoint of the prefix from the last
    shard down to this one: lambda_j (the gradient of S_out_j) = dS_in_{j+1} + M_{j+1}^T lambda_{j+1}, so
    dS_local_j = lambda_j and dM_j = lambda_j S_out_{j-1}^T."""

    @staticmethod
    def forward(ctx, local_and_transition, cp: ContextParallelGroup, head_v_dim: int):
        gathered = torch.stack(_all_gather(local_and_transition, cp))  # [CP, B, HV, K, V + K]
        locals_, transitions = gathered.split([head_v_dim, gathered.shape[-1] - head_v_dim], dim=-1)
        state = torch.zeros_like(locals_[0])
        for local, transition in zip(locals_[: cp.rank], transitions[: cp.rank]):
            state = transition @ state + local
        ctx.cp = cp
        ctx.save_for_backward(transitions, state)
        return state

    @staticmethod
    def backward(ctx, grad_state_in):
        cp = ctx.cp
        transitions, state_in = ctx.saved_tensors
        grads_in = _all_gather(grad_state_in, cp)  # every shard's dS_in
        adjoint = torch.zeros_like(state_in)  # of the last shard's final state, which nobody reads
        for j in range(cp.size - 1, cp.rank, -1):  # adjoint of S_out_{j-1} from S_in_j = S_out_{j-1} and S_out_j
            adjoint = grads_in[j] + transitions[j].transpose(-1, -2) @ adjoint
        grad_transition = adjoint @ state_in.transpose(-1, -2)  # state_in = S_out_{rank-1}
        return torch.cat([adjoint, grad_transition], dim=-1), None, None


def context_parallel_gated_delta_rule(q, k, v, shard: ContextShard, *, backend: str = "auto", chunk_layout=None,
                                      **kwargs) -> torch.Tensor:
    """The chunked gated delta rule of this rank's tokens with the state the shards before it leave (see the module
    docstring): q, k [1, B * T/CP, H, K], v [1, B * T/CP, HV, V], documents `shard.cu_seqlens`; keyword arguments
    as `ops.chunk_gated_delta_rule` (g/beta or their raw forms, scale, use_qk_l2norm_in_kernel), with a zero initial
    state at each row start. Returns o [1, B * T/CP, HV, V]. Every rank of `shard.cp` must call it (collectives)."""
    from hybridlm import ops
    from hybridlm.kernels.gated_delta.chunk import MAX_HEAD_DIM

    for name in ("initial_state", "output_final_state", "cu_seqlens"):
        if kwargs.get(name) is not None and kwargs[name] is not False:
            raise ValueError(f"context_parallel_gated_delta_rule got {name}=: under context parallelism every row "
                             "starts from a zero state and the documents are the shard's (shard.cu_seqlens)")
    head_k_dim, (num_v_heads, head_v_dim) = k.shape[-1], v.shape[-2:]
    channels = head_v_dim + head_k_dim
    if ops.GATED_DELTA.resolve(backend, q.device) == "triton" and channels > MAX_HEAD_DIM:
        raise ValueError(f"context parallelism runs V + K = {head_v_dim} + {head_k_dim} = {channels} value channels "
                         f"through the Triton kernels, which tile at most {MAX_HEAD_DIM}; use head dims with "
                         f"head_k_dim + head_v_dim <= {MAX_HEAD_DIM} or parallel.context_parallel_size=1")
    num_docs = shard.cu_seqlens.numel() - 1
    state_dtype = torch.promote_types(v.dtype, torch.float32)
    # [0 | I] for a first document that continues the previous shard's, [0 | 0] for every other document.
    initial = torch.zeros(num_docs, num_v_heads, head_k_dim, channels, dtype=state_dtype, device=v.device)
    identity = torch.eye(head_k_dim, dtype=state_dtype, device=v.device)
    initial[shard.first_doc[shard.continues], :, :, head_v_dim:] = identity
    v_and_carry = torch.cat([v, v.new_zeros(*v.shape[:-1], head_k_dim)], dim=-1)
    o_both, final = ops.chunk_gated_delta_rule(
        q, k, v_and_carry, initial_state=initial, output_final_state=True, cu_seqlens=shard.cu_seqlens,
        chunk_layout=chunk_layout, backend=backend, **kwargs,
    )  # fmt: skip
    o_local, o_carry = o_both.split([head_v_dim, head_k_dim], dim=-1)
    # (S_local | M) of each row's last document: M is 0 unless the whole row-shard continues one document.
    state_in = _StateFromPreviousShards.apply(final[shard.last_doc], shard.cp, head_v_dim)  # [B, HV, K, V]
    rows = shard.rows
    carry = o_carry.reshape(rows, -1, num_v_heads, head_k_dim)
    correction = torch.einsum("bthk,bhkv->bthv", carry.to(state_in.dtype), state_in)
    return o_local + correction.reshape(o_local.shape).to(o_local.dtype)


class _FromPreviousShard(torch.autograd.Function):
    """Each rank's `tensor` -> the previous rank's (zeros on rank 0); backward hands each gradient back to the rank
    it came from. A Function so that rank 0, which uses nothing received, still runs the backward collective."""

    @staticmethod
    def forward(ctx, tensor, cp: ContextParallelGroup):
        ctx.cp = cp
        gathered = _all_gather(tensor, cp)
        return gathered[cp.rank - 1] if cp.rank else torch.zeros_like(tensor)

    @staticmethod
    def backward(ctx, grad):
        cp = ctx.cp
        gathered = _all_gather(grad, cp)
        return (gathered[cp.rank + 1] if cp.rank + 1 < cp.size else torch.zeros_like(grad)), None


def conv_halo(x: torch.Tensor, kernel_size: int, shard: ContextShard) -> torch.Tensor:
    """The short conv's inputs before this shard: the previous rank's last kernel_size - 1 positions of each row of
    x [B, T/CP, C], as the conv's `state` [B, C, kernel_size - 1] (zeros on rank 0). The conv masks them where a
    document starts here (`shard.position_in_doc`); their gradient flows back to the previous rank."""
    tail = x[:, x.shape[1] - (kernel_size - 1):].transpose(1, 2)
    return _FromPreviousShard.apply(tail.contiguous(), shard.cp)


def gather_keys_values(k: torch.Tensor, v: torch.Tensor, shard: ContextShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, kv_heads, T/CP, d] of this rank's tokens -> those of every token up to this shard's last
    ([B, kv_heads, (rank + 1) * T/CP, d]; later keys are never visible); differentiable."""
    visible = shard.cp.rank + 1
    both = shard.cp.gather(torch.stack([k, v]))[:visible]  # [ranks, 2, B, kv_heads, T/CP, d]
    keys_values = torch.cat(both.unbind(0), dim=3)
    return keys_values[0], keys_values[1]


def attention_pattern(shard: ContextShard, window: int):
    """Which of the keys `gather_keys_values` returns each local query sees: causal on global positions, inside the
    window and the document (`hybridlm.layers.attention.visibility_rule`). One document per row and no window: a
    bottom-right causal bias (no mask is materialised; SDPA's flash kernel on CUDA). Otherwise a boolean mask
    [B or 1, 1, T/CP, keys] (FlexAttention's block mask is not built for context parallelism)."""
    from torch.nn.attention.bias import causal_lower_right

    from hybridlm.layers.attention import AttentionPattern, dense_mask

    keys = shard.start + shard.local_len
    if shard.segment_ids is None and not window:
        return AttentionPattern(mask=causal_lower_right(shard.local_len, keys))
    device = shard.position_in_doc.device
    q_index = torch.arange(shard.start, keys, device=device)
    return AttentionPattern(mask=dense_mask(shard.segment_ids, window, q_index, torch.arange(keys, device=device)))


def context_layout(shard: ContextShard, cfg):
    """The model's TokenLayout of this shard (`cfg` a ModelConfig): global RoPE positions, the attention pattern
    above, the shard's documents for the GDN kernels."""
    from hybridlm import ops
    from hybridlm.layout import TokenLayout

    chunk_layout = None
    if "gated_deltanet" in cfg.layer_types:
        chunk_layout = ops.prepare_gdn_chunk_layout(shard.cu_seqlens, shard.rows * shard.local_len,
                                                    backend=cfg.gdn.backend)  # fmt: skip
    attention = attention_pattern(shard, cfg.attention.sliding_window)
    return TokenLayout(position_ids=shard.position_in_doc, attention=attention, gdn_chunk_layout=chunk_layout,
                       context=shard)


def sum_over_shards(value: torch.Tensor, shard: ContextShard) -> torch.Tensor:
    """`value` summed over the ranks of the shard's group (not differentiable: counts and logged losses)."""
    total = value.detach().clone()
    dist.all_reduce(total, group=shard.cp.group)
    return total


def scale_shares_for_data_parallel(out, cp: ContextParallelGroup) -> None:
    """A shard's losses (HybridLM's LMOutput under `context=`) times CP, in place. DeepSpeed averages gradients
    (and the trainer its logged losses) over all W ranks, but the CP ranks of one group hold shares of one loss:
    with each share times CP, the average over W is the mean over the W / CP groups of their whole rows' losses."""
    for key in ("loss", "ce_loss", "aux_loss", "z_loss"):
        out[key] = out[key] * cp.size
