"""What a patching experiment can be told, validated once: the choices (experiments, corruptions, directions,
components, alignments), `PairSpec` (how one clean session becomes a pair) and `PatchingConfig` (everything a
`patch_sessions` / `run_patching` run depends on; its fields are the key of the resumable parts)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterable, Mapping, Sequence

from probes.data.builders import FRAMINGS

MIN_SEPARATION = 1.0  # nats of clean - corrupt logit_diff a pair needs (see probes.patching.metrics)


class PatchingError(ValueError):
    """Bad input to patching (unequal pair, unknown group, nothing to answer ...); names what was expected."""


COMPONENTS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
DIRECTIONS = ("denoise", "noise")
CORRUPTIONS = ("image", "framing", "text", "noise")
EXPERIMENTS = ("denoise", "noise", "atp", "taskswap", "knockout")
ALIGNS = ("last", "mean")
ATP_METHODS = ("atp", "atp_graddrop", "atp_qk", "atp_layer", "atp_star")  # see PatchingConfig.atp_method
DEFAULT_COMPONENTS = ("resid_pre", "attn_out", "mlp_out")
EXPERIMENT_DEFAULTS = {  # experiment -> (corruption, directions, method)
    "denoise": ("image", ("denoise",), "exact"),
    "noise": ("image", ("noise",), "exact"),
    "atp": ("image", ("denoise", "noise"), "atp"),
    "taskswap": ("framing", ("denoise", "noise"), "exact"),
    "knockout": (None, (), "knockout"),
}


def _names(value: Sequence[str] | None, name: str, allowed: Sequence[str] | None = None) -> tuple[str, ...] | None:
    """A sequence of names as a tuple (None stays None); a bare string is refused (it would read as its letters)."""
    if value is None:
        return None
    if isinstance(value, str):
        raise PatchingError(f"{name} {value!r}: expected a list of names, not one string")
    out = tuple(value)
    bad = [v for v in out if allowed is not None and v not in allowed]
    if bad:
        raise PatchingError(f"{name} {bad}: expected some of {tuple(allowed)}")
    return out


def _ints(value: Iterable[int] | None, name: str, low: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    out = tuple(int(v) for v in value)
    if any(v < low for v in out):
        raise PatchingError(f"{name} {list(out)}: expected integers >= {low}")
    return out


def _set(obj: object, **values: object) -> None:
    for k, v in values.items():
        object.__setattr__(obj, k, v)  # frozen: normalised once, here


@dataclass(frozen=True)
class PairSpec:
    """How `build_pair` makes the corrupt side of a clean session (see `probes.patching.pairs`): `swap` (image: the
    fields whose values change; default the asked PII type), `corrupt_framing` (framing), `replacements` (text:
    {old: new} of the same token length), `noise_std` and `seed` (noise), `leak` / `refusal` (the two continuations
    the metric compares, when the caller gives them)."""

    corruption: str
    swap: Sequence[str] | None = None
    corrupt_framing: str = "direct"
    replacements: Mapping[str, str] | None = None
    noise_std: float | int = 3.0
    seed: int = 0
    leak: str | None = None
    refusal: str | None = None

    def __post_init__(self) -> None:
        if self.corruption not in CORRUPTIONS:
            raise PatchingError(f"corruption {self.corruption!r}: expected one of {CORRUPTIONS}")
        if self.corrupt_framing not in FRAMINGS:
            raise PatchingError(f"corrupt_framing {self.corrupt_framing!r}: expected one of {FRAMINGS}")
        if not math.isfinite(self.noise_std) or self.noise_std < 0:
            raise PatchingError(f"noise_std {self.noise_std}: expected a finite number >= 0 (a multiple of the "
                                "image embeddings' standard deviation)")
        _set(self, swap=_names(self.swap, "swap"), noise_std=float(self.noise_std),
             replacements=None if self.replacements is None else dict(self.replacements))


@dataclass(frozen=True)
class PatchingConfig:
    """Everything a patching run (`patch_sessions`, `run_patching`) depends on, checked before any work starts.

    experiment: denoise | noise | atp | taskswap | knockout; `corruption` and `directions` default to the
    experiment's (`EXPERIMENT_DEFAULTS`). components, layers (default: all), groups (default: those on both sides of
    each pair, `default_groups`): the cells. batch_size: patched configurations per forward. align: how a group of
    unequal size on the two sides is patched (last | mean). corrupt_framing, replacements, swap, noise_std, seed,
    leak, refusal: the pair (`PairSpec`). sources, windows: knockout's source groups (default: the PII patches, the
    image and the earlier turns) and window sizes in layers (default: a quarter of the layers). check_exact: also run
    exact patching in an atp experiment. atp_method: the attribution estimator of an atp experiment (atp, the plain
    gradient; atp_graddrop; atp_qk, atp_layer or atp_star, the AtP* attention-saturation correction of
    `probes.patching.atp_star`). max_pairs: patch the first this many sessions (None: all). n_boot: bootstrap
    draws of the summary. min_separation: the pair check's margin in nats (None: keep every pair). model: the model
    label written in the rows (default: the loaded model's)."""

    experiment: str
    corruption: str | None = None
    directions: Sequence[str] | None = None
    components: Sequence[str] = DEFAULT_COMPONENTS
    layers: Iterable[int] | None = None
    groups: Sequence[str] | None = None
    batch_size: int = 16
    align: str = "last"
    corrupt_framing: str = "direct"
    replacements: Mapping[str, str] | None = None
    swap: Sequence[str] | None = None
    noise_std: float | int = 3.0
    seed: int = 0
    sources: Sequence[str] | None = None
    windows: Iterable[int] | None = None
    check_exact: bool = True
    atp_method: str = "atp"
    leak: str | None = None
    refusal: str | None = None
    max_pairs: int | None = None
    n_boot: int = 1000
    min_separation: float | int | None = MIN_SEPARATION
    model: str | None = None

    def __post_init__(self) -> None:
        if self.experiment not in EXPERIMENTS:
            raise PatchingError(f"experiment {self.experiment!r}: expected one of {EXPERIMENTS}")
        corruption, directions, _ = EXPERIMENT_DEFAULTS[self.experiment]
        _set(self, corruption=self.corruption or corruption,
             directions=_names(self.directions or directions, "directions", DIRECTIONS),
             components=_names(self.components, "components", COMPONENTS), layers=_ints(self.layers, "layers", 0),
             groups=_names(self.groups, "groups") or None, sources=_names(self.sources, "sources"),
             windows=_ints(self.windows, "windows", 1) or None)
        if not self.components:
            raise PatchingError(f"components: expected at least one of {COMPONENTS}")
        if self.atp_method not in ATP_METHODS:
            raise PatchingError(f"atp_method {self.atp_method!r}: expected one of {ATP_METHODS}")
        if self.align not in ALIGNS:
            raise PatchingError(f"align {self.align!r}: expected one of {ALIGNS}")
        for name, low in (("batch_size", 1), ("max_pairs", 1), ("n_boot", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise PatchingError(f"{name} {value}: expected an integer >= {low}")
        if self.min_separation is not None and math.isnan(self.min_separation):
            raise PatchingError("min_separation nan: expected a number of nats, or None to keep every pair")
        if self.corruption == "text" and not self.replacements and self.experiment != "knockout":
            raise PatchingError("replacements: the text corruption needs {old: new}, e.g. {'SSN': 'Tel'}")
        spec = self.pair_spec() if self.corruption is not None else None  # checks the pair's own fields
        _set(self, swap=spec.swap if spec else _names(self.swap, "swap"),
             replacements=spec.replacements if spec else self.replacements,
             noise_std=float(self.noise_std),
             min_separation=None if self.min_separation is None else float(self.min_separation))

    @property
    def method(self) -> str:
        """exact | atp | knockout: what the experiment runs on each pair."""
        return EXPERIMENT_DEFAULTS[self.experiment][2]

    def pair_spec(self) -> PairSpec:
        """How each session of the run becomes a pair."""
        return PairSpec(self.corruption, self.swap, self.corrupt_framing, self.replacements, self.noise_std,
                        self.seed, self.leak, self.refusal)


def patching_config(config: PatchingConfig | str, options: Mapping[str, object]) -> PatchingConfig:
    """`config` with `options` (field=value) applied; a string `config` is the experiment of a new one."""
    from dataclasses import replace

    known = {f.name for f in fields(PatchingConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise PatchingError(f"patching options {unknown}: expected fields of PatchingConfig ({', '.join(known)})")
    if isinstance(config, str):
        return PatchingConfig(config, **options)
    if "experiment" in options:  # the other defaults (corruption, directions) were resolved for the old one
        raise PatchingError("experiment: give a new PatchingConfig for another experiment, not an option")
    return replace(config, **options) if options else config
