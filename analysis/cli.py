"""`mmret`: the command line. Each subcommand is a thin wrapper over a library function a notebook can call.

    mmret capture --model M --sessions S.jsonl --out DIR [--hooks resid_post,attn_out] [--positions last:*]
    mmret capture ... --shard I/N | --jobs N [--executor slurm]   (one capture split over workers, one store)
    mmret store verify DIR [--sessions S.jsonl] | mmret store merge OUT [SRC ...]
    mmret inspect DIR
    mmret sessions build --kind mmprivacy|multiturn|memory --out S.jsonl [--n 20] [--seed 0] [--layout grid]
    mmret sessions load-mmprivacy DIR --out S.jsonl [--part direct|memory|real|real-named] [--mapping MAP.json]
    mmret ocr IMAGE [--show-values]              (the text and the PII read off a document image, masked)
    mmret leak --model M --sessions S.jsonl --out DIR
    mmret probe --store DIR --target digits --out DIR [--positions last,image,final] [--method logreg] [--mdl]
    mmret patch --model M --sessions S.jsonl --experiment denoise|noise|atp|taskswap|knockout --out DIR
    mmret study run|validate [CONFIG] [--set KEY=VALUE] [--trust-remote-code] [--shard I/N]
    mmret sweep CONFIG --grid KEY=V1,V2 [--trust-remote-code]
    mmret organism train --out RUN [--seed 0] [--device cuda]
    mmret tiny --family llava --out DIR          (a tiny random-initialised checkpoint, for trying things out)

`--model default` is the embedded model (probes/organism/default) in every command.

Bad input is one line on stderr, `mmret <command>: error: <what, naming the file or flag>`, and exit status 2;
`mmret --debug ...` shows the traceback instead. Everything the command line can check (flags, the output folder,
the sessions file and its images, the config) is checked before a model loads, so a refused command leaves
nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:  # imported where used: the CLI starts without loading torch
    from probes.patching import PatchingConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# What a command reports as a one-line error (exit 2) rather than a traceback: the project's named errors are
# ValueError subclasses (UnicodeDecodeError is one too); OSError covers a missing, unreadable or unwritable path,
# a file where a folder is expected (and the reverse), an existing path, and a full disk.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
EXIT_BAD_INPUT = 2


class CliError(ValueError):
    """A command-line value that cannot work; the message names the flag and what was expected."""


class Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: `mmret leak: error: argument --batch-size: ...` and exit 2,
    without the usage block (`--help` shows it)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a batch of 0 would loop forever or divide by zero later)."""
    return _int_at_least(text, 1)


def _shard(text: str) -> tuple[int, int]:
    """An argparse type: i/n with 0 <= i < n."""
    from probes.activations.errors import StoreError
    from probes.activations.shards import parse_shard

    try:
        return parse_shard(text)
    except StoreError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def at_least_two(text: str) -> int:
    return _int_at_least(text, 2)


def model_path(name: str) -> str:
    """`--model default` -> the embedded model's folder; anything else unchanged (an HF id or a local folder)."""
    from probes.models.loading import resolve_model

    return resolve_model(name)


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
            raise CliError(f"--layers {text!r}: expected layer numbers and ranges, e.g. 0-3,6")
        out += layers
    return out


# ---- checks made before anything runs ------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder: Path, flag: str, out: Path) -> None:
    """Create and remove a scratch folder in `folder`: the only test that also holds for root, for whom permission
    bits do not count but a read-only mount or a kernel file system (/sys, /proc) still refuses."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".mmret-write-check-"))
    except OSError as err:
        raise CliError(f"{flag} {out}: cannot write in {folder} ({err.strerror or err})") from None


def check_out_folder(out: str | os.PathLike, flag: str = "--out") -> Path:
    """A folder a command may create or fill: refused when it is a file, lies under a file, or cannot be written.
    Nothing is created here."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CliError(f"{flag} {out}: is a file; expected a folder (or a path that does not exist yet)")
    base = _nearest_existing(out)
    if not base.is_dir():
        raise CliError(f"{flag} {out}: {base} is a file, so no folder can be made under it")
    _probe_writable(base, flag, out)
    return out


def check_out_file(out: str | os.PathLike, flag: str = "--out") -> Path:
    """A file a command will write (its folder may not exist yet): refused when it is a folder, or its folder
    cannot be made or written."""
    out = Path(out)
    if out.is_dir():
        raise CliError(f"{flag} {out}: is a folder; expected a file name")
    check_out_folder(out.parent, flag)
    return out


def check_in_file(path: str | os.PathLike, flag: str, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CliError(f"{flag} {path}: no such file; expected {what}")
    if not path.is_file():
        raise CliError(f"{flag} {path}: is a folder; expected {what}")
    return path


def private_values(labels: dict[str, Any], session_id: str = "") -> set[str]:
    """Every string inside a session's private ("_") labels, the PII an error message must never show, less the
    values that are public anyway (a public label's value, a part of the session id: `_identity` repeats the
    identity id)."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str):
            if len(value) >= 3:
                found.add(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) >= 1000:
            found.add(str(value))

    for key, value in labels.items():
        if key.startswith("_"):
            walk(value)
    public = {str(v) for k, v in labels.items() if not k.startswith("_")}
    return {v for v in found if v not in public and v not in session_id}


def read_sessions_checked(args: argparse.Namespace, flag: str = "--sessions", path: str | None = None) -> list:
    """Every session of `path` (default `args.sessions`), parsed and with every image checked (exists, matches its
    sha256, decodes), before a model loads; the PII of their private labels is kept on `args` so that no message
    shows it."""
    from probes.data.session import check_images, read_sessions

    path = check_in_file(args.sessions if path is None else path, flag, "a sessions JSONL file")
    sessions = list(read_sessions(path))  # an empty file, a bad line or bytes that are not UTF-8: named errors
    for s in sessions:
        args.private_values |= private_values(s.labels, s.session_id)
    check_images(sessions)
    return sessions


def redact(text: str, secrets: Iterable[str]) -> str:
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, "<private>")
    return text


def error_line(err: BaseException, secrets: Iterable[str] = (), out: str | None = None) -> str:
    """One line naming what went wrong: an OSError as `<file>: <reason>`, our errors as their message. An OSError
    that names no file (a write to a full disk) is put on the command's `--out`, what was being written."""
    if isinstance(err, OSError) and err.filename is not None:
        text = f"{err.filename}: {err.strerror or err}"
        if err.filename2 is not None:
            text += f" ({err.filename2})"
    elif isinstance(err, OSError) and out is not None:
        text = f"--out {out}: {err.strerror or err} (while writing it)"
    else:
        text = str(err) or type(err).__name__
    return redact(" ".join(text.split()), secrets)


def claim(args: argparse.Namespace, path: str | os.PathLike) -> None:
    """Note an output path that does not exist yet: if the command then fails, the empty folders it made on the
    way are removed (a folder with anything in it stays: it may be another process's, or a resumable part)."""
    path = Path(path).absolute()
    if not path.exists():
        args.created.append((path, _nearest_existing(path)))


def remove_empty_created(args: argparse.Namespace) -> None:
    for path, base in getattr(args, "created", []):
        p = path
        while p != base and p.is_dir() and not any(p.iterdir()):
            p.rmdir()
            p = p.parent


def load_checked(args: argparse.Namespace, **kw: Any):
    """The model of `--model` ("default": the embedded one), loaded with the library's checks; `--allow-partial`
    loads weights that do not match the architecture anyway, with a warning."""
    from probes.models.loading import load_model

    return load_model(model_path(args.model), device=args.device, allow_partial=args.allow_partial, **kw)


def cmd_capture(args: argparse.Namespace) -> int:
    """Everything is checked before the model loads (`validate_capture`: sessions, images, selector, hooks, layers,
    context length, the store at --out and the weights it was captured with), so a refused capture writes nothing."""
    from probes.activations.capture import capture, validate_capture

    layers = _layers(args.layers)
    check_out_folder(args.out)
    sessions = read_sessions_checked(args)
    settings = dict(hooks=args.hooks, positions=args.positions, layers=layers, mode=args.mode,
                    max_new_tokens=args.max_new_tokens, dtype=args.dtype, batch_size=args.batch_size,
                    force_new=args.force_new, allow_long=args.allow_long)
    validate_capture(model_path(args.model), sessions, args.out, backend=args.backend, shard=args.shard, **settings)
    claim(args, args.out)
    if args.jobs:
        return _capture_jobs(args, settings)
    loaded = load_checked(args, dtype=args.model_dtype, backend=args.backend)
    store = capture(loaded, sessions, args.out, progress=not args.no_progress, shard=args.shard,
                    keep_private_labels=args.keep_private_labels, **settings)
    print(store.summary())
    return 0


def _capture_jobs(args: argparse.Namespace, settings: dict[str, Any]) -> int:
    """`--jobs N`: the capture as a submitit array of N workers, then the store's check (exit 1 if not ok)."""
    from analysis.cluster import capture_array

    if args.shard is not None or args.force_new:
        raise CliError("--jobs: runs every shard itself; drop --shard and --force-new (clear the store first)")
    load = dict(device=args.device, dtype=args.model_dtype, backend=args.backend, allow_partial=args.allow_partial)
    check = capture_array(model_path(args.model), args.sessions, args.out, args.jobs,
                          {**settings, "keep_private_labels": args.keep_private_labels}, load, args.executor,
                          partition=args.partition, gpus=args.gpus, time_min=args.time)
    print(check.report())
    return 0 if check.ok else 1


def cmd_store(args: argparse.Namespace) -> int:
    """`mmret store verify STORE [--sessions S]` and `mmret store merge OUT [SRC ...]`."""
    from probes.activations.folder import read_spec
    from probes.activations.shards import merge_stores, verify_store

    for folder in ([args.store] if args.action == "verify" else args.sources):
        if not (Path(folder) / "store.json").is_file():
            raise CliError(f"{folder}: not an activation store (no store.json)")
    if args.action == "verify":
        read_spec(Path(args.store) / "store.json")
        check = verify_store(args.store, read_sessions_checked(args) if args.sessions else None)
    else:
        check_out_folder(args.store)
        check = merge_stores(args.store, args.sources)
    print(check.report())
    return 0 if check.ok else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from probes.activations.store import ActivationStore, StoreError

    store = Path(args.store)
    if not (store / "store.json").is_file():  # ActivationStore() would make a new, empty store there
        raise StoreError(f"{store}: not an activation store (no store.json); expected a folder `mmret capture` wrote")
    print(ActivationStore(store).summary())
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from probes.models.tiny import build_tiny_model

    check_out_folder(args.out)
    claim(args, args.out)
    print(build_tiny_model(args.family, args.out, seed=args.seed))
    return 0


def _csv(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def cmd_sessions_build(args: argparse.Namespace) -> int:
    """Synthetic identities -> documents -> sessions JSONL (images beside it), plus fine-tune texts for memory."""
    out = check_out_file(args.out)
    image_dir = out.parent / (out.stem + "_images")
    if image_dir.exists() and not image_dir.is_dir():
        raise CliError(f"--out {out}: {image_dir} (where its images go) is a file; expected a folder")
    claim(args, out.parent)
    fresh_images, finetune = not image_dir.exists(), out.with_suffix(".finetune.jsonl")
    fresh_finetune = not finetune.exists()
    try:
        n = _build_sessions(args, out, image_dir, finetune)
    except BaseException:
        # what a failed build wrote before its sessions file, which names it, could be written
        if fresh_images:
            shutil.rmtree(image_dir, ignore_errors=True)
        if fresh_finetune:
            finetune.unlink(missing_ok=True)
        raise
    print(f"{n} {args.kind} sessions of {args.n} identities -> {out}")
    return 0


def _build_sessions(args: argparse.Namespace, out: Path, image_dir: Path, finetune: Path) -> int:
    import json

    from probes.data import builders as sb
    from probes.data.files import atomic_write_text
    from probes.data.identities import make_identities, split_identities
    from probes.data.session import write_sessions

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
        atomic_write_text(finetune, "".join(json.dumps(t) + "\n" for t in texts))
        sessions = (sb.memory_probe_sessions(memory, **choose)
                    + sb.memory_probe_sessions(unseen, unseen=True, **choose))
    write_sessions(sessions, out)
    return len(sessions)


def cmd_sessions_load_mmprivacy(args: argparse.Namespace) -> int:
    from probes.data.mmprivacy import cli_load_mmprivacy

    check_out_file(args.out)
    claim(args, Path(args.out).parent)
    mapping = check_in_file(args.mapping, "--mapping", "a JSON file {prompt id: row or name}") if args.mapping else None
    print(cli_load_mmprivacy(args.dir, args.out, part=args.part, framings=args.framings, mapping=mapping,
                             ocr_cache=args.ocr_cache))
    return 0


OCR_CACHE_HELP = ("OCR cache folder (default $MMRET_OCR_CACHE or ~/.cache/mm-retention/ocr; "
                  "it holds PII read off images)")


def cmd_ocr(args: argparse.Namespace) -> int:
    from probes.data.pii_locate import cli_ocr

    check_in_file(args.image, "image", "a document image (PNG or JPEG)")
    print(cli_ocr(args.image, show_values=args.show_values, cache_dir=args.ocr_cache))
    return 0


def _refusal_patterns(path: str | None) -> list[str] | None:
    """The default refusal regexes plus those of `path` (one a line), each compiled here so that a bad one is
    named before the model loads."""
    import re

    from probes.leakage import DEFAULT_REFUSAL_PATTERNS

    if not path:
        return None
    source = check_in_file(path, "--refusal-patterns", "a text file of regexes, one a line")
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise CliError(f"--refusal-patterns {source}: not UTF-8 text (byte {err.start})") from None
    extra = [line.strip() for line in lines if line.strip()]
    for lineno, pattern in enumerate(extra, start=1):
        try:
            re.compile(pattern)
        except re.error as err:
            raise CliError(f"--refusal-patterns {source}: pattern {lineno} is not a valid regex ({err})") from None
    return [*DEFAULT_REFUSAL_PATTERNS, *extra]


def cmd_leak(args: argparse.Namespace) -> int:
    from analysis.results import run_leakage

    check_out_folder(args.out)
    patterns = _refusal_patterns(args.refusal_patterns)
    read_sessions_checked(args)
    claim(args, args.out)
    loaded = load_checked(args, dtype=args.model_dtype)
    df = run_leakage(loaded, args.sessions, args.out, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, refusal_patterns=patterns, keep_responses=args.keep_responses,
                     n_boot=args.n_boot, seed=args.seed, progress=not args.no_progress)
    print(f"{len(df)} responses: ASR {df['leak'].mean():.3f}, RR {df['refused'].mean():.3f}; "
          f"results, leakage_table.csv/.tex and leakage.pdf in {args.out}")
    return 0


PRIVATE_TARGETS = ("digits", "chars")  # probe targets read from the sessions' private labels (the PII value)


def cmd_probe(args: argparse.Namespace) -> int:
    from analysis.results import run_probes
    from probes.activations.folder import PRIVATE_FILE, StoreError
    from probes.probing.sweep import main_metric

    layers = _layers(args.layers)
    turns = _ints(args.turns, "--turns")
    check_out_folder(args.out)
    if not (Path(args.store) / "store.json").is_file():
        raise StoreError(f"--store {args.store}: not an activation store (no store.json); expected a folder "
                         "`mmret capture` wrote")
    if args.sessions:
        check_in_file(args.sessions, "--sessions", "the sessions JSONL the store was captured from")
    elif args.target in PRIVATE_TARGETS and not (Path(args.store) / PRIVATE_FILE).is_file():
        raise CliError(f"--target {args.target}: the store {args.store} holds no private labels (no {PRIVATE_FILE}: "
                       "a store keeps the sessions' PII out); pass --sessions with the sessions JSONL it was "
                       "captured from, or capture it with --keep-private-labels, or probe a public label "
                       "(--target identity or label:<column>)")
    claim(args, args.out)
    df = run_probes(args.store, args.out, target=args.target, position_groups=_csv(args.positions),
                    turns=turns, layers=layers, method=args.method, pii_type=args.pii_type,
                    group_col=args.group_by, n_folds=args.folds, seed=args.seed, control=args.control,
                    n_boot=args.n_boot, mdl=args.mdl, private_from=args.sessions, max_memory_mb=args.max_memory_mb)
    metric = main_metric(df)
    best = df[df["metric"] == metric].sort_values("value").iloc[-1]
    print(f"{df[['layer', 'position_group', 'turn']].drop_duplicates().shape[0]} cells; best {metric} "
          f"{best['value']:.3f} at layer {best['layer']}, {best['position_group']}, turn {best['turn']}; "
          f"results and figures in {args.out}")
    return 0


def _ints(text: str | None, flag: str, low: int = 0) -> list[int] | None:
    if not text:
        return None
    try:
        values = [int(t) for t in _csv(text) or []]
    except ValueError:
        values = []
    if not values or min(values) < low:
        raise CliError(f"{flag} {text!r}: expected a comma list of integers >= {low}, e.g. 0,1,3")
    return values


def cmd_patch(args: argparse.Namespace) -> int:
    from analysis.results import run_patching

    config = patching_config_of(args)  # checked before anything is loaded or written
    check_out_folder(args.out)
    read_sessions_checked(args)
    claim(args, args.out)
    loaded = load_checked(args)
    df = run_patching(loaded, args.sessions, args.experiment, args.out, config, progress=not args.no_progress)
    print(f"{args.experiment}: {len(df)} rows over {df['session_id'].nunique() if 'session_id' in df else '?'} "
          f"pair(s); results and figures in {args.out}")
    return 0


def patching_config_of(args: argparse.Namespace) -> PatchingConfig:
    """The PatchingConfig of `mmret patch`'s flags; a bad value is named by its flag."""
    from probes.patching import PatchingConfig, PatchingError

    replacements = None
    if args.replace:
        pairs = [r.split("=", 1) for r in args.replace]
        if any(len(p) != 2 or not p[0] for p in pairs):
            raise CliError(f"--replace: expected OLD=NEW, got {len(args.replace)} value(s) without '='")
        replacements = dict(pairs)
    layers = _layers(args.layers)
    windows = _ints(args.window, "--window", low=1)
    try:
        return PatchingConfig(args.experiment, corruption=args.corruption,
                              components=tuple(_csv(args.components) or ()), layers=layers,
                              groups=_csv(args.groups), batch_size=args.batch_size,
                              corrupt_framing=args.corrupt_framing, atp_method=args.atp_method,
                              replacements=replacements, windows=windows,
                              max_pairs=args.max_pairs, n_boot=args.n_boot, seed=args.seed)
    except PatchingError as err:  # the message starts with the config's field: name the flag instead
        field, _, rest = str(err).partition(" ")
        name = field.rstrip(":")
        flag = {"replacements": "--replace", "windows": "--window"}.get(name, "--" + name.replace("_", "-"))
        raise CliError(f"{flag}{':' if field.endswith(':') else ''} {rest}") from None


def check_remote_code(models: Iterable[dict[str, Any]], where: str, allowed: bool, command: str) -> None:
    """`trust_remote_code: true` runs Python from the model's folder: a config alone may not switch it on. Refused
    unless the command line says --trust-remote-code as well; announced on stderr when it does."""
    trusting = [m for m in models if m.get("trust_remote_code")]
    for m in trusting:
        if not allowed:
            raise CliError(f"{where}: model {m.get('name') or m['path']!r} ({m['path']}) has trust_remote_code: "
                           f"true, which runs code from the model's folder; add --trust-remote-code to "
                           f"`{command}` to allow it")
        print(f"{command}: trust_remote_code is on for model {m.get('name') or m['path']!r}: code from "
              f"{m['path']} will run", file=sys.stderr)


def check_study_models(models: Iterable[dict[str, Any]], where: str) -> None:
    """A model the study cannot load is named now, not after the first stage: "default" and local folders are
    inspected (config, architecture and processor, no weights); an HF id must be in the cache when offline."""
    from probes.models.loading import inspect_model, resolve_model

    for i, m in enumerate(models):
        path = resolve_model(m["path"])
        local = Path(path).expanduser()
        looks_like_path = path.startswith((".", "/", "~")) or path.count("/") > 1
        if local.exists() or looks_like_path:
            try:
                inspect_model(path, trust_remote_code=bool(m.get("trust_remote_code")))
            except ValueError as err:
                raise CliError(f"{where}: models[{i}].path: {err}") from None
        elif os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hf_cache(path):
            raise CliError(f"{where}: models[{i}].path {path!r}: not a local folder, and not in the Hugging Face "
                           "cache while HF_HUB_OFFLINE=1; download it first or give its folder")


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id at all
        return False


def cmd_mitigate(args: argparse.Namespace) -> int:
    from analysis.mitigation import run_mitigation
    from probes.mitigation.image import KINDS, ProtectionError
    from probes.mitigation.settings import blackbox_settings, leak_directions, steer_settings

    kinds, strengths = _csv(args.protect) or [], _floats(args.strengths, "--strengths")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise CliError(f"--protect {','.join(bad)}: expected some of {','.join(KINDS)}")
    hooks = _csv(args.steer_hooks) or []
    if hooks and not args.steer_fit:
        raise CliError("--steer-hooks needs --steer-fit: sessions of other identities to fit the leak direction on")
    check_out_folder(args.out)
    sessions = read_sessions_checked(args)
    fit = read_sessions_checked(args, "--steer-fit", args.steer_fit) if hooks else []
    try:
        settings = blackbox_settings(kinds, strengths, dilation=args.dilation)
    except ProtectionError as err:
        raise CliError(f"--strengths/--dilation: {err}") from None
    claim(args, args.out)
    loaded = load_checked(args)
    if hooks:
        unknown = sorted(set(hooks) - set(loaded.hook_names()))
        if unknown:
            raise CliError(f"--steer-hooks {','.join(unknown)}: not hooks of this model "
                           "(e.g. blocks.2.hook_resid_post)")
        settings += steer_settings(leak_directions(loaded, fit, hooks), strengths)
    done = run_mitigation(loaded, sessions, settings, args.out, n_boot=args.n_boot, seed=args.seed,
                            max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    print(f"mitigation: {len(done.points)} settings measured; points, fronts and figures in {args.out}")
    return 0


def _floats(text: str | None, flag: str) -> list[float]:
    try:
        return [float(x) for x in _csv(text) or []]
    except ValueError:
        raise CliError(f"{flag} {text!r}: expected numbers separated by commas") from None


def cmd_study(args: argparse.Namespace) -> int:
    from analysis.study.config import default_config_path, load_study_config, parse_value
    from analysis.study.pipeline import run_study

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--set {item!r}: expected KEY=VALUE with a dotted config key (e.g. probes.method=ridge)")
        overrides[key] = parse_value(value)
    config = args.config or default_config_path()
    if args.config:
        check_in_file(config, "config", "a study YAML file")
    cfg = load_study_config(config, overrides)
    check_remote_code(cfg.data["models"], cfg.source, args.trust_remote_code, f"mmret study {args.study_command}")
    check_study_models(cfg.data["models"], cfg.source)
    if args.study_command == "validate":
        print(cfg.to_yaml(), end="")
        return 0
    check_out_folder(cfg.out, "out")
    if cfg.data.get("figures_dir"):
        check_out_folder(cfg.data["figures_dir"], "figures_dir")
    claim(args, cfg.out)
    from analysis.study.pipeline import StudyError, run_capture_shard

    if getattr(args, "shard", None) is not None:
        for store in run_capture_shard(cfg, args.shard, progress=not args.quiet):
            print(f"shard {args.shard[0]}/{args.shard[1]} captured into {store}; run `mmret study run` without "
                  "--shard once every worker is done")
        return 0
    try:
        run_study(cfg, progress=not args.quiet)
    except StudyError as err:  # names the stage and the partial folder kept for resuming
        cause = err.__cause__
        print(f"mmret study {args.study_command}: error: {error_line(err, args.private_values)}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(cause, EXPECTED_ERRORS) else 1
    return 0


def sweep_main(argv: list[str]) -> int:
    """`mmret sweep`: checks what the command line must allow (trust_remote_code in any grid point) and the sweep
    folder, then hands the arguments to analysis.study.sweep's own parser."""
    from analysis.study.config import load_study_config
    from analysis.study.sweep import expand, parse_grid
    from analysis.study.sweep import main as main_sweep

    pre = Parser(prog="mmret sweep", add_help=False)
    pre.add_argument("config", nargs="?")
    pre.add_argument("--grid", action="append", default=[])
    pre.add_argument("--out", default=None)
    pre.add_argument("--trust-remote-code", action="store_true")
    known, _ = pre.parse_known_args(argv)
    rest = [a for a in argv if a != "--trust-remote-code"]
    if known.config and "-h" not in argv and "--help" not in argv:
        check_in_file(known.config, "config", "a study YAML file")
        out = Path(known.out or str(load_study_config(known.config).out) + "_sweep")
        jobs = expand(known.config, parse_grid(known.grid), out)  # validates every grid point; writes nothing
        announced: set[str] = set()
        for job in jobs:
            where = f"{known.config} (grid point {job.name})" if job.point else known.config
            models = [m for m in job.config["models"] if m["path"] not in announced]
            check_remote_code(models, where, known.trust_remote_code, "mmret sweep")
            check_study_models(models, where)
            announced |= {m["path"] for m in models}
        check_out_folder(out, "--out")
    return main_sweep(rest)


MODEL_HELP = "HF id, local model folder, or 'default' (the embedded model)"


def add_allow_partial(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-partial", action="store_true",
                        help="load a checkpoint whose weights do not match its architecture (with a warning)")


def build_parser() -> argparse.ArgumentParser:
    from probes.data.documents import LAYOUTS

    p = Parser(prog="mmret", description="mechanistic retention analysis of PII in multimodal LLMs")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also accepted anywhere)")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("capture", help="capture hidden states of sessions into an activation store")
    c.add_argument("--model", required=True, help=MODEL_HELP)
    c.add_argument("--sessions", required=True, help="sessions JSONL")
    c.add_argument("--out", required=True, help="store folder (reruns resume)")
    c.add_argument("--hooks", default="resid_post",
                   help="comma list: resid_post, resid_pre, attn_out, mlp_out, vision, projector, or TL hook names")
    c.add_argument("--layers", default=None, help="LM layers for the hook shorthands, e.g. 0-3,6 (default all)")
    c.add_argument("--positions", default="all",
                   help="position selector: all, final, segment:<s>, turn:<t>, last:<t>, last:*, image:<k>, "
                        "mark:<label>; join with +")
    c.add_argument("--mode", default="auto", choices=["auto", "turns", "single"])
    c.add_argument("--max-new-tokens", type=positive_int, default=32, help="for assistant turns the model writes")
    c.add_argument("--dtype", default="model", choices=["model", "float32", "float16", "bfloat16"],
                   help="stored dtype (default: the model's own: 2 bytes a value for a bf16 model)")
    c.add_argument("--model-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    c.add_argument("--backend", default="torch", choices=["torch", "bridge"])
    c.add_argument("--batch-size", type=positive_int, default=8,
                   help="sessions captured together (one forward per turn)")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--force-new", action="store_true",
                   help="start the store over when --out holds one of another model or other settings")
    c.add_argument("--allow-long", action="store_true",
                   help="capture sessions longer than the model's context (otherwise refused)")
    c.add_argument("--keep-private-labels", action="store_true",
                   help="also write <out>/private_labels.jsonl (the sessions' PII: do not share it); "
                        "`mmret probe --target digits|chars` reads its targets there")
    c.add_argument("--shard", default=None, type=_shard,
                   help="i/n: capture only worker i's part of a split into n (workers run at once into one store)")
    c.add_argument("--jobs", type=positive_int, default=None,
                   help="submit the capture as N submitit jobs (shards 0..N-1), wait, then verify the store")
    c.add_argument("--executor", default="local", choices=["local", "slurm", "debug"], help="for --jobs")
    c.add_argument("--partition", default=None, help="SLURM partition (--jobs)")
    c.add_argument("--gpus", type=int, default=0, help="GPUs per job (--jobs)")
    c.add_argument("--time", type=int, default=60, help="minutes per job (--jobs)")
    add_allow_partial(c)
    c.set_defaults(func=cmd_capture)

    st = sub.add_parser("store", help="check a store, or merge stores captured apart into one")
    st.add_argument("action", choices=["verify", "merge"])
    st.add_argument("store", help="the store (verify), or the store to merge into (merge)")
    st.add_argument("sources", nargs="*", default=[], help="merge: stores to copy sessions from")
    st.add_argument("--sessions", default=None, help="verify: every session of this JSONL is there once")
    st.set_defaults(func=cmd_store)

    sessions = sub.add_parser("sessions", help="build or load sessions (JSONL)")
    ssub = sessions.add_subparsers(dest="sessions_command", required=True)
    b = ssub.add_parser("build", help="synthetic identities and documents -> sessions JSONL")
    b.add_argument("--kind", required=True, choices=["mmprivacy", "multiturn", "memory"])
    b.add_argument("--out", required=True, help="sessions JSONL; images go to <out>_images/ beside it")
    b.add_argument("--n", type=positive_int, default=20, help="identities (memory: half planted, half unseen)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--size", type=positive_int, default=128,
                   help="document size in pixels (the embedded model reads 96 px grid documents)")
    b.add_argument("--layout", default="fixed", choices=list(LAYOUTS),
                   help="grid: one character per cell, what the embedded model reads (use --size 96)")
    b.add_argument("--framings", default=None, help="comma list (default all five; mmprivacy and memory)")
    b.add_argument("--pii-types", default=None, help="comma list of Email, Phone Numbers, SSN (default all)")
    b.add_argument("--scenarios", default=None, help="comma list of open, hiring, verification, finance")
    b.add_argument("--k", default=None, help="multiturn: distractor counts, e.g. 0,1,3 (default 0-5)")
    b.add_argument("--memory-style", default="full", choices=["full", "single"])
    b.set_defaults(func=cmd_sessions_build)

    lm = ssub.add_parser("load-mmprivacy", help="a folder in the published MM-Privacy layout -> sessions JSONL")
    lm.add_argument("dir")
    lm.add_argument("--out", required=True, help="sessions JSONL to write")
    lm.add_argument("--part", choices=["direct", "memory", "real", "real-named"], default="direct")
    lm.add_argument("--framings", default=None, help="comma-separated framings (default: all five)")
    lm.add_argument("--mapping", default=None,
                    help="JSON {prompt id: 1-based row or name}; overrides the image reading, checked against it")
    lm.add_argument("--ocr-cache", default=None, help=OCR_CACHE_HELP)
    lm.set_defaults(func=cmd_sessions_load_mmprivacy)

    oc = sub.add_parser("ocr", help="read the text lines and the PII on a document image (values masked unless asked)")
    oc.add_argument("image", help="image file (PNG or JPEG)")
    oc.add_argument("--show-values", action="store_true", help="print the values unmasked (they are PII)")
    oc.add_argument("--ocr-cache", default=None, help=OCR_CACHE_HELP)
    oc.set_defaults(func=cmd_ocr)

    lk = sub.add_parser("leak", help="generate answers to PII-asking sessions; score ASR, partial leak, RR")
    lk.add_argument("--model", required=True, help=MODEL_HELP)
    lk.add_argument("--sessions", required=True, help="sessions JSONL (labels pii_type and _target)")
    lk.add_argument("--out", required=True, help="folder for results, tables and the figure")
    lk.add_argument("--max-new-tokens", type=positive_int, default=32)
    lk.add_argument("--batch-size", type=positive_int, default=8)
    lk.add_argument("--n-boot", type=non_negative_int, default=1000, help="bootstrap draws for the CIs (0: none)")
    lk.add_argument("--seed", type=int, default=0)
    lk.add_argument("--refusal-patterns", default=None, help="file of extra refusal regexes, one a line")
    lk.add_argument("--keep-responses", action="store_true",
                    help="add the response texts to results.csv (they contain PII when the model leaks)")
    lk.add_argument("--model-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    lk.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    lk.add_argument("--no-progress", action="store_true")
    add_allow_partial(lk)
    lk.set_defaults(func=cmd_leak)

    pr = sub.add_parser("probe", help="fit linear probes on every (layer, position group, turn) cell of a store")
    pr.add_argument("--store", required=True, help="activation store folder (mmret capture)")
    pr.add_argument("--max-memory-mb", type=float, default=None,
                    help="stream the sweep from disk, activations and fits held at once kept under about this "
                         "(same results as in memory); default: read every cell at once")
    pr.add_argument("--sessions", default=None,
                    help="the sessions JSONL the store was captured from: the PII targets (digits, chars) come from "
                         "its private labels")
    pr.add_argument("--target", default="digits",
                    help="digits | chars (the asked PII value, per character) | identity | label:<column>")
    pr.add_argument("--out", required=True)
    pr.add_argument("--positions", default="last", help="position groups: last,image,final,mark:<label>,...")
    pr.add_argument("--turns", default=None, help="turns to probe (default: all)")
    pr.add_argument("--layers", default=None, help="e.g. 0-3,6 (default: all stored)")
    pr.add_argument("--method", default="logreg", choices=["logreg", "ridge", "dim"])
    pr.add_argument("--pii-type", default=None, help="for digits/chars: the field (default: the asked value)")
    pr.add_argument("--group-by", default="identity_id", help="label whose values never share a fold")
    pr.add_argument("--folds", type=at_least_two, default=5)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--control", default="none", help="name of this store's control condition in the results")
    pr.add_argument("--n-boot", type=non_negative_int, default=1000)
    pr.add_argument("--mdl", action="store_true", help="also the online code (MDL): codelength and compression")
    pr.set_defaults(func=cmd_probe)

    pa = sub.add_parser("patch", help="activation patching: exact, attribution, task swap, attention knockout")
    pa.add_argument("--model", required=True, help=MODEL_HELP)
    pa.add_argument("--sessions", required=True, help="sessions JSONL (each the clean side of a pair)")
    pa.add_argument("--experiment", required=True, choices=["denoise", "noise", "atp", "taskswap", "knockout"])
    pa.add_argument("--out", required=True)
    pa.add_argument("--corruption", default=None, choices=["image", "framing", "text", "noise"],
                    help="default: image pair (framing swap for taskswap)")
    pa.add_argument("--components", default="resid_pre,attn_out,mlp_out")
    pa.add_argument("--layers", default=None, help="e.g. 0-3,6 (default all)")
    pa.add_argument("--groups", default=None,
                    help="position groups (default: PII patches, other patches, turns, final)")
    pa.add_argument("--corrupt-framing", default="direct", help="the other framing of a framing swap")
    pa.add_argument("--atp-method", default="atp", help="the estimator of --experiment atp: atp, atp_graddrop, "
                    "atp_qk, atp_layer or atp_star (AtP*; see probes.patching.atp_star)")
    pa.add_argument("--replace", action="append", default=None, metavar="OLD=NEW", help="text corruption")
    pa.add_argument("--window", default=None, help="knockout layer windows, e.g. 1,2,4")
    pa.add_argument("--batch-size", type=positive_int, default=16)
    pa.add_argument("--max-pairs", type=positive_int, default=None)
    pa.add_argument("--n-boot", type=non_negative_int, default=1000)
    pa.add_argument("--seed", type=int, default=0)
    pa.add_argument("--device", default=None)
    pa.add_argument("--no-progress", action="store_true")
    add_allow_partial(pa)
    pa.set_defaults(func=cmd_patch)

    mi = sub.add_parser("mitigate", help="privacy-utility fronts of image protections and white-box steers")
    mi.add_argument("--model", required=True, help=MODEL_HELP)
    mi.add_argument("--sessions", required=True, help="PII-asking sessions JSONL (held-out identities)")
    mi.add_argument("--out", required=True)
    mi.add_argument("--protect", default="blur,pixelate,jpeg,mask,region_pixelate",
                    help="black-box protections (blur, pixelate, downscale, jpeg, mask, region_blur, region_pixelate)")
    mi.add_argument("--strengths", default="0.25,0.5,0.75,1", help="each method's knob values (0 is the baseline)")
    mi.add_argument("--dilation", type=float, default=4.0, help="px a regional protection grows its boxes at 1")
    mi.add_argument("--steer-hooks", default=None, help="white-box: hooks to steer at, e.g. blocks.2.hook_resid_post")
    mi.add_argument("--steer-fit", default=None, help="sessions JSONL of other identities to fit the leak direction")
    mi.add_argument("--max-new-tokens", type=positive_int, default=32)
    mi.add_argument("--n-boot", type=non_negative_int, default=1000)
    mi.add_argument("--seed", type=int, default=0)
    mi.add_argument("--device", default=None)
    mi.add_argument("--no-progress", action="store_true")
    add_allow_partial(mi)
    mi.set_defaults(func=cmd_mitigate)

    st = sub.add_parser("study", help="the whole study from one YAML config (sessions ... report)")
    stsub = st.add_subparsers(dest="study_command", required=True)
    for name, text in (("run", "run or resume a study; stages whose outputs match the config are skipped"),
                       ("validate", "check a config and print it with every default filled in")):
        s = stsub.add_parser(name, help=text)
        s.add_argument("config", nargs="?", default=None, help="study YAML (default: the shipped default study)")
        s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a dotted config key")
        s.add_argument("--quiet", action="store_true")
        s.add_argument("--trust-remote-code", action="store_true",
                       help="allow a config's trust_remote_code: true (runs code from the model's folder)")
        if name == "run":
            s.add_argument("--shard", default=None, type=_shard,
                           help="i/n: only worker i's part of the capture stage (workers at once, any machines "
                                "sharing the out folder); then `mmret study run` without it finishes the study")
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


class StderrLog(logging.Handler):
    """The library's log lines (INFO and up: "resuming: ...", warnings) on stderr while a command runs, written
    where sys.stderr points at the time, with the sessions' PII values redacted."""

    def __init__(self, secrets: set[str]) -> None:
        super().__init__(logging.INFO)
        self.secrets = secrets  # filled in as the command reads its sessions

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(redact(record.getMessage(), self.secrets), file=sys.stderr)
        except Exception:  # a log line must never break the command
            self.handleError(record)


@contextlib.contextmanager
def library_log(secrets: set[str]) -> Iterator[None]:
    handler = StderrLog(secrets)
    loggers = [logging.getLogger(name) for name in ("probes", "analysis")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = " ".join(a for a in argv[:2] if not a.startswith("-")) or "mmret"
    if command.split(" ")[0] not in ("sessions", "study", "organism"):
        command = command.split(" ")[0]
    args = argparse.Namespace(created=[], private_values=set())
    try:
        with library_log(args.private_values):
            return run(argv, args)
    except SystemExit as stop:  # argparse: --help (0) or a bad flag (its one-line message is printed)
        return stop.code if isinstance(stop.code, int) else EXIT_BAD_INPUT
    except EXPECTED_ERRORS as err:
        remove_empty_created(args)
        if debug:
            raise
        # Our errors are ValueError subclasses that name the file/field: print them, not a traceback.
        print(f"mmret {command}: error: {error_line(err, args.private_values, getattr(args, 'out', None))}",
              file=sys.stderr)
        return EXIT_BAD_INPUT


def run(argv: list[str], args: argparse.Namespace) -> int:
    """Parse `argv` into `args` and run its command."""
    if argv[:2] == ["organism", "train"]:  # its own parser (probes/organism/train.py)
        from probes.organism.train import main_train

        return main_train(argv[2:])
    if argv[:1] == ["sweep"]:  # its own parser (analysis/study/sweep.py)
        return sweep_main(argv[1:])
    build_parser().parse_args(argv, namespace=args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
