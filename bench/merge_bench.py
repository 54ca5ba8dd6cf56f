"""Merge benchmark: our streaming merge vs PEFT's load + merge_and_unload + save_pretrained,
and our layer-by-layer verification vs the whole-model verification.

Builds locally (no hub) a Llama-style bf16 model split into several safetensors shards and a
random fp32 LoRA adapter (r=16 on q_proj/v_proj), then runs each arm in its own subprocess and
reads that child's wall time and peak RSS (VmHWM). Compares every merged weight with a
reference merge (fp32 delta, rounded once to bf16), tensor by tensor.

    .venv/bin/python bench/merge_bench.py                # 672M params (1.3 GB bf16), all 5 arms
    .venv/bin/python bench/merge_bench.py --small        # ~90 MB, seconds
    .venv/bin/python bench/merge_bench.py --size 3b      # 3.2B (6.4 GB): ours, ours+verify, layers

Targets: merge (issue "performance"): ours peak RSS <= 1.5 x (largest shard + adapter) and <=
half of PEFT's; wall time no worse than PEFT's. Verification (issue 15): layer-by-layer peak
RSS <= runtime + 2 x the largest unit (decoder layer or embedding/head, at the verification
dtype), time <= the merge's, max |logits diff| equal to the whole-model verification's. The
ours+verify arm is merge_adapter as the service runs it (verify=True): what the verification
adds to a merge's wall time, imports included, against the merge's own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Full size: hidden 2048, 12 layers, GQA 16/4 heads, vocab 32000 -> ~672M params, ~1.34 GB bf16.
FULL = dict(hidden=2048, layers=12, intermediate=5632, heads=16, kv_heads=4, vocab=32000)
SMALL = dict(hidden=512, layers=4, intermediate=1408, heads=8, kv_heads=2, vocab=32000)
# Llama-3.2-3B's shape (head tied to the embedding): 3.21B params, 6.4 GB bf16.
B3 = dict(hidden=3072, layers=28, intermediate=8192, heads=24, kv_heads=8, vocab=128256, tie=1)
SIZES = {"small": SMALL, "full": FULL, "3b": B3}
ARMS = ("peft", "ours", "ours+verify", "verify-layers", "verify-whole")
VERIFY_FP32_MAX_PARAMS = 1_000_000_000  # as lora_core.merging.verify: fp32 below, bf16 above
BASE_SHARD_BYTES = 300 * 10**6  # base shards ~300 MB, like a 7B checkpoint cut small
OUT_SHARD_SIZE = "2GB"  # both arms; ours must not hold an output shard in memory
RANK, ALPHA = 16, 32
INIT_STD = 0.02  # random weights, scale of a trained LLM's linear layers


def _tensor_specs(c: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every LlamaForCausalLM tensor, in HF's naming."""
    h, kv = c["hidden"], c["hidden"] // c["heads"] * c["kv_heads"]
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (c["vocab"], h))]
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (c["intermediate"], h)),
            (p + "mlp.up_proj.weight", (c["intermediate"], h)),
            (p + "mlp.down_proj.weight", (h, c["intermediate"])),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs.append(("model.norm.weight", (h,)))
    return specs if c.get("tie") else specs + [("lm_head.weight", (c["vocab"], h))]


def largest_unit_params(c: dict[str, int]) -> int:
    """Parameters of the largest unit verification loads at once: a decoder layer, or the
    embedding / LM head (each its own unit; a tied head is the embedding's tensor again)."""
    units: dict[str, int] = {}
    for name, shape in _tensor_specs(c):
        parts = name.split(".")
        unit = ".".join(parts[:3]) if parts[1] == "layers" else name
        n = 1
        for d in shape:
            n *= d
        units[unit] = units.get(unit, 0) + n
    return max(units.values())


def total_params(c: dict[str, int]) -> int:
    total = 0
    for _, shape in _tensor_specs(c):
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def make_base(out: Path, c: dict[str, int]) -> None:
    """Write config, tokenizer and bf16 shards of <= BASE_SHARD_BYTES directly with safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from lora_core.model_files.tiny import train_tokenizer

    out.mkdir(parents=True)
    tok = train_tokenizer(vocab_size=1024)
    tok.save_pretrained(out)
    LlamaConfig(
        vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
        num_key_value_heads=c["kv_heads"], tie_word_embeddings=bool(c.get("tie")),
        dtype="bfloat16",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"],
    ).save_pretrained(out)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in _tensor_specs(c):
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * INIT_STD
        t = t.to(torch.bfloat16)
        if shards[-1] and size + t.nbytes > BASE_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.nbytes for s in shards for t in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_adapter(out: Path, c: dict[str, int]) -> None:
    """Random fp32 LoRA on q_proj/v_proj in PEFT's file format."""
    import torch
    from safetensors.torch import save_file

    from lora_core.training.lora_layer import adapter_config_dict

    g = torch.Generator().manual_seed(1)
    state = {}
    for name, shape in _tensor_specs(c):
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            key = "base_model.model." + name.removesuffix(".weight")
            state[key + ".lora_A.weight"] = torch.randn(RANK, shape[1], generator=g) * INIT_STD
            state[key + ".lora_B.weight"] = torch.randn(shape[0], RANK, generator=g) * INIT_STD
    out.mkdir(parents=True)
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = adapter_config_dict(
        "bench-base", r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
    )  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


def run_arm(arm: str, base: Path, adapter: Path, out: Path) -> None:
    """Child process body: one merge (or verification of `out`), then print
    {"merge_s": ..., "peak_rss_mb": ...} as the last stdout line."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from lora_core.merging.merge import merge_adapter, merge_with_peft

    if arm.startswith("verify"):
        run_verify(arm, base, adapter, out)
        return
    start = time.perf_counter()
    if arm == "peft":
        merge_with_peft(base, adapter, out, max_shard_size=OUT_SHARD_SIZE)
    else:  # ours+verify: the merge as the service runs it, verification included
        verify = arm == "ours+verify"
        merge_adapter(base, adapter, out, max_shard_size=OUT_SHARD_SIZE, verify=verify)
    merge_s = time.perf_counter() - start
    print(json.dumps({"merge_s": merge_s, "peak_rss_mb": _vm_hwm_mb()}))


def run_verify(arm: str, base: Path, adapter: Path, merged: Path) -> None:
    """Verify `merged`; "runtime" is the RSS once everything this arm's check imports is
    loaded (the whole-model check also needs peft; the layer-by-layer one does not)."""
    import transformers.models.llama.modeling_llama  # noqa: F401

    if arm == "verify-whole":
        import peft  # noqa: F401
    from lora_core.merging.verify import verify_merge

    runtime = _vm_mb("VmRSS:")
    start = time.perf_counter()
    diff = verify_merge(base, adapter, merged, layerwise=arm == "verify-layers")
    seconds = time.perf_counter() - start
    print(json.dumps({"merge_s": seconds, "peak_rss_mb": _vm_hwm_mb(), "runtime_mb": runtime,
                      "max_abs_diff": diff}))  # fmt: skip


def _vm_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _vm_hwm_mb() -> float:
    """This process's peak RSS (VmHWM). Not rusage: after fork + exec, Linux seeds a child's
    ru_maxrss with the parent's RSS at fork time, which would hide a lean child's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(arm: str, base: Path, adapter: Path, out: Path) -> dict[str, float]:
    """Run one arm in a fresh interpreter; its wall time (imports included) and peak RSS."""
    if not arm.startswith("verify"):
        shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--arm", arm, str(base), str(adapter), str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read() if proc.stdout else ""
    status = proc.wait()
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{arm} arm failed (status {status})")
    child = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": wall, **child}


def max_diff_vs_reference(base: Path, adapter: Path, merged: Path) -> tuple[float, int]:
    """Max |merged - reference| over every tensor, reference = round_once(W + s·BA), bf16.

    Returns (max abs diff, number of tensors that are not bit-identical to the reference).
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    lora = load_file(str(adapter / "adapter_model.safetensors"))
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    out_files = sorted(merged.glob("*.safetensors"))
    located = {}
    for f in out_files:
        with safe_open(str(f), "pt") as h:
            located.update({k: f for k in h.keys()})
    worst, differing = 0.0, 0
    for name, fname in sorted(index.items()):
        with safe_open(str(base / fname), "pt") as h:
            w = h.get_tensor(name)
        key = "base_model.model." + name.removesuffix(".weight")
        if key + ".lora_A.weight" in lora:
            a, b = lora[key + ".lora_A.weight"], lora[key + ".lora_B.weight"]
            w = (w.float() + ALPHA / RANK * (b.float() @ a.float())).to(w.dtype)
        with safe_open(str(located[name]), "pt") as h:
            got = h.get_tensor(name)
        if got.dtype != w.dtype:
            differing += 1
        diff = (got.float() - w.float()).abs().max().item()
        worst = max(worst, diff)
        differing += int(not torch.equal(got.to(w.dtype), w))
    return worst, differing


def dir_mb(path: Path, pattern: str) -> list[float]:
    return [f.stat().st_size / 1e6 for f in sorted(path.glob(pattern))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="~90 MB model (same as --size small)")
    ap.add_argument("--size", choices=sorted(SIZES), default="full", help="model shape")
    ap.add_argument(
        "--arms",
        default=None,
        help=f"comma list of {','.join(ARMS)} (default: all; 3b: ours,ours+verify,verify-layers)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="runs per arm (default 2, small 1)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: tmp)")
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        run_arm(args.arm, *args.paths)
        return
    size = "small" if args.small else args.size
    c = SIZES[size]
    default = "ours,ours+verify,verify-layers" if size == "3b" else ",".join(ARMS)
    arms = (args.arms or default).split(",")
    if any(a.startswith("verify") for a in arms) and "ours" not in arms:
        raise SystemExit("the verify arms check the 'ours' arm's output: add ours to --arms")
    repeats = args.repeats or (1 if size != "full" else 2)
    print(f"cpu flags: {cpu_flags()} | load average at start: {os.getloadavg()}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    base, adapter = work / "base", work / "adapter"
    if not base.exists():
        t0 = time.perf_counter()
        make_base(base, c)
        make_adapter(adapter, c)
        print(f"generated base + adapter in {time.perf_counter() - t0:.1f} s")
    shards, adapter_mb = dir_mb(base, "*.safetensors"), dir_mb(adapter, "*.safetensors")[0]
    print(f"base: {sum(shards):.0f} MB bf16 in {len(shards)} shards (largest {max(shards):.0f} MB)"
          f", adapter {adapter_mb:.1f} MB fp32 (r={RANK}, q_proj/v_proj)")  # fmt: skip
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS if arm in arms}
    for _ in range(repeats):
        for arm in results:
            out = work / ("out-ours" if arm.startswith("verify") else f"out-{arm}")
            results[arm].append(measure(arm, base, adapter, out))
    merges = {a: r for a, r in results.items() if a in ("peft", "ours")}
    report(merges, base, adapter, work, max(shards) + adapter_mb)
    verify_report(results, c)
    print(f"load average at end: {os.getloadavg()}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


def cpu_flags() -> str:
    """The CPU flags that decide GEMM speed (bf16 native or emulated)."""
    text = Path("/proc/cpuinfo").read_text()
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])  # fmt: skip
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "(none of avx2/avx512/amx)"


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    """Best time, worst peak RSS over the repeats."""
    out = {k: min(r[k] for r in runs) for k in ("wall_s", "merge_s")}
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    for k in ("runtime_mb", "max_abs_diff"):
        if k in runs[0]:
            out[k] = max(r[k] for r in runs)
    return out


def verify_report(results: dict[str, list[dict[str, float]]], c: dict[str, int]) -> None:
    """Verification arms: time, peak RSS over the runtime, the budget, the logits diff."""
    arms = [a for a in ("verify-layers", "verify-whole") if results.get(a)]
    if not arms:
        return
    params = total_params(c)
    unit = largest_unit_params(c)
    vbytes = 4 if params <= VERIFY_FP32_MAX_PARAMS else 2
    unit_mb = unit * vbytes / 2**20
    print(f"verification in {'fp32' if vbytes == 4 else 'bf16'}: {params / 1e9:.2f}B params, "
          f"largest unit {unit / 1e6:.0f}M params = {unit_mb:.0f} MiB as verified "
          f"({unit * 2 / 2**20:.0f} MiB bf16 on disk)")  # fmt: skip
    print(f"{'arm':14} {'wall s':>8} {'verify s':>9} {'runtime MB':>11} {'peak RSS MB':>12}"
          f" {'peak-runtime':>13}  max|logits diff|")  # fmt: skip
    best = {a: _best(results[a]) for a in arms}
    for a, b in best.items():
        print(f"{a:14} {b['wall_s']:8.2f} {b['merge_s']:9.2f} {b['runtime_mb']:11.0f} "
              f"{b['peak_rss_mb']:12.0f} {b['peak_rss_mb'] - b['runtime_mb']:13.0f}  "
              f"{b['max_abs_diff']:.6g}")  # fmt: skip
    lay, merge = best.get("verify-layers"), _best(results["ours"])
    checks = {}
    if lay:
        budget = lay["runtime_mb"] + 2 * unit_mb
        checks[f"layers peak RSS <= runtime + 2 x largest unit = {budget:.0f} MB"] = (
            lay["peak_rss_mb"] <= budget
        )
        checks[f"layers verify s <= merge s ({merge['merge_s']:.2f})"] = (
            lay["merge_s"] <= merge["merge_s"]
        )
        checks[f"layers wall <= merge wall ({merge['wall_s']:.2f})"] = (
            lay["wall_s"] <= merge["wall_s"]
        )
    if lay and "verify-whole" in best:
        whole = best["verify-whole"]
        checks["same max|logits diff| as whole-model (within 1e-6)"] = (
            abs(lay["max_abs_diff"] - whole["max_abs_diff"]) <= 1e-6
        )
        print(f"ratios layers/whole: verify s {lay['merge_s'] / whole['merge_s']:.2f}, peak RSS "
              f"{lay['peak_rss_mb'] / whole['peak_rss_mb']:.2f}")  # fmt: skip
    if results.get("ours+verify"):
        both = _best(results["ours+verify"])
        added = {k: both[k] - merge[k] for k in ("wall_s", "merge_s")}
        print(f"merge_adapter(verify=True): wall {both['wall_s']:.2f} s, {both['merge_s']:.2f} s "
              f"without imports; the verification adds {added['wall_s']:.2f} s wall, "
              f"{added['merge_s']:.2f} s (peak RSS {both['peak_rss_mb']:.0f} MB)")  # fmt: skip
        checks[f"verification adds <= the merge's wall ({merge['wall_s']:.2f})"] = (
            added["wall_s"] <= merge["wall_s"]
        )
    for label, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {label}")


def report(results, base: Path, adapter: Path, work: Path, budget_basis_mb: float) -> None:
    """Print per-arm best wall time / worst peak RSS, ratios, targets and exactness."""
    best = {
        arm: {
            "wall_s": min(r["wall_s"] for r in runs),
            "merge_s": min(r["merge_s"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        }
        for arm, runs in results.items()
    }
    print(f"{'arm':6} {'wall s':>8} {'merge s':>8} {'peak RSS MB':>12}  max|diff| vs ref  tensors≠")
    for arm, b in best.items():
        diff, differing = max_diff_vs_reference(base, adapter, work / f"out-{arm}")
        print(f"{arm:6} {b['wall_s']:8.2f} {b['merge_s']:8.2f} {b['peak_rss_mb']:12.0f}"
              f"  {diff:16.3g}  {differing}")  # fmt: skip
    if "peft" not in best or "ours" not in best:
        return
    o, p = best["ours"], best["peft"]
    ratios = {k: o[k] / p[k] for k in ("wall_s", "merge_s", "peak_rss_mb")}
    print("ratios ours/peft: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    budget = 1.5 * budget_basis_mb
    checks = {
        f"ours RSS <= 1.5 x (largest shard + adapter) = {budget:.0f} MB": o["peak_rss_mb"]
        <= budget,
        "ours RSS <= 0.5 x PEFT's": o["peak_rss_mb"] <= 0.5 * p["peak_rss_mb"],
        "ours wall <= PEFT's": o["wall_s"] <= p["wall_s"],
    }
    for label, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {label}")


if __name__ == "__main__":
    main()
