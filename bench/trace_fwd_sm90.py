"""Where a query block's time goes in the Hopper forward: reads bench/trace_fwd_sm90.cu's file.

    python bench/trace_fwd_sm90.py OUT.bin

Per consumer warpgroup, mean SM clocks per block (the first block of each SM left out) of:
q_wait (O stored -> the next block's Q has landed), the first tile (turn taken, S landed,
softmax), each later tile (waiting for the turn, S landing after it, the softmax, P V done
after it), the last P V (waiting for the turn, done) and the O store; and the producer's
view: block taken -> Q load issued (Q's buffer freed), Q issued -> a consumer's start.
"""

import collections
import sys

import numpy as np


def load(path):
    raw = np.fromfile(path, dtype=np.uint8)
    sms, groups, cap, _ = np.frombuffer(raw[:16].tobytes(), dtype=np.int32)
    words = np.frombuffer(raw[16:].tobytes(), dtype=np.uint64).reshape(sms, groups, cap)
    return words


def events(words):
    live = words[words != 0]
    return [(int(w & 0xFF), int(w >> 8)) for w in live]


def consumer_blocks(evs):
    """Split one consumer's events into blocks: lists of (event, clock) from a start to its store."""
    blocks, cur = [], None
    for e, t in evs:
        if e == 1:
            cur = [(e, t)]
            blocks.append(cur)
        elif cur is not None:
            cur.append((e, t))
    return blocks


def main():
    words = load(sys.argv[1])
    sms = words.shape[0]
    for wg in (1, 2):
        acc = collections.defaultdict(list)
        tiles_per_block = []
        for sm in range(sms):
            blocks = consumer_blocks(events(words[sm, wg]))
            for i, b in enumerate(blocks):
                if i == 0 or not b or b[-1][0] != 7:
                    continue
                prev_stored = blocks[i - 1][-1][1]
                acc["q_wait (stored -> next start)"].append(b[0][1] - prev_stored)
                ev = b[1:]
                # first tile: 2, 3, 4
                acc["first: start -> turn"].append(ev[0][1] - b[0][1])
                acc["first: turn -> S"].append(ev[1][1] - ev[0][1])
                acc["first: S -> softmax"].append(ev[2][1] - ev[1][1])
                k = 3
                last = ev[2][1]
                n = 1
                while ev[k][0] == 2:
                    t2, t3, t4, t5 = (ev[k + j][1] for j in range(4))
                    acc["step: wait turn"].append(t2 - last)
                    acc["step: turn -> S"].append(t3 - t2)
                    acc["step: S -> softmax"].append(t4 - t3)
                    acc["step: softmax -> PV done"].append(t5 - t4)
                    last = t5
                    k += 4
                    n += 1
                acc["last: wait turn"].append(ev[k][1] - last)
                acc["last: turn -> PV done"].append(ev[k + 1][1] - ev[k][1])
                acc["store"].append(ev[k + 2][1] - ev[k + 1][1])
                acc["block (start -> stored)"].append(ev[k + 2][1] - b[0][1])
                if i + 1 < len(blocks):
                    acc["block period (start -> next start)"].append(blocks[i + 1][0][1] - b[0][1])
                tiles_per_block.append(n)
        print(f"consumer {wg}: {len(tiles_per_block)} blocks, {np.mean(tiles_per_block):.2f} tiles each")
        for key, vals in acc.items():
            v = np.array(vals)
            print(f"  {key:40s} mean {v.mean():8.0f}  median {np.median(v):8.0f}  (n={len(v)})")
    # Producer: block taken -> Q issued; Q issued -> consumer 1's start of that block.
    q_lat, q_free = [], []
    for sm in range(sms):
        prod = events(words[sm, 0])
        starts = [t for e, t in events(words[sm, 1]) if e == 1]
        taken = [t for e, t in prod if e == 10]
        qs = [t for e, t in prod if e == 12]
        for j, tq in enumerate(qs[: len(starts)]):
            q_lat.append(starts[j] - tq)
        for tt, tq in zip(taken, qs):
            q_free.append(tq - tt)
    print(f"producer: taken -> Q issued mean {np.mean(q_free):.0f}; Q issued -> consumer 1 start mean "
          f"{np.mean(q_lat):.0f} median {np.median(q_lat):.0f}")
    # Kernel span per SM.
    spans = []
    for sm in range(sms):
        ts = [t for wg in range(3) for _, t in events(words[sm, wg])]
        spans.append(max(ts) - min(ts))
    print(f"SM span: mean {np.mean(spans):.0f} min {np.min(spans)} max {np.max(spans)} clocks")


if __name__ == "__main__":
    main()
