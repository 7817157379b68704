"""Every attention implementation against a plain NumPy softmax(q·kᵀ/√K + mask)·v written
here (forward and, by hand, backward), on packed rows: several documents per row, positions
restarting at 0, padding at the end; and against KV-cache columns for decoding. The Pallas
kernels (GPU flash, TPU splash) run in interpret mode on the CPU."""

import importlib.util
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from kstore_jax.model import attention, flash_docs


def packed_row(rng, L, max_doc):
  """segment ids 1.. of documents of random lengths left to right, padding (0) after;
  positions restart at 0 in each document."""
  seg, pos, s, col = np.zeros(L, np.int32), np.zeros(L, np.int32), 1, 0
  while True:
    n = int(rng.integers(1, max_doc + 1))
    if col + n > L - 3:   # leave some padding
      break
    seg[col:col + n], pos[col:col + n] = s, np.arange(n)
    s, col = s + 1, col + n
  return seg, pos


def batch(seed, B=2, L=64, H=2, K=32, max_doc=24, dtype=np.float32):
  rng = np.random.default_rng(seed)
  q, k, v, do = (rng.standard_normal((B, L, H, K)).astype(dtype) for _ in range(4))
  rows = [packed_row(rng, L, max_doc) for _ in range(B)]
  seg = np.stack([r[0] for r in rows])
  pos = np.stack([r[1] for r in rows])
  # padding rows' outputs feed nothing (no loss weight, no query sees them): no cotangent
  do *= (seg > 0)[:, :, None, None]
  return q, k, v, do, seg, pos


def reference(q, k, v, do, q_seg, q_pos, k_seg, k_pos, causal):
  """float64 NumPy: output [B, L, H, K] and the gradients of sum(out * do) w.r.t. q, k, v.
  Queries with no visible key (padding) are left out (output and gradient 0)."""
  q, k, v, do = (x.astype(np.float64) for x in (q, k, v, do))
  scale = 1.0 / np.sqrt(q.shape[-1])
  visible = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)
  if causal:
    visible &= k_pos[:, None, :] <= q_pos[:, :, None]
  vis = visible[:, None]                                         # [B, 1, L, T]
  s = np.einsum("blhk,bthk->bhlt", q, k) * scale
  s = np.where(vis, s, -np.inf)
  has = vis.any(-1, keepdims=True)
  s = np.where(has, s, 0.0)
  p = np.exp(s - s.max(-1, keepdims=True)) * vis
  p = p / np.where(has, p.sum(-1, keepdims=True), 1.0)
  out = np.einsum("bhlt,bthk->blhk", p, v)
  dv = np.einsum("bhlt,blhk->bthk", p, do)
  dp = np.einsum("blhk,bthk->bhlt", do, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq = np.einsum("bhlt,bthk->blhk", ds, k) * scale
  dk = np.einsum("bhlt,blhk->bthk", ds, q) * scale
  return out, dq, dk, dv, has[:, 0, :, 0].transpose(0, 1)        # has: [B, L]


def run_self(impl, q, k, v, do, seg, pos, causal):
  def f(q, k, v):
    out = attention.self_attention(impl, q, k, v, jnp.asarray(pos), jnp.asarray(seg), causal,
                                   interpret=True)
    return (out.astype(jnp.float32) * do).sum(), out
  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(
      *(jnp.asarray(x) for x in (q, k, v)))
  return (np.asarray(out, np.float64),) + tuple(np.asarray(g, np.float64) for g in grads)


def rel(a, b):
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# tokamax is an optional package: its rows run where it is installed (the test extra has it)
SELF_IMPLS = ["einsum", "xla", "cpu_docs", "pallas", "pallas_docs", "splash"] + (
    ["tokamax"] if importlib.util.find_spec("tokamax") else [])
if not flags.FLAGS.is_parsed():   # tokamax reads its absl config flags (from pytest's argv
  flags.FLAGS(sys.argv[:1])       # else); the tools parse theirs, tokamax's own tests do this
LENGTH = {"splash": 128}   # splash's smallest tile; the others take 64-position rows


@pytest.mark.parametrize("impl", SELF_IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_self_attention_matches_numpy(impl, causal):
  q, k, v, do, seg, pos = batch(seed=SELF_IMPLS.index(impl) * 2 + causal,
                                L=LENGTH.get(impl, 64))
  out, dq, dk, dv = run_self(impl, q, k, v, do, seg, pos, causal)
  ref_out, ref_dq, ref_dk, ref_dv, has = reference(q, k, v, do, seg, pos, seg, pos, causal)
  real = (seg > 0)[:, :, None, None]   # padding rows' outputs are unused by every caller
  for got, want in ((out, ref_out), (dq, ref_dq), (dk, ref_dk), (dv, ref_dv)):
    assert rel(got * real, want * real) < 2e-5, impl
  assert np.isfinite(out).all()


@pytest.mark.parametrize("impl", SELF_IMPLS)
def test_self_attention_bfloat16(impl):
  q, k, v, do, seg, pos = batch(seed=7, L=LENGTH.get(impl, 64))
  out, dq, dk, dv = run_self(impl, *(x.astype(jnp.bfloat16) for x in (q, k, v)), do, seg, pos,
                             causal=True)
  ref_out, ref_dq, ref_dk, ref_dv, _ = reference(q, k, v, do, seg, pos, seg, pos, True)
  real = (seg > 0)[:, :, None, None]
  for got, want in ((out, ref_out), (dq, ref_dq), (dk, ref_dk), (dv, ref_dv)):
    assert rel(got * real, want * real) < 2e-2, impl


@pytest.mark.parametrize("impl", [i for i in SELF_IMPLS if attention.length_unsupported(i, 112)])
def test_rows_the_tiles_cannot_cover_still_attend(impl):
  """The probes run the training kernel on rows of the longest bio (+1) or name, GBERT's
  fill-mask on prompt + answer rows: 112 positions is no multiple of any flash tile, and
  the kernel refused it (a probe stage crashed on the GPU and TPU defaults)."""
  q, k, v, do, seg, pos = batch(seed=11, L=112)
  out, dq, dk, dv = run_self(impl, q, k, v, do, seg, pos, True)
  ref_out, ref_dq, ref_dk, ref_dv, _ = reference(q, k, v, do, seg, pos, seg, pos, True)
  real = (seg > 0)[:, :, None, None]
  for got, want in ((out, ref_out), (dq, ref_dq), (dk, ref_dk), (dv, ref_dv)):
    assert rel(got * real, want * real) < 2e-5, impl


@pytest.mark.parametrize("impl, L, launch, flash", [
    ("pallas_docs", 11, "", False),   # a Q-probe's row (1 + the longest name)
    ("pallas", 11, "", False),
    ("pallas_docs", 48, "", False),   # below the tile, no power of two
    ("pallas_docs", 32, "", True),
    ("pallas_docs", 192, "block=128", False),   # a bio-recall row at a 128-position launch
])
def test_rows_of_any_length_lower_for_cuda(impl, L, launch, flash):
  """Triton's arrays and dots take powers of two (>= 16): a row below the kernel's tile that
  is none (the probes' rows, GBERT's fill-mask rows), or no multiple of the launch's tile,
  runs `xla` (it raised in the Triton lowering); the others keep the flash kernel."""
  sds = jax.ShapeDtypeStruct
  args = (sds((2, L, 2, 64), jnp.bfloat16),) * 3 + (sds((2, L), jnp.int32),) * 2
  f = lambda q, k, v, pos, seg: attention.self_attention(impl, q, k, v, pos, seg, True,
                                                          launch=launch)
  with attention.lowering_target("cuda"):
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert ("__gpu$xla.gpu.triton" in text) == flash
  block = flash_docs.parse_launch(launch).block if impl == "pallas_docs" else 64
  assert (attention.length_unsupported(impl, L, block) is None) == flash


def test_reference_is_not_trivially_satisfied():
  """The reference's mask matters: leaving out segments or causality changes the output by
  far more than the tolerance above (so the tests would catch a kernel that ignores them)."""
  q, k, v, do, seg, pos = batch(seed=3)
  full = reference(q, k, v, do, seg, pos, seg, pos, True)[0]
  one_doc = reference(q, k, v, do, (seg > 0).astype(np.int32), pos, (seg > 0).astype(np.int32),
                      pos, True)[0]
  bidir = reference(q, k, v, do, seg, pos, seg, pos, False)[0]
  real = (seg > 0)[:, :, None, None]
  assert rel(one_doc * real, full * real) > 0.1
  assert rel(bidir * real, full * real) > 0.1


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_cached_attention_matches_numpy(impl):
  """Decoding: 3 new queries against 40 cache columns, rows left-padded differently (empty
  columns have segment 0), the cache columns' own positions deciding causality."""
  rng = np.random.default_rng(11)
  B, L, T, H, K = 3, 3, 40, 2, 16
  q, do = (rng.standard_normal((B, L, H, K)).astype(np.float32) for _ in range(2))
  k, v = (rng.standard_normal((B, T, H, K)).astype(np.float32) for _ in range(2))
  k_seg, k_pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
  q_seg, q_pos = np.ones((B, L), np.int32), np.zeros((B, L), np.int32)
  for b, pad in enumerate((0, 5, 17)):
    n = T - L - pad                               # cached prompt of n tokens after the padding
    k_seg[b, pad:T - L], k_pos[b, pad:T - L] = 1, np.arange(n)
    k_seg[b, T - L:], k_pos[b, T - L:] = 1, n + np.arange(L)   # this call's own columns
    q_pos[b] = n + np.arange(L)
  out = attention.cached_attention(impl, jnp.asarray(q), jnp.asarray(k).transpose(0, 2, 1, 3),
                                   jnp.asarray(v).transpose(0, 2, 1, 3), jnp.asarray(q_pos),
                                   jnp.asarray(q_seg), jnp.asarray(k_pos), jnp.asarray(k_seg),
                                   causal=True)
  ref = reference(q, k, v, do, q_seg, q_pos, k_seg, k_pos, True)[0]
  assert rel(np.asarray(out, np.float64), ref) < 2e-5


def test_packed_offsets_match_segments():
  """cuDNN's packed layout (lengths and first columns of each row's documents) from segment
  ids, checked against a Python walk over each row."""
  rng = np.random.default_rng(5)
  seg = np.stack([packed_row(rng, 64, 20)[0] for _ in range(4)])
  lengths, offsets = (np.asarray(x) for x in attention.packed_offsets(jnp.asarray(seg), 64))
  assert lengths.shape == (4, 64) and offsets.shape == (4, 65)
  for b, row in enumerate(seg):
    docs = [s for s in np.unique(row) if s > 0]
    want_len = [int((row == s).sum()) for s in docs]
    want_off = [int(np.argmax(row == s)) for s in docs]
    n = len(docs)
    assert list(lengths[b, :n]) == want_len and (lengths[b, n:] == -1).all()
    assert list(offsets[b, :n]) == want_off and (offsets[b, n:] == -1).all()


@pytest.mark.parametrize("platform,want", [("cpu", "cpu_docs"), ("cuda", "pallas_docs"),
                                           ("tpu", "splash")])
def test_auto_resolves_per_platform(platform, want):
  assert attention.resolve("auto", platform) == want
  assert attention.resolve("xla", platform) == "xla"
  assert attention.resolve_dtype("auto", platform) == ("float32" if platform == "cpu"
                                                       else "bfloat16")
  assert attention.unsupported(want, attention.resolve_dtype("auto", platform), platform,
                               512) is None


def test_impossible_combinations_are_named():
  assert "float32" in attention.unsupported("cudnn", "float32", "cuda", 512)
  assert "cpu" in attention.unsupported("cudnn", "bfloat16", "cpu", 512)
  assert "tpu" in attention.unsupported("pallas", "bfloat16", "tpu", 512)
  assert "multiple of 64" in attention.unsupported("pallas", "bfloat16", "cuda", 96)
  assert "multiple of 64" in attention.unsupported("pallas_docs", "bfloat16", "cuda", 96)
  assert "tpu" in attention.unsupported("pallas_docs", "bfloat16", "tpu", 512)
  assert "multiple of 128" in attention.unsupported("tokamax", "bfloat16", "cuda", 192)


# -- pallas_docs: the kernel that visits only the tiles its documents reach --------------------
def check_flash_docs(q, k, v, do, seg, pos, causal, block=16, **launch):
  """flash_docs at `block`-position tiles and the rest of `launch` (Launch's fields: heads a
  program, split, unroll): output and gradients equal the reference's on every real
  (non-padding) row."""
  launch = flash_docs.LAUNCH._replace(block=block, **launch)
  def f(q, k, v):
    out = flash_docs.attention(q, k, v, jnp.asarray(seg), causal, interpret=True, launch=launch)
    return (out * do).sum(), out
  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(
      *(jnp.asarray(x) for x in (q, k, v)))
  want = reference(q, k, v, do, seg, pos, seg, pos, causal)
  real = (seg > 0)[:, :, None, None]
  for got, w in zip((out, *grads), want[:4]):
    assert rel(np.asarray(got, np.float64) * real, w * real) < 2e-5


def visible_tiles(seg, block, causal, inner=None):
  """NumPy: for each row, [query tile of `block`, key tile of `inner`] and [query tile of
  `inner`, key tile of `block`] (inner: block), whether a query of the one sees a key of the
  other (same segment id, padding included, as the kernels mask; key column <= query column
  if causal)."""
  B, L = seg.shape
  Y, Z = block, inner or block
  cols = np.arange(L)
  sees = seg[:, :, None] == seg[:, None, :]
  if causal:
    sees &= cols[None, None, :] <= cols[None, :, None]
  return (sees.reshape(B, L // Y, Y, L // Z, Z).any((2, 4)),
          sees.reshape(B, L // Z, Z, L // Y, Y).any((2, 4)))


@pytest.mark.parametrize("causal", [True, False])
def test_flash_docs_skips_tiles_and_matches_numpy(causal):
  """16-position tiles over 128-position rows of documents up to 24 long: most tile pairs are
  skipped, and the output and gradients are the reference's."""
  q, k, v, do, seg, pos = batch(seed=21 + causal, L=128)
  visited, dense = flash_docs.visited_tiles(seg, 16, causal)
  assert visited < 0.6 * dense, (visited, dense)
  # unrolled tiles (Launch.unroll) compute at least `unroll` key tiles a query tile: every
  # one of the 2 x 8 query tiles here walks 1-3 (documents up to 24 positions, causal)
  if causal:
    assert visited < flash_docs.visited_tiles(seg, 16, causal, unroll=3)[0] == 2 * 8 * 3 * 16**2
  check_flash_docs(q, k, v, do, seg, pos, causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block,inner,launch", [
    (32, 16, {}), (32, 16, dict(split=True)), (64, 16, dict(unroll=2)),
    (64, 32, dict(heads=2, split=True, unroll=1))])
def test_flash_docs_inner_tiles_match_numpy(causal, block, inner, launch):
  """A program's loop over smaller tiles than its own (Launch.inner: the forward's and dq's
  key tiles, dk and dv's query tiles, the latter from the scores transposed): forward and
  gradients equal the reference, split or not, unrolled or not, several heads a program;
  the smaller tiles bound the documents' ranges more tightly."""
  q, k, v, do, seg, pos = batch(seed=71 + block + inner + causal, L=128, H=4, max_doc=40)
  visited = flash_docs.visited_tiles(seg, block, causal, inner=inner)[0]
  assert visited < flash_docs.visited_tiles(seg, block, causal)[0]
  check_flash_docs(q, k, v, do, seg, pos, causal, block=block, inner=inner, **launch)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("unroll", [1, 3])
def test_flash_docs_unrolled_tiles_match_numpy(causal, unroll):
  """Tiles at the diagonal end of each range computed unrolled (Launch.unroll), the rest in the
  loop: documents shorter and longer than the unrolled tiles (ranges of 1 to 5 tiles of 16:
  an unrolled tile outside a short range, masked whole; the loop for the long ones), forward
  and backward, split or not, equal the reference. (Computing an unrolled tile outside the
  range as a real one, or leaving the loop out, fails here.)"""
  rng = np.random.default_rng(61 + unroll + 2 * causal)
  q, k, v, do, _, _ = batch(seed=61, L=128)
  rows = [packed_row(rng, 128, 70), packed_row(rng, 128, 8)]   # long documents, short ones
  seg, pos = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
  do = do * (seg > 0)[:, :, None, None]
  assert pos.max() >= 16 * unroll, pos.max()     # a document longer than the unrolled tiles
  for split in (False, True):
    check_flash_docs(q, k, v, do, seg, pos, causal, unroll=unroll, split=split)


@pytest.mark.parametrize("heads,split", [(2, False), (4, False), (1, True), (2, True)])
def test_flash_docs_heads_a_program_match_numpy(heads, split):
  """Programs of several heads each (Launch.heads) compute every head as programs of one do:
  each head its own q, k, v, statistics and gradients (4 heads of other values per row); the
  backward split in two kernels (Launch.split: dk and dv, then dq) gives the same."""
  q, k, v, do, seg, pos = batch(seed=51 + heads, L=64, H=4)
  check_flash_docs(q, k, v, do, seg, pos, True, heads=heads, split=split)


def test_flash_docs_heads_must_divide():
  q = jnp.zeros((1, 64, 4, 32), jnp.float32)
  with pytest.raises(ValueError, match="3 heads a program do not divide 4 heads"):
    flash_docs.attention(q, q, q, jnp.ones((1, 64), jnp.int32), True, interpret=True,
                         launch=flash_docs.LAUNCH._replace(heads=3))


@pytest.mark.parametrize("causal", [True, False])
def test_flash_docs_any_segment_layout(causal):
  """Segment ids scattered over the row (a document in pieces, ids beyond L): the bounds widen
  and the function stays the reference's (causality by column, as the kernel has it)."""
  rng = np.random.default_rng(31)
  q, k, v, do, _, _ = batch(seed=31, L=128)
  seg = rng.choice(np.array([0, 1, 2, 7, 500]), size=(2, 128)).astype(np.int32)
  cols = np.broadcast_to(np.arange(128, dtype=np.int32), seg.shape)
  check_flash_docs(q, k, v, do, seg, cols, causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block,inner", [(16, 0), (32, 16), (64, 16)])
def test_flash_docs_bounds_are_the_visible_tiles(causal, block, inner):
  """On packed rows (documents left to right) each tile's range, in tiles of the loop's size
  (Launch.inner), is exactly from the first to the last tile holding something it sees: no
  visible tile left out, no needless one walked."""
  rng = np.random.default_rng(41)
  seg = np.stack([packed_row(rng, 256, 40)[0] for _ in range(6)])
  keys_of, queries_of = visible_tiles(seg, block, causal, inner)
  k_lo, k_hi, q_lo, q_hi = (np.asarray(x) for x in flash_docs.tile_bounds(
      jnp.asarray(seg), block, causal, inner))
  for b in range(seg.shape[0]):
    for n in range(keys_of.shape[1]):
      keys, queries = np.flatnonzero(keys_of[b, n]), np.flatnonzero(queries_of[b, :, n])
      assert (k_lo[b, n], k_hi[b, n]) == (keys.min(), keys.max() + 1)
      assert (q_lo[b, n], q_hi[b, n]) == (queries.min(), queries.max() + 1)


# -- cpu_docs: the CPU's C++ kernel (XLA FFI) ---------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_docs_any_shape_segment_layout_and_runs(causal):
  """Shapes off the kernel's tiles (L = 70 rows, 40-wide heads, 3 of them), segment ids
  scattered over the row (a document in pieces, ids beyond L, padding between), vmapped over
  two runs as a grid cohort calls it: each run's output and gradients are the reference's
  (causality by column, as the kernel has it)."""
  rng = np.random.default_rng(53)
  R, B, L, H, K = 2, 2, 70, 3, 40
  q, k, v, do = (rng.standard_normal((R, B, L, H, K)).astype(np.float32) for _ in range(4))
  seg = rng.choice(np.array([0, 1, 2, 7, 500]), size=(R, B, L)).astype(np.int32)
  do *= (seg > 0)[..., None, None]
  cols = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))

  def loss(q, k, v, seg, do):
    out = attention.self_attention("cpu_docs", q, k, v, jnp.asarray(cols), seg, causal)
    return (out * do).sum(), out
  grad = jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (_, out), grads = jax.jit(grad)(*(jnp.asarray(x) for x in (q, k, v, seg, do)))
  for r in range(R):
    want = reference(q[r], k[r], v[r], do[r], seg[r], cols, seg[r], cols, causal)
    real = (seg[r] > 0)[:, :, None, None]
    for got, ref in zip((out[r], *(g[r] for g in grads)), want[:4]):
      assert rel(np.asarray(got, np.float64) * real, ref * real) < 2e-5
    assert np.isfinite(np.asarray(out[r])).all()


def test_cpu_docs_without_a_compiler(monkeypatch):
  """No C++ compiler: `auto` on a CPU is `einsum`, and naming `cpu_docs` is refused in a few
  words that say what is missing."""
  from kstore_jax.model import cpu_attention
  monkeypatch.setenv("CXX", "no-such-compiler")
  monkeypatch.setenv("PATH", "/nonexistent")
  assert cpu_attention.compiler() is None
  assert attention.resolve("auto", "cpu") == "einsum"
  assert "C++ compiler" in attention.unsupported("cpu_docs", "float32", "cpu", 128)
  assert "cpu" in attention.unsupported("cpu_docs", "bfloat16", "cuda", 128)


def test_cpu_docs_with_a_compiler_that_fails(monkeypatch):
  """A compiler that is there but fails ($CXX=/bin/false): `auto` is `einsum` and `cpu_docs`
  is refused in one line (it was picked, and crashed at the first step's build)."""
  from kstore_jax.model import cpu_attention
  monkeypatch.setenv("CXX", "/bin/false")
  cpu_attention.library_path.cache_clear()   # (this process built it with the real one)
  try:
    assert cpu_attention.compiler() == ["/bin/false"]
    assert attention.resolve("auto", "cpu") == "einsum"
    problem = attention.unsupported("cpu_docs", "float32", "cpu", 128)
    assert problem.startswith("cpu_docs could not be built with /bin/false: "), problem
    assert "\n" not in problem
  finally:
    cpu_attention.library_path.cache_clear()


def test_cpu_docs_build_without_native_flags_and_a_failed_one(tmp_path, monkeypatch):
  """A compiler that refuses -march=native still builds the kernel (portable flags); one
  that builds nothing stops with an error naming the source and the compiler's words."""
  import ctypes
  from kstore_jax.model import cpu_attention
  no_native = tmp_path / "no-native-cxx"
  no_native.write_text('#!/bin/sh\ncase "$*" in *-march=native*) echo "no native here" >&2; '
                       'exit 1;; esac\nexec g++ "$@"\n')
  broken = tmp_path / "broken-cxx"
  broken.write_text('#!/bin/sh\n[ "$1" = --version ] && exec g++ --version\n'
                    'echo "internal compiler error" >&2; exit 1\n')
  for script in (no_native, broken):
    script.chmod(0o755)
  monkeypatch.setenv(cpu_attention.CACHE_ENV, str(tmp_path / "kernels"))
  monkeypatch.setenv("CXX", str(no_native))
  cpu_attention.library_path.cache_clear()
  try:
    assert ctypes.CDLL(str(cpu_attention.library_path())).KstoreAttentionForward
    monkeypatch.setenv("CXX", str(broken))
    cpu_attention.library_path.cache_clear()
    with pytest.raises(RuntimeError, match="cpu_attention.cc.*\n.*internal compiler error"):
      cpu_attention.library_path()
  finally:
    cpu_attention.library_path.cache_clear()


def test_flash_docs_lowers_for_cuda():
  """Forward and backward lower to Triton kernels for CUDA on this CPU host, alone and vmapped
  over grid runs, with no [B, H, L, L] scores."""
  B, L, H, K = 2, 256, 4, 64
  def loss(q, k, v, seg):
    return flash_docs.attention(q, k, v, seg, True).astype(jnp.float32).sum()
  grad = jax.grad(loss, argnums=(0, 1, 2))
  args = [jax.ShapeDtypeStruct((B, L, H, K), jnp.bfloat16)] * 3 + [
      jax.ShapeDtypeStruct((B, L), jnp.int32)]
  runs = [jax.ShapeDtypeStruct((2, *a.shape), a.dtype) for a in args]
  for fn, a in ((grad, args), (jax.vmap(grad), runs)):
    with attention.lowering_target("cuda"):
      text = jax.jit(fn).trace(*a).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2      # the forward and the backward kernel
    assert f"{L}x{L}xf32" not in text and "x256x256x" not in text


def test_flash_docs_launch_reaches_triton():
  """A launch's warps and pipeline stages are the lowered kernels' (bench attention times
  launches on the device by them), its tile and heads a program their grid's."""
  args = [jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)] * 3 + [
      jax.ShapeDtypeStruct((2, 256), jnp.int32)]
  for launch in (flash_docs.LAUNCH, flash_docs.Launch(block=128, warps=8, stages=3, heads=2),
                 flash_docs.Launch(warps=8, stages=1, split=True),
                 flash_docs.Launch(inner=32, stages=1, split=True)):
    kernels = 3 if launch.split else 2   # the forward, the backward (in two if split)
    grad = jax.grad(lambda q, k, v, seg: flash_docs.attention(
        q, k, v, seg, True, launch=launch).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    with attention.lowering_target("cuda"):
      text = jax.jit(grad).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count(f"num_warps = {launch.warps} : i32") == kernels, launch
    assert text.count(f"num_stages = {launch.stages} : i32") == kernels, launch
    # the forward's grid: (tiles, rows, head groups)
    assert (f"grid_x = {256 // launch.block} : i32, grid_y = 2 : i32, "
            f"grid_z = {4 // launch.heads} : i32") in text


def test_model_flash_launch_is_its_kernels_launch():
  """model.flash_launch (ModelConfig.flash_launch) is the launch the model's pallas_docs
  kernels lower with: the device check trains the attention sweep's fastest launch by it."""
  from kstore_jax.model import transformer
  tokens = jax.ShapeDtypeStruct((2, 128), jnp.int32)
  for text, warps, stages, kernels in (("", 4, 2, 2), ("warps=8, stages=1,split=1", 8, 1, 3)):
    cfg = transformer.ModelConfig(vocab_size=64, num_layers=1, num_heads=2, d_model=128,
                                  d_ff=128, dtype="bfloat16", attention="pallas_docs",
                                  norm="xla", platform="cuda", flash_launch=text)
    model = transformer.Transformer(cfg)
    with attention.lowering_target("cuda"):
      params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
      loss = lambda p, t: model.apply(p, t)[0].sum()
      text = jax.jit(jax.grad(loss)).trace(params, tokens).lower(
          lowering_platforms=("cuda",)).as_text()
    assert text.count(f"num_warps = {warps} : i32") == kernels
    assert text.count(f"num_stages = {stages} : i32") == kernels


def test_flash_launch_text_round_trips_and_refuses_in_words():
  """parse_launch reads what launch_text writes (bench attention's `launch`, which the device
  check passes back as model.flash_launch), fields it names replace the model's, and a bad
  field or value is refused naming it."""
  for launch in (flash_docs.LAUNCH, flash_docs.Launch(block=128, inner=32, warps=8, stages=1,
                                                      heads=2, split=True, unroll=3)):
    assert flash_docs.parse_launch(flash_docs.launch_text(launch)) == launch
  assert flash_docs.parse_launch("") == flash_docs.LAUNCH
  assert flash_docs.parse_launch(" split=true ") == flash_docs.LAUNCH._replace(split=True)
  for bad, says in (("warps=3", "warps=3"), ("tile=64", "'tile=64'"), ("block=48", "block=48"),
                    ("split=2", "split='2'"), ("heads=0", "heads=0"), ("stages=x", "stages='x'"),
                    ("warps=8,warps=4", "twice"), ("unroll=-1", "unroll=-1"),
                    ("inner=24", "inner=24"), ("inner=8", "inner=8"),
                    ("block=32,inner=64", "up to block=32")):
    with pytest.raises(ValueError, match=re.escape(says)):
      flash_docs.parse_launch(bad)
  assert "does not divide" in flash_docs.launch_unsupported(
      flash_docs.Launch(heads=3), num_heads=4, seq_len=128)
  assert "data.seq_len=192" in flash_docs.launch_unsupported(
      flash_docs.Launch(block=128), num_heads=4, seq_len=192)
  assert flash_docs.launch_unsupported(flash_docs.Launch(block=128), 4, 64) is None   # cut to L


def test_row_and_head_axes_are_the_sharding_rules():
  """attention.per_shard splits rows and heads over the mesh axes train/sharding.py gives the
  logical `batch` and `heads`."""
  from kstore_jax.train import sharding
  rules = dict(sharding.RULES)
  assert attention.ROW_AXES == tuple(rules["batch"])
  assert attention.HEAD_AXES == (rules["heads"],)


# run in a process of 4 CPU devices (this one has one): rows over `data`, heads over `tensor`
PER_SHARD = """
import sys, json
sys.path.insert(0, "tests")
import jax, jax.numpy as jnp, numpy as np
from kstore_jax.model import attention
from test_attention import batch, reference, rel
impl = sys.argv[1]
mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"),
                     axis_types=(jax.sharding.AxisType.Auto,) * 3)   # (the project's meshes)
q, k, v, do, seg, pos = batch(seed=7, B=4, L=128, H=2)
def f(q, k, v):
  with attention.on_mesh(mesh):
    out = attention.self_attention(impl, q, k, v, jnp.asarray(pos), jnp.asarray(seg), True,
                                   interpret=True)
  return (out * do).sum(), out
g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
args = [jnp.asarray(x) for x in (q, k, v)]
(_, out), grads = g(*args)
want = reference(q, k, v, do, seg, pos, seg, pos, True)
real = (seg > 0)[:, :, None, None]
print(json.dumps({"err": max(rel(np.asarray(a, np.float64) * real, b * real)
                             for a, b in zip((out, *grads), want[:4])),
                  "shard_map": "shard_map" in str(jax.make_jaxpr(g)(*args))}))
"""


@pytest.mark.parametrize("impl", ["cpu_docs", "pallas_docs", "splash"])
def test_kernels_run_per_shard_on_a_mesh(impl):
  """On a mesh of several devices a kernel XLA cannot partition (a Mosaic kernel refuses to
  lower otherwise) runs in a shard_map, each device on its rows and heads: the output and
  gradients are still the NumPy reference's."""
  import json
  import os
  import subprocess
  import runs
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", PER_SHARD, impl], cwd=root,
                        env=runs.env(n_devices=4), capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["shard_map"] and r["err"] < 2e-5, r
