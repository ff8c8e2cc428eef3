"""Prefill and decode throughput: kvjax vs Hugging Face transformers, same checkpoint, one run.

    python benchmarks/decode.py                                   # ~10M Llama, CPU, float32
    python benchmarks/decode.py --config 1b --bandwidth-gbs 3350  # ~1B Llama, bf16, on an H100

Builds a random Llama-architecture checkpoint with transformers (`save_pretrained` to a temp
dir), loads it with `kvjax.lm.load` and `LlamaForCausalLM.from_pretrained`, and times greedy
generation of --new-tokens tokens after a --prompt-len token prompt (the same random token ids
for both) at each batch size in --batches:

  kvjax  `lm.generate` (jitted `steps.prefill`, then `steps.decode_loop`: one lax.while_loop);
         its stats give prefill_s and decode_s, compilation excluded (one warm-up call first).
  HF     prefill: `model(ids, use_cache=True, logits_to_keep=1)`; decode: `model.generate(ids,
         do_sample=False, min_new_tokens=N, max_new_tokens=N)` minus prefill (medians);
         PyTorch eager under torch.inference_mode (one warm-up call first).

The two are interleaved per repeat (so both see the same machine load) and the median of
--repeats runs is reported (the JSON also has the best of each series). Tokens/s: prefill
B*P / prefill_s, decode B*N / decode_s.
Also reports the memory-bandwidth bound of a decode step: all weight bytes plus the KV cache
bytes read at the mean context length, 2*L*B*S*K*H*itemsize; with --bandwidth-gbs, the implied
maximum decode tokens/s and the fraction each implementation achieves.

Writes <out>/decode_<backend>.json (machine, config, every measurement, ratios kvjax/HF) and
<out>/decode_<backend>.md (the table, also printed).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from report import cpu_name, write  # noqa: E402

# HF LlamaConfig fields of each benchmark model.
CONFIGS = {
    # 10.5M parameters: 6.3M in the layers, 4.2M in the untied embedding and head.
    "10m": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                max_position_embeddings=2048),
    # 1.24B parameters: the shape of Llama-3.2-1B (tied embeddings), random weights.
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64,
               max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True),
}
DEFAULT_DTYPE = {"10m": "float32", "1b": "bfloat16"}
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python benchmarks/decode.py",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--config", choices=sorted(CONFIGS), default="10m")
  ap.add_argument("--dtype", choices=DTYPES, help="default: float32 for 10m, bfloat16 for 1b")
  ap.add_argument("--prompt-len", type=int, default=128)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
  ap.add_argument("--bandwidth-gbs", type=float,
                  help="memory bandwidth in GB/s (e.g. 3350 for H100 SXM HBM3) for the bound")
  ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "results"))
  ap.add_argument("--allow-cpu-1b", action="store_true",
                  help="run --config 1b even when JAX's backend is the CPU (slow, ~5 GB)")
  args = ap.parse_args(argv)
  args.dtype = args.dtype or DEFAULT_DTYPE[args.config]
  try:
    args.batches = [int(b) for b in args.batches.split(",")]
  except ValueError:
    ap.error(f"--batches must be comma-separated integers, e.g. 1,8; got {args.batches!r}")
  for name in ("prompt_len", "new_tokens", "repeats"):
    if getattr(args, name) < 1:
      ap.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
  if min(args.batches) < 1:
    ap.error(f"--batches must all be >= 1; got {args.batches}")
  limit = CONFIGS[args.config]["max_position_embeddings"]
  if args.prompt_len + args.new_tokens > limit:
    ap.error(f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds the "
             f"{args.config} config's {limit} positions")
  if args.config == "1b" and jax.default_backend() == "cpu" and not args.allow_cpu_1b:
    ap.error("--config 1b is meant for a GPU/TPU; JAX's backend here is the CPU "
             "(pass --allow-cpu-1b to run it anyway)")
  return args


def torch_device():
  import torch
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_checkpoint(config: str, dtype: str, path: str, seed: int) -> int:
  """Saves a randomly initialised LlamaForCausalLM to path; returns its parameter count."""
  import torch
  import transformers
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(seed)
  hf_cfg = transformers.LlamaConfig(**CONFIGS[config])
  with torch.device(torch_device()):
    model = transformers.LlamaForCausalLM._from_config(hf_cfg, dtype=getattr(torch, dtype))
  model.save_pretrained(path)
  n = sum(p.numel() for p in model.parameters())
  del model
  return n


def load_models(path: str, dtype: str):
  """The checkpoint as (kvjax Model, transformers model in eval mode on torch_device())."""
  import torch
  import transformers
  from kvjax import lm
  transformers.utils.logging.disable_progress_bar()
  kv = lm.load(path, dtype=jnp.dtype(dtype))
  hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
  return kv, hf.to(torch_device()).eval()


def prompt_ids(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
  """[B, P] random token ids, the same for both implementations."""
  return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int64)


def run_kvjax(model, ids: np.ndarray, new_tokens: int) -> tuple[float, float, np.ndarray]:
  """One greedy generation: (prefill_s, decode_s, tokens [B, N]). stop_tokens=[] makes the
  decode loop's stop ids [-1], so every row runs the full N steps."""
  from kvjax import lm
  out = lm.generate(model, ids.tolist(), max_new_tokens=new_tokens, stop_tokens=[])
  return out.stats["prefill_s"], out.stats["decode_s"], np.array(out.tokens)


def _sync(device) -> None:
  if device.type == "cuda":
    import torch
    torch.cuda.synchronize()


def run_hf(model, ids: np.ndarray, new_tokens: int) -> tuple[float, float, np.ndarray]:
  """One prefill forward, then one greedy generate: (prefill_s, generate_s, tokens [B, N])."""
  import torch
  device = model.device
  x = torch.as_tensor(ids, device=device)
  mask = torch.ones_like(x)
  with torch.inference_mode():
    _sync(device)
    t0 = time.perf_counter()
    model(x, attention_mask=mask, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(x, attention_mask=mask, do_sample=False, use_cache=True,
                         min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                         pad_token_id=0)
    _sync(device)
    generate_s = time.perf_counter() - t0
  return prefill_s, generate_s, out[:, ids.shape[1]:].cpu().numpy()


def greedy_agreement(a: np.ndarray, b: np.ndarray) -> dict:
  """How far two [B, N] greedy outputs agree: rows identical, mean common-prefix length."""
  same = a == b
  prefix = [int(np.argmin(np.append(row, False))) for row in same]
  return dict(rows_identical=int(sum(p == a.shape[1] for p in prefix)), rows=int(a.shape[0]),
              mean_common_prefix=float(np.mean(prefix)))


def measure(kv, hf, batch: int, args, progress) -> dict:
  """Warm-up, then --repeats interleaved runs of both; medians and tokens/s at one batch size."""
  ids = prompt_ids(batch, args.prompt_len, kv.cfg.vocab_size, args.seed)
  run_kvjax(kv, ids, args.new_tokens)  # compiles prefill and decode_loop
  run_hf(hf, ids, args.new_tokens)
  raw = {"kvjax_prefill_s": [], "kvjax_decode_s": [], "hf_prefill_s": [], "hf_generate_s": []}
  for _ in range(args.repeats):
    kp, kd, k_tokens = run_kvjax(kv, ids, args.new_tokens)
    hp, hg, h_tokens = run_hf(hf, ids, args.new_tokens)
    for key, value in zip(raw, (kp, kd, hp, hg)):
      raw[key].append(value)
    progress.update(1)
  med = {key: statistics.median(values) for key, values in raw.items()}
  best = {key: min(values) for key, values in raw.items()}
  for stats in (med, best):  # each summarised alone: one slow prefill spoils no decode figure
    stats["hf_decode_s"] = stats["hf_generate_s"] - stats["hf_prefill_s"]
  prefill_tokens, decode_tokens = batch * args.prompt_len, batch * args.new_tokens
  result = dict(batch=batch, runs=raw, median=med, best=best)
  for phase, n in (("prefill", prefill_tokens), ("decode", decode_tokens)):
    kvjax_tps = n / med[f"kvjax_{phase}_s"]
    hf_tps = n / med[f"hf_{phase}_s"]
    result[phase] = dict(tokens=n, kvjax_tok_s=kvjax_tps, hf_tok_s=hf_tps,
                         ratio=kvjax_tps / hf_tps)
  result["greedy_agreement"] = greedy_agreement(k_tokens, h_tokens)
  return result


def bandwidth_bound(cfg, n_params: int, itemsize: int, batch: int, args,
                    decode: dict | None = None) -> dict:
  """Bytes one decode step must read: every weight once, plus K and V of the mean context
  S = prompt_len + new_tokens / 2 for each row; with a bandwidth, the implied max tokens/s."""
  S = args.prompt_len + args.new_tokens / 2
  weight_bytes = n_params * itemsize
  kv_bytes = 2 * cfg.n_layers * batch * S * cfg.n_kv_heads * cfg.head_dim * itemsize
  out = dict(batch=batch, mean_context=S, weight_bytes=weight_bytes, kv_bytes=kv_bytes,
             bytes_per_step=weight_bytes + kv_bytes, bandwidth_gbs=args.bandwidth_gbs,
             max_tok_s=None, kvjax_fraction=None, hf_fraction=None)
  if args.bandwidth_gbs:
    out["max_tok_s"] = batch * args.bandwidth_gbs * 1e9 / out["bytes_per_step"]
    if decode:
      out["kvjax_fraction"] = decode["kvjax_tok_s"] / out["max_tok_s"]
      out["hf_fraction"] = decode["hf_tok_s"] / out["max_tok_s"]
  return out


def machine_info(hf) -> dict:
  import flax
  import jaxlib
  import torch
  import transformers
  return dict(
      processor=cpu_name(), cpu_count=os.cpu_count(), platform=platform.platform(),
      python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
      flax=flax.__version__, torch=torch.__version__, transformers=transformers.__version__,
      jax_backend=jax.default_backend(), jax_devices=[str(d) for d in jax.devices()],
      torch_device=str(hf.device), torch_threads=torch.get_num_threads(),
      torch_cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      hf_attn_implementation=hf.config._attn_implementation,
      load_average_start=list(os.getloadavg()))


def _fmt(x, digits: int = 1) -> str:
  return "" if x is None else f"{x:,.{digits}f}"


def markdown(report: dict) -> str:
  """The results table (tokens/s, ratio kvjax/HF) and the bandwidth bound table."""
  c, m = report["config"], report["machine"]
  lines = [
      f"# decode benchmark: kvjax vs transformers ({m['jax_backend']})", "",
      f"{c['name']} Llama ({c['n_params'] / 1e6:,.1f}M params, {c['dtype']}), prompt "
      f"{c['prompt_len']} + {c['new_tokens']} new tokens, greedy, median of {c['repeats']}. "
      f"{m['processor']} ({m['cpu_count']} cpus), jax {m['jax']} on {m['jax_devices'][0]}, "
      f"torch {m['torch']} on {m['torch_device']} (transformers {m['transformers']}, "
      f"{m['hf_attn_implementation']} attention). Load average at start "
      f"{m['load_average_start'][0]:.2f}, end {m['load_average_end'][0]:.2f}.", "",
      "| batch | phase | kvjax tok/s | HF tok/s | ratio (kvjax/HF) |",
      "|---:|---|---:|---:|---:|",
  ]
  for r in report["results"]:
    for phase in ("prefill", "decode"):
      p = r[phase]
      lines.append(f"| {r['batch']} | {phase} | {_fmt(p['kvjax_tok_s'])} | {_fmt(p['hf_tok_s'])} "
                   f"| {p['ratio']:.2f} |")
  lines += ["", "Decode memory-bandwidth bound (weights + KV cache at the mean context, read once "
            "per step):", "",
            "| batch | MB/step | bandwidth GB/s | max tok/s | kvjax fraction | HF fraction |",
            "|---:|---:|---:|---:|---:|---:|"]
  for b in report["bandwidth_bound"]:
    lines.append(f"| {b['batch']} | {b['bytes_per_step'] / 1e6:,.2f} "
                 f"| {_fmt(b['bandwidth_gbs'], 0)} | {_fmt(b['max_tok_s'])} "
                 f"| {_fmt(b['kvjax_fraction'], 3)} | {_fmt(b['hf_fraction'], 3)} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  from tqdm import tqdm
  args = parse_args(argv)
  t_start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="kvjax_bench_") as path:
    print(f"building a random {args.config} Llama checkpoint ({args.dtype})", file=sys.stderr)
    n_params = build_checkpoint(args.config, args.dtype, path, args.seed)
    kv, hf = load_models(path, args.dtype)
  machine = machine_info(hf)
  with tqdm(total=len(args.batches) * args.repeats, desc="timed runs", file=sys.stderr) as bar:
    results = [measure(kv, hf, b, args, bar) for b in args.batches]
  machine["load_average_end"] = list(os.getloadavg())
  itemsize = jnp.dtype(args.dtype).itemsize
  report = dict(
      machine=machine,
      config=dict(name=args.config, hf=CONFIGS[args.config], n_params=n_params, dtype=args.dtype,
                  prompt_len=args.prompt_len, new_tokens=args.new_tokens, batches=args.batches,
                  repeats=args.repeats, seed=args.seed,
                  kvjax_method="lm.generate: steps.prefill + steps.decode_loop, stop ids [-1]",
                  hf_method="prefill: model(ids, use_cache=True, logits_to_keep=1); decode: median "
                            "of model.generate(greedy, min=max=new_tokens) minus median prefill"),
      results=results,
      bandwidth_bound=[bandwidth_bound(kv.cfg, n_params, itemsize, r["batch"], args, r["decode"])
                       for r in results],
      runtime_s=time.perf_counter() - t_start,
  )
  table = markdown(report)
  print(table)
  for r in results:
    g = r["greedy_agreement"]
    print(f"batch {r['batch']}: greedy tokens identical in {g['rows_identical']}/{g['rows']} rows "
          f"(mean common prefix {g['mean_common_prefix']:.1f} of {args.new_tokens})")
  stem = write(args.out, "decode", report, table)
  print(f"wrote {stem}.json and {stem}.md in {report['runtime_s']:.0f} s")
  return report


if __name__ == "__main__":
  main()
