"""The model's and training step's fast paths equal the plain computations: the chunked
output-head loss (`step.head_cross_entropy`) vs cross entropy on the full logits and causal
attention in query blocks (`einsum_attention(causal_blocks=n)`) vs one block, in value and
gradients; the table form of rotary (`rotary_tables`, `rotary`) vs the pairwise rotation; a
tall kernel's gradient on the CPU (`flat_matmul`'s transposed product) vs NumPy's; scanned
layers and every remat policy vs the plain model, in training and in KV-cache decoding."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kstore_jax.eval import generate
from kstore_jax.model import attention, transformer
from kstore_jax.train import step


def weighted_cross_entropy(logits_BLV, targets_BL, weights_BL):
  """The plain reference: mean cross entropy over positions with weight > 0; the weight sum."""
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
  total = weights_BL.sum()
  return (ce_BL * weights_BL).sum() / jnp.maximum(total, 1.0), total


def init_params(model, tokens_BL, seed):
  """The model's params as plain arrays (the logical-axis boxes removed); the init jitted
  (one program, not each of its ops dispatched and compiled alone)."""
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), tokens_BL))["params"]


def full_logits_loss(hidden_BLD, head_DV, targets_BL, weights_BL):
  return weighted_cross_entropy(jnp.einsum("bld,dv->blv", hidden_BLD, head_DV), targets_BL,
                                weights_BL)


@pytest.mark.parametrize("b,l,rows,one_pass", [
    (4, 24, step.CHUNK_ROWS, False), (3, 7, step.CHUNK_ROWS, False),
    (600, 5, step.CHUNK_ROWS, False), (1, 2048, step.CHUNK_ROWS, False), (4, 24, 8, False),
    (8, 64, 1 << 20, False), (4, 24, 8, True), (8, 64, 1 << 20, True)])
def test_head_cross_entropy_equals_full_logits(b, l, rows, one_pass):
  """The chunked head loss (and, `one_pass`, its softmax max and sum in one reduction: the
  GPU's) against cross entropy on the full logits, in value and gradients."""
  d, v = 16, 50
  k = jax.random.split(jax.random.key(b * 1000 + l), 4)
  hidden = jax.random.normal(k[0], (b, l, d))
  head = jax.random.normal(k[1], (d, v))
  targets = jax.random.randint(k[2], (b, l), 0, v)
  weights = (jax.random.uniform(k[3], (b, l)) < 0.7).astype(jnp.float32)
  grad = lambda f: jax.value_and_grad(lambda h, w: f(h, w, targets, weights)[0], (0, 1))
  chunked = lambda h, w, t, m: step.head_cross_entropy(h, w, t, m, rows, one_pass)
  (ref, ref_grads), (got, got_grads) = grad(full_logits_loss)(hidden, head), grad(chunked)(
      hidden, head)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  for g, r in zip(got_grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
  assert step.head_cross_entropy(hidden, head, targets, weights)[1] == weights.sum()


def test_chunk_rows_per_platform():
  """CPU: chunks sized for its cache; GPU/TPU: ~256 MiB of logits, so the paper config's head
  (96 x 512 positions, 3,328 ids) runs in 4 chunks, GPT-2's 50,304-wide head in 64."""
  assert step.chunk_rows("cpu", 3328) == step.CHUNK_ROWS
  chunks = lambda platform, vocab: 512 // step.positions_per_chunk(
      96, 512, step.chunk_rows(platform, vocab))
  assert chunks("cpu", 3328) == 64
  for platform in ("cuda", "tpu"):
    assert step.chunk_rows(platform, 3328) * 3328 * 4 <= step.ACCELERATOR_CHUNK_BYTES
    assert chunks(platform, 3328) == 4 and chunks(platform, 50304) == 64


def test_lm_loss_uses_the_models_head():
  """make_lm_loss (hidden states through `head_matrix`) gives the loss of the model's own
  logits, for a tied and an untied head."""
  for tie in (True, False):
    cfg = transformer.ModelConfig(vocab_size=40, num_layers=1, num_heads=2, d_model=16, d_ff=32,
                                  tie_embeddings=tie)
    model = transformer.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 40)
    params = init_params(model, tokens, 1)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1),
             "weights": jnp.ones((2, 9)).at[:, -1].set(0.0),
             "positions": jnp.broadcast_to(jnp.arange(9), (2, 9)),
             "segment_ids": jnp.ones((2, 9), jnp.int32)}
    logits, _, _ = jax.jit(model.apply)({"params": params}, tokens)
    ref = weighted_cross_entropy(logits, batch["targets"], batch["weights"])[0]
    got = jax.jit(step.make_lm_loss(model))(params, {}, batch)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_one_pass_norms_equal_numpys_and_clip_as_optax():
  """The GPU step's gradient and param norms (optim.global_norm, one reduction over GROUP
  leaves at a time) against NumPy's in float64, over more leaves than a group, of mixed
  shapes and dtypes; its clip equals optax.clip_by_global_norm's updates and state, above
  and below the limit."""
  from kstore_jax.train import optim
  rng = np.random.default_rng(0)
  shapes = [(3,), (5, 7), (2, 3, 4), (1,), (64, 9)] * 15   # 75 leaves: three groups
  f32 = {f"p{i}": jnp.asarray(rng.standard_normal(s), jnp.float32)
         for i, s in enumerate(shapes)}
  norm = lambda tree: np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                                  for x in tree.values()))
  want = norm(f32)
  assert len(f32) > 2 * optim.GROUP
  for one_pass in (False, True):
    assert float(jax.jit(optim.global_norm, static_argnums=1)(f32, one_pass)) == \
        pytest.approx(want, rel=1e-6)
  mixed = {k: v.astype(jnp.bfloat16) if k.endswith("7") else v for k, v in f32.items()}
  assert float(optim.global_norm(mixed, True)) == pytest.approx(norm(mixed), rel=1e-6)
  for limit in (0.5 * want, 2.0 * want):   # clipped, and left alone
    ref = optax.clip_by_global_norm(limit)
    ours = optim.clip_by_global_norm(limit, one_pass=True)
    got, state = jax.jit(ours.update)(f32, ours.init(f32))
    exp, exp_state = ref.update(f32, ref.init(f32))
    assert state == exp_state
    for k in f32:
      np.testing.assert_allclose(got[k], exp[k], rtol=2e-6, atol=1e-7)
    assert np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in got.values())) == \
        pytest.approx(min(limit, want), rel=1e-5)


def test_one_pass_norms_train_step_like_the_per_leaf_one():
  """The train step with one-pass norms (off the CPU) against the per-leaf one on a toy
  model: the same loss, norms and updated params within float order, and the same optimizer
  state tree (a checkpoint saved by either restores into the other)."""
  from kstore_jax.train import optim
  model = transformer.Transformer(transformer.ModelConfig(**TOY_MODEL))
  tokens_BL = jnp.asarray(np.random.default_rng(1).integers(1, 50, (4, 8)), jnp.int32)
  params = jax.jit(lambda: init_params(model, tokens_BL, 0))()
  batch = {"inputs": tokens_BL, "targets": jnp.roll(tokens_BL, -1, 1),
           "weights": jnp.ones(tokens_BL.shape, jnp.float32),
           "segment_ids": jnp.ones_like(tokens_BL), "positions": jnp.broadcast_to(
               jnp.arange(8, dtype=jnp.int32), tokens_BL.shape)}
  hp = {k: jnp.asarray(v) for k, v in optim.hyperparams(dataclasses.replace(
      _Stage(), grad_clip=0.05)).items()}   # a clip that bites: its norm matters
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": optim.make_optimizer(hp).init(params)}
  loss_fn = step.make_lm_loss(model)
  outs = [jax.jit(step.make_train_step(loss_fn, one_pass_norms=one))(state, {}, batch, hp)
          for one in (False, True)]
  (s0, m0), (s1, m1) = outs
  assert jax.tree.structure(s0) == jax.tree.structure(s1)
  for k in ("loss", "grad_norm", "param_norm"):
    assert float(m1[k]) == pytest.approx(float(m0[k]), rel=1e-5), k
  assert float(m0["grad_norm"]) > 0.05
  for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_one_pass_norms_only_off_the_cpu_with_whole_params():
  """One reduction over many leaves where a kernel a leaf costs a launch (off the CPU) and the
  params are whole on each device; on fsdp or tensor meshes, whose leaves are sharded on
  differing dimensions, concatenating them would gather them."""
  from types import SimpleNamespace as NS
  from kstore_jax.train import loop
  mesh = lambda data, fsdp, tensor: NS(shape={"data": data, "fsdp": fsdp, "tensor": tensor})
  assert loop.one_pass_norms(NS(platform="cuda"), mesh(8, 1, 1))
  assert loop.one_pass_norms(NS(platform="tpu"), mesh(1, 1, 1))
  assert not loop.one_pass_norms(NS(platform="cpu"), mesh(1, 1, 1))
  assert not loop.one_pass_norms(NS(platform="cuda"), mesh(2, 4, 1))
  assert not loop.one_pass_norms(NS(platform="cuda"), mesh(4, 1, 2))


@dataclasses.dataclass
class _Stage:
  """A stage config's optimizer numbers (configs/base.py stage)."""
  lr: float = 1e-2
  warmup_steps: int = 0
  steps: int = 10
  final_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-6
  weight_decay: float = 0.1
  grad_clip: float = 1.0


@pytest.mark.parametrize("blocks", [2, 4, 3])
def test_causal_blocks_equal_full_attention(blocks):
  """Packed rows (several documents, padding at the end): the same outputs and gradients; a
  length the blocks do not divide (3 into 8) falls back to one block."""
  b, l, h, d = 3, 8, 2, 4
  k = jax.random.split(jax.random.key(blocks), 4)
  q, kk, v = (jax.random.normal(k[i], (b, l, h, d)) for i in range(3))
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0], [1, 2, 3, 3, 3, 3, 3, 4]])
  pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 0], [0, 0, 0, 1, 2, 3, 4, 0]])
  mask = attention.mask(pos, seg, pos, seg, causal=True)
  live = (seg > 0)[:, :, None, None]

  def out(n):
    def f(q, kk, v):
      o = attention.einsum_attention(q, kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                       mask, causal_blocks=n)
      return (jnp.where(live, o, 0.0) * jnp.arange(1.0, d + 1)).sum(), o
    (val, o), grads = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(q, kk, v)
    return jnp.where(live, o, 0.0), grads

  ref_o, ref_g = out(1)
  got_o, got_g = out(blocks)
  np.testing.assert_allclose(got_o, ref_o, rtol=1e-5, atol=1e-6)
  for g, r in zip(got_g, ref_g):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def rotary_reference(x_BLHD, positions_BL, rot_dim, base):
  """NeoX rotary spelled out pair by pair: (x[i], x[i + half]) rotated by position * base^(-i /
  half), the dims past rot_dim unchanged."""
  half = rot_dim // 2
  out = np.array(x_BLHD, np.float64)
  for i in range(half):
    angle = np.asarray(positions_BL, np.float64)[..., None] * base ** (-i / half)
    x1, x2 = out[..., i].copy(), out[..., i + half].copy()
    out[..., i] = x1 * np.cos(angle) - x2 * np.sin(angle)
    out[..., i + half] = x2 * np.cos(angle) + x1 * np.sin(angle)
  return out


@pytest.mark.parametrize("head_dim,rot_dim", [(32, 16), (16, 16), (64, 16), (24, 10)])
def test_rotary_tables_equal_pairwise_rotation(head_dim, rot_dim):
  """The table form (x * cos + swapped halves * sin; a reshape-reversal swap when rot_dim
  divides the head, a concatenation when not) is the pairwise rotation."""
  x = jax.random.normal(jax.random.key(head_dim + rot_dim), (2, 5, 3, head_dim))
  pos = jnp.array([[0, 1, 2, 3, 4], [7, 100, 0, 511, 3]])
  tables = transformer.rotary_tables(pos, rot_dim, 10000.0, head_dim)
  got = transformer.rotary(x, tables, rot_dim)
  np.testing.assert_allclose(got, rotary_reference(x, pos, rot_dim, 10000.0), rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (16, 16)])
def test_flat_matmul_gradients_equal_numpy(shape):
  """On the CPU a tall kernel's gradient is computed as a transposed [O, tokens] x [tokens, I]
  product (`transformer._tall_matmul`): the value and both gradients are the plain matmul's,
  checked against NumPy (x^T dy, dy W^T) for tall, wide and square kernels, for the CPU and
  for a platform that takes the plain product."""
  n_in, n_out = shape
  rng = np.random.default_rng(n_in * 100 + n_out)
  x_BLI, w_IO, dy_BLO = (rng.standard_normal(s).astype(np.float32)
                         for s in ((3, 5, n_in), (n_in, n_out), (3, 5, n_out)))
  for platform in ("cpu", "cuda"):
    f = lambda x, w: transformer.flat_matmul(x, w, 1, platform).reshape(3, 5, n_out)
    y, vjp = jax.vjp(jax.jit(f), jnp.asarray(x_BLI), jnp.asarray(w_IO))
    dx, dw = vjp(jnp.asarray(dy_BLO))
    np.testing.assert_allclose(y, x_BLI @ w_IO, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dy_BLO @ w_IO.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        dw, x_BLI.reshape(-1, n_in).T @ dy_BLO.reshape(-1, n_out), rtol=1e-5, atol=1e-5)


TOY_MODEL = dict(vocab_size=50, num_layers=3, num_heads=2, d_model=16, d_ff=32,
                 rotary_fraction=0.5)


def plain_and_other(**other):
  """The toy model unrolled with nothing recomputed, and with the `other` settings."""
  return (transformer.Transformer(transformer.ModelConfig(**TOY_MODEL)),
          transformer.Transformer(transformer.ModelConfig(**TOY_MODEL, **other)))


@pytest.fixture(scope="module")
def toy_params():
  """The toy model's params, made once for the tests below in one jitted init (op by op, the
  first init of a shape takes seconds)."""
  plain = transformer.Transformer(transformer.ModelConfig(**TOY_MODEL))
  return jax.jit(lambda: init_params(plain, jnp.zeros((1, 8), jnp.int32), 3))()


def packed_loss_and_grads(model, params):
  """The model's LM loss and its gradients on two packed rows (two documents, and one with
  padding)."""
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 50)
  seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3], jnp.int32)
  pos = jnp.asarray([list(range(5)) + list(range(7)), list(range(9)) + [0] * 3], jnp.int32)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "positions": pos,
           "segment_ids": seg, "weights": (seg > 0).astype(jnp.float32)}
  return jax.jit(lambda: jax.value_and_grad(
      lambda p: step.make_lm_loss(model)(p, {}, batch)[0])(params))()


@pytest.fixture(scope="module")
def plain_loss(toy_params):
  """The unrolled, nothing-recomputed model's (loss, gradients): once for every variant."""
  return packed_loss_and_grads(plain_and_other()[0], toy_params)


@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "full"), (True, "dots"),
                                        (False, "dots_no_batch")])
def test_scan_and_remat_compute_the_same_loss_and_gradients(scan, remat, toy_params, plain_loss):
  """model.scan_layers (one scanned block over stacked params) and every remat policy give the
  unrolled, nothing-recomputed model's loss and gradients, on packed rows, in one param layout."""
  _, other = plain_and_other(scan_layers=scan, remat=remat)
  (want, want_g), (got, got_g) = plain_loss, packed_loss_and_grads(other, toy_params)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert jax.tree.structure(got_g) == jax.tree.structure(want_g)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("block,scan", [("gpt2", False), ("gpt2", True), ("llama", False)])
def test_fused_norm_computes_the_same_loss_and_gradients(block, scan, toy_params, plain_loss):
  """model.norm=pallas (each residual add and the norm after it in one kernel, interpreted
  here; the projections' biases added there) gives XLA's model's loss and gradients in the
  same param layout, for GPT-2's LayerNorm and Llama's RMSNorm, unrolled or scanned."""
  plain, fused = plain_and_other(block=block, norm="pallas", scan_layers=scan)
  plain = transformer.Transformer(dataclasses.replace(plain.cfg, block=block))
  params = toy_params if block == "gpt2" else jax.jit(
      lambda: init_params(plain, jnp.zeros((1, 8), jnp.int32), 3))()
  assert jax.tree.structure(jax.eval_shape(
      lambda: init_params(fused, jnp.zeros((1, 8), jnp.int32), 3))) == jax.tree.structure(params)
  (want, want_g) = plain_loss if block == "gpt2" else packed_loss_and_grads(plain, params)
  got, got_g = packed_loss_and_grads(fused, params)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_gpu_gelu_recomputed_in_the_backward_gives_the_same_gradients(toy_params, plain_loss):
  """Lowered for a GPU the MLP's bias and GELU are recomputed in the backward (jax.checkpoint)
  from the up projection's product: the same loss and gradients as the CPU's plain model; the
  backward keeps the product and the GELU's output (the down projection's input), not the
  biased product (a [T, F] tensor the forward would write besides), and the CPU keeps its
  plain model."""
  _, gpu = plain_and_other(platform="cuda")
  (want, want_g), (got, got_g) = plain_loss, packed_loss_and_grads(gpu, toy_params)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)
  x_TD = jax.random.normal(jax.random.key(1), (1, 4, TOY_MODEL["d_model"]))
  for platform in ("cpu", "cuda"):
    mlp = transformer.Mlp(transformer.ModelConfig(**TOY_MODEL, platform=platform))
    p = jax.tree.map(lambda a: a + 0.1,   # a bias that is not zero
                     nn.unbox(mlp.init(jax.random.key(0), x_TD)))
    up = p["params"]["up"]
    product_TF = x_TD[0] @ up["kernel"]
    want_TF = {"product": product_TF, "biased": product_TF + up["bias"],
               "gelu": jax.nn.gelu(product_TF + up["bias"])}
    _, f_vjp = jax.vjp(lambda p: mlp.apply(p, x_TD), p)
    saved = {name for r in jax.tree.leaves(f_vjp) if r.size == product_TF.size
             for name, w in want_TF.items()
             if np.allclose(np.reshape(r, product_TF.shape), w, rtol=1e-5, atol=1e-6)}
    assert ("biased" in saved) == (platform == "cpu"), (platform, saved)
    if platform == "cuda":
      assert saved == {"product", "gelu"}


def test_gpu_value_bias_folded_into_the_output_bias(toy_params):
  """Off the CPU the values' bias is not added to the values: attention passes it through to
  every output (a query's weights sum to 1) and the out projection maps it to a constant added
  with its own bias. With value biases that are not zero (the others' zero: their rounding,
  amplified through the toy's norms, would hide the fold's at 2e-5): the CPU model's loss,
  gradients and greedy KV-cache decoding, and the value projection's output is the bare
  product."""
  plain, gpu = plain_and_other(platform="cuda")
  biased = jax.tree_util.tree_map_with_path(
      lambda path, a: a + 0.1 if "value']['bias" in jax.tree_util.keystr(path) else a,
      toy_params)
  (want, want_g), (got, got_g) = (packed_loss_and_grads(m, biased) for m in (plain, gpu))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  prompt_BP = jax.random.randint(jax.random.key(4), (3, 6), 1, TOY_MODEL["vocab_size"])
  lens_B = jnp.asarray([6, 4, 2], jnp.int32)
  np.testing.assert_array_equal(generate.generate(gpu, biased, prompt_BP, lens_B, 5),
                                generate.generate(plain, biased, prompt_BP, lens_B, 5))
  tokens = prompt_BP[:1]
  for model, folded in ((plain, False), (gpu, True)):
    _, state = model.apply({"params": biased}, tokens, capture_intermediates=True,
                           mutable=["intermediates"])
    value = state["intermediates"]["block0"]["attn"]["value"]["__call__"][0]
    x_BLD = nn.LayerNorm(epsilon=1e-6).apply({"params": biased["block0"]["ln1"]["LayerNorm_0"]},
                                             biased["embed"]["embedding"][tokens])
    product = jnp.einsum("bld,dhk->blhk", x_BLD, biased["block0"]["attn"]["value"]["kernel"])
    v_BLHK = value[0] if folded else value
    np.testing.assert_allclose(v_BLHK, product if folded else product + 0.1, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("scan,remat", [(False, "full"), (True, "full"), (True, "dots"),
                                        (False, "dots_no_batch")])
def test_remat_decodes_like_the_plain_model(scan, remat, toy_params):
  """Every remat policy, with and without scan_layers: init gives the plain model's param tree,
  and KV-cache decoding (eval, ask) of the same params gives the plain model's greedy tokens on
  ragged prompts. A remat block called with a cache would trace its layer index, which indexes
  the cache's per-layer tuple."""
  plain, other = plain_and_other(scan_layers=scan, remat=remat)
  shapes = jax.eval_shape(lambda: init_params(other, jnp.zeros((1, 8), jnp.int32), 3))
  assert jax.tree.structure(shapes) == jax.tree.structure(toy_params)
  prompt_BP = jax.random.randint(jax.random.key(4), (3, 6), 1, TOY_MODEL["vocab_size"])
  lens_B = jnp.asarray([6, 4, 2], jnp.int32)
  want = generate.generate(plain, toy_params, prompt_BP, lens_B, 5)
  np.testing.assert_array_equal(generate.generate(other, toy_params, prompt_BP, lens_B, 5), want)


@pytest.mark.parametrize("tie", [True, False])
def test_bf16_logits_are_accumulated_in_float32(tie):
  """With bf16 compute the model's logits (what decoding takes the argmax of) are the f32
  product of the bf16 hidden state and head, as the training loss makes them: rounded to
  bf16 (8 bits of mantissa) they tie and the argmax disagrees with the trained head."""
  cfg = transformer.ModelConfig(vocab_size=512, num_layers=1, num_heads=2, d_model=64, d_ff=128,
                                dtype="bfloat16", tie_embeddings=tie)
  model = transformer.Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 512)
  params = jax.tree.map(lambda x: 8 * x, init_params(model, tokens, 0))   # logits ~ tens
  logits, hidden, _ = model.apply({"params": params}, tokens)
  assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
  ref = np.asarray(hidden, np.float64) @ np.asarray(transformer.head_matrix(cfg, params),
                                                    np.float64)
  got = np.asarray(logits)
  np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())
  assert (got != np.asarray(logits.astype(jnp.bfloat16), np.float32)).mean() > 0.5


def test_flops_per_token_matches_xla_cost_analysis():
  """The MFU numerator (transformer.flops_per_token) against XLA's own count of the compiled
  programs: full training (6N), a frozen base that gradients pass through to an embedding
  update (4N: LoRA, P-/Q-probes with embed_rank), forward only; with and without the head.
  Counting 6N for a frozen base overstated probe and LoRA MFU ~1.5x."""
  cfg = transformer.ModelConfig(vocab_size=512, num_layers=2, num_heads=4, d_model=256,
                                d_ff=1024)
  model = transformer.Transformer(cfg)
  B, L = 4, 64
  tokens = jnp.zeros((B, L), jnp.int32)
  params = init_params(model, tokens, 0)
  logits_sum = lambda p: model.apply({"params": p}, tokens)[0].sum()
  hidden_sum = lambda p, d=None: model.apply({"params": p}, tokens, embed_delta_VD=d)[1].sum()
  through_frozen = lambda p, d: jax.grad(lambda d: hidden_sum(p, d))(d)
  delta = jnp.zeros((cfg.vocab_size, cfg.d_model))

  def xla_flops(f, *args):
    cost = jax.jit(f).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"] / (B * L)

  for f, args, want in ((jax.grad(logits_sum), (params,), transformer.flops_per_token(cfg, L)),
                        (through_frozen, (params, delta),
                         transformer.flops_per_token(cfg, L, "inputs", head=False)),
                        (logits_sum, (params,), transformer.flops_per_token(cfg, L, "none")),
                        (hidden_sum, (params,),
                         transformer.flops_per_token(cfg, L, "none", head=False))):
    assert xla_flops(f, *args) == pytest.approx(want, rel=0.05)
