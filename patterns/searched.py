"""Blocks chosen from the model's own attention: searched once per layer, then reused across denoising steps."""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field, replace

import torch
from einops import rearrange

from .base import (
    BlockSize,
    HeadShard,
    Pattern,
    _block_spans,
    as_pair,
    check_max_iter,
    check_qkv,
    check_spans,
    check_target,
)
from .causal import FrameCausal
from .layout import VideoLayout
from .ordering import IdentityOrder, TokenOrder, as_order

BUDGETS = ("row", "head", "layer")
CRITERIA = ("greedy", "mass", "pooled")
# float32 elements of one chunk of `block_attention_mass` and `greedy_blocks`: 64 MB.
_CHUNK = 1 << 24
# A set of key blocks holding less than this share of a query's attention counts as holding none, with the
# squared error `_NO_MASS_ERROR` (the worst there is).
_MIN_SET_MASS = 1e-6
_NO_MASS_ERROR = 1e30


def block_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    block_size: BlockSize,
    groups: torch.Tensor | None = None,
    q_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    Exact attention mass between blocks: for each head, the softmax probabilities of `query` over `key`
    (scale `1 / sqrt(D)`, computed in float32) summed over the keys of each key block and averaged over the
    queries of each query block and over the batch. Each row of the result sums to 1.

    Computed in chunks of query rows, so memory stays near `_CHUNK` floats however long the sequence; the work
    is one dense `Q K^T` (no `P V`).

    Args:
        query (`torch.Tensor` of shape `(B, H, Nq, D)`): queries in the token order the kernel sees.
        key (`torch.Tensor` of shape `(B, H, Nk, D)`): keys in the same order.
        block_size (`int` or `tuple[int, int]`): `block_q` and `block_k` in tokens; partial last blocks hold
            fewer tokens (the query average is over the real ones).
        groups (`torch.LongTensor` of shape `(N,)`, *optional*): the model's own causal mask, when it has one
            (`Nq = Nk = N`): query `r` attends key `s` only where `groups[s] <= groups[r]`
            ([`FrameCausal.video_groups`]); the softmax is over those keys.
        q_starts (`torch.LongTensor`, *optional*): the first token of each query block, when the blocks are not
            every `block_q` tokens from 0 (blocks counted from each causal group's start: the kernel's per-group
            calls); increasing from 0, at most `block_q` apart.

    Returns:
        `torch.FloatTensor` of shape `(H, nq, ceil(Nk / block_k))`, `nq = ceil(Nq / block_q)` or `len(q_starts)`.

    Example:
        >>> q, k = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
        >>> mass = block_attention_mass(q, k, 4)
        >>> mass.shape, torch.allclose(mass.sum(-1), torch.ones(2, 3))
        (torch.Size([2, 3, 3]), True)
    """
    bq, bk = as_pair(block_size)
    batch, heads, nq_tok, _ = query.shape
    nk_tok = key.shape[2]
    starts, lengths = query_blocks(nq_tok, bq, q_starts)
    nq, nk = len(starts), math.ceil(nk_tok / bk)
    block_of_token = _block_of_token(starts, nq_tok).to(query.device)
    mass = torch.zeros(heads, nq, nk, dtype=torch.float32, device=query.device)
    rows_per_chunk = max(1, _CHUNK // max(1, batch * heads * nk_tok))
    for start in range(0, nq_tok, rows_per_chunk):
        end = min(start + rows_per_chunk, nq_tok)
        masked = None if groups is None else _masked_pairs(groups, torch.arange(start, end, device=groups.device))
        weights, total = _key_block_weights(query[:, :, start:end], key, bk, masked)
        probs = weights.sum(3) / total[:, :, None]  # (B, H, nk, rows)
        mass.index_add_(1, block_of_token[start:end], probs.sum(0).transpose(1, 2))
    return mass / (lengths.to(mass)[None, :, None] * batch)


def pooled_block_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    block_size: BlockSize,
    groups: torch.Tensor | None = None,
    q_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    SpargeAttn's prediction of the block mass: each block's queries and keys pooled to their mean, and the mass of
    key block `j` for query block `i` estimated as the softmax over key blocks of `mean_q_i . mean_k_j / sqrt(D) +
    log |j|` (a block of `|j|` keys equal to their mean would hold that much); averaged over the batch. Exact where
    each block's keys are alike (and its queries); the second result says how alike the keys are.

    Cost: the pooling (one pass over q and k) and an `nq x nk` product per head, a small fraction of a dense call.

    Args:
        query, key, block_size, groups, q_starts: as in [`block_attention_mass`] (under `groups`, block pairs with
            no allowed pair hold no mass; the others are estimated as if whole).

    Returns:
        `(mass, similarity)`: `torch.FloatTensor`s of shapes `(H, nq, nk)`, rows summing to 1, and `(H, nk)`, the
        mean cosine similarity between the keys of each key block (pairs of one key with itself included; 1 when
        they point the same way), averaged over the batch.

    Example:
        >>> q, k = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
        >>> mass, similarity = pooled_block_mass(q, k, 4)
        >>> mass.shape, similarity.shape, torch.allclose(mass.sum(-1), torch.ones(2, 3))
        (torch.Size([2, 3, 3]), torch.Size([2, 3]), True)
    """
    bq, bk = as_pair(block_size)
    dim, nk_tok = query.shape[-1], key.shape[2]
    starts, lengths = query_blocks(query.shape[2], bq, q_starts)
    nk = math.ceil(nk_tok / bk)
    q_index = _block_of_token(starts, query.shape[2]).to(query.device)
    k_index = (torch.arange(nk_tok) // bk).to(key.device)
    k_lengths = torch.bincount(torch.arange(nk_tok) // bk, minlength=nk).to(key.device, torch.float32)

    def pooled(x, index, count, blocks):
        total = torch.zeros(*x.shape[:2], blocks, x.shape[-1], dtype=torch.float32, device=x.device)
        return total.index_add_(2, index, x.float()) / count[:, None]

    mean_q = pooled(query, q_index, lengths.to(query.device, torch.float32), len(starts))
    mean_k = pooled(key, k_index, k_lengths, nk)
    logits = mean_q @ mean_k.transpose(-1, -2) / math.sqrt(dim) + k_lengths.log()
    if groups is not None:
        logits = logits.masked_fill(~_allowed_blocks(groups.cpu(), starts, bk).to(logits.device), -torch.inf)
    mass = torch.softmax(logits, dim=-1).mean(0)
    unit = torch.nn.functional.normalize(key.float(), dim=-1)
    similarity = pooled(unit, k_index, k_lengths, nk).square().sum(-1)  # |mean of unit keys|^2
    return mass, similarity.mean(0)


def query_blocks(num_tokens: int, block_q: int, q_starts: torch.Tensor | None = None):
    """`(starts, lengths)` of the query blocks as `torch.LongTensor`s on the CPU: every `block_q` tokens from 0, or
    the blocks starting at `q_starts` (checked: increasing from 0, within the tokens, at most `block_q` apart)."""
    starts = torch.arange(0, num_tokens, block_q) if q_starts is None else torch.as_tensor(q_starts).cpu().long()
    lengths = torch.cat([starts.flatten()[1:], torch.tensor([num_tokens])]) - starts.flatten()
    if starts.dim() != 1 or not len(starts) or starts[0] != 0 or not ((lengths > 0) & (lengths <= block_q)).all():
        raise ValueError(
            f"q_starts must increase from 0 in steps of 1 to block_q={block_q} within {num_tokens} tokens, got "
            f"q_starts={starts.tolist()}"
        )
    return starts, lengths


def _block_of_token(starts: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The index of the query block (starting at `starts`, on the CPU) that holds each of the tokens."""
    return torch.searchsorted(starts, torch.arange(num_tokens), right=True) - 1


def _key_block_weights(
    query: torch.Tensor, key: torch.Tensor, block_k: int, masked: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 softmax of `query` `(B, H, rows, D)` over all of `key` `(B, H, Nk, D)` (scale `1 / sqrt(D)`),
    unnormalised: its numerators `(B, H, nk, block_k, rows)`, keys padded to whole blocks with weight 0, and its
    denominators `(B, H, rows)`. Keys come first so that each key block is one contiguous `(block_k, rows)` slab:
    the per-block sums below are plain batched matmuls and reductions, with no copy of the `rows x Nk` weights
    (the largest tensor of a search), and the normalisation is left to the much smaller per-block results.
    `masked` `(Nk, rows)`: pairs the model's own mask leaves out (weight 0; each row keeps some key)."""
    nk_tok, dim = key.shape[2], key.shape[3]
    nk = math.ceil(nk_tok / block_k)
    keys = torch.nn.functional.pad(key.float(), (0, 0, 0, nk * block_k - nk_tok))
    weights = keys @ (query.float() / math.sqrt(dim)).transpose(-1, -2)  # (B, H, nk * block_k, rows)
    weights[:, :, nk_tok:] = -torch.inf
    if masked is not None:
        weights[:, :, :nk_tok].masked_fill_(masked, -torch.inf)
    weights = weights.sub_(weights.amax(2, keepdim=True)).exp_()
    return weights.view(*weights.shape[:2], nk, block_k, -1), weights.sum(2)


def _masked_pairs(groups: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`(N, rows)`: the keys a causal group rule (`groups[s] <= groups[r]`) leaves out for the query `rows`."""
    return groups[:, None] > groups[rows][None, :]


def _allowed_blocks(groups: torch.Tensor, starts: torch.Tensor, block_k: int) -> torch.Tensor:
    """`(nq, nk)`: the block pairs holding at least one pair the causal group rule allows (the earliest key of the
    key block is in a group no later than the query block's latest), query blocks starting at `starts`."""
    bk = block_k
    latest_query = torch.full((len(starts),), -1).scatter_reduce(0, _block_of_token(starts, len(groups)), groups, "amax")
    pad = (0, -len(groups) % bk)
    earliest_key = torch.nn.functional.pad(groups, pad, value=int(groups.max())).view(-1, bk).amin(1)
    return earliest_key[None, :] <= latest_query[:, None]


def greedy_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_size: BlockSize,
    keep: float,
    required: torch.Tensor,
    sample_rows: int = 32,
    value_dims: int = 32,
    groups: torch.Tensor | None = None,
    q_starts: torch.Tensor | None = None,
    budget: str = "row",
    shard: HeadShard | None = None,
) -> torch.Tensor:
    r"""
    For each head and query block, the set of `round(keep * nk)` key blocks (at least `required`) whose
    block-sparse attention output is closest to the dense one, built greedily: starting from the required
    blocks, add the key block that most lowers the squared output error summed over the block's queries.
    Query blocks whose required blocks are more (text rows, which keep every key block) take the excess from
    the others, so the total stays `keep` of all blocks, required ones included (just the required blocks
    where those alone are more). Under the model's own causal mask (`groups`), dense means masked, and a set
    grows only by blocks the mask leaves some pair of (up to all of them, when there are fewer than
    `round(keep * nk)`).

    With kept blocks `K`, query `r`'s sparse output (softmax renormalised over `K`, as the kernel computes it)
    misses the dense output `o_r` by exactly `sum_{j in K} d_rj / sum_{j in K} m_rj`, where `m_rj` is the mass
    key block `j` holds and `d_rj = sum_{k in j} p_rk (v_k - o_r)` its pull away from `o_r`. So the error of
    any candidate set follows from the `d` and `m` of its blocks, and the greedy step is exact. Unlike ranking
    blocks one by one (by mass, or by what dropping each alone would cost), it sees that blocks whose pulls
    cancel are worth keeping together: on a diffuse head, whose output is a broad average, the top blocks by
    mass are a biased sample of it, while the greedy set is a balanced one.

    Cost, to keep it bounded on long sequences: `sample_rows` evenly spaced queries stand for each query
    block (all of them when the block is no longer; the rows of a partial last block may repeat), and values
    wider than `value_dims` are projected to `value_dims` dimensions by a fixed random Gaussian map (squared
    norms are kept in expectation). Work: one attention over the sampled rows plus `keep * nk` greedy steps
    over `(sampled rows, nk, value_dims)` per head and query block, in chunks of about `_CHUNK` floats.

    Args:
        query, key, value (`torch.Tensor` of shape `(B, H, N, D)`): in the token order the kernel sees; the
            batch's queries are pooled (one set per head and query block).
        block_size (`int` or `tuple[int, int]`): `block_q` and `block_k` in tokens.
        keep (`float`): share of key blocks per query block, in `(0, 1]`, required blocks included.
        required (`torch.BoolTensor` of shape `(nq, nk)`): blocks every set starts with.
        sample_rows (`int`, *optional*, defaults to `32`): queries per query block that enter the error.
        value_dims (`int`, *optional*, defaults to `32`): value dimensions the error is measured in.
        groups (`torch.LongTensor` of shape `(N,)`, *optional*): the model's causal mask, as in
            [`block_attention_mass`] (query, key and value of the same length).
        q_starts (`torch.LongTensor`, *optional*): the first token of each query block, as in
            [`block_attention_mass`] (`required` then has a row per block).
        budget (`str`, *optional*, defaults to `"row"`): `"row"`: every set gets `round(keep * nk)` blocks
            (less where text rows' excess is taken back, above).
            `"head"` or `"layer"`: `keep` of all the head's (or the layer's) blocks, rounded once, required ones
            included (under `groups`, each row's share capped at the blocks it may attend), shared among its sets
            by what they buy: every set is grown greedily up to twice its row share, and each further block goes
            to the set whose relative squared error (against its dense output's energy) it lowers most (gains
            made non-increasing along each set's sequence, so each set keeps a prefix of it), AdaSpa's
            head-adaptive budgets on the greedy objective. Costs the greedy steps of twice the share.
        shard ([`HeadShard`], *optional*): when these are only some of the model's heads (context or tensor
            parallelism), `budget="layer"` is shared over all of them, as one process would share it.

    Returns:
        `torch.BoolTensor` of shape `(H, nq, nk)`.

    Example:
        >>> q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
        >>> kept = greedy_blocks(q, k, v, 8, keep=0.4, required=torch.eye(5, dtype=torch.bool))
        >>> kept.shape, kept.sum(-1).tolist()
        (torch.Size([2, 5, 5]), [[2, 2, 2, 2, 2], [2, 2, 2, 2, 2]])
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget=}")
    bq, bk = as_pair(block_size)
    batch, heads, n, _ = query.shape
    starts, lengths = query_blocks(n, bq, q_starts)
    nq, nk = len(starts), math.ceil(key.shape[2] / bk)
    values = value.float()
    if value.shape[-1] > value_dims:
        projection = torch.randn(value.shape[-1], value_dims, generator=torch.Generator().manual_seed(0))
        values = values @ (projection / math.sqrt(value_dims)).to(values.device)
    dv = values.shape[-1]
    values = torch.nn.functional.pad(values, (0, 0, 0, nk * bk - key.shape[2])).reshape(batch, heads, nk, bk, dv)
    samples = min(sample_rows, bq)
    groups = None if groups is None else groups.to(query.device)
    rows = (starts[:, None] + torch.arange(samples)[None, :] * lengths[:, None] // samples).to(query.device)
    candidates = torch.ones(nq, nk, dtype=torch.bool)
    if groups is not None:
        candidates = required.cpu() | _allowed_blocks(groups.cpu(), starts, bk)
    required_count = required.sum(-1).cpu()
    count = _row_budgets(torch.clamp(candidates.sum(-1), max=round(keep * nk)), required_count).to(query.device)
    shared = budget != "row"
    if shared:  # grown further, then cut back to the shared budget
        # Rounded once over all of a head's blocks, as `select_blocks` does: a rounded share per row adds up the
        # rows' rounding (0.33 for keep=0.25 where a row holds 3 key blocks).
        head_blocks = float(torch.clamp(candidates.sum(-1).double(), max=keep * nk).sum())
        count = torch.maximum(
            torch.clamp(candidates.sum(-1), max=min(nk, 2 * round(keep * nk))), required_count
        ).to(query.device)
        steps = int((count.cpu() - required_count).max())
        picks = torch.full((steps, heads, nq), -1, dtype=torch.long, device=query.device)
        gains = torch.full((steps, heads, nq), -torch.inf, device=query.device)
    kept = required.to(query.device).expand(heads, nq, nk).clone()
    refused = (~candidates).to(query.device)
    per_block = batch * samples * max(nk * dv, nk * bk)  # floats of one head and query block (pulls or probabilities)
    head_chunk = max(1, min(heads, _CHUNK // per_block))
    block_chunk = max(1, _CHUNK // (per_block * head_chunk))
    for h0 in range(0, heads, head_chunk):
        h1 = min(h0 + head_chunk, heads)
        for q0 in range(0, nq, block_chunk):
            q1 = min(q0 + block_chunk, nq)
            sampled = rows[q0:q1].reshape(-1)
            masked = None if groups is None else _masked_pairs(groups, sampled)
            weights, total = _key_block_weights(query[:, h0:h1, sampled], key[:, h0:h1], bk, masked)
            mass = weights.sum(3) / total[:, :, None]  # (b, h, nk, rows)
            # Each key block's unnormalised share of o_r, then its pull (share - mass * o_r), normalised.
            part = weights.transpose(-1, -2) @ values[:, h0:h1]  # (b, h, nk, rows, dv)
            if shared:  # each set's dense output energy, sum over its rows of |o_r|^2
                energy = (part.sum(2) / total[..., None]).square().sum(-1)  # (b, h, rows)
                energy = rearrange(energy, "b h (q s) -> h q (b s)", s=samples).sum(-1).clamp(min=1e-30)
            pull = part.addcmul_(mass[..., None], part.sum(2, keepdim=True), value=-1).div_(total[:, :, None, :, None])

            # One set per head and query block, its rows pooled over the batch and the sampled queries.
            pull, mass = (rearrange(x, "b h j (q s) ... -> h q (b s) j ...", s=samples) for x in (pull, mass))
            grown = _grow(pull, mass, kept[h0:h1, q0:q1], count[q0:q1], refused[q0:q1], record=shared)
            if not shared:
                kept[h0:h1, q0:q1] = grown
                continue
            _, chunk_picks, errors = grown
            picks[: len(chunk_picks), h0:h1, q0:q1] = chunk_picks
            chunk_gains = (errors[:-1] - errors[1:]) / energy
            gains[: len(chunk_picks), h0:h1, q0:q1] = chunk_gains.masked_fill(chunk_picks < 0, -torch.inf)
    if not shared:
        return kept
    return _share_budget(kept, picks, gains, head_blocks, budget, shard)


def _share_budget(
    kept: torch.Tensor,
    picks: torch.Tensor,
    gains: torch.Tensor,
    head_blocks: float,
    budget: str,
    shard: HeadShard | None = None,
) -> torch.Tensor:
    """`greedy_blocks`' shared budgets: to the required blocks `kept` `(h, nq, nk)` (alike in every head), add
    the first picks of each set's greedy sequence (`picks` `(steps, h, nq)`, -1 past its end), up to
    `round(head_blocks)` blocks per head in all, required ones included (`round(heads * head_blocks)` for the
    layer), handed out by `gains` (`(steps, h, nq)`, the relative error each pick removes), per head or for the
    whole layer (all the model's heads under a `shard`)."""
    gains = torch.cummin(gains, dim=0).values  # non-increasing along each sequence: the best gains are prefixes
    local_heads = gains.shape[1]
    if budget == "layer" and shard is not None:
        gains = rearrange(shard.all_heads(rearrange(gains, "t h q -> h t q")), "h t q -> t h q")
    steps, heads, nq = gains.shape
    pool = rearrange(gains, "t h q -> h (t q)") if budget == "head" else gains.reshape(1, -1)
    pooled_heads = 1 if budget == "head" else heads
    share = max(0, round(pooled_heads * head_blocks) - pooled_heads * int(kept[0].sum()))
    ranks = torch.argsort(torch.argsort(pool, dim=-1, descending=True, stable=True), dim=-1)
    chosen = ranks < share
    # (A view, not einops: no set may grow at all, steps == 0, when the budget is at most the required blocks.)
    chosen = chosen.view(heads, steps, nq).transpose(0, 1) if budget == "head" else chosen.view(steps, heads, nq)
    taken = chosen.sum(0)  # blocks each set adds: a prefix of its picks
    if heads != local_heads:
        taken = shard.own(taken, local_heads)
    for step in range(steps):
        add = (taken > step) & (picks[step] >= 0)
        kept |= torch.nn.functional.one_hot(picks[step].clamp(min=0), kept.shape[-1]).bool() & add[..., None]
    return kept


def _set_error(squared: torch.Tensor, set_mass: torch.Tensor) -> torch.Tensor:
    """Each row's squared output error for sets whose pulls sum to a vector of squared norm `squared` and whose
    mass is `set_mass`. A set holding (almost) none of a row's mass leaves the kernel's output for that row to keys
    the softmax barely sees, and its float32 error would be rounding noise over an underflowing square: it counts
    as the worst, finite, so sums over rows stay comparable."""
    error = torch.where(set_mass >= _MIN_SET_MASS, squared.clamp(min=0) / set_mass.square(), _NO_MASS_ERROR)
    return error.clamp(max=_NO_MASS_ERROR)


def _grow(
    pull: torch.Tensor,
    mass: torch.Tensor,
    kept: torch.Tensor,
    count: torch.Tensor,
    refused: torch.Tensor,
    record: bool = False,
):
    """The greedy steps of `greedy_blocks` on `pull` `(h, blocks, rows, nk, D)` and `mass` `(h, blocks, rows,
    nk)`: add to `kept` `(h, blocks, nk)` one block per set and step until each set holds `count[block]`, never
    one of `refused` `(blocks, nk)`. `record`: also return each step's picks `(steps, h, blocks)` (-1 where a set
    was full) and each set's squared error (summed over its rows) before the first step and after each,
    `(steps + 1, h, blocks)`."""
    pull = pull.contiguous()  # read once per step below, as a view
    weights = kept.float()
    # Sums over the kept blocks as matmuls broadcast over the rows: no reordered copy of `pull`.
    total_pull = (weights[:, :, None, None, :] @ pull)[..., 0, :]
    total_mass = (mass @ weights[:, :, :, None])[..., 0]
    pull_norms = torch.linalg.vector_norm(pull, dim=-1).square_()
    picks = torch.empty(0, *kept.shape[:2], dtype=torch.long, device=kept.device)
    errors = _set_error(total_pull.square().sum(-1), total_mass).sum(2)[None] if record else None
    while True:
        short = kept.sum(-1) < count
        if not short.any():
            return (kept, picks, errors) if record else kept
        # |total + pull_j|^2 expanded, so each step reads `pull` once instead of building a copy of it.
        cross = torch.einsum("nd,njd->nj", total_pull.flatten(0, 2), pull.flatten(0, 2)).view(pull_norms.shape)
        squared = total_pull.square().sum(-1)[..., None] + 2 * cross + pull_norms
        error = _set_error(squared, total_mass[..., None] + mass).sum(2)  # (h, blocks, nk)
        best = error.masked_fill(kept | refused, torch.inf).argmin(-1)  # kept and refused are never picked again
        if record:
            picks = torch.cat([picks, best.masked_fill(~short, -1)[None]])
            errors = torch.cat([errors, torch.where(short, error.gather(-1, best[..., None])[..., 0], errors[-1])[None]])
        kept = kept | (torch.nn.functional.one_hot(best, kept.shape[-1]).bool() & short[..., None])
        index = best[:, :, None, None].expand(-1, -1, pull.shape[2], 1)  # (h, blocks, rows, 1)
        grow = short[:, :, None].float()  # sets already full add nothing
        total_mass = total_mass + grow * mass.gather(3, index)[..., 0]
        picked = pull.gather(3, index[..., None].expand(-1, -1, -1, -1, pull.shape[-1]))[:, :, :, 0]
        total_pull = total_pull + grow[..., None] * picked


def _group_block_starts(bounds: tuple[int, ...], block: int) -> torch.Tensor:
    """The first token of each block of `block` tokens counted from each group's start (`bounds`: the groups'
    first tokens, then the sequence's length)."""
    return torch.cat([torch.arange(a, b, block) for a, b in itertools.pairwise(bounds)])


def _covering_blocks(span: tuple[int, int], block: int, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`(blocks of the span, blocks given by starts and lengths)` as 0/1 floats: which of the given blocks each
    block of `block` tokens of the span `(start, stop)` (counted from its start, the last partial) overlaps."""
    first = torch.arange(*span, block)
    end = torch.clamp(first + block, max=span[1])
    return ((starts[None, :] < end[:, None]) & (starts + lengths > first[:, None])).float()


def _row_budgets(share: torch.Tensor, required: torch.Tensor) -> torch.Tensor:
    """How many blocks each query block keeps (`(..., nq)` long tensors, on the CPU): its `share`, or its `required`
    blocks where those are more (text rows keep every key block), the excess taken back from the other rows, which
    are lowered to a common count (the earlier rows one more where it does not divide), never below their own
    required blocks. So each head's total stays the shares' total, `keep` of its blocks, text and diagonal
    included; where the required blocks alone are more, just those. Without rows over their share (no text: only
    the diagonal is required) this is `max(share, required)`, bit for bit the per-row budget before the text's
    excess was taken back."""
    share, required = share.long(), required.long()
    base = torch.maximum(share, required)
    total = torch.maximum(share.sum(-1), required.sum(-1))
    over = base.sum(-1) > total
    if not over.any():
        return base

    def kept_at(level):  # each row at a common `level`, within [required, base]
        return torch.minimum(torch.maximum(level[..., None], required), base)

    # Bisect for the highest common level whose total still fits: kept_at(low) fits, kept_at(high) does not.
    low, high = torch.zeros_like(total), base.amax(-1)
    while bool(((high - low > 1) & over).any()):
        mid = (low + high) // 2
        fits = kept_at(mid).sum(-1) <= total
        low, high = torch.where(fits, mid, low), torch.where(fits, high, mid)
    counts = kept_at(low)
    # The rows that would grow at the next level share what is left, one block each.
    can_grow = (counts == low[..., None]) & (counts < base)
    counts = counts + (can_grow & (can_grow.cumsum(-1) <= (total - counts.sum(-1))[..., None]))
    return torch.where(over[..., None], counts, base)


def _top(scores: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """Bool mask over the last dim of `scores`: its `count` largest entries (ties broken by position)."""
    ranks = torch.argsort(torch.argsort(scores, dim=-1, descending=True, stable=True), dim=-1)
    count = torch.as_tensor(count, device=scores.device)
    return ranks < (count[..., None] if count.ndim else count)


def select_blocks(
    scores: torch.Tensor,
    keep: float,
    budget: str,
    required: torch.Tensor,
    top_p: float | None = None,
    shard: HeadShard | None = None,
) -> torch.Tensor:
    r"""
    The highest-scoring blocks, `keep` of all blocks, always including `required`.

    Args:
        scores (`torch.Tensor` of shape `(H, nq, nk)`): e.g. [`block_drop_error`] or [`block_attention_mass`];
            higher is kept first.
        keep (`float`): share of blocks to keep, in `(0, 1]`, `required` included (rounded to whole blocks;
            just `required` where those alone are more). With `budget="row"`, `round(keep * nk)` per row, rows
            whose required blocks are more (text rows) taking the excess from the others.
        budget (`str`): where the share applies: `"layer"` (one budget for all heads and rows, so heads and
            rows with more high scores get more blocks), `"head"` (per head), `"row"` (per query block).
        required (`torch.BoolTensor` of shape `(nq, nk)` or `(H, nq, nk)`): blocks kept whatever their score
            (the diagonal, text).
        top_p (`float`, *optional*): each row keeps only blocks among the fewest (required ones first, then the
            highest) whose scores sum to `top_p` of the row's (the cumulative threshold of SpargeAttn and
            XAttention: concentrated rows keep few blocks, diffuse ones many), at most `keep` of them: of the
            row's blocks with `budget="row"`, of the head's or layer's with `"head"` / `"layer"` (the highest
            scores among all rows' candidates). Scores must be non-negative, e.g. block masses.
        shard ([`HeadShard`], *optional*): when these are only some of the model's heads (context or tensor
            parallelism), `budget="layer"` is shared over all of them, as one process would share it.

    Returns:
        `torch.BoolTensor` of shape `(H, nq, nk)`.

    Example:
        >>> scores = torch.tensor([[[0.7, 0.2, 0.1], [0.5, 0.1, 0.4]]])
        >>> required = torch.tensor([[True, False, False], [False, True, False]])
        >>> select_blocks(scores, 0.5, "layer", required).int()  # 3 of 6 blocks: the diagonal, then the highest
        tensor([[[1, 0, 0],
                 [1, 1, 0]]], dtype=torch.int32)
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget=}")
    heads, nq, nk = scores.shape
    required = required.to(scores.device).expand(heads, nq, nk)
    # Required blocks rank first (above even infinite scores, held at the largest float); then the higher score.
    ranked = torch.where(required, torch.inf, scores.float().clamp(max=torch.finfo(torch.float32).max))
    row_count = _row_budgets(torch.full((heads, nq), round(keep * nk)), required.sum(-1).cpu()).to(scores.device)
    if top_p is not None:
        order = ranked.argsort(dim=-1, descending=True, stable=True)
        ordered = scores.float().gather(-1, order)
        before = ordered.cumsum(-1) - ordered  # the score of the blocks ranked above each one
        needed = (before < top_p * scores.float().sum(-1, keepdim=True)).sum(-1)
        if budget == "row":
            row_count = torch.minimum(row_count, needed)
        else:  # only each row's candidates compete for the shared budget
            candidates = _top(ranked, torch.clamp(needed, min=required.sum(-1)))
            ranked = ranked.masked_fill(~candidates, -torch.inf)
    if budget == "row":
        return _top(ranked, torch.clamp(row_count, min=required.sum(-1)))
    if budget == "layer" and shard is not None:
        ranked = shard.all_heads(ranked)
    flat = ranked.reshape(heads, nq * nk) if budget == "head" else ranked.reshape(1, -1)
    count = torch.clamp(torch.full((flat.shape[0],), round(keep * flat.shape[1]), device=scores.device),
                        min=flat.isposinf().sum(-1))  # the required blocks
    count = torch.minimum(count, (flat != -torch.inf).sum(-1))  # top_p's candidates at most
    kept = _top(flat, count).reshape(-1, nq, nk)
    return kept if len(kept) == heads else shard.own(kept, heads)


def _check_keep(keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"Searched.keep must be a share of blocks in (0, 1], got keep={keep!r}")


@dataclass(frozen=True, repr=False)
class Searched(Pattern):
    r"""
    Searched blocks (name `"searched"`), as AdaSpa and SparseD observe: which blocks a head needs barely
    changes across denoising steps, so find them once from the model's own attention and reuse them. At a
    layer's first sparse call of a generation the runtime calls [`~Searched.search`] with that call's
    queries, keys and values; the resulting per-head block mask (for that layout, block size and token order)
    is reused (plan-cached) for the remaining steps of the generation, and the next generation searches again.
    The runtime searches each video of a batch on its own queries, keys and values (so a video gets the blocks
    it gets alone, whatever shares its batch); the search is shared by the CFG branches where the pipeline calls
    the transformer once per branch (the cond call runs first); a call that batches both branches searches each
    half on its own.

    How blocks are chosen (`criterion`):

    - `"greedy"` ([`greedy_blocks`]): per head and query block, the set of key blocks whose sparse output is
      closest to the dense output, built greedily from the exact error of each candidate set. On the embedded
      testbed it has about a third of the attention error of the best static pattern (at a slightly higher
      density) at the step it searched; with the default `budget="layer"` one search per generation reaches
      31.9 dB at 25% density and block 64 (six videos, 1.32x end to end; README). Its cost is the catch
      (`diffsparse bench search`): at 2,448 tokens, 4 heads x 32, on a 2-core CPU, one search with
      `budget="layer"` costs about 4.7 dense attention calls of the layer at block 64 (3.9 with `budget="row"`,
      19 at block 32); `sample_rows=8` cuts it to about 1.9 (1.5 with `"row"`) for about 1.7 dB (30.2 dB, at
      1.43x). How much the search is cut matters more than how (fewer queries, or values projected to fewer
      dimensions).
    - `"mass"` ([`block_attention_mass`] then [`select_blocks`]): the blocks holding the most attention mass
      (AdaSpa, SpargeAttn). On diffuse heads, whose output is a broad average, the top blocks by mass are a
      biased sample of that average, and the error can exceed the output itself.
    - `"pooled"` ([`pooled_block_mass`] then [`select_blocks`]): SpargeAttn's prediction: the mass estimated
      from block-mean queries and keys, at a small fraction of a dense call, so cheap enough to search at every
      step (`refresh=1`); key blocks whose keys are not alike (mean cosine similarity below `min_similarity`),
      which a mean stands for poorly, are kept whatever their estimate.

    Text structure: blocks holding text tokens are always kept as queries and as keys (as every pattern does),
    and every query block keeps its diagonal key block; both count toward `keep` under every criterion and
    budget. Query blocks that must keep more than their row share (text rows keep every key block) take the
    excess from the other query blocks' shares (`budget="row"`, and the greedy head and layer budgets, which
    add up the row shares), so the layout's density stays `keep` (FLUX.1 at 1024 x 1024, block 64: 0.25 at
    `keep=0.25`, where text rows on top of their share gave 0.33). Where the required blocks alone are more
    than `keep`, just those are kept.

    Under the model's own causal mask (SkyReels-V2's asynchronous diffusion forcing: `search(..., within=
    FrameCausal(frames))`, which the runtime passes) the search measures the masked attention, spends each query
    block's budget on blocks the mask allows, and counts query blocks from each group's first token, as the
    runtime's per-group kernel calls do (`block_mask(..., q_tokens=, k_tokens=)` gives a group's rows).

    It has no closed-form token definition: its token mask is the searched block mask expanded to tokens, in
    the searched order. Before a search it has no mask at all, and asking for one raises (rather than
    quietly standing in a dense or a guessed mask): measure a searched pattern through the runtime
    (`diffsparse eval`, `diffsparse trace`), which searches on the model's own queries, keys and values.

    Args:
        keep (`float`, *optional*, defaults to `0.25`): share of blocks kept, in `(0, 1]`. `SparseConfig.density`
            sets it (`at_density` gives a copy with `keep=target`).
        criterion (`str`, *optional*, defaults to `"greedy"`): `"greedy"`, `"mass"` or `"pooled"` (above).
        budget (`str`, *optional*, defaults to `"layer"`): where `keep` applies: `"row"`, the same number of key
            blocks for every query block; `"head"` (per head) or `"layer"` (one budget for all heads and rows of
            the layer, AdaSpa's head-adaptive budgets): with `"mass"` or `"pooled"` the highest scores of the
            head or layer, with `"greedy"` the blocks that lower the relative error most ([`greedy_blocks`]).
            Under context or tensor parallelism `"layer"` is shared over all the model's heads, as in one
            process (the ranks' scores are all-gathered: `search(..., shard=)`).
        sample_rows (`int`, *optional*, defaults to `32`): `"greedy"`: queries per query block whose error
            counts (evenly spaced; all of them for blocks of up to 32 queries).
        value_dims (`int`, *optional*, defaults to `32`): `"greedy"`: value dimensions the error is measured in
            (wider values are randomly projected; exact up to 32).
        refresh (`int`, *optional*, defaults to `0`): search again every this many steps after a layer's last
            search, with that step's tensors (`0`: once per generation). Each search costs again (above).
        min_similarity (`float`, *optional*, defaults to `0.0`): `"pooled"`: key blocks whose keys' mean cosine
            similarity is below this are always kept, in `[0, 1]` (`0`: none); they count toward `keep`, so a
            row may keep more than its share where many are.
        top_p (`float`, *optional*): `"mass"` or `"pooled"`: each query block keeps only blocks among the fewest
            holding `top_p` of its (estimated) mass, in `(0, 1]`, with `keep` the most that may be kept, per row
            or shared over the head or layer as `budget` says ([`select_blocks`]): the density then follows the
            attention, at most `keep`.

    Example:
        >>> from diffsparse.patterns import Searched, VideoLayout
        >>> layout = VideoLayout(frames=2, height=4, width=4)
        >>> q, k, v = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
        >>> searched = Searched(keep=0.5).search(q, k, v, layout, 8)
        >>> searched
        searched(keep=0.5, criterion='greedy', budget='layer', heads=2)
        >>> searched.block_mask(layout, 8).shape, searched.density(layout, 8)
        (torch.Size([2, 4, 4]), 0.5)
    """

    keep: float = 0.25
    criterion: str = "greedy"
    budget: str = "layer"
    sample_rows: int = 32
    value_dims: int = 32
    refresh: int = 0
    min_similarity: float = 0.0
    top_p: float | None = None
    # Set by `search`, not parameters (`get_pattern` lists and takes the constructor's only): the mask (compared
    # through `searched_for`, whose last item is a digest of its bits). A `replace`d copy is unsearched.
    searched_mask: torch.Tensor | None = field(default=None, init=False, compare=False)
    searched_for: tuple | None = field(default=None, init=False)

    name = "searched"
    composable = False

    def __post_init__(self):
        _check_keep(self.keep)
        if self.criterion not in CRITERIA:
            raise ValueError(f"Searched.criterion must be one of {CRITERIA}, got criterion={self.criterion!r}")
        if self.budget not in BUDGETS:
            raise ValueError(f"Searched.budget must be one of {BUDGETS}, got budget={self.budget!r}")
        similarity = self.min_similarity
        if isinstance(similarity, bool) or not isinstance(similarity, (int, float)) or not 0 <= similarity <= 1:
            raise ValueError(f"Searched.min_similarity must be a number in [0, 1], got min_similarity={similarity!r}")
        if similarity and self.criterion != "pooled":
            raise ValueError(
                f"Searched.min_similarity={similarity!r} needs criterion='pooled' (the only criterion that estimates "
                f"blocks from their means), got criterion={self.criterion!r}"
            )
        if self.top_p is not None:
            top_p = self.top_p
            if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
                raise ValueError(f"Searched.top_p must be a share of the mass in (0, 1] or None, got top_p={top_p!r}")
            if self.criterion == "greedy":
                raise ValueError(
                    f"Searched.top_p={top_p!r} needs a mass criterion ('mass' or 'pooled'), got "
                    f"criterion={self.criterion!r}"
                )
        for name, low in (("sample_rows", 1), ("value_dims", 1), ("refresh", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Searched.{name} must be an int >= {low}, got {name}={value!r}")

    @property
    def num_heads(self) -> int:
        return 1 if self.searched_mask is None else self.searched_mask.shape[0]

    @property
    def refit_every(self) -> int:
        return self.refresh

    def __repr__(self) -> str:
        extra = "" if (self.sample_rows, self.value_dims) == (32, 32) else (
            f", sample_rows={self.sample_rows!r}, value_dims={self.value_dims!r}")
        extra += f", refresh={self.refresh!r}" if self.refresh else ""
        extra += f", min_similarity={self.min_similarity!r}" if self.min_similarity else ""
        extra += "" if self.top_p is None else f", top_p={self.top_p!r}"
        extra += "" if self.searched_mask is None else f", heads={self.num_heads}"
        return f"{self.name}(keep={self.keep!r}, criterion={self.criterion!r}, budget={self.budget!r}{extra})"

    @torch.no_grad()
    def search(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor | None,
        layout: VideoLayout,
        block_size: BlockSize,
        order: TokenOrder | None = None,
        within: FrameCausal | None = None,
        shard: HeadShard | None = None,
        q_tokens: tuple[int, int] | None = None,
    ) -> Searched:
        r"""
        A copy holding the highest-scoring blocks for these queries, keys and values.

        Args:
            query, key, value (`torch.Tensor` of shape `(B, H, N, D)`): in the model's (frame-major) token
                order, `N = layout.num_tokens`; they are put in `order` here. One batch and one set of heads
                (nothing is broadcast), `query` and `key` of one head dim. `value` may be `None` with
                `criterion="mass"` or `"pooled"`.
            layout ([`VideoLayout`]): the sequence layout.
            block_size (`int` or `tuple[int, int]`): `block_q` and `block_k` of the kernel.
            order ([`TileOrder`] or [`IdentityOrder`], *optional*, defaults to `None` (frame-major)): the token
                order the kernel sees.
            within ([`FrameCausal`], *optional*): the model's own attention mask (SkyReels-V2's causal frame
                groups): the search measures the masked attention and keeps no block the mask leaves wholly out
                (`"greedy"`; with `"mass"` such blocks hold no mass and rank last). A query block's budget stays
                `round(keep * nk)` of all key blocks, capped at the blocks it may attend. Where `order` keeps each
                group's tokens together, query blocks are counted from each group's first token, as the
                runtime's per-group kernel calls count them, so those calls run the searched blocks as they are.
            shard ([`HeadShard`], *optional*): when the tensors hold only some of the model's heads (context
                or tensor parallelism): `budget="layer"` is then shared over all the model's heads, so each
                process keeps the blocks one process would keep for its heads (every process calls this together).
            q_tokens (`tuple[int, int]`, *optional*): the queries `(start, stop)` the kernel computes (in `order`),
                when not all of them (the runtime's `video_queries` calls, which attend the text's queries elsewhere
                or not at all): `keep` is then the share of those queries' blocks (`density(..., q_tokens)`), their
                query blocks are counted from `start` (as the call's kernel counts them), and the rows outside
                keep their required blocks only, at no cost to the budget (those queries are not searched: give
                anything there).
        """
        pair, order = as_pair(block_size), as_order(order)
        n = layout.num_tokens
        check_spans(layout, q_tokens, None)
        if q_tokens is not None and within is not None:
            raise ValueError(f"q_tokens={q_tokens!r} (queries of a part of the sequence) cannot be combined with "
                             f"within={within!r} (a mask whose groups attend from the sequence's first query)")
        if value is None and self.criterion == "greedy":
            raise ValueError(f"{self!r} measures the output error of its blocks: give value, not None")
        if within is not None and not isinstance(within, FrameCausal):
            raise ValueError(f"within must be a FrameCausal mask or None, got within={within!r}")
        if within is not None and layout.text_len:
            raise ValueError(f"within={within!r} is a mask over video tokens: give a layout without text, got {layout}")
        check_qkv(layout, query, key, value)
        tensors = {"query": query, "key": key} | ({} if value is None else {"value": value})
        if not isinstance(order, IdentityOrder):
            perm = order.permutation(layout).to(query.device)
            tensors = {name: t.index_select(2, perm) for name, t in tensors.items()}
        groups, bounds = None, (0, n)
        if within is not None:
            groups = within.video_groups(layout, order).to(query.device)
            bounds = within.group_bounds(layout, order) or bounds  # each group's tokens together: blocks from its start
        elif q_tokens is not None:
            bounds = tuple(sorted({0, *q_tokens, n}))  # the computed queries' blocks from their first token
        starts = _group_block_starts(bounds, pair[0])
        required = self._required(layout, pair, starts)
        # Only the computed queries' blocks are searched and paid for: else the text rows (every key block) took
        # their share of `keep` from the video rows of a `video_queries` call, then were left out of it (0.21 for
        # keep=0.3 with a fifth of the rows text).
        lo, hi = (0, n) if q_tokens is None else q_tokens
        rows = slice(int((starts < lo).sum()), int((starts < hi).sum()))
        queries, span_starts = tensors["query"][:, :, lo:hi], starts[rows] - lo
        if self.criterion == "greedy":
            searched = greedy_blocks(queries, tensors["key"], tensors["value"], pair, self.keep, required[rows],
                                     sample_rows=self.sample_rows, value_dims=self.value_dims, groups=groups,
                                     q_starts=span_starts, budget=self.budget, shard=shard)
        elif self.criterion == "mass":
            mass = block_attention_mass(queries, tensors["key"], pair, groups, q_starts=span_starts)
            searched = select_blocks(mass, self.keep, self.budget, required[rows], top_p=self.top_p, shard=shard)
        else:
            mass, similarity = pooled_block_mass(queries, tensors["key"], pair, groups, q_starts=span_starts)
            dissimilar = (similarity < self.min_similarity).cpu()[:, None, :]  # (H, 1, nk)
            searched = select_blocks(mass, self.keep, self.budget, required[rows] | dissimilar, top_p=self.top_p,
                                     shard=shard)
        mask = required.expand(searched.shape[0], *required.shape).clone()
        mask[:, rows] = searched.cpu()
        digest = hashlib.sha1(mask.numpy().tobytes()).hexdigest()
        searched = replace(self)
        object.__setattr__(searched, "searched_mask", mask)
        object.__setattr__(searched, "searched_for", (layout, pair, order, bounds, tuple(mask.shape), digest))
        return searched

    def fit(
        self, query, key, value, layout, block_size, order=None, generator=None, within=None, shard=None, q_tokens=None
    ) -> Searched:
        """[`~Searched.search`] (nothing is drawn at random: `generator` is unused)."""
        return self.search(query, key, value, layout, block_size, order, within, shard, q_tokens)

    @staticmethod
    def _required(layout: VideoLayout, block_size: tuple[int, int], q_starts: torch.Tensor | None = None):
        """`(nq, nk)`: the diagonal key block of every query block (starting at `q_starts`; default every
        `block_q` tokens), and every block pair touching text."""
        bq, bk = block_size
        starts, lengths = query_blocks(layout.num_tokens, bq, q_starts)
        _, _, k_text = _block_spans(layout, bk)
        text_lo, text_hi = layout.text_start, layout.text_start + layout.text_len
        q_text = (starts < text_hi) & (starts + lengths > text_lo)
        nq, nk = len(starts), len(k_text)
        required = q_text[:, None] | k_text[None, :]
        # The kernel's diagonal rule: the key block holding the query block's first token.
        diagonal = torch.clamp(starts // bk, max=nk - 1)
        required[torch.arange(nq), diagonal] = True
        return required

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(starts, lengths)` of the searched mask's query blocks, in tokens."""
        (layout, (bq, _), _), bounds = self._searched_key(), self.searched_for[3]
        return query_blocks(layout.num_tokens, bq, _group_block_starts(bounds, bq))

    def _searched_key(self) -> tuple:
        """`(layout, (block_q, block_k), order)` the mask was searched for."""
        if self.searched_for is None:
            raise ValueError(
                f"{self!r} has no blocks before a search: its mask comes from a model's queries, keys and values "
                f"(Searched.search, called by the runtime at each layer's first sparse call)"
            )
        return self.searched_for[:3]

    def _searched(self, layout: VideoLayout, block_size: BlockSize, order: TokenOrder | None) -> torch.Tensor:
        asked = (layout, as_pair(block_size), as_order(order))
        if self._searched_key() != asked:
            raise ValueError(
                f"{self!r} was searched for layout, block size and order {self.searched_for[:3]}; it has no mask "
                f"for {asked}: search again"
            )
        return self.searched_mask

    def _video_token_mask(self, layout: VideoLayout) -> torch.Tensor:
        """The searched mask over video tokens in frame-major order (what the base class calls the definition)."""
        order = self._searched_key()[2]
        tokens = self.token_mask(layout, order=order)
        if not isinstance(order, IdentityOrder):
            inverse = order.inverse(layout)
            tokens = tokens[:, inverse][:, :, inverse]
        video = slice(layout.video_start, layout.video_start + layout.num_video_tokens)
        return tokens[:, video, video]

    def block_mask(
        self,
        layout: VideoLayout,
        block_size: BlockSize,
        order: TokenOrder | None = None,
        q_tokens: tuple[int, int] | None = None,
        k_tokens: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The searched mask; between the token ranges `q_tokens`, `k_tokens` (a causal group's queries and its
        keys), the reduction of its token mask there: each block of the range keeps what any searched block it
        overlaps kept."""
        mask = self._searched(layout, block_size, order).clone()
        check_spans(layout, q_tokens, k_tokens)
        bq, bk = as_pair(block_size)
        n = layout.num_tokens
        rows = self._rows()
        if (q_tokens or (0, n)) == (0, n) and torch.equal(rows[0], torch.arange(0, n, bq)):
            q_cover = None  # the searched rows are the asked ones
        else:
            q_cover = _covering_blocks(q_tokens or (0, n), bq, *rows)
        if k_tokens is not None and k_tokens != (0, n):
            columns = query_blocks(n, bk)  # key blocks are always counted from 0
            mask = ((mask.float() @ _covering_blocks(k_tokens, bk, *columns).t()) > 0)
        return mask if q_cover is None else (q_cover @ mask.float()) > 0

    def token_mask(self, layout: VideoLayout, order: TokenOrder | None = None) -> torch.Tensor:
        bq, bk = self._searched_key()[1]
        mask = self._searched(layout, (bq, bk), order)
        n = layout.num_tokens
        return mask.repeat_interleave(self._rows()[1], 1).repeat_interleave(bk, 2)[:, :, :n]

    def at_density(self, layout, target, block_size, order=None, max_iter=40, q_tokens=None) -> Searched:
        r"""A copy keeping `target` of the blocks (no solving: `keep` is the density, whichever queries attend). A
        searched pattern can only confirm its own `keep`; search again for another."""
        check_target(target)
        check_max_iter(max_iter)
        if self.searched_mask is None:
            return replace(self, keep=target)
        if target != self.keep:
            raise ValueError(f"{self!r} was searched for keep={self.keep}; search again for density {target}")
        return self
