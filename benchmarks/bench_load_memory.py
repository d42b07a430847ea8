"""Peak host memory while loading a sharded checkpoint: ours against loading it naively and transformers.

Writes a Llama-shaped bf16 checkpoint of about 1.2 GB in ~256 MB safetensors
shards (random values), then loads it three ways, each in a fresh process,
and reports the peak resident set (VmHWM: anonymous + mapped file + shared
memory pages) above the process's baseline after imports:

- ours: the loader's ModelStore.load (plan, stream tensor by tensor into /dev/shm);
- naive: every shard read into memory first (safetensors load_file), then copied
  into one shared-memory buffer, as a load-everything-then-place loader does;
- transformers: AutoModelForCausalLM.from_pretrained(dtype=bfloat16), then every
  parameter read once (it may keep them as views of the mapped files, not yet in RAM).

Streaming should peak near one shard plus the final weights; naive near all
shards plus the final weights.

    python benchmarks/bench_load_memory.py [--layers 10] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LLAMA = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
SHARD_BYTES = 256 * 2**20


def write_checkpoint(folder: str, layers: int) -> dict:
    """Shards of random bf16 tensors, written one shard at a time; returns sizes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(**LLAMA, num_hidden_layers=layers, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    config.to_json_file(os.path.join(folder, "config.json"))
    hidden, inter, kv = LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["num_key_value_heads"] * 128
    shapes = {"model.embed_tokens.weight": (LLAMA["vocab_size"], hidden)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        shapes |= {
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (hidden, hidden),
            prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (LLAMA["vocab_size"], hidden)}

    shards, current, current_bytes = [], {}, 0
    for name, shape in shapes.items():
        tensor = torch.randn(shape, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        if current and current_bytes + tensor.nbytes > SHARD_BYTES:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = tensor
        current_bytes += tensor.nbytes
    shards.append(current)
    weight_map, total, largest = {}, 0, 0
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
        size = os.path.getsize(os.path.join(folder, file))
        total, largest = total + size, max(largest, size)
        weight_map |= dict.fromkeys(shard, file)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as file:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, file)
    return {"shards": len(shards), "checkpoint_bytes": total, "largest_shard_bytes": largest}


def rss_now() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")


def child(way: str, folder: str) -> None:
    """Load `folder` one way in this fresh process; print JSON with the peak above baseline."""
    # Every way imports torch and its loader before the baseline, so only loading is measured.
    import torch

    if way == "ours":
        from llmexec.loader.model_store import ModelStore
    elif way == "naive":
        from safetensors.torch import load_file

        from llmexec.loader.shm_store import SHM_DIR
    else:
        from transformers import AutoModelForCausalLM
    reset_peak()
    baseline = rss_now()
    started = time.perf_counter()
    if way == "ours":
        store = ModelStore()
        model = store.load(folder, dtype="bfloat16")
        weight_bytes = sum(model.weights.bytes_by_dtype.values())
        seconds = time.perf_counter() - started
        peak = peak_rss()
        store.close()
    elif way == "naive":
        with open(os.path.join(folder, "model.safetensors.index.json")) as file:
            index = json.load(file)
        state_dict = {}
        for file in sorted(set(index["weight_map"].values())):
            state_dict |= load_file(os.path.join(folder, file))
        weight_bytes = sum(t.nbytes for t in state_dict.values())
        path = os.path.join(SHM_DIR, f"llmexec-bench-naive-{os.getpid()}")
        try:
            buffer = torch.from_file(path, shared=True, size=weight_bytes, dtype=torch.uint8)
            offset = 0
            for tensor in state_dict.values():
                buffer[offset : offset + tensor.nbytes].copy_(tensor.reshape(-1).view(torch.uint8))
                offset += tensor.nbytes
            seconds = time.perf_counter() - started
            peak = peak_rss()
        finally:
            os.unlink(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        weight_bytes = sum(p.nbytes for p in model.state_dict().values())
        seconds = time.perf_counter() - started
        # transformers may leave parameters as views of the mapped files, paged in
        # only when first used; read each once, as the first forward pass would.
        for parameter in model.parameters():
            parameter.sum()  # in its own dtype: no temporary copy
        peak = peak_rss()
    print(
        json.dumps(
            {
                "way": way,
                "peak_above_baseline": peak - baseline,
                "baseline": baseline,
                "weight_bytes": weight_bytes,
                "seconds": seconds,
            }
        )
    )


def measure(way: str, folder: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", way, folder], capture_output=True, text=True, timeout=1800
    )
    if result.returncode != 0:
        raise RuntimeError(f"{way} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10, help="10 layers: about 1.2 GB in bf16")
    parser.add_argument("--keep", default="", help="write the checkpoint here and keep it")
    parser.add_argument("--ways", default="ours,naive,transformers")
    parser.add_argument("--child", nargs=2, metavar=("WAY", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="llmexec-bench-load-", dir=args.keep or None) as folder:
        sizes = write_checkpoint(folder, args.layers)
        gib = 2**30
        print(
            f"checkpoint: {sizes['checkpoint_bytes'] / gib:.2f} GiB in {sizes['shards']} shards, "
            f"largest {sizes['largest_shard_bytes'] / gib:.2f} GiB"
        )
        print(f"{'way':<14}{'peak RSS above baseline':>26}{'final weights':>16}{'peak - weights':>16}{'seconds':>10}")
        for way in args.ways.split(","):
            row = measure(way, folder)
            extra = row["peak_above_baseline"] - row["weight_bytes"]
            print(
                f"{way:<14}{row['peak_above_baseline'] / gib:>22.2f} GiB{row['weight_bytes'] / gib:>12.2f} GiB"
                f"{extra / gib:>12.2f} GiB{row['seconds']:>10.1f}",
                flush=True,
            )
        print(f"streaming target: one shard ({sizes['largest_shard_bytes'] / gib:.2f} GiB) + final weights")


if __name__ == "__main__":
    main()
