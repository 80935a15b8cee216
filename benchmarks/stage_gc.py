"""What freeing a dropped model costs between stages, with and without the freeze at a stage's start.

A stage ends with a full garbage collection (alignctl.train.context.release_memory: its trainer, models and
optimizer hold reference cycles, and an accelerator's cached memory is given back only once they are collected). In
a process that has imported torch, transformers, TRL and PEFT a full collection scans ~500k objects. The lifecycle
now freezes what is alive at a stage's start (freeze_live_objects), so later collections scan only what the stage
made. This script builds and drops a tiny model ``--repeats`` times in one process, timing ``release_memory`` after
each drop, first without the freeze, then with it, and prints the medians side by side:

    python benchmarks/stage_gc.py [--repeats 7]

The ratio frozen / unfrozen is the target (<= 0.1). The last line checks that the dropped models were collected in
both cases (no tiny model is left alive), so the freeze does not keep what a stage dropped.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import weakref


def _drop_and_release(release) -> tuple[float, bool]:
    """Build a tiny causal LM with a reference cycle (as a trainer holds its model), drop it, time the release."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    holder = {"model": model}
    holder["self"] = holder  # a cycle: refcounting alone cannot free it
    alive = weakref.ref(model)
    del model, holder
    t0 = time.perf_counter()
    release()
    return time.perf_counter() - t0, alive() is None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import peft  # noqa: F401  (what a stage process has imported)
    import trl  # noqa: F401
    from trl import DPOConfig, SFTConfig  # noqa: F401

    from alignctl.train.context import freeze_live_objects, release_memory

    before = [_drop_and_release(release_memory) for _ in range(args.repeats)]
    freeze_live_objects()
    after = [_drop_and_release(release_memory) for _ in range(args.repeats)]
    slow, fast = statistics.median(t for t, _ in before), statistics.median(t for t, _ in after)
    print(f"objects the collector tracks (frozen or not): {len(gc.get_objects()) + gc.get_freeze_count()}")
    print(f"release_memory after dropping a model: {slow * 1000:7.1f} ms without the freeze, {fast * 1000:7.2f} ms "
          f"with it (medians of {args.repeats}); ratio {fast / slow:.4f} (target <= 0.1)")
    print(f"dropped models collected: without the freeze {all(ok for _, ok in before)}, "
          f"with it {all(ok for _, ok in after)}")


if __name__ == "__main__":
    main()
