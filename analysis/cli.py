"""`mmret`: the command line. Each subcommand is a thin wrapper over a library function a notebook can call.

    mmret capture --model M --sessions S.jsonl --out DIR [--hooks resid_post,attn_out] [--positions last:*]
    mmret inspect DIR
    mmret sessions build --kind mmprivacy|multiturn|memory --out S.jsonl [--n 20] [--seed 0]
    mmret sessions load-mmprivacy DIR --out S.jsonl [--part direct|memory] [--framings caption,direct]
    mmret leak --model M --sessions S.jsonl --out DIR
    mmret probe --store DIR --target digits --out DIR [--positions last,image,final] [--method logreg] [--mdl]
    mmret patch --model M --sessions S.jsonl --experiment denoise|noise|atp|taskswap|knockout --out DIR
    mmret organism train --out RUN [--seed 0] [--device cuda]
    mmret tiny --family llava --out DIR          (a tiny random-initialised checkpoint, for trying things out)
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _layers(text: str | None) -> list[int] | None:
    """'0-3,6' -> [0, 1, 2, 3, 6]."""
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        try:
            layers = list(range(int(a), int(b) + 1)) if b else [int(a)]
        except ValueError:
            layers = []
        if not layers or layers[0] < 0:  # a ValueError: main prints it as an error, not a traceback
            raise ValueError(f"--layers {text!r}: expected layer numbers and ranges, e.g. 0-3,6")
        out += layers
    return out


def cmd_capture(args: argparse.Namespace) -> int:
    from probes.capture import capture
    from probes.loading import load_model
    from probes.session import read_sessions

    sessions = list(read_sessions(args.sessions))  # parse everything first: a bad line fails before any work
    loaded = load_model(args.model, device=args.device, dtype=args.model_dtype, backend=args.backend)
    store = capture(loaded, sessions, args.out, hooks=args.hooks, positions=args.positions, layers=_layers(args.layers),
                    mode=args.mode, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                    progress=not args.no_progress, batch_size=args.batch_size)
    print(store.summary())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from probes.store import ActivationStore

    print(ActivationStore(args.store).summary())
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from probes.tiny import build_tiny_model

    print(build_tiny_model(args.family, args.out, seed=args.seed))
    return 0


def _csv(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def cmd_sessions_build(args: argparse.Namespace) -> int:
    """Synthetic identities -> documents -> sessions JSONL (images beside it), plus fine-tune texts for memory."""
    import json
    from pathlib import Path

    from probes import sessions_build as sb
    from probes.identities import make_identities, split_identities
    from probes.session import atomic_write_text, write_sessions

    out = Path(args.out)
    image_dir = out.parent / (out.stem + "_images")
    people = make_identities(args.n, seed=args.seed)
    choose = {k: v for k, v in {"framings": _csv(args.framings), "pii_types": _csv(args.pii_types)}.items() if v}
    docs = {"size": args.size, "seed": args.seed, "layout": args.layout, "relative_to": out.parent}
    if args.scenarios:
        docs["scenarios"] = _csv(args.scenarios)
    if args.kind == "mmprivacy":
        sessions = sb.mmprivacy_sessions(people, image_dir, **choose, **docs)
    elif args.kind == "multiturn":
        ks = [int(k) for k in _csv(args.k)] if args.k else range(6)
        choose.pop("framings", None)
        sessions = sb.multiturn_sessions(people, image_dir, k_distractors=ks, **choose, **docs)
    else:  # memory: plant the memory set; probe it and the never-planted probe set by name
        memory, unseen = split_identities(people, args.n // 2, seed=args.seed)
        texts = sb.memory_finetune_texts(memory, style=args.memory_style)
        atomic_write_text(out.with_suffix(".finetune.jsonl"), "".join(json.dumps(t) + "\n" for t in texts))
        sessions = (sb.memory_probe_sessions(memory, **choose)
                    + sb.memory_probe_sessions(unseen, unseen=True, **choose))
    write_sessions(sessions, out)
    print(f"{len(sessions)} {args.kind} sessions of {args.n} identities -> {out}")
    return 0


def cmd_sessions_load_mmprivacy(args: argparse.Namespace) -> int:
    from probes.mmprivacy import cli_load_mmprivacy

    print(cli_load_mmprivacy(args.dir, args.out, part=args.part, framings=args.framings))
    return 0


def cmd_leak(args: argparse.Namespace) -> int:
    from pathlib import Path

    from probes.leakage import DEFAULT_REFUSAL_PATTERNS, run_leakage

    patterns = None
    if args.refusal_patterns:  # extra regexes, one a line, on top of the defaults
        extra = [line.strip() for line in Path(args.refusal_patterns).read_text().splitlines() if line.strip()]
        patterns = [*DEFAULT_REFUSAL_PATTERNS, *extra]
    df = run_leakage(args.model, args.sessions, args.out, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, refusal_patterns=patterns, keep_responses=args.keep_responses,
                     n_boot=args.n_boot, seed=args.seed, device=args.device, dtype=args.model_dtype,
                     progress=not args.no_progress)
    print(f"{len(df)} responses: ASR {df['leak'].mean():.3f}, RR {df['refused'].mean():.3f}; "
          f"results, leakage_table.csv/.tex and leakage.pdf in {args.out}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from probes.probing import main_metric, run_probes

    df = run_probes(args.store, args.out, target=args.target, position_groups=_csv(args.positions),
                    turns=[int(t) for t in _csv(args.turns)] if args.turns else None, layers=_layers(args.layers),
                    method=args.method, pii_type=args.pii_type, group_col=args.group_by, n_folds=args.folds,
                    seed=args.seed, control=args.control, n_boot=args.n_boot, mdl=args.mdl)
    metric = main_metric(df)
    best = df[df["metric"] == metric].sort_values("value").iloc[-1]
    print(f"{df[['layer', 'position_group', 'turn']].drop_duplicates().shape[0]} cells; best {metric} "
          f"{best['value']:.3f} at layer {best['layer']}, {best['position_group']}, turn {best['turn']}; "
          f"results and figures in {args.out}")
    return 0


def cmd_patch(args: argparse.Namespace) -> int:
    from probes.patching import run_patching

    replacements = None
    if args.replace:
        pairs = [r.split("=", 1) for r in args.replace]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"--replace: expected OLD=NEW, got {args.replace}")
        replacements = dict(pairs)
    df = run_patching(args.model, args.sessions, args.experiment, args.out, corruption=args.corruption,
                      components=tuple(_csv(args.components)), layers=_layers(args.layers), groups=_csv(args.groups),
                      batch_size=args.batch_size, corrupt_framing=args.corrupt_framing, replacements=replacements,
                      windows=[int(w) for w in _csv(args.window)] if args.window else None,
                      max_pairs=args.max_pairs, n_boot=args.n_boot, seed=args.seed, device=args.device,
                      progress=not args.no_progress)
    print(f"{args.experiment}: {len(df)} rows over {df['session_id'].nunique() if 'session_id' in df else '?'} "
          f"pair(s); results and figures in {args.out}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from analysis.study import run_study
    from analysis.study_config import default_config_path, load_study_config, parse_value

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with a dotted config key (e.g. probes.method=ridge)")
        overrides[key] = parse_value(value)
    cfg = load_study_config(args.config or default_config_path(), overrides)
    if args.study_command == "validate":
        print(cfg.to_yaml(), end="")
        return 0
    from analysis.study import StudyError

    try:
        run_study(cfg, progress=not args.quiet)
    except StudyError as err:  # names the stage and the partial folder kept for resuming
        print(f"mmret study: error: {err}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmret", description="mechanistic retention analysis of PII in multimodal LLMs")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("capture", help="capture hidden states of sessions into an activation store")
    c.add_argument("--model", required=True, help="HF id or local model directory")
    c.add_argument("--sessions", required=True, help="sessions JSONL")
    c.add_argument("--out", required=True, help="store folder (reruns resume)")
    c.add_argument("--hooks", default="resid_post",
                   help="comma list: resid_post, resid_pre, attn_out, mlp_out, vision, projector, or TL hook names")
    c.add_argument("--layers", default=None, help="LM layers for the hook shorthands, e.g. 0-3,6 (default all)")
    c.add_argument("--positions", default="all",
                   help="position selector: all, final, segment:<s>, turn:<t>, last:<t>, last:*, image:<k>, "
                        "mark:<label>; join with +")
    c.add_argument("--mode", default="auto", choices=["auto", "turns", "single"])
    c.add_argument("--max-new-tokens", type=int, default=32, help="for assistant turns the model writes")
    c.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="stored dtype")
    c.add_argument("--model-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    c.add_argument("--backend", default="torch", choices=["torch", "bridge"])
    c.add_argument("--batch-size", type=int, default=8, help="sessions captured together (one forward per turn)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_capture)

    sessions = sub.add_parser("sessions", help="build or load sessions (JSONL)")
    ssub = sessions.add_subparsers(dest="sessions_command", required=True)
    b = ssub.add_parser("build", help="synthetic identities and documents -> sessions JSONL")
    b.add_argument("--kind", required=True, choices=["mmprivacy", "multiturn", "memory"])
    b.add_argument("--out", required=True, help="sessions JSONL; images go to <out>_images/ beside it")
    b.add_argument("--n", type=int, default=20, help="identities (memory: half planted, half unseen)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--size", type=int, default=128, help="document size in pixels")
    b.add_argument("--layout", default="fixed", choices=["fixed", "random"])
    b.add_argument("--framings", default=None, help="comma list (default all five; mmprivacy and memory)")
    b.add_argument("--pii-types", default=None, help="comma list of Email, Phone Numbers, SSN (default all)")
    b.add_argument("--scenarios", default=None, help="comma list of open, hiring, verification, finance")
    b.add_argument("--k", default=None, help="multiturn: distractor counts, e.g. 0,1,3 (default 0-5)")
    b.add_argument("--memory-style", default="full", choices=["full", "single"])
    b.set_defaults(func=cmd_sessions_build)

    lm = ssub.add_parser("load-mmprivacy", help="a folder in the published MM-Privacy layout -> sessions JSONL")
    lm.add_argument("dir")
    lm.add_argument("--out", required=True, help="sessions JSONL to write")
    lm.add_argument("--part", choices=["direct", "memory"], default="direct")
    lm.add_argument("--framings", default=None, help="comma-separated framings (default: all five)")
    lm.set_defaults(func=cmd_sessions_load_mmprivacy)

    lk = sub.add_parser("leak", help="generate answers to PII-asking sessions; score ASR, partial leak, RR")
    lk.add_argument("--model", required=True, help="HF id or local model directory")
    lk.add_argument("--sessions", required=True, help="sessions JSONL (labels pii_type and _target)")
    lk.add_argument("--out", required=True, help="folder for results, tables and the figure")
    lk.add_argument("--max-new-tokens", type=int, default=32)
    lk.add_argument("--batch-size", type=int, default=8)
    lk.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws for the CIs")
    lk.add_argument("--seed", type=int, default=0)
    lk.add_argument("--refusal-patterns", default=None, help="file of extra refusal regexes, one a line")
    lk.add_argument("--keep-responses", action="store_true",
                    help="add the response texts to results.csv (they contain PII when the model leaks)")
    lk.add_argument("--model-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    lk.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    lk.add_argument("--no-progress", action="store_true")
    lk.set_defaults(func=cmd_leak)

    pr = sub.add_parser("probe", help="fit linear probes on every (layer, position group, turn) cell of a store")
    pr.add_argument("--store", required=True, help="activation store folder (mmret capture)")
    pr.add_argument("--target", default="digits",
                    help="digits | chars (the asked PII value, per character) | identity | label:<column>")
    pr.add_argument("--out", required=True)
    pr.add_argument("--positions", default="last", help="position groups: last,image,final,mark:<label>,...")
    pr.add_argument("--turns", default=None, help="turns to probe (default: all)")
    pr.add_argument("--layers", default=None, help="e.g. 0-3,6 (default: all stored)")
    pr.add_argument("--method", default="logreg", choices=["logreg", "ridge", "dim"])
    pr.add_argument("--pii-type", default=None, help="for digits/chars: the field (default: the asked value)")
    pr.add_argument("--group-by", default="identity_id", help="label whose values never share a fold")
    pr.add_argument("--folds", type=int, default=5)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--control", default="none", help="name of this store's control condition in the results")
    pr.add_argument("--n-boot", type=int, default=1000)
    pr.add_argument("--mdl", action="store_true", help="also the online code (MDL): codelength and compression")
    pr.set_defaults(func=cmd_probe)

    pa = sub.add_parser("patch", help="activation patching: exact, attribution, task swap, attention knockout")
    pa.add_argument("--model", required=True, help="HF id or local model directory")
    pa.add_argument("--sessions", required=True, help="sessions JSONL (each the clean side of a pair)")
    pa.add_argument("--experiment", required=True, choices=["denoise", "noise", "atp", "taskswap", "knockout"])
    pa.add_argument("--out", required=True)
    pa.add_argument("--corruption", default=None, choices=["image", "framing", "text", "noise"],
                    help="default: image pair (framing swap for taskswap)")
    pa.add_argument("--components", default="resid_pre,attn_out,mlp_out")
    pa.add_argument("--layers", default=None, help="e.g. 0-3,6 (default all)")
    pa.add_argument("--groups", default=None, help="position groups (default: PII patches, other patches, turns, final)")
    pa.add_argument("--corrupt-framing", default="direct", help="the other framing of a framing swap")
    pa.add_argument("--replace", action="append", default=None, metavar="OLD=NEW", help="text corruption")
    pa.add_argument("--window", default=None, help="knockout layer windows, e.g. 1,2,4")
    pa.add_argument("--batch-size", type=int, default=16)
    pa.add_argument("--max-pairs", type=int, default=None)
    pa.add_argument("--n-boot", type=int, default=1000)
    pa.add_argument("--seed", type=int, default=0)
    pa.add_argument("--device", default=None)
    pa.add_argument("--no-progress", action="store_true")
    pa.set_defaults(func=cmd_patch)

    st = sub.add_parser("study", help="the whole study from one YAML config (sessions ... report)")
    stsub = st.add_subparsers(dest="study_command", required=True)
    for name, text in (("run", "run or resume a study; stages whose outputs match the config are skipped"),
                       ("validate", "check a config and print it with every default filled in")):
        s = stsub.add_parser(name, help=text)
        s.add_argument("config", nargs="?", default=None, help="study YAML (default: the shipped default study)")
        s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a dotted config key")
        s.add_argument("--quiet", action="store_true")
        s.set_defaults(func=cmd_study)
    sub.add_parser("sweep", help="a study per grid point via submitit (options: mmret sweep --help)")

    org = sub.add_parser("organism", help="the embedded default model")
    osub = org.add_subparsers(dest="organism_command", required=True)
    osub.add_parser("train", help="train it (options: mmret organism train --help)")  # parsed by main_train

    i = sub.add_parser("inspect", help="summarise an activation store")
    i.add_argument("store")
    i.set_defaults(func=cmd_inspect)

    t = sub.add_parser("tiny", help="write a tiny random-initialised checkpoint of a family")
    t.add_argument("--family", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["organism", "train"]:  # its own parser (probes/organism/train.py)
        from probes.organism.train import main_train

        return main_train(argv[2:])
    if argv[:1] == ["sweep"]:  # its own parser (analysis/sweep.py)
        from analysis.sweep import main as main_sweep

        try:
            return main_sweep(argv[1:])
        except ValueError as err:
            print(f"mmret sweep: error: {err}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        # Our errors are ValueError subclasses that name the file/field: print them, not a traceback.
        print(f"mmret {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
