"""The math of merging KV heads: mean pooling and a calibrated, RoPE-aware closed form.

Query head ``i`` reads KV head ``i // (H / KVH)``, so going from ``KVH`` to ``KVH'`` heads
merges each run of ``r = KVH / KVH'`` consecutive KV heads into one.

``mean`` (Ainslie et al., 2023) averages the K and V projection rows of a group.

``calibrated`` fits the merge to calibration activations and absorbs the inverse into the
query and output projections, so each query head still sees (approximately) its own key
and value head:

- keys, with RoPE: in the rotary plane of frequency ``f`` a key is a complex number and
  RoPE multiplies it by ``e^{i θ_f pos}``.  Only a complex scalar commutes with every
  rotation, so the merged key is ``k'_f = Σ_j a_{jf} k_{jf}`` and each original key is
  approximated as ``k_{jf} ≈ b_{jf} k'_f``; the query of head ``i`` absorbs ``conj(b_{jf})``.
  ``a`` and ``b`` come from the best rank-1 (complex SVD) approximation of the group's keys,
  each head weighted by the energy its queries put on that plane (what the scores see).
  Without RoPE (gpt2) the merged key is any linear map of the group's keys: a weighted
  PCA, the inverse absorbed into the queries.
- values: weighted PCA of the group's centred values (weights from the output projection
  columns that read them); the merged value is the top ``head_dim`` components, each
  original value is reconstructed by least squares and absorbed into ``o_proj``.  The mean
  value goes to ``o_proj``'s bias exactly, because attention weights sum to one.

The result is exact when the group's keys/values really are (complex-)rank-deficient and
the least-squares optimum of its proxy objective otherwise; healing (``trainable.py``)
closes the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# Relative ridge added to covariance matrices: calibration sets are finite and some
# directions carry (almost) no energy.
_RIDGE = 1e-6


@dataclass
class AttentionWeights:
    """Dense fp32 weights of one attention block (rows of q/k/v are heads × head_dim)."""

    q_w: torch.Tensor
    q_b: torch.Tensor | None
    k_w: torch.Tensor
    k_b: torch.Tensor | None
    v_w: torch.Tensor
    v_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    target_kv_heads: int
    rotary_dim: int = 0  # 0 = no RoPE

    @property
    def ratio(self) -> int:
        """Original KV heads merged into one."""
        return self.num_kv_heads // self.target_kv_heads

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_heads_of_group(self, m: int) -> range:
        return range(m * self.ratio, (m + 1) * self.ratio)

    def queries_of_kv(self, j: int) -> range:
        g = self.queries_per_kv
        return range(j * g, (j + 1) * g)


def _rows(w: torch.Tensor | None, head: int, d: int) -> torch.Tensor | None:
    return None if w is None else w[head * d:(head + 1) * d]


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts)


def mean_merge(w: AttentionWeights, lay: HeadLayout) -> AttentionWeights:
    """Average the K/V projection rows (and biases) of each group of KV heads."""
    d = lay.head_dim

    def pool(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        heads = t.reshape(lay.num_kv_heads, d, *t.shape[1:])
        return heads.reshape(lay.target_kv_heads, lay.ratio, d, *t.shape[1:]).mean(1).reshape(-1, *t.shape[1:])

    return replace(w, k_w=pool(w.k_w), k_b=pool(w.k_b), v_w=pool(w.v_w), v_b=pool(w.v_b))


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x @ weight.T.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def _top_eigvecs(cov: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` eigenvectors (columns) of a Hermitian matrix, largest first."""
    ridge = _RIDGE * cov.diagonal().real.mean().clamp_min(1e-30)
    vals, vecs = torch.linalg.eigh(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype))
    return vecs[:, torch.argsort(vals, descending=True)[:k]]


def _lstsq(target: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """B minimising ‖target - basis @ B.T‖ over rows: target (T, d_out), basis (T, d_in)."""
    gram = basis.T.conj() @ basis
    ridge = _RIDGE * gram.diagonal().real.mean().clamp_min(1e-30)
    gram = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, basis.T.conj() @ target).T.conj()


def calibrated_merge(w: AttentionWeights, lay: HeadLayout, x: torch.Tensor) -> AttentionWeights:
    """Merge KV heads fitted to calibration inputs ``x`` (tokens, hidden) of the q/k/v projections."""
    x64 = x.reshape(-1, x.shape[-1]).double()
    q_w, q_b, k_w, k_b = _merge_keys(w, lay, x64)
    v_w, v_b, o_w, o_b = _merge_values(w, lay, x64)
    return AttentionWeights(q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b)


# -- keys ------------------------------------------------------------------------------
def _merge_keys(w: AttentionWeights, lay: HeadLayout, x: torch.Tensor):
    d, rd = lay.head_dim, lay.rotary_dim
    q = _project(x, w.q_w.double(), None if w.q_b is None else w.q_b.double())  # bias included: scores see it
    k = _project(x, w.k_w.double(), None if w.k_b is None else w.k_b.double())
    q_w, q_b = w.q_w.double().clone(), None if w.q_b is None else w.q_b.double().clone()
    new_k_w, new_k_b = [], []
    for m in range(lay.target_kv_heads):
        group = list(lay.kv_heads_of_group(m))
        # (rows mixing original K rows into the merged head, per-query-head maps absorbed in q)
        mix = torch.zeros(d, lay.ratio * d, dtype=torch.float64)
        q_maps: dict[int, torch.Tensor] = {}
        if rd:
            _rotary_key_merge(q, k, lay, group, mix, q_maps)
        free = list(range(rd, d))  # dims RoPE does not rotate: any linear map is allowed
        if free:
            _linear_key_merge(q, k, lay, group, free, mix, q_maps)
        stacked_w = torch.cat([w.k_w[j * d:(j + 1) * d].double() for j in group])
        new_k_w.append(mix @ stacked_w)
        if w.k_b is not None:
            new_k_b.append(mix @ torch.cat([w.k_b[j * d:(j + 1) * d].double() for j in group]))
        for i, qmap in q_maps.items():  # q'_i = qmap @ q_i (rows of head i)
            rows = slice(i * d, (i + 1) * d)
            q_w[rows] = qmap @ w.q_w[rows].double()
            if q_b is not None:
                q_b[rows] = qmap @ w.q_b[rows].double()
    k_b_out = torch.cat(new_k_b).float() if new_k_b else None
    return q_w.float(), None if q_b is None else q_b.float(), torch.cat(new_k_w).float(), k_b_out


def _rotary_key_merge(q, k, lay: HeadLayout, group: list[int], mix, q_maps) -> None:
    """Per rotary plane: complex rank-1 merge of the group's keys, weighted by query energy."""
    d, half = lay.head_dim, lay.rotary_dim // 2
    for f in range(half):
        re, im = f, f + half
        z = torch.stack([torch.complex(k[:, j * d + re], k[:, j * d + im]) for j in group], dim=1)  # (T, r)
        energy = torch.stack([
            sum((q[:, i * d + re] ** 2 + q[:, i * d + im] ** 2).mean() for i in lay.queries_of_kv(j)) for j in group])
        sw = energy.clamp_min(1e-12).sqrt()
        zt = z * sw.to(z.dtype)
        v = _top_eigvecs(zt.T.conj() @ zt / z.shape[0], 1)[:, 0]  # (r,)
        a = sw.to(v.dtype) * v  # merged key k' = Σ_j a_j z_j
        merged = z @ a
        # Refit each head's coefficient by least squares against the merged key.
        denom = (merged.conj() * merged).real.sum().clamp_min(1e-30)
        for pos, j in enumerate(group):
            b = (merged.conj() * z[:, pos]).sum() / denom  # z_j ≈ b k'
            # k'_f = a z: real rows [re, im] of the merged head from [re, im] rows of head j
            ar, ai = float(a[pos].real), float(a[pos].imag)
            c0 = pos * d
            mix[re, c0 + re] += ar
            mix[re, c0 + im] += -ai
            mix[im, c0 + re] += ai
            mix[im, c0 + im] += ar
            c = b.conj()  # q'_i = conj(b) q_i
            cr, ci = float(c.real), float(c.imag)
            for i in lay.queries_of_kv(j):
                qm = q_maps.setdefault(i, torch.zeros(d, d, dtype=torch.float64))
                qm[re, re], qm[re, im], qm[im, re], qm[im, im] = cr, -ci, ci, cr


def _linear_key_merge(q, k, lay: HeadLayout, group: list[int], dims: list[int], mix, q_maps) -> None:
    """Unrotated key dims: weighted PCA over the group, inverse absorbed into the queries."""
    d, n = lay.head_dim, len(dims)
    idx = torch.tensor(dims)
    keys = [k[:, j * d + idx] for j in group]  # each (T, n)
    # Weight each head's dims by the second moment of the queries that read it (metric of the score error).
    metrics = []
    for j in group:
        qs = torch.cat([q[:, i * d + idx] for i in lay.queries_of_kv(j)])
        metrics.append(qs.T @ qs / qs.shape[0])
    roots = [_sqrtm(mtx) for mtx in metrics]
    weighted = torch.cat([kj @ rt for kj, rt in zip(keys, roots, strict=True)], dim=1)  # (T, r n)
    u = _top_eigvecs(weighted.T @ weighted / weighted.shape[0], n)  # (r n, n)
    a = torch.block_diag(*roots) @ u  # merged = keys_stack @ a
    merged = torch.cat(keys, dim=1) @ a  # (T, n)
    for pos, j in enumerate(group):
        b = _lstsq(keys[pos], merged)  # k_j ≈ b @ k'
        c0 = pos * d
        mix[idx[:, None], (c0 + idx)[None, :]] = a[pos * n:(pos + 1) * n].T
        for i in lay.queries_of_kv(j):
            qm = q_maps.setdefault(i, torch.eye(d, dtype=torch.float64) if not lay.rotary_dim else
                                   torch.zeros(d, d, dtype=torch.float64))
            qm[idx[:, None], idx[None, :]] = b.T  # q_i·k_j ≈ q_i·(b k') = (bᵀ q_i)·k'


def _sqrtm(m: torch.Tensor) -> torch.Tensor:
    ridge = _RIDGE * m.diagonal().mean().clamp_min(1e-30)
    vals, vecs = torch.linalg.eigh(m + ridge * torch.eye(m.shape[0], dtype=m.dtype))
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


# -- values ----------------------------------------------------------------------------
def _merge_values(w: AttentionWeights, lay: HeadLayout, x: torch.Tensor):
    d = lay.head_dim
    v = _project(x, w.v_w.double(), None if w.v_b is None else w.v_b.double())
    o_w = w.o_w.double().clone()
    o_b = torch.zeros(o_w.shape[0], dtype=torch.float64) if w.o_b is None else w.o_b.double().clone()
    new_v_w, new_v_b = [], []
    for m in range(lay.target_kv_heads):
        group = list(lay.kv_heads_of_group(m))
        vals = [v[:, j * d:(j + 1) * d] for j in group]
        means = [vj.mean(0) for vj in vals]
        centred = [vj - mu for vj, mu in zip(vals, means, strict=True)]
        # Metric of head j: what o_proj does with it, summed over the query heads reading it.
        metrics = []
        for j in group:
            cols = torch.cat([w.o_w[:, i * d:(i + 1) * d].double() for i in lay.queries_of_kv(j)])
            metrics.append(cols.T @ cols)
        roots = [_sqrtm(mtx) for mtx in metrics]
        weighted = torch.cat([cj @ rt for cj, rt in zip(centred, roots, strict=True)], dim=1)  # (T, r d)
        u = _top_eigvecs(weighted.T @ weighted / weighted.shape[0], d)  # (r d, d)
        a = torch.block_diag(*roots) @ u  # merged = centred_stack @ a
        merged = torch.cat(centred, dim=1) @ a
        w_stack = torch.cat([w.v_w[j * d:(j + 1) * d].double() for j in group])  # (r d, hidden)
        new_v_w.append(a.T @ w_stack)
        b_stack = torch.zeros(len(group) * d, dtype=torch.float64) if w.v_b is None else \
            torch.cat([w.v_b[j * d:(j + 1) * d].double() for j in group])
        new_v_b.append(a.T @ (b_stack - torch.cat(means)))  # v' = aᵀ(x Wᵀ + b - μ): centring moves into the bias
        for pos, j in enumerate(group):
            b = _lstsq(centred[pos], merged)  # v_j - μ_j ≈ b @ v'
            for i in lay.queries_of_kv(j):
                cols = slice(i * d, (i + 1) * d)
                o_b += w.o_w[:, cols].double() @ means[pos]  # the mean passes through softmax-weighted sums
                o_w[:, cols] = w.o_w[:, cols].double() @ b
    return (torch.cat(new_v_w).float(), torch.cat(new_v_b).float(), o_w.float(), o_b.float())
