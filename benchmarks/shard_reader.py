"""Shard reader throughput and memory: one JSON line per measurement.

    python -m benchmarks.shard_reader --gb 2 --buffer-mb 256

Writes a folder of float32 .npy shards (larger than the buffer) to a temporary directory, then streams
whole training epochs through `ActivationDataset.train_batches`. The first pass follows the write, so
both passes are normally served from the page cache; the second is the figure to quote. Peak memory is
the resident high-water mark (VmHWM) above the resident size before streaming: the design bound is two
buffers (the one served, the one being read) plus two batches (the caller's last one and the next).
`--provenance` also writes each shard's token provenance (tokens/shard_NNNN.npy, int32 [rows, 3], as
`python -m sae_sweep.harvest` does), to show that it costs the training reader nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from sae_sweep.data import ActivationDataset

MIB = 2**20


def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so writing the data does not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def write_shards(
    folder: Path, total_bytes: int, d_in: int, shard_tokens: int, seed: int = 0, provenance: bool = False
) -> int:
    """Random float32 shards filled piecewise through a memmap (never the whole array in RAM)."""
    rng = np.random.default_rng(seed)
    tokens = total_bytes // (4 * d_in)
    for i, start in enumerate(range(0, tokens, shard_tokens)):
        n = min(shard_tokens, tokens - start)
        if provenance:
            (folder / "tokens").mkdir(exist_ok=True)
            rows = np.stack([np.zeros(n), np.arange(n), rng.integers(0, 49152, n)], 1).astype(np.int32)
            np.save(folder / "tokens" / f"shard_{i:04d}.npy", rows)
        arr = np.lib.format.open_memmap(
            folder / f"shard_{i:04d}.npy", mode="w+", dtype=np.float32, shape=(n, d_in)
        )
        for a in range(0, n, 4096):
            arr[a : a + 4096] = rng.standard_normal((min(4096, n - a), d_in), dtype=np.float32)
        arr.flush()
        del arr
    return tokens


def stream_epoch(ds: ActivationDataset, batch_size: int, epoch: int) -> dict[str, float]:
    n = ds.batches_per_epoch(batch_size)
    start = time.perf_counter()
    for _ in itertools.islice(ds.train_batches(batch_size, epoch), n):
        pass
    seconds = time.perf_counter() - start
    nbytes = n * batch_size * ds.d_in * 4
    return {
        "batches": n,
        "seconds": round(seconds, 3),
        "mb_per_s": round(nbytes / MIB / seconds, 1),
        "tokens_per_s": round(n * batch_size / seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, default=1.0, help="size of the shard folder written (GiB)")
    parser.add_argument("--buffer-mb", type=float, default=128, help="data.buffer_mb")
    parser.add_argument("--d-in", type=int, default=3072)
    parser.add_argument("--shard-tokens", type=int, default=20_000, help="rows per shard (last one shorter)")
    parser.add_argument("--chunk-tokens", type=int, default=4096, help="data.chunk_tokens")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--passes", type=int, default=2, help="epochs streamed (the last is page-cache warm)")
    parser.add_argument("--provenance", action="store_true", help="also write token provenance files")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sae-shard-bench-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        tokens = write_shards(
            folder, int(args.gb * 2**30), args.d_in, args.shard_tokens, provenance=args.provenance
        )
        print(
            json.dumps(
                {
                    "step": "write",
                    "gb": args.gb,
                    "tokens": tokens,
                    "d_in": args.d_in,
                    "shards": len(list(folder.glob("*.npy"))),
                    "provenance": args.provenance,
                    "seconds": round(time.perf_counter() - start, 2),
                }
            ),
            flush=True,
        )

        ds = ActivationDataset(folder, seed=0, chunk_tokens=args.chunk_tokens, buffer_mb=args.buffer_mb)
        reset = reset_peak_rss()
        baseline_kb = proc_status_kb("VmRSS")
        for epoch in range(args.passes):
            figures = stream_epoch(ds, args.batch_size, epoch)
            print(json.dumps({"step": "epoch", "pass": epoch + 1, **figures}), flush=True)
        buffer_mb = ds.buffer_rows(args.batch_size) * args.d_in * 4 / MIB
        peak_mb = (proc_status_kb("VmHWM") - baseline_kb) / 1024
        print(
            json.dumps(
                {
                    "step": "memory",
                    "peak_rss_mb_above_baseline": round(peak_mb, 1),
                    "baseline_rss_mb": round(baseline_kb / 1024, 1),
                    "buffer_mb_used": round(buffer_mb, 1),
                    "bound_mb": round(2 * buffer_mb + 2 * args.batch_size * args.d_in * 4 / MIB, 1),
                    "data_mb": round(tokens * args.d_in * 4 / MIB),
                    "peak_reset": reset,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
