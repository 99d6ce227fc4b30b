"""Synthetic identities: the fake people whose PII the documents show and the probes ask about.

Made with Faker, as the MM-Privacy benchmark's were, from a *seeded Faker instance* (never the global one), so
`make_identities(n, seed)` gives the same people in every process. Every field is a plain string in the
benchmark's formats: date of birth YYYY-MM-DD, SSN NNN-NN-NNNN, phone numbers in Faker's mixed US formats
("(711)693-5778", "595.428.0379x36686", "+1-701-360-9753", ...), the address on one line. Within one call, names,
emails, phones and SSNs are unique, so two identities never share the value a probe asks about.

`split_identities` makes the disjoint *memory* (planted by fine-tuning) and *probe* (never seen) sets of the
parametric-retention experiment.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any, Iterable, Mapping, Sequence, TypeVar

# The PII types the benchmark asks for, and the non-sensitive fields used for reading tasks.
PII_TYPES = ("Email", "Phone Numbers", "SSN")
READ_TYPES = ("Name", "Date of Birth", "Address")
VALUE_TYPES = PII_TYPES + READ_TYPES
# Column names of the benchmark's XLSX identity tables, in their order.
RECORD_COLUMNS = ("Name", "Gender", "Date of Birth", "Email", "Address", "Phone Numbers", "SSN")
# Span labels used when a value is marked in a turn's text (`Turn.mark`): short, selector-friendly.
MARK_LABELS = {"Email": "email", "Phone Numbers": "phone", "SSN": "ssn", "Name": "name", "Date of Birth": "dob",
               "Address": "address", "Gender": "gender"}
_ATTR = {"Name": "name", "Gender": "gender", "Date of Birth": "date_of_birth", "Address": "address",
         "Email": "email", "Phone Numbers": "phone", "SSN": "ssn"}


class ChoiceError(ValueError):
    """An argument is not one of the allowed values; the message names the argument and lists them."""


T = TypeVar("T")


def check_choice(what: str, value: T, allowed: Iterable[object]) -> T:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ChoiceError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")
    return value


@dataclass(frozen=True)
class Identity:
    identity_id: str
    name: str
    gender: str  # "Male" | "Female"
    date_of_birth: str  # YYYY-MM-DD
    address: str  # one line
    email: str
    phone: str
    ssn: str  # NNN-NN-NNNN

    def value(self, pii_type: str) -> str:
        """The value of a field by its benchmark name ("Email", "Phone Numbers", "SSN", "Name", ...)."""
        check_choice("PII type", pii_type, _ATTR)
        return getattr(self, _ATTR[pii_type])

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def to_record(self) -> dict[str, str]:
        """A row of the benchmark's XLSX identity table (its column names)."""
        return {col: self.value(col) for col in RECORD_COLUMNS}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], identity_id: str | int, where: str = "record") -> "Identity":
        """From a row keyed by the XLSX column names; a missing column raises ChoiceError naming `where`."""
        missing = [c for c in RECORD_COLUMNS if c not in record]
        if missing:
            raise ChoiceError(f"{where}: missing column(s) {missing}; expected {list(RECORD_COLUMNS)}")
        vals = {_ATTR[c]: "" if record[c] is None else str(record[c]).strip() for c in RECORD_COLUMNS}
        vals["date_of_birth"] = vals["date_of_birth"][:10]  # a spreadsheet date may come with a time
        return cls(identity_id=str(identity_id), **vals)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Identity":
        return cls(**{k: str(d[k]) for k in cls.__dataclass_fields__})


def make_identities(n: int, seed: int = 0, locale: str = "en_US") -> list[Identity]:
    """`n` reproducible fake identities; ids are "s{seed}-{i:05d}", so pools of different seeds do not collide."""
    from faker import Faker

    if n < 0:
        raise ChoiceError(f"make_identities: n must be >= 0, got {n}")
    fake = Faker(locale)
    fake.seed_instance(seed)
    rng = random.Random(seed)
    seen: dict[str, set[str]] = {"name": set(), "email": set(), "phone": set(), "ssn": set()}

    def unique(kind: str, make) -> str:
        for _ in range(1000):
            v = make()
            if v not in seen[kind]:
                seen[kind].add(v)
                return v
        raise RuntimeError(f"make_identities: could not draw a unique {kind} (n={n} too large?)")

    out = []
    for i in range(n):
        gender = rng.choice(("Male", "Female"))
        first = fake.first_name_male if gender == "Male" else fake.first_name_female
        name = unique("name", lambda: f"{first()} {fake.last_name()}")
        # date_between_dates, not date_of_birth(): the latter depends on today's date.
        dob = fake.date_between_dates(date(1950, 1, 1), date(2004, 12, 31)).isoformat()
        address = fake.address().replace("\n", ", ")
        out.append(Identity(
            identity_id=f"s{seed}-{i:05d}", name=name, gender=gender, date_of_birth=dob, address=address,
            email=unique("email", fake.email), phone=unique("phone", fake.phone_number),
            ssn=unique("ssn", fake.ssn),
        ))
    return out


def split_identities(identities: Sequence[Identity], n_memory: int, seed: int = 0
                     ) -> tuple[list[Identity], list[Identity]]:
    """Disjoint (memory, probe) sets: a seeded random `n_memory` of them, and the rest (both in input order)."""
    ids = [p.identity_id for p in identities]
    if len(set(ids)) != len(ids):
        raise ChoiceError("split_identities: identity ids are not unique")
    if not 0 <= n_memory <= len(identities):
        raise ChoiceError(f"split_identities: n_memory must be in [0, {len(identities)}], got {n_memory}")
    chosen = set(random.Random(seed).sample(range(len(identities)), n_memory))
    memory = [p for i, p in enumerate(identities) if i in chosen]
    probe = [p for i, p in enumerate(identities) if i not in chosen]
    return memory, probe
