"""Scale: store size, manifest memory, opening a big store, sharded capture, and capture cost on real shapes
(issue 20). Prints `name: value` lines, every ratio measured side by side in this run.

    python benchmarks/scale.py [--out results/bench_scale] [--positions 10000000] [--parts store,sharded,real]

Models are random-initialised from transformers' config classes at real dimensions, in bfloat16 (nothing is
downloaded): an onevision-qwen2-0.5b shape (Qwen2: 24 layers, d 896, 14 heads, 2 KV heads, MLP 4864, vocabulary
151,646; SigLIP: 26 layers, d 1152, 16 heads, MLP 4304, 384 px crops of 27 x 27 patches, anyres_max_9) and a
llava-1.5-7b width with 4 LM layers instead of 32 (LLaMA d 4096, 32 heads, MLP 11008; CLIP ViT-L/14 at 336 px).
Their tokenizer is the tiny byte-level one of probes.models.tiny (a few hundred tokens): text tokenizes longer than
with the real one, and the unused embedding rows cost memory only.

Printed:
    store_bytes_per_value              every byte of a store folder (tensors, manifest files, settings) / stored
                                       values, for the onevision shape in bf16 capturing resid_post of every layer at
                                       every position of one 4-message session with a 1,024 x 512 form (target <= 2.1)
    store_positions, store_layers, store_d_model    that session's size
    bytes_per_session_per_layer        the same store's bytes / layers (for planning)
    manifest_mb_per_million_positions  resident size of the manifest in memory (pandas, deep) per 10^6 positions,
                                       read from a synthetic store part of 10^6 rows (target <= 100)
    manifest_disk_mb_per_million_positions   its parquet files on disk
    open_store_positions               positions in the synthetic store (default 10^7: 1,000 sessions x 10,000)
    open_store_peak_mb                 peak resident memory a fresh process adds (ru_maxrss after, minus its resident
                                       size once the libraries are imported) to open that store, list its sessions,
                                       read one cell (layer 0, last token of turn 0, every session) and one whole
                                       session (target <= 1,000); the shards repeat (one tensor file hard-linked
                                       under 1,000 names, each with its own manifest), which `verify` would report
    open_store_seconds                 the same, wall time
    sharded_equals_single              1 when 4 worker processes (submitit's local executor) capturing shards 0-3/4
                                       into one store write the same tensors, byte for byte, as one process, and the
                                       store verifies (every session once); 0 otherwise (tiny LLaVA, 12 sessions)
    capture_vs_plain_forward_real_size one session's capture (resid_post, every layer, every position; mode "auto",
                                       capture's default: one pass) / one plain forward of the same tokens and images
                                       (logits of the last token only); medians of interleaved repeats (target <= 1.10)
    capture_turns_vs_plain_forward_real_size   the same capture fed turn by turn through the KV cache (mode "turns",
                                       what a chat does; the same numbers, tested)
    capture_seconds_per_session_real_size, capture_hours_per_1000_sessions_real_size   on this machine
    w7b_*                              the same capture figures for the 7b-width model
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from probes import Session, Turn, capture, load_model  # noqa: E402
from probes.activations.capture import capture_session, resolve_hooks  # noqa: E402
from probes.activations.manifest import compact, file_bytes, memory_mb, parquet_bytes, read_rows  # noqa: E402
from probes.activations.shards import verify_store  # noqa: E402
from probes.data.session import SessionImage  # noqa: E402
from probes.models.render import render  # noqa: E402

ONEVISION = {"text": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=151646, max_position_embeddings=32768),
             "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16)}
LLAVA_7B_WIDTH = {"text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                               num_key_value_heads=32, vocab_size=32064),
                  "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, projection_dim=768)}


def real_shape(family: str, path: Path, sizes: dict, **tiny: int) -> Path:
    """A checkpoint of `family` with the tiny processor and tokenizer (`tiny`: crop and patch sizes) and a model of
    real `sizes`, random-initialised in bfloat16."""
    import transformers

    from probes.models.tiny import build_tiny_model

    build_tiny_model(family, path, **tiny)
    tiny_cfg = transformers.AutoConfig.from_pretrained(path)
    data = tiny_cfg.to_dict()
    data["text_config"].pop("layer_types", None)  # derived from the layer count: rebuilt for the real one
    data["text_config"].update(sizes["text"])
    data["vision_config"].update(sizes["vision"])
    cfg = type(tiny_cfg).from_dict(data)
    torch.manual_seed(0)
    model = getattr(transformers, cfg.architectures[0])._from_config(cfg, dtype=torch.bfloat16).eval()
    for f in path.glob("model*.safetensors*"):  # the tiny weights go; processor and tokenizer files stay
        f.unlink()
    model.save_pretrained(path, max_shard_size="50GB")
    return path


def form_session(sid: str, size: tuple[int, int], seed: int = 0, folder: Path | None = None) -> Session:
    """Four messages, the first with a form image of `size` (made-up values; saved into `folder` if given, so
    that the session can be written to JSONL)."""
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    for i, label in enumerate(["Name", "Date of birth", "SSN", "Phone", "Email", "Address"]):
        d.text((40, 40 + 70 * i), f"{label}: value {seed}-{i}", fill="black")
    if folder is not None:
        img.save(folder / f"{sid}.png")
    image = SessionImage.from_path(folder / f"{sid}.png") if folder is not None else SessionImage.from_pil(img)
    return Session(sid, [Turn("user", "Here is my application form. Please keep it for later.", images=[image]),
                         Turn("assistant", "Thank you, I have read the form and will keep it in mind."),
                         Turn("user", "What did we talk about before? Describe it in general terms."),
                         Turn("assistant", "We talked about your application form.")])


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function over round-robin rounds, after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def capture_cost(loaded, session: Session, repeats: int, prefix: str) -> dict[str, float]:
    hooks = resolve_hooks(loaded, "resid_post")
    r = render(loaded.adapter, session)
    plain_kw = {"input_ids": r.input_ids, "logits_to_keep": 1, **loaded.adapter.image_inputs(r.images)}
    with torch.no_grad():
        t = interleaved({"plain": lambda: loaded.hf_model(**plain_kw),
                         "capture": lambda: capture_session(loaded, session, hooks, "all", mode="auto", rendered=r),
                         "turns": lambda: capture_session(loaded, session, hooks, "all", mode="turns", rendered=r)},
                        repeats)
    return {f"{prefix}positions": r.n_positions, f"{prefix}plain_forward_seconds": t["plain"],
            f"{prefix}capture_seconds_per_session": t["capture"],
            f"{prefix}capture_vs_plain_forward": t["capture"] / t["plain"],
            f"{prefix}capture_turns_vs_plain_forward": t["turns"] / t["plain"],
            f"{prefix}capture_hours_per_1000_sessions": 1000 * t["capture"] / 3600}


def real_size_figures(scratch: Path, repeats: int) -> dict[str, float]:
    out: dict[str, float] = {}
    ov = real_shape("llava_onevision", scratch / "onevision", ONEVISION, crop_px=384, patch_size=14)
    loaded = load_model(ov, dtype="bfloat16")
    session = form_session("ov-0", (1024, 512))
    store = capture(loaded, [session], scratch / "ov_store", hooks="resid_post", positions="all", progress=False)
    x, meta = store.query()
    values = x.numel()
    out.update(store_bytes_per_value=file_bytes(store.path) / values, store_positions=x.shape[0],
               store_layers=x.shape[1], store_d_model=x.shape[2],
               bytes_per_session_per_layer=file_bytes(store.path) / x.shape[1],
               store_dtype_bytes=x.element_size())
    del x
    c = capture_cost(loaded, session, repeats, "")
    out.update(capture_vs_plain_forward_real_size=c["capture_vs_plain_forward"],
               capture_seconds_per_session_real_size=c["capture_seconds_per_session"],
               plain_forward_seconds_real_size=c["plain_forward_seconds"],
               capture_hours_per_1000_sessions_real_size=c["capture_hours_per_1000_sessions"],
               capture_turns_vs_plain_forward_real_size=c["capture_turns_vs_plain_forward"],
               capture_positions_real_size=c["positions"])
    del loaded
    w7 = real_shape("llava", scratch / "w7b", LLAVA_7B_WIDTH, image_size=336, patch_size=14)
    loaded = load_model(w7, dtype="bfloat16")
    out.update({f"w7b_{k}": v for k, v in capture_cost(loaded, form_session("w7-0", (1024, 512)), repeats,
                                                        "").items()})
    return out


# ---- a synthetic store of many positions ------------------------------------------------------------------------
def synthetic_rows(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Manifest rows of one made-up session of n positions over 4 turns (an image in turn 0), as capture writes."""
    turn = np.repeat(np.arange(4), -(-n // 4))[:n]
    segment = np.where((turn == 0) & (np.arange(n) % (n // 4 or 1) < n // 8), "image", "user")
    last = np.r_[turn[1:] != turn[:-1], True]
    return pd.DataFrame({
        "turn": turn, "role": np.where(turn % 2, "assistant", "user"), "position": np.arange(n),
        "segment": segment, "image_index": np.where(segment == "image", 0, -1), "tile": np.where(segment == "image",
                                                                                                0, -1),
        "patch_row": np.where(segment == "image", np.arange(n) % 64, -1), "patch_col": -1, "mark": "",
        "last_of_turn": last, "groups": np.where(segment == "image", "all,image:0", "all"), "scope": "lm",
        "row": np.arange(n), "pii_type": rng.choice(["SSN", "Phone", "Email"]), "identity_id": "id-x",
    })


def write_synthetic_store(path: Path, n_sessions: int, per_session: int, layers: int = 2, d: int = 64) -> None:
    """A store folder of n_sessions x per_session positions whose sessions share one tensor file (hard links)."""
    from safetensors.torch import save_file

    from probes.activations.folder import FORMAT

    rng = np.random.default_rng(0)
    shards = path / "shards"
    shards.mkdir(parents=True)
    (path / "manifest").mkdir()
    (path / "store.json").write_text(json.dumps({"format": FORMAT, "model": "synthetic", "family": "llava",
                                                 "hooks": [f"blocks.{i}.hook_resid_post" for i in range(layers)],
                                                 "positions": "all", "dtype": "model"}))
    kinds = {"hook_resid_post": {"layers": list(range(layers)), "scope": "lm"}}
    first = shards / "s00000.safetensors"
    save_file({"hook_resid_post": torch.randn(per_session, layers, d).to(torch.bfloat16)}, str(first),
              metadata={"kinds": json.dumps(kinds), "session": json.dumps({"session_id": "s00000", "turns": []}),
                        "format": str(FORMAT)})
    base = compact(synthetic_rows(per_session, rng))
    per_part = max(1, 1_000_000 // per_session)
    part, names = [], {}
    for i in range(n_sessions):
        name = f"s{i:05d}"
        if i:
            os.link(first, shards / f"{name}.safetensors")
        df = base.assign(session_id=name, shard=name)
        (shards / f"{name}.parquet").write_bytes(parquet_bytes(df, {name: name}))
        part.append(df)
        names[name] = name
        if len(part) == per_part or i == n_sessions - 1:
            (path / "manifest" / f"part-{i:08d}.parquet").write_bytes(parquet_bytes(pd.concat(part), names))
            part, names = [], {}


OPEN_SCRIPT = """
import json, resource, sys, time
from probes.activations.store import ActivationStore
import probes.activations.manifest, torch, pandas, pyarrow.dataset
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
base = rss_mb()
t0 = time.perf_counter()
store = ActivationStore(sys.argv[1])
ids = store.finished_ids()
x, meta = store.query("hook_resid_post", layers=[0], turn=0, last_of_turn=True)
y, m2 = store.query(session_id=[sorted(ids)[len(ids) // 2]])
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"base": base, "peak": peak, "seconds": seconds, "sessions": len(ids), "cell": len(meta),
                  "session_rows": len(m2)}))
"""


def store_figures(scratch: Path, n_positions: int) -> dict[str, float]:
    per_session = 10_000
    n_sessions = max(1, n_positions // per_session)
    big = scratch / "synthetic"
    write_synthetic_store(big, n_sessions, per_session)
    part = sorted((big / "manifest").glob("part-*.parquet"))[0]
    rows = read_rows([part])
    mb = memory_mb(rows) / (len(rows) / 1e6)
    disk = sum(p.stat().st_size for p in (big / "manifest").glob("*.parquet")) / 2**20 / (n_sessions * per_session
                                                                                         / 1e6)
    root = str(Path(__file__).resolve().parents[1])
    run = subprocess.run([sys.executable, "-c", OPEN_SCRIPT, str(big)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root}, check=True)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["sessions"] == n_sessions and got["cell"] == n_sessions and got["session_rows"] == per_session
    return {"manifest_mb_per_million_positions": mb, "manifest_disk_mb_per_million_positions": disk,
            "open_store_positions": n_sessions * per_session, "open_store_peak_mb": got["peak"] - got["base"],
            "open_store_base_mb": got["base"], "open_store_seconds": got["seconds"]}


def sharded_figures(scratch: Path) -> dict[str, float]:
    from analysis.cluster import capture_array
    from probes import write_sessions
    from probes.models.tiny import build_tiny_model

    tiny = build_tiny_model("llava", scratch / "tiny")
    sessions = [form_session(f"t{i:02d}", (64, 48), seed=i, folder=scratch) for i in range(12)]
    path = write_sessions(sessions, scratch / "tiny_sessions.jsonl")
    settings = dict(positions="all", batch_size=2)
    single = capture(load_model(tiny), sessions, scratch / "single", progress=False, **settings)
    check = capture_array(tiny, path, scratch / "sharded", 4, settings, executor_kind="local")
    same = check.ok and _tensor_bytes(single.path) == _tensor_bytes(scratch / "sharded")
    return {"sharded_equals_single": int(same and verify_store(scratch / "sharded", sessions).ok)}


def _tensor_bytes(store: Path) -> dict[str, bytes]:
    from safetensors import safe_open

    out = {}
    for f in sorted((Path(store) / "shards").glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out[f.stem] = b"".join(fh.get_tensor(k).view(torch.uint8).numpy().tobytes() for k in sorted(fh.keys()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--positions", type=int, default=10_000_000, help="positions of the synthetic store")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds per real-size forward (after a warm-up)")
    p.add_argument("--parts", default="store,sharded,real", help="which parts to run (comma list)")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    figures: dict[str, float] = {"cpu_cores": os.cpu_count() or 0, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="mmret-scale-") as tmp:
        scratch = Path(tmp)
        parts = set(a.parts.split(","))
        if "store" in parts:
            figures.update(store_figures(scratch, a.positions))
        if "sharded" in parts:
            figures.update(sharded_figures(scratch))
        if "real" in parts:
            figures.update(real_size_figures(scratch, a.repeats))
    figures["total_seconds"] = time.perf_counter() - t0
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for k, v in figures.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "scale.json").write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
