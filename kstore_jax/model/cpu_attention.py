"""`cpu_docs` attention: the CPU's fused kernel over packed documents (cpu_attention.cc, XLA
FFI custom calls, float32), built on first use with the machine's C++ compiler.

XLA:CPU runs the einsum path's batched dots and soft-max on one thread while its 2-D matmuls
use every core; this kernel computes each batch row on XLA's intra-op thread pool, a block
of query rows against only the key columns its documents reach, and reads q, k, v in their
[B, L, H, K] layout (no head-major copies). Its forward saves each query's log-sum-exp;
the backward recomputes the probabilities from it.

The shared library is compiled (~3 s) once per source, compiler, jaxlib and CPU into
$KSTORE_KERNEL_CACHE (default ~/.cache/kstore_jax/kernels; one build at a time under a lock,
written by rename). `unavailable()` says why it cannot be built (no compiler, or one whose
build fails), or None: `auto` on such a CPU is `einsum`, and config validation refuses
`cpu_docs` in one line.
"""

import ctypes
import fcntl
import functools
import hashlib
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
CACHE_ENV = "KSTORE_KERNEL_CACHE"
DEFAULT_CACHE = "~/.cache/kstore_jax/kernels"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
NATIVE = ("-march=native",)   # the CPU's own vector width; dropped where a compiler refuses it
FORWARD, BACKWARD = "kstore_attention_forward", "kstore_attention_backward"


def compiler() -> list[str] | None:
  """The C++ compiler's command ($CXX split as a shell splits it, `ccache g++` say; else g++
  or c++ on the PATH), or None."""
  words = shlex.split(os.environ.get("CXX", "")) or ["g++"]
  if found := shutil.which(words[0]):
    return [found, *words[1:]]
  return [found] if (found := shutil.which("c++")) else None


def unavailable() -> str | None:
  """Why the kernel cannot be built here, in a few words; None when it can. It is built to
  know (once a machine: `library_path`'s cache), so a compiler that fails is found before a
  run picks `cpu_docs`, not at its first step."""
  cxx = compiler()
  return ("cpu_docs needs a C++ compiler (g++, or $CXX)" if cxx is None
          else _build_problem(tuple(cxx)))


@functools.cache
def _build_problem(cxx: tuple[str, ...]) -> str | None:
  """Why building the kernel with `cxx` failed, or None: asked once a process and compiler
  (a failed build is not cached on disk, and `auto` is resolved many times a run)."""
  try:
    library_path()
  except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
    return f"cpu_docs could not be built with {' '.join(cxx)}: " \
           f"{str(e).strip().splitlines()[0][:200]}"
  return None


def _cpu_flags() -> str:
  """The CPU's feature flags (-march=native builds for them)."""
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith("flags")), "")
  except OSError:
    return platform.processor()


@functools.cache
def library_path() -> pathlib.Path:
  """The built library for this source, compiler, jaxlib and CPU, compiled if missing (with
  NATIVE, else without it where the compiler refuses it)."""
  cxx = compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler (g++, or $CXX)")
  version = subprocess.run([*cxx, "--version"], capture_output=True, text=True,
                           check=True).stdout
  key = hashlib.sha256("\0".join([SOURCE.read_text(), *cxx, version, " ".join(FLAGS + NATIVE),
                                  jax.ffi.include_dir(), jax.lib.__version__,
                                  platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
  cache = pathlib.Path(os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE))
  path = cache / f"cpu_attention-{key}.so"
  if path.exists():
    return path
  cache.mkdir(parents=True, exist_ok=True)
  with open(cache / ".lock", "w") as lock:   # one build at a time; the others then load it
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not path.exists():
      fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
      os.close(fd)
      try:
        for flags in (FLAGS + NATIVE, FLAGS):
          build = subprocess.run([*cxx, *flags, "-I", jax.ffi.include_dir(), str(SOURCE),
                                  "-o", tmp], capture_output=True, text=True, check=False)
          if not build.returncode:
            break
        else:
          raise RuntimeError(f"building {SOURCE} with {' '.join(cxx)} failed:\n"
                             f"{build.stderr[-3000:]}")
        os.replace(tmp, path)
      finally:
        if os.path.exists(tmp):
          os.remove(tmp)
  return path


@functools.cache
def _registered() -> None:
  lib = ctypes.cdll.LoadLibrary(str(library_path()))
  for name, symbol in ((FORWARD, lib.KstoreAttentionForward),
                       (BACKWARD, lib.KstoreAttentionBackward)):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")


def _forward(q_BLHK, k_BLHK, v_BLHK, seg_BL, causal):
  _registered()
  *lead, L, H, _ = q_BLHK.shape
  return jax.ffi.ffi_call(
      FORWARD, (jax.ShapeDtypeStruct(q_BLHK.shape, jnp.float32),
                jax.ShapeDtypeStruct((*lead, H, L), jnp.float32)),
      vmap_method="broadcast_all")(q_BLHK, k_BLHK, v_BLHK, seg_BL.astype(jnp.int32),
                                   causal=np.int32(causal))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q_BLHK, k_BLHK, v_BLHK, seg_BL, causal: bool):
  """Softmax attention of packed rows over themselves (float32 [..., L, H, K]): a query sees
  the keys of its own segment id (> 0), and, `causal`, those at or before its column;
  padding queries (segment 0) see none and output 0."""
  return _forward(q_BLHK, k_BLHK, v_BLHK, seg_BL, causal)[0]


def _attention_fwd(q_BLHK, k_BLHK, v_BLHK, seg_BL, causal):
  o_BLHK, lse_BHL = _forward(q_BLHK, k_BLHK, v_BLHK, seg_BL, causal)
  return o_BLHK, (q_BLHK, k_BLHK, v_BLHK, seg_BL, o_BLHK, lse_BHL)


def _attention_bwd(causal, res, do_BLHK):
  q_BLHK, k_BLHK, v_BLHK, seg_BL, o_BLHK, lse_BHL = res
  grads = jax.ffi.ffi_call(
      BACKWARD, tuple(jax.ShapeDtypeStruct(q_BLHK.shape, jnp.float32) for _ in range(3)),
      vmap_method="broadcast_all")(q_BLHK, k_BLHK, v_BLHK, seg_BL.astype(jnp.int32), o_BLHK,
                                   lse_BHL, do_BLHK.astype(jnp.float32),
                                   causal=np.int32(causal))
  return (*grads, None)


attention.defvjp(_attention_fwd, _attention_bwd)


def kernel(q_BLHK, k_BLHK, v_BLHK, seg_BL, causal: bool, interpret: bool):
  """`attention` in float32 for any compute dtype (the output in q's), with the flash
  kernels' arguments (`interpret`, Pallas's, means nothing here)."""
  del interpret
  f32 = lambda x: x.astype(jnp.float32)
  return attention(f32(q_BLHK), f32(k_BLHK), f32(v_BLHK), seg_BL, causal).astype(q_BLHK.dtype)
