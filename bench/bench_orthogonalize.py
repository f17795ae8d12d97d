"""Streaming vs in-memory orthogonalization: wall time and peak RSS.

Builds a synthetic sharded checkpoint of random bf16 weights from a real 4B-class llama config
(8.2 GiB on disk, 2 GiB shards) in a scratch directory, then orthogonalizes it by streaming in a
child process, printing wall time, peak RSS and the largest shard size. ``--small`` also times
the in-memory path against streaming on a checkpoint that fits in memory.

    python bench/bench_orthogonalize.py [--dir /tmp/refdir-bench] [--small]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchlib import fresh_dir

CONFIG = dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=36,
              num_attention_heads=24, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
              tie_word_embeddings=False, torch_dtype="bfloat16")
SHARD = 2 * 1024**3


def make_checkpoint(d: Path, config: dict, shard_bytes: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    d.mkdir(parents=True)
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "torch_dtype"})
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    shapes = {n: tuple(p.shape) for n, p in skeleton.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, k = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, k
        if shard:
            k += 1
            name = f"model-{k:05d}.safetensors"
            save_file(shard, str(d / name), metadata={"format": "pt"})
            weight_map.update({n: name for n in shard})
            shard, size = {}, 0

    for n, shape in shapes.items():
        t = (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if size + nbytes > shard_bytes:
            flush()
        shard[n] = t
        size += nbytes
    flush()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(d)


def child(code: str) -> tuple[float, float]:
    """Wall time and the child's own peak RSS in MiB. (ru_maxrss of children is not usable here:
    Linux carries the parent's high-water mark across fork and exec.)"""
    code += "\nprint('VmHWM', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    t = time.time()
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    hwm = int(next(line.split()[1] for line in res.stdout.splitlines() if line.startswith("VmHWM")))
    return time.time() - t, hwm / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/refdir-bench", help="scratch directory (replaced; ~17 GiB at its peak)")
    ap.add_argument("--small", action="store_true", help="also time the in-memory path on a small checkpoint")
    a = ap.parse_args()
    root = Path(a.dir)
    fresh_dir(root, create=True)
    src = root / "src"
    t = time.time()
    make_checkpoint(src, CONFIG, SHARD)
    shards = sorted(src.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards) / 1024**3
    largest = max(p.stat().st_size for p in shards) / 1024**3
    print(f"synthetic checkpoint: {total:.2f} GiB in {len(shards)} shards, largest {largest:.2f} GiB "
          f"(built in {time.time() - t:.0f} s)")
    code = (f"import torch; from refdir.core.orthogonalize import stream_orthogonalize; "
            f"stream_orthogonalize({str(src)!r}, torch.randn({CONFIG['hidden_size']}), {str(root / 'out')!r})")
    wall, rss = child(code)
    print(f"streaming orthogonalization: {wall:.0f} s wall, peak RSS {rss / 1024:.2f} GiB "
          f"= {rss / 1024 / largest:.2f} x the largest shard")
    if a.small:
        small = root / "small"
        make_checkpoint(small, {**CONFIG, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12,
                                "num_attention_heads": 16, "vocab_size": 32000}, 256 * 1024**2)
        for mode in ("stream", "memory"):
            if mode == "stream":
                code = (f"import torch; from refdir.core.orthogonalize import stream_orthogonalize; "
                        f"stream_orthogonalize({str(small)!r}, torch.randn(1024), {str(root / 's-out')!r})")
            else:
                code = (f"import torch; from transformers import AutoModelForCausalLM; "
                        f"from refdir.core.orthogonalize import orthogonalize_; "
                        f"m = AutoModelForCausalLM.from_pretrained({str(small)!r}, dtype=torch.bfloat16); "
                        f"orthogonalize_(m, torch.randn(1024)); m.save_pretrained({str(root / 'm-out')!r})")
            t = time.time()
            subprocess.run([sys.executable, "-c", code], check=True)
            print(f"small checkpoint, {mode}: {time.time() - t:.1f} s")
    fresh_dir(root)


if __name__ == "__main__":
    main()
