"""One Gated DeltaNet decode step's state work, alone: read the recurrent state of B sequences
from the cache, run the gated delta rule for one token, write the state back. Median ms.

    .venv/bin/python -m bench.deltanet_decode --batch 32 --heads 16

Run it from two checkouts (`cd TREE && python -m bench.deltanet_decode`, which imports that
tree's model/) to compare them."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from model.batch import BatchLayout
from model.cache import DeltaNetState
from model.delta_rule import recurrent_gated_delta_rule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128, help="key and value head dim")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    B, H, D = a.batch, a.heads, a.head_dim
    g = torch.Generator().manual_seed(0)
    state = DeltaNetState(B + 4, 64, 4, H, D, D, torch.float32)
    state.recurrent.normal_(generator=g)
    layout = BatchLayout.build(list(range(B)), [32] * B, [1] * B)  # decode: every sequence under way
    q = F.normalize(torch.randn(B, 1, H, D, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, 1, H, D, generator=g), dim=-1)
    v = torch.randn(B, 1, H, D, generator=g)
    decay, beta = -torch.rand(B, 1, H, generator=g), torch.rand(B, 1, H, generator=g)

    def step() -> None:
        conv, rec = state.read(layout)
        _, rec = recurrent_gated_delta_rule(q, k, v, decay, beta, rec)
        state.write(layout, conv, rec)

    for _ in range(3):
        step()
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    ms = 1e3 * statistics.median(times)
    print(f"B={B}, {H} heads of {D}x{D}, {a.threads} thread(s): median {ms:.2f} ms")


if __name__ == "__main__":
    main()
