"""The decoder: Flax NNX modules for every supported family, layers stacked under `lax.scan`.

One forward serves every method: tokens or input embeddings or a mid-stack hidden state in,
explicit positions, the default causal mask or a caller's mask (e.g. a draft tree), an optional
layer range, and on request each layer's input hidden state and new K/V.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.cache.dense import KVCache
from kvjax.cache.view import NEW, SHARED, View, causal
from kvjax.lm import rope
from kvjax.lm.attention import KeyBlock, Training, attend
from kvjax.lm.attention import causal as causal_attention
from kvjax.lm.config import Config
from kvjax.lm.sharding import constrain, declare
from kvjax.pallas_kernels.precision import einsum_f32

ACTIVATION = ("batch", "seq", "embed")  # logical axes of the residual stream [B, T, D]
LOGITS = ("batch", "seq", "vocab")
LAYERS = "layers"  # the logical axis of stacked layers, leading every Block param of a Decoder


def init_param(rngs: nnx.Rngs, shape, axes, dtype, std=0.02) -> nnx.Param:
  """A Param [*shape] drawn from N(0, std^2), declaring its logical axes (one per dimension)."""
  return declare(std * jax.random.normal(rngs.params(), shape, dtype), axes)


def stack_layers(layers: list[nnx.Module]) -> nnx.Module:
  """One module of the layers' common structure, every param theirs stacked on a new leading
  axis declared LAYERS (the axis `run_layers` scans over)."""
  state = jax.tree.map(lambda *a: jnp.stack(a), *(nnx.state(m) for m in layers))
  state = nnx.spmd.add_axis(state, 0, {nnx.PARTITION_NAME: LAYERS})
  return nnx.merge(nnx.graphdef(layers[0]), state)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis, of size dim (default d_model) with logical name `axis`
  (head_dim, "head_dim" for the q/k norms)."""

  def __init__(self, cfg: Config, dtype, dim: int | None = None, axis: str = "embed"):
    dim = dim or cfg.d_model
    self.eps = cfg.norm_eps
    self.plus_one = cfg.norm_plus_one
    init = jnp.zeros if cfg.norm_plus_one else jnp.ones
    self.scale = declare(init((dim,), dtype), (axis,))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    w = self.scale[...].astype(jnp.float32)
    return (xf * (1.0 + w if self.plus_one else w)).astype(x.dtype)


class Attention(nnx.Module):
  """Projections only; the attention itself is `attend` over cache + new key blocks."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs, dtype):
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.q = init_param(rngs, (D, N, H), ("embed", "heads", "head_dim"), dtype)
    self.k = init_param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), dtype)
    self.v = init_param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), dtype)
    self.o = init_param(rngs, (N, H, D), ("heads", "head_dim", "embed"), dtype)
    if cfg.qkv_bias:
      self.q_bias = declare(jnp.zeros((N, H), dtype), ("heads", "head_dim"))
      self.k_bias = declare(jnp.zeros((K, H), dtype), ("kv_heads", "head_dim"))
      self.v_bias = declare(jnp.zeros((K, H), dtype), ("kv_heads", "head_dim"))
    if cfg.o_bias:
      self.o_bias = declare(jnp.zeros((D,), dtype), ("embed",))
    if cfg.qk_norm:
      self.q_norm = RMSNorm(cfg, dtype, dim=H, axis="head_dim")
      self.k_norm = RMSNorm(cfg, dtype, dim=H, axis="head_dim")

  def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, D] -> q [B, T, N, H], k, v [B, T, K, H] (before RoPE; after the biases and,
    with qk_norm, each head's q and k RMSNorm)."""
    q = jnp.einsum("btd,dnh->btnh", x, self.q[...])
    k = jnp.einsum("btd,dkh->btkh", x, self.k[...])
    v = jnp.einsum("btd,dkh->btkh", x, self.v[...])
    if hasattr(self, "q_bias"):
      q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
    if hasattr(self, "q_norm"):
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v

  def out(self, a: jax.Array) -> jax.Array:
    """a [B, T, N, H] -> [B, T, D]."""
    y = jnp.einsum("btnh,nhd->btd", a, self.o[...])
    return y + self.o_bias[...] if hasattr(self, "o_bias") else y


ACT = {
  "silu": jax.nn.silu,
  "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


class MLP(nnx.Module):
  def __init__(self, cfg: Config, *, rngs: nnx.Rngs, dtype):
    D, F = cfg.d_model, cfg.ffn_dim
    self.act = cfg.act
    self.gate = init_param(rngs, (D, F), ("embed", "ffn"), dtype)
    self.up = init_param(rngs, (D, F), ("embed", "ffn"), dtype)
    self.down = init_param(rngs, (F, D), ("ffn", "embed"), dtype)
    if cfg.mlp_bias:
      self.gate_bias = declare(jnp.zeros((F,), dtype), ("ffn",))
      self.up_bias = declare(jnp.zeros((F,), dtype), ("ffn",))
      self.down_bias = declare(jnp.zeros((D,), dtype), ("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    g = jnp.einsum("btd,df->btf", x, self.gate[...])
    u = jnp.einsum("btd,df->btf", x, self.up[...])
    if hasattr(self, "gate_bias"):
      g, u = g + self.gate_bias[...], u + self.up_bias[...]
    g = ACT[self.act](g)
    y = jnp.einsum("btf,fd->btd", g * u, self.down[...])
    return y + self.down_bias[...] if hasattr(self, "down_bias") else y


def route(logits: jax.Array, k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
  """Router logits [..., E] float32 -> (weights [..., k] float32, experts [..., k] int32):
  the k largest of softmax(logits) (softmax over all E experts first, as Mixtral and
  Qwen3-MoE do), rescaled to sum to 1 when `renormalize`. Ties go to the lower expert id."""
  weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
  if renormalize:
    weights = weights / weights.sum(axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32)


class MoE(nnx.Module):
  """Mixture-of-experts MLP (Mixtral, Qwen3-MoE): router [D, E]; experts gate, up [E, D, F],
  down [E, F, D] (F: `cfg.expert_ffn_dim`); `route` picks k of E experts per token; exact and
  capacity-free (no token is dropped, each token's output depends on that token alone).

  Cost per token (N = B * T tokens): router 2·D·E FLOPs, experts 6·k·D·F FLOPs (k/E of a
  dense evaluation of every expert), in one of two exact forms chosen by shape:
  - grouped (N * k >= E, e.g. prefill): the N * k (token, expert) pairs sorted by expert,
    each expert's rows one group of `jax.lax.ragged_dot`. TPU and GPU run it as a grouped
    matmul (6·N·k·D·F FLOPs, every expert's weights read once); XLA:CPU has no ragged dot
    and jax lowers it there to a masked dense dot over all E groups (E times the FLOPs,
    same result: the other groups contribute exact zeros).
  - gathered (N * k < E, e.g. decoding a few rows): each token's k experts' weights
    gathered and applied as batched matmuls: 6·N·k·D·F FLOPs and only N * k experts' weights
    read from memory instead of all E.
  """

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs, dtype):
    D, F, E = cfg.d_model, cfg.expert_ffn_dim, cfg.n_experts
    self.act = cfg.act
    self.k = cfg.n_experts_per_tok
    self.renormalize = cfg.moe_renormalize
    self.router = init_param(rngs, (D, E), ("embed", "experts"), dtype)
    self.gate = init_param(rngs, (E, D, F), ("experts", "embed", "ffn"), dtype)
    self.up = init_param(rngs, (E, D, F), ("experts", "embed", "ffn"), dtype)
    self.down = init_param(rngs, (E, F, D), ("experts", "ffn", "embed"), dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> [B, T, D]. The router's logits are computed in x's dtype and then
    taken to float32 (as transformers does); the k outputs are combined in float32."""
    B, T, D = x.shape
    logits = jnp.einsum("btd,de->bte", x, self.router[...]).astype(jnp.float32)
    weights, experts = route(logits, self.k, self.renormalize)  # [B, T, k]
    N, E = B * T, self.router.shape[-1]
    weights, experts = weights.reshape(N, self.k), experts.reshape(N, self.k)
    form = self._gathered if N * self.k < E else self._grouped
    y = form(x.reshape(N, D), experts)  # [N, k, D]
    y = jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights)
    return y.astype(x.dtype).reshape(B, T, D)

  def _ffn(self, g, u):
    return ACT[self.act](g) * u

  def _grouped(self, x: jax.Array, experts: jax.Array) -> jax.Array:
    """x [N, D], experts [N, k] -> each pair's expert output [N, k, D] (one ragged dot per
    projection over the pairs sorted by expert)."""
    N, k = experts.shape
    E = self.router.shape[-1]
    flat = experts.reshape(N * k)
    order = jnp.argsort(flat, stable=True)  # pair n * k + j, sorted by its expert
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # rows per expert
    xs = x[order // k]  # [N * k, D]
    g = jax.lax.ragged_dot(xs, self.gate[...], sizes)
    u = jax.lax.ragged_dot(xs, self.up[...], sizes)
    ys = jax.lax.ragged_dot(self._ffn(g, u), self.down[...], sizes)  # [N * k, D]
    return jnp.zeros_like(ys).at[order].set(ys).reshape(N, k, -1)

  def _gathered(self, x: jax.Array, experts: jax.Array) -> jax.Array:
    """x [N, D], experts [N, k] -> [N, k, D] from each token's own k experts' weights."""
    g = jnp.einsum("nd,nkdf->nkf", x, self.gate[...][experts])
    u = jnp.einsum("nd,nkdf->nkf", x, self.up[...][experts])
    return jnp.einsum("nkf,nkfd->nkd", self._ffn(g, u), self.down[...][experts])


MLP_KINDS = ("mlp", "moe")  # a Block's MLP: dense, or the mixture of experts


class Block(nnx.Module):
  """One pre-norm decoder layer (Gemma-2 adds post-norms): cfg's layer `layer`, whose MLP is
  the mixture of experts (`moe`) or dense (`mlp`) as `cfg.moe_layers[layer]` says."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs, dtype, layer: int = 0):
    self.cfg = cfg
    self.attn_norm = RMSNorm(cfg, dtype)
    self.attn = Attention(cfg, rngs=rngs, dtype=dtype)
    self.mlp_norm = RMSNorm(cfg, dtype)
    if cfg.moe_layers[layer]:
      self.moe = MoE(cfg, rngs=rngs, dtype=dtype)
    else:
      self.mlp = MLP(cfg, rngs=rngs, dtype=dtype)
    if cfg.post_norms:
      self.post_attn_norm = RMSNorm(cfg, dtype)
      self.post_mlp_norm = RMSNorm(cfg, dtype)

  def _plain_causal(self, view: View, T: int) -> bool:
    """Whether this layer's attention is a prompt's causal self-attention with nothing else
    (no cache, mask, window or softcap): the case `attention.causal` dispatches to the
    device's kernel (cuDNN, TPU flash; the blocked XLA path on CPU)."""
    cfg = self.cfg
    return (
      T > 1
      and view.cache_read is None
      and len(view.blocks) == 1
      and view.blocks[0].source == NEW
      and view.blocks[0].causal
      and view.blocks[0].mask is None
      and not any(cfg.windows)
      and cfg.attn_softcap is None
    )

  def __call__(
    self,
    x,
    *,
    view: View,
    freq,
    cached,
    layer,
    window,
    training: Training | None = None,
    attn_in: jax.Array | None = None,
    rotation: Rotation,
  ):
    """x [B, T, D]; view: what the T tokens attend to (`kvjax.cache.view`); cached: the
    cache's `Slots` (every layer stacked) or None, read at `layer` (an int32 scalar) in place;
    freq: the layer's RoPE inverse frequencies [H/2] (`rope.layer_freqs`); window: sliding
    window of the layer (0 = none). Returns (x [B, T, D], k, v [B, K, T, H])
    in the caches' layout, with k as the cache stores it (after RoPE when view.rotated, else
    before). training: the training forward's settings (`attention.Training`: differentiable
    attention, dropout keys folded by layer). attn_in [B, T, C]: the attention's input in place
    of attn_norm(x) (published EAGLE heads: no input norm, or a 2D-wide input over q/k/v
    [C, N, H]); the residual stays x. rotation: the RoPE tables of this layer's freq for the
    view's positions (`Rotation`, computed once for every layer that shares them)."""
    dropout = training if training is not None and (training.rate or training.attn_rate) else None
    drop_keys = (
      None if dropout is None else jax.random.split(jax.random.fold_in(dropout.key, layer), 3)
    )
    q, k, v = self.attn.qkv(self.attn_norm(x) if attn_in is None else attn_in)
    qs = [rope.rotate(q, *t) for t in rotation.q]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]: the new tokens only
    k_rot = rope.rotate(k, *rotation.new, heads_first=True)
    blocks = []
    for keys in view.blocks:
      if keys.source == NEW:
        blocks.append(KeyBlock(qs[keys.frame], k_rot, v, keys))
      elif keys.source == SHARED:
        blocks.append(KeyBlock(qs[keys.frame], cached.shared_k, cached.shared_v, keys, layer))
      else:  # CACHE
        blocks.append(KeyBlock(qs[keys.frame], cached.k, cached.v, keys, layer))
    scale, softcap = self.cfg.query_scale, self.cfg.attn_softcap
    partial = None
    if view.cache_read is not None:
      extra = dict(new=(k_rot, v)) if view.reads_new else {}
      if rotation.key is not None:
        extra["rotation"] = rotation.key
      partial = view.cache_read(
        q,
        cached.k[layer],
        cached.v[layer],
        freq=freq,
        window=window,
        scale=scale,
        softcap=softcap,
        **extra,
      )
    attn_drop = (
      None if dropout is None or not dropout.attn_rate else (dropout.attn_rate, drop_keys[0])
    )
    if self._plain_causal(view, T=x.shape[1]) and training is None:  # one dispatch
      a = causal_attention(qs[0], k_rot, v, scale=scale)
    elif blocks:
      a = attend(
        blocks,
        scale=scale,
        softcap=softcap,
        window=window,
        partial=partial,
        differentiable=training is not None,
        dropout=attn_drop,
      )
    else:  # the cache's read covered every key
      a = partial[0].astype(q.dtype)
    a = self.attn.out(a)
    if self.cfg.post_norms:
      a = self.post_attn_norm(a)
    x = x + _drop(a, dropout, drop_keys, 1)
    m = (self.moe if hasattr(self, "moe") else self.mlp)(self.mlp_norm(x))
    if self.cfg.post_norms:
      m = self.post_mlp_norm(m)
    return x + _drop(m, dropout, drop_keys, 2), k_rot if view.rotated else k, v


def stack_blocks(blocks: list[Block]) -> Block:
  """The L Blocks of a Decoder as one Block with every param stacked on a leading LAYERS axis:
  the norms and attention over all L layers, and each MLP kind (`MLP_KINDS`) over the layers
  that have it, in layer order (`Config.moe_layers`). With one kind in every layer that is
  `stack_layers(blocks)`; with both, `mlp` holds the dense layers' params [L_dense, ...] and
  `moe` the mixture layers' [L_moe, ...] (`layer_slice` takes a run of layers back out)."""
  mlps = {kind: [getattr(b, kind) for b in blocks if hasattr(b, kind)] for kind in MLP_KINDS}
  if sum(bool(m) for m in mlps.values()) == 1:
    return stack_layers(blocks)
  for b in blocks:
    for kind in MLP_KINDS:
      if hasattr(b, kind):
        delattr(b, kind)
  stacked = stack_layers(blocks)
  for kind, modules in mlps.items():
    setattr(stacked, kind, stack_layers(modules))
  return stacked


def layer_runs(cfg: Config, start: int, stop: int) -> list[tuple[int, int]]:
  """[start, stop) cut into the maximal runs [a, b) of consecutive layers with one MLP kind
  (one run for every family but a Qwen3-MoE with dense layers)."""
  kinds = cfg.moe_layers
  runs, a = [], start
  for l in range(start + 1, stop + 1):
    if l == stop or kinds[l] != kinds[a]:
      runs.append((a, l))
      a = l
  return runs


def layer_slice(blocks: Block, cfg: Config, start: int, stop: int) -> Block:
  """Layers [start, stop) of a Decoder's stacked `blocks` (`stack_blocks`), all of one MLP
  kind, as a stacked Block of that kind: norm and attention params [start, stop) of theirs,
  MLP params [i, i + stop - start) of that kind's stack, i counting the layers of that kind
  below start. A new module over the same arrays."""
  moe = cfg.moe_layers[start]
  if any(m != moe for m in cfg.moe_layers[start:stop]):
    raise ValueError(f"layers [{start}, {stop}) mix dense and mixture-of-experts MLPs")
  kind, other = MLP_KINDS[::-1] if moe else MLP_KINDS
  first = cfg.moe_layers[:start].count(moe)
  graphdef, state = nnx.split(blocks)
  if hasattr(blocks, other):  # both kinds stacked: drop the other one
    sub = nnx.merge(graphdef, state)
    delattr(sub, other)
    graphdef, state = nnx.split(sub)
  n = stop - start
  state = nnx.State(
    {
      name: jax.tree.map(lambda a, lo=first if name == kind else start: a[lo : lo + n], value)
      for name, value in state.items()
    }
  )
  return nnx.merge(graphdef, state)


def layer_block(blocks: Block, cfg: Config, layer: int) -> Block:
  """Layer `layer` of a Decoder's stacked `blocks` as one Block (no layer axis)."""
  graphdef, state = nnx.split(layer_slice(blocks, cfg, layer, layer + 1))
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Output:
  """logits: [B, T, V] float32 (None when the range stops below the top or logits=False).
  hidden: [B, T, D] the stream after the last layer run: final-normed (the LM head's input)
    when the range ends at the top layer, else the raw residual that the next range takes.
  layer_inputs: [L', B, T, D] the hidden state entering each layer run (on request).
  k, v: [L', B, K, T, H] each run layer's keys and values (on request), in the caches' layout;
    keys as the cache stores them: after RoPE, except with a SinkCache (before)."""

  logits: jax.Array | None
  hidden: jax.Array
  layer_inputs: jax.Array | None = None
  k: jax.Array | None = None
  v: jax.Array | None = None


class Decoder(nnx.Module):
  """Embedding, L stacked Blocks (`stack_blocks`: every Param has a leading layer axis), final
  norm, LM head. Every param declares its logical axes where it is made (`sharding.declare`)."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
    V, D = cfg.vocab_size, cfg.d_model
    self.cfg = cfg
    self.layout = None  # (mesh, rules) once `sharding.shard` places the model
    self.embed = init_param(rngs, (V, D), ("vocab", "embed"), dtype)
    # L Blocks, then the draws of one more that earlier versions spent on a template: every
    # seed keeps the random params it always had (the LM head's among them).
    layers = [Block(cfg, rngs=rngs, dtype=dtype, layer=l) for l in range(cfg.n_layers)]
    Block(cfg, rngs=rngs, dtype=dtype, layer=cfg.n_layers - 1)  # the one more, unused
    self.blocks = stack_blocks(layers)
    self.final_norm = RMSNorm(cfg, dtype)
    if not cfg.tie_embeddings:
      self.head = init_param(rngs, (D, V), ("embed", "vocab"), dtype)

  @property
  def dtype(self):
    return self.embed[...].dtype

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> [B, T, D] (Gemma scales by sqrt(D) in the params' dtype)."""
    x = jnp.take(self.embed[...], tokens, axis=0)
    if self.cfg.scale_embeddings:
      x = x * jnp.asarray(self.cfg.d_model**0.5, x.dtype)
    return x

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] (final-normed) -> [..., V] float32 (padding ids masked)."""
    w = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
    logits = einsum_f32("...d,dv->...v", hidden, w)
    if self.cfg.final_softcap is not None:
      logits = jnp.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
    return mask_padding(logits, self.cfg)

  def __call__(
    self,
    tokens: jax.Array | None = None,
    *,
    embeds: jax.Array | None = None,
    hidden: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    mask: jax.Array | None = None,
    view: View | None = None,
    n_new: jax.Array | None = None,
    layers: tuple[int, int] | None = None,
    logits: bool = True,
    return_layer_inputs: bool = False,
    return_kv: bool = False,
    training: Training | None = None,
  ) -> tuple[Output, KVCache | None]:
    """Runs layers [start, stop) over T new tokens per row.

    Input, exactly one of: tokens [B, T] int; embeds [B, T, D] (start == 0); hidden [B, T, D],
    the stream entering layer `start` (start > 0).
    positions: [B, T] int, default cache.next_position() + arange(T) (arange(T) without a
      cache).
    cache: a KVCache or SinkCache; the new tokens attend to what its `view` shows and are
      written into it; it advances by n_new ([B], default T) only when the range ends at the
      top layer. A SinkCache assigns positions itself (no `positions`, no `mask`).
    mask: [B, T, S + T] bool over (cache slots, new tokens); replaces the default (filled slots,
      causal among new tokens). Filled-slot and sliding-window limits always apply.
    view: how the T tokens attend, built by the caller over `cache` when neither the cache's
      default view nor a mask says it (a draft tree read by its kernel:
      `kvjax.speculative.verify.tree_view`); its new_pos are the tokens' positions. Excludes
      `positions` and `mask`.
    training: the training forward (`kvjax.lm.attention.Training`: attention loops that
      reverse-mode differentiation can run at any length, optional dropout rates and a key);
      every inference path leaves it None.
    """
    cfg = self.cfg
    start, stop = layers or (0, cfg.n_layers)
    if not 0 <= start < stop <= cfg.n_layers:
      raise ValueError(f"layers={layers} is not a range [start, stop) within [0, {cfg.n_layers}]")
    x = constrain(_input(self, tokens, embeds, hidden, start), ACTIVATION, self.layout)
    B, T, _ = x.shape
    cached = None if cache is None else cache.slots()
    view = _view(cfg, B, T, cache, cached, positions, mask, view)
    if n_new is None:
      n_new = jnp.full((B,), T, jnp.int32)
    _check_shape("n_new", n_new, (B,), jnp.integer)
    x, layer_inputs, ks, vs = run_layers(
      self.blocks,
      cfg,
      x,
      view=view,
      cached=cached,
      layers=(start, stop),
      layout=self.layout,
      return_layer_inputs=return_layer_inputs,
      training=training,
    )
    if cache is not None:
      cache = cache.write(
        ks, vs, view.new_pos, n_new, layers=(start, stop), advance=stop == cfg.n_layers
      )
    out_logits = None
    if stop == cfg.n_layers:
      x = self.final_norm(x)
      if logits:
        out_logits = constrain(self.logits(x), LOGITS, self.layout)
    return Output(
      logits=out_logits,
      hidden=x,
      layer_inputs=layer_inputs,
      k=ks if return_kv else None,
      v=vs if return_kv else None,
    ), cache


def _view(cfg: Config, B: int, T: int, cache, cached, positions, mask, view) -> View:
  """What T new tokens of B rows attend to: the caller's view (checked against the cache), or
  the cache's default view, or causal among themselves without a cache. cached: the cache's
  slots; positions, mask and view as `Decoder.__call__` takes them, checked for shape."""
  if cache is not None:
    got = tuple(cached.k.shape)
    want = (cfg.n_layers, B, cfg.n_kv_heads, cache.size, cfg.head_dim)
    if got != want:
      raise ValueError(
        f"the cache's slots have shape {got}; this model and "
        f"a batch of {B} need [L, B, K, S, H] = {want[:3]} + (S,) + {want[4:]}"
      )
  S = cache.size if cache is not None else 0
  if positions is not None:
    _check_shape("positions", positions, (B, T), jnp.integer)
  if mask is not None:
    _check_shape("mask", mask, (B, T, S + T), jnp.bool_)
  if view is not None:
    if cache is None or positions is not None or mask is not None:
      raise ValueError(
        "view= needs the cache it was built over, and excludes positions= "
        "and mask= (they are the view's)"
      )
    _check_shape("view.new_pos", view.new_pos, (B, T), jnp.integer)
    return view
  if cache is not None:
    return cache.view(T, positions=positions, mask=mask)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return causal(positions, mask)


def mask_padding(logits: jax.Array, cfg: Config) -> jax.Array:
  """logits [..., V] float32 with the ids the tokenizer lacks (>= cfg.tokenizer_size) at the
  lowest float32: probability exactly 0 in every softmax, never an argmax, and finite (a
  product with a zero probability stays 0 in losses)."""
  if cfg.tokenizer_size is None or cfg.tokenizer_size == cfg.vocab_size:
    return logits
  real = jnp.arange(logits.shape[-1]) < cfg.tokenizer_size
  return jnp.where(real, logits, jnp.finfo(jnp.float32).min)


def run_layers(
  blocks: Block,
  cfg: Config,
  x: jax.Array,
  *,
  view: View,
  cached,
  layers,
  layout=None,
  return_layer_inputs: bool = False,
  training: Training | None = None,
  attn_in: jax.Array | None = None,
):
  """Runs layers [start, stop) = `layers` of the stacked `blocks` (`stack_blocks`) over
  x [B, T, D], all attending through `view`: one `lax.scan` per run of layers with one MLP kind
  (`layer_runs`), so one for every family but a Qwen3-MoE with dense layers.

  cached: the cache's `Slots` (arrays with a leading L axis: all layers, read in place at
  each layer's own index), or None. Returns
  (x [B, T, D], layer_inputs [L', B, T, D] or None, k, v [L', B, K, T, H]), k in the form the
  cache stores (see `Block`). attn_in: every layer's attention input (`Block`; one-layer
  stacks, the EAGLE heads)."""
  outs = []
  for run in layer_runs(cfg, *layers):
    x, *out = _scan(
      layer_slice(blocks, cfg, *run),
      cfg,
      x,
      view=view,
      cached=cached,
      layers=run,
      layout=layout,
      return_layer_inputs=return_layer_inputs,
      training=training,
      attn_in=attn_in,
    )
    outs.append(out)
  if len(outs) == 1:
    return x, *outs[0]
  layer_inputs, ks, vs = (
    None if parts[0] is None else jnp.concatenate(parts) for parts in zip(*outs)
  )
  return x, layer_inputs, ks, vs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rotation:
  """RoPE tables (cos, sin) for a view's positions: q, one per query frame ([B, T, H/2] each,
  or [U, B, T, H/2] stacked over U distinct freq vectors before `at`); new, the new tokens'
  keys; key, the cache's keys that view.cache_read rotates (None when it rotates none)."""

  q: tuple[tuple[jax.Array, jax.Array], ...]
  new: tuple[jax.Array, jax.Array]
  key: tuple[jax.Array, jax.Array] | None

  @classmethod
  def of(cls, view: View, freqs: np.ndarray) -> Rotation:
    """The tables of every distinct freq in freqs [U, H/2], stacked on a leading U axis (the
    cache's keys' only when the view's cache_read rotates them)."""

    def tables(pos):
      cos, sin = zip(*(rope.tables(pos, f) for f in freqs))
      return jnp.stack(cos), jnp.stack(sin)

    q = tuple(tables(p) for p in view.q_pos)
    new = next((t for p, t in zip(view.q_pos, q) if p is view.new_pos), None)
    key = None
    if view.key_pos is not None and view.cache_read is not None:
      key = tables(view.key_pos)
    return cls(q, tables(view.new_pos) if new is None else new, key)

  def at(self, u) -> Rotation:
    """The tables of distinct freq u (an int or int32 scalar)."""
    return jax.tree.map(lambda a: a[u], self)


def _scan(
  blocks: Block,
  cfg: Config,
  x: jax.Array,
  *,
  view: View,
  cached,
  layers,
  layout,
  return_layer_inputs: bool,
  training: Training | None,
  attn_in: jax.Array | None,
):
  """`run_layers` over one run [start, stop) = `layers` whose params `blocks` holds stacked
  (entry i: layer start + i)."""
  start, stop = layers
  freqs_np = rope.layer_freqs(cfg)[start:stop]  # [L', H/2]
  windows = jnp.asarray(np.array(cfg.windows[start:stop], np.int32))
  graphdef, stacked = nnx.split(blocks)
  # the RoPE tables once per distinct freq, not once per layer (XLA:CPU would evaluate each
  # angle's sine and cosine inside every layer's rotation, once per head and half)
  unique, which = np.unique(freqs_np, axis=0, return_inverse=True)
  tables = Rotation.of(view, unique)

  def body(x, xs):
    params, freq, window, layer, u = xs
    y, k, v = nnx.merge(graphdef, params)(
      x,
      view=view,
      freq=freq,
      cached=cached,
      layer=layer,
      window=window,
      training=training,
      attn_in=attn_in,
      rotation=tables.at(u),
    )
    return constrain(y, ACTIVATION, layout), (x if return_layer_inputs else None, k, v)

  index = jnp.arange(start, stop, dtype=jnp.int32)
  xs = (stacked, jnp.asarray(freqs_np), windows, index, jnp.asarray(which.reshape(-1), jnp.int32))
  x, (layer_inputs, ks, vs) = jax.lax.scan(body, x, xs)
  return x, layer_inputs, ks, vs


def _drop(x: jax.Array, dropout: Training | None, keys, i: int) -> jax.Array:
  """Residual dropout of a sublayer's output x (identity without training's dropout)."""
  if dropout is None or not dropout.rate:
    return x
  keep = jax.random.bernoulli(keys[i], 1.0 - dropout.rate, x.shape)
  return jnp.where(keep, x / (1.0 - dropout.rate), 0).astype(x.dtype)


def _check_shape(name, x, shape, kind):
  if tuple(jnp.shape(x)) != tuple(shape) or not jnp.issubdtype(jnp.asarray(x).dtype, kind):
    raise ValueError(
      f"{name} must be a {kind.__name__} array of shape {tuple(shape)}; got "
      f"{jnp.asarray(x).dtype}{list(jnp.shape(x))}"
    )


def _input(dec: Decoder, tokens, embeds, hidden, start: int) -> jax.Array:
  given = [
    n for n, a in (("tokens", tokens), ("embeds", embeds), ("hidden", hidden)) if a is not None
  ]
  if len(given) != 1:
    raise ValueError(f"pass exactly one of tokens, embeds, hidden; got {given or 'none'}")
  if start > 0 and hidden is None:
    raise ValueError(
      f"a layer range starting at {start} takes `hidden` (the stream entering "
      f"layer {start}), not {given[0]}"
    )
  if start == 0 and hidden is not None:
    raise ValueError(
      "`hidden` is the input of a range starting above layer 0; use tokens or embeds"
    )
  D = dec.cfg.d_model
  if tokens is not None:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
        f"tokens must be an int array [B, T]; got {tokens.dtype}{list(tokens.shape)}"
      )
    return dec.embed_tokens(tokens)
  x = embeds if embeds is not None else hidden
  if x.ndim != 3 or x.shape[-1] != D:
    raise ValueError(f"{given[0]} must be [B, T, {D}]; got {list(x.shape)}")
  return x.astype(dec.dtype)
