#!/usr/bin/env python3
"""Prints the tables of scripts/bench-gpu.sh from the JSON lines it wrote:
edgetune.jsonl (`edgetune bench-train --json` and `edgetune bench --json`) and torch.jsonl
(scripts/bench_torch.py).

    python3 scripts/bench_table.py FOLDER
"""
import json
import os
import sys


def lines(path):
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                print(f"{path}:{n}: not JSON ({e}); skipped", file=sys.stderr)
    return out


def mib(b):
    return f"{b / 1048576:.0f}" if b else "-"


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def host_ms(h):
    """A decoded token's host time, recording / submitting / waiting for the GPU, in ms."""
    if not h:
        return "-"
    return f"{h['recording']:.2f} / {h['submitting']:.2f} / {h['waiting']:.2f}"


def kernels_of(o):
    """The family of a run's products, the grid below which tile128's are on 64 x 64 blocks
    (tile64), the widest side of its narrow blocks where it is not the default (48), and the
    shader checks where they are not the default (bounds)."""
    k = o.get("kernels") or {}
    matmul = k.get("matmul", "?")
    groups = k.get("tile128_min_groups")
    name = matmul
    if matmul in ("tile128", "coop16", "half") and groups is not None:
        name = f"{matmul}, tile64 below {groups} tiles" if groups else f"{matmul}, 128 x 128 always"
    narrow = k.get("narrow_max")
    if matmul in ("tile128", "coop16", "half") and narrow is not None and narrow != 48:
        name += f", narrow blocks up to {narrow}" if narrow else ", no narrow blocks"
    checks = o.get("shader_checks", "bounds")
    return name if checks == "bounds" else f"{name}, shader checks {checks}"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    folder = sys.argv[1]
    ours = lines(os.path.join(folder, "edgetune.jsonl"))
    theirs = lines(os.path.join(folder, "torch.jsonl"))
    device = next((o["adapter"]["name"] + " (" + o["adapter"]["backend"] + ")" for o in ours if "adapter" in o), "?")
    torch_dev = next((t["device"] + ", torch " + t["torch"] + ", " + t["weights"] for t in theirs if "device" in t), None)
    print(f"edgetune on {device}" + (f"; PyTorch + PEFT on {torch_dev}" if torch_dev else "; no PyTorch column"))
    print()
    print("| shape | kernels | checkpointing | edgetune tokens/s | step ms (median) | CPU record ms | dispatches/step | "
          "buffers + bind groups created/step | GPU MiB (planned / driver) | PyTorch tokens/s | PyTorch GPU MiB | "
          "edgetune / PyTorch |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for o in ours:
        if "modes" not in o:
            continue
        for m in o["modes"]:
            t = next((t for t in theirs if t.get("kind") == "train" and t["shape"] == o["shape"]
                      and t["checkpointing"] == m["checkpointing"]), None)
            mem = m["gpu_memory_bytes"]
            ratio = m["tokens_per_s"] / t["tokens_per_s"] if t else None
            kernels = kernels_of(o)
            print(f"| {o['shape']} | {kernels} | {'on' if m['checkpointing'] else 'off'} | {fmt(m['tokens_per_s'])} | "
                  f"{fmt(m['step_ms']['median'])} | {fmt(m['cpu_record_ms'])} | {m['dispatches_per_step']:.0f} | "
                  f"{m['buffers_created_per_step'] + m['bind_groups_created_per_step']:.0f} | "
                  f"{mib(mem['planned'])} / {mib(mem.get('driver'))} | {fmt(t['tokens_per_s'] if t else None)} | "
                  f"{mib(t['gpu_memory_bytes']) if t else '-'} | {fmt(ratio, 3)} |")
    print()
    print("| shape | prompt tokens | split keys below | LoRA rank | edgetune prefill tokens/s | "
          "edgetune decode tokens/s (a step at a time / chained) | "
          "host ms/token (recording / submitting / waiting) | dispatches/token | "
          "allocations/token | PyTorch prefill tokens/s | PyTorch decode tokens/s | edgetune / PyTorch (decode) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for o in ours:
        if "decode_tokens_per_s" not in o:
            continue
        # PyTorch decodes the base model: rows with an adapter applied have no counterpart.
        t = next((t for t in theirs if t.get("kind") == "decode" and t["shape"] == o["shape"]
                  and t.get("prompt_tokens", 128) == o.get("prompt_tokens") and not o.get("lora_rank")), None)
        # Generation chains its greedy steps (each submitted before the last one's token is read).
        decode = o.get("decode_chained_tokens_per_s") or o["decode_tokens_per_s"]
        ratio = decode / t["decode_tokens_per_s"] if t else None
        print(f"| {o['shape']} | {o.get('prompt_tokens', '?')} | {o.get('split_keys_below', '-')} | "
              f"{o.get('lora_rank') or '-'} | {fmt(o['prefill_tokens_per_s'])} | "
              f"{fmt(o['decode_tokens_per_s'])} / {fmt(o.get('decode_chained_tokens_per_s'))} | "
              f"{host_ms(o.get('host_ms_per_token'))} | {o['dispatches_per_token']:.0f} | {o['allocations_per_token']:.0f} | "
              f"{fmt(t['prefill_tokens_per_s'] if t else None)} | {fmt(t['decode_tokens_per_s'] if t else None)} | "
              f"{fmt(ratio, 3)} |")
    print()
    print("| shape | sequences, each with its own adapter | LoRA rank | tokens/s one after another | "
          "tokens/s together (a step at a time / chained) | together / one after another | dispatches/step | "
          "compute passes/step | allocations/step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for o in ours:
        r = o.get("rows")
        if not r:
            continue
        print(f"| {o['shape']} | {r['sequences']} | {r['lora_rank']} | {fmt(r['alone_tokens_per_s'])} | "
              f"{fmt(r.get('together_stepwise_tokens_per_s'))} / {fmt(r['together_tokens_per_s'])} | "
              f"{fmt(r['speedup'], 2)} | {fmt(r.get('dispatches_per_step'), 0)} | "
              f"{fmt(r.get('compute_passes_per_step'), 0)} | {r['allocations_per_step']:.0f} |")
    profile_table(folder)
    for o in ours:
        if o.get("profile") and "decode_tokens_per_s" in o:
            forward_profile(o, kernels_of(o))


def profile_table(folder):
    """The slowest kernels of each profiled step (profile.json for the adapter's family,
    profile-FAMILY.json for the others, profile-checks-C.json for its shader checks C), if any
    was taken."""
    names = sorted(n for n in os.listdir(folder) if n.startswith("profile") and n.endswith(".json"))
    for name in names:
        one_profile(os.path.join(folder, name))


def one_profile(path):
    try:
        with open(path) as f:
            p = json.load(f)
    except (OSError, ValueError) as e:
        print(f"\n{os.path.basename(path)} unreadable: {e}")
        return
    family = kernels_of(p)
    for m in p.get("modes", []):
        print()
        print(f"Profiled step of {p.get('model')} (seq {p.get('seq')}, {family} kernels, checkpointing "
              f"{'on' if m['checkpointing'] else 'off'}, timer {m.get('profile_timer')}, "
              f"step {m.get('step_ms', {}).get('median', 0):.1f} ms unprofiled, "
              f"{1e3 * sum(k['seconds'] for k in m.get('profile', [])):.1f} ms in kernels):")
        kernel_rows(m.get("profile", []), 1)


def kernel_rows(kernels, per):
    """A table of the 15 slowest kernels: milliseconds and dispatches divided by `per` (the
    tokens, for decoding), share of the whole, rates."""
    total = sum(k["seconds"] for k in kernels) or 1e-12
    print()
    print("| kernel | ms | share | dispatches | GFLOP/s | GB/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k in kernels[:15]:
        print(f"| {k['kernel']} | {1e3 * k['seconds'] / per:.3f} | {100 * k['seconds'] / total:.1f} % | "
              f"{k['dispatches'] / per:g} | {fmt(k.get('gflop_per_s'))} | {fmt(k.get('gbyte_per_s'))} |")


def forward_profile(p, family):
    """`edgetune bench --profile`'s prefill and decoding: each kernel's time (per token when
    decoding) and the share of the wall-clock time spent in kernels."""
    prof = p.get("profile") or {}
    for name, what in (("prefill", "Profiled prefill"), ("decode", "Profiled decoding, per token,")):
        d = prof.get(name)
        if not d or not d.get("tokens"):
            continue
        per = d["tokens"] if name == "decode" else 1
        print()
        print(f"{what} of {p.get('model')} ({d['tokens']} tokens, {family} kernels, timer {p.get('profile_timer')}): "
              f"{d['wall_ms'] / per:.3f} ms, {d['kernel_ms'] / per:.3f} ms of it in kernels "
              f"({100 * d['kernel_ms'] / max(d['wall_ms'], 1e-12):.0f} %):")
        kernel_rows(d.get("kernels", []), per)


if __name__ == "__main__":
    main()
