"""Capture speed and memory, measured side by side in one run; prints `name: value` lines.

Model: a random-initialised LLaVA (8 LM layers, d_model 256, CLIP 2 layers, 96 px / patch 8 = 144 image tokens)
on 8-turn sessions with one image (turn = one message). Times are medians of interleaved repeats; the machine
may be shared, so `--threads 1` gives steadier figures.

    capture_vs_plain_forward            capture of resid_post at every layer and position, given the rendered
                                        tokens / plain HF forward of the same tokens with no hooks (target <= 1.10)
    capture_end_to_end_vs_plain_forward the same, rendering the session from its turns included
    run_with_cache_vs_plain_forward     transformer-lens TransformerBridge.run_with_cache of the same hooks
    kv_capture_vs_single_pass           turn-by-turn capture through the KV cache / one pass, both for a batch of
                                        `--batch` sessions captured together (`capture_batch`: one forward per turn
                                        step for the batch vs one padded pass); the sessions differ in their
                                        image only, so their turns are of equal length (target <= 1.25)
    kv_capture_vs_single_pass_varied    the same for sessions whose turns differ in length (0-12 tokens), so that
                                        each turn step is padded to its longest chunk: the cost of the holes
    kv_capture_vs_single_pass_unbatched the same for one session at a time (each turn pays a forward's fixed cost)
    kv_capture_vs_reencode_T{n}         turn-by-turn capture / re-encoding the prefix at each turn, n turns
    peak_mem_vs_run_with_cache          peak memory of capture / run_with_cache of everything, then slicing
                                        (each in a fresh process; target <= 0.25)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from probes import Session, Turn, build_tiny_model, capture_session, load_model, render, resolve_hooks  # noqa: E402
from probes.activations.capture import capture_batch  # noqa: E402
from probes.models.families.base import FamilyAdapter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402  (benchmarks/timing.py)

SIZE = dict(n_layers=8, d_model=256, image_size=96, patch_size=8, vision_layers=2, d_vision=64, n_heads=8)


def session(n_turns: int, seed: int = 0, vary: bool = False) -> Session:
    """`vary`: messages get 0-2 extra clauses by seed and turn, so that sessions of a batch differ in length."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(img).text((4, 40), f"SSN 123-45-{seed:04d}", fill="black")
    turns = [Turn("user", "Here is my application form. Please read it carefully and keep it.", images=[img])]
    for i in range(1, n_turns):
        role = "assistant" if i % 2 else "user"
        extra = " and then some more about it" * ((seed + i) % 3) if vary else ""
        turns.append(Turn(role, f"This is message {i} of our conversation about the weather and other things{extra}."))
    return Session(f"bench-{n_turns}-{seed}", turns)


# Wall-clock time by default; `--clock cpu` takes this process's CPU time instead, which a busy machine disturbs
# less (with `--threads 1`, where one thread does all the work).
CLOCK = time.perf_counter


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    return timing.interleaved(fns, repeats, CLOCK)


def plain_inputs(adapter: FamilyAdapter, rendered) -> dict:
    return {"input_ids": rendered.input_ids, **adapter.image_inputs(rendered.images), "logits_to_keep": 1}


@torch.no_grad()
def reencode(loaded, rendered, hooks) -> None:
    """The naive way: at each turn, run the whole prefix again and keep that turn's positions."""
    kept = []
    def keep(x, name):
        kept.append(x[0, a:b].clone())
    inputs = rendered.image_inputs(loaded.adapter, range(len(rendered.images)))
    with loaded.hooks([(h, keep) for h in hooks]):
        for a, b in rendered.turn_chunks():
            loaded.hf_model(input_ids=rendered.input_ids[:, :b], **inputs, logits_to_keep=1)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss_kb() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return that (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def peak_rss_kb() -> int:
    return _status_kb("VmHWM")


def memory_child(model_dir: str, what: str, n_turns: int) -> None:
    """Peak resident memory added by one capture, in a fresh process (printed as JSON)."""
    loaded = load_model(model_dir, backend="bridge" if what == "run_with_cache" else "torch")
    s = session(n_turns)
    rendered = render(loaded.adapter, s)
    hooks = resolve_hooks(loaded, "resid_post")
    inputs = plain_inputs(loaded.adapter, rendered)
    inputs.pop("logits_to_keep")
    # Warm up on a one-turn session, so one-time allocations are not counted; the measured run is longer.
    warm = render(loaded.adapter, session(1))
    with torch.no_grad():
        if what == "run_with_cache":
            loaded.bridge.run_with_cache(warm.input_ids, **loaded.adapter.image_inputs(warm.images))
        else:
            capture_session(loaded, warm.session, hooks, "all", rendered=warm)
    before = reset_peak_rss_kb()
    if what == "capture":
        out = capture_session(loaded, s, hooks, "all", rendered=rendered)
        kept = out.kinds["hook_resid_post"]
    else:
        with torch.no_grad():
            _, cache = loaded.bridge.run_with_cache(inputs.pop("input_ids"), **inputs)
        kept = torch.stack([cache[h][0] for h in hooks], dim=1)
    after = peak_rss_kb()
    print(json.dumps({"delta_kb": after - before, "kept_shape": list(kept.shape)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="sessions captured together for kv_capture_vs_single_pass")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time by wall clock, or by this process's CPU time (steadier on a shared machine)")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "WHAT", "TURNS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.child:
        memory_child(args.child[0], args.child[1], int(args.child[2]))
        return
    torch.manual_seed(0)
    scratch = tempfile.TemporaryDirectory(prefix="mmret-bench-")  # removed when main returns
    tmp = scratch.name
    model_dir = str(build_tiny_model("llava", Path(tmp) / "llava8", **SIZE))
    loaded = load_model(model_dir)
    plain = load_model(model_dir).hf_model  # a second copy that never has a hook on it
    hooks = resolve_hooks(loaded, "resid_post")
    s = session(args.turns)
    rendered = render(loaded.adapter, s)
    inputs = plain_inputs(loaded.adapter, rendered)
    print(f"# model: llava, 8 layers, d_model 256; session: {args.turns} turns, {rendered.n_positions} positions, "
          f"1 image ({len(rendered.token_map.select('image:0'))} image tokens); threads {torch.get_num_threads()}, "
          f"clock {args.clock}")

    with torch.no_grad():
        t = interleaved({
            "plain": lambda: plain(**inputs),
            "capture": lambda: capture_session(loaded, s, hooks, "all", mode="single", rendered=rendered),
            "capture_e2e": lambda: capture_session(loaded, s, hooks, "all", mode="single"),
            "kv": lambda: capture_session(loaded, s, hooks, "all", mode="turns", rendered=rendered),
        }, args.repeats)
    print(f"plain_forward_ms: {1000 * t['plain']:.1f}")
    print(f"capture_ms: {1000 * t['capture']:.1f}")
    print(f"capture_vs_plain_forward: {t['capture'] / t['plain']:.3f}")
    print(f"capture_end_to_end_vs_plain_forward: {t['capture_e2e'] / t['plain']:.3f}")
    print(f"kv_capture_vs_single_pass_unbatched: {t['kv'] / t['capture']:.3f}")

    print(f"batch_size: {args.batch}")
    for name, vary in (("kv_capture_vs_single_pass", False), ("kv_capture_vs_single_pass_varied", True)):
        batch = [session(args.turns, seed, vary=vary) for seed in range(args.batch)]
        batch_rendered = [render(loaded.adapter, b) for b in batch]
        lengths = [r.n_positions for r in batch_rendered]
        with torch.no_grad():
            tb = interleaved({
                "single": lambda b=batch, r=batch_rendered: capture_batch(loaded, b, hooks, "all", mode="single",
                                                                         rendered=r),
                "kv": lambda b=batch, r=batch_rendered: capture_batch(loaded, b, hooks, "all", mode="turns",
                                                                     rendered=r),
            }, args.repeats)
        print(f"# {name}: {args.batch} sessions of {args.turns} turns, {min(lengths)}-{max(lengths)} positions; "
              f"batched single pass {1000 * tb['single']:.1f} ms, turn by turn {1000 * tb['kv']:.1f} ms")
        print(f"{name}: {tb['kv'] / tb['single']:.3f}")

    bridged = load_model(model_dir, backend="bridge").bridge
    bridge_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "logits_to_keep")}
    all_logits = {k: v for k, v in inputs.items() if k != "logits_to_keep"}  # as run_with_cache computes them
    with torch.no_grad():
        t2 = interleaved({
            "plain": lambda: plain(**all_logits),
            "rwc": lambda: bridged.run_with_cache(rendered.input_ids, names_filter=lambda n: n in set(hooks),
                                                  **bridge_inputs),
        }, max(5, args.repeats // 2))
    print(f"run_with_cache_vs_plain_forward: {t2['rwc'] / t2['plain']:.3f}")

    for n in (2, 4, 8, 16):
        sn = session(n)
        rn = render(loaded.adapter, sn)
        tn = interleaved({
            "kv": lambda: capture_session(loaded, sn, hooks, "all", mode="turns", rendered=rn),
            "re": lambda: reencode(loaded, rn, hooks),
        }, max(5, args.repeats // 2))
        print(f"kv_capture_vs_reencode_T{n}: {tn['kv'] / tn['re']:.3f}")

    mem = {}
    for what in ("capture", "run_with_cache"):
        threads = [] if args.threads is None else ["--threads", str(args.threads)]
        out = subprocess.run([sys.executable, __file__, "--child", model_dir, what, str(args.turns), *threads],
                             capture_output=True, text=True, check=True)
        mem[what] = json.loads(out.stdout.strip().splitlines()[-1])
    assert mem["capture"]["kept_shape"] == mem["run_with_cache"]["kept_shape"], mem  # the same vectors kept
    print(f"peak_mem_capture_mb: {mem['capture']['delta_kb'] / 1024:.1f}")
    print(f"peak_mem_run_with_cache_mb: {mem['run_with_cache']['delta_kb'] / 1024:.1f}")
    print(f"peak_mem_vs_run_with_cache: {mem['capture']['delta_kb'] / max(mem['run_with_cache']['delta_kb'], 1):.3f}")


if __name__ == "__main__":
    main()
