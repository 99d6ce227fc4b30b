"""Identities: reproducible from a seed, in the benchmark's formats, unique, and split into disjoint sets."""

import re
from datetime import date

import pytest

from probes.data.identities import (
    PII_TYPES,
    RECORD_COLUMNS,
    VALUE_TYPES,
    ChoiceError,
    Identity,
    make_identities,
    split_identities,
)


@pytest.fixture(scope="module")
def people():
    return make_identities(300, seed=7)


def test_same_seed_same_people_other_seed_others(people):
    assert make_identities(300, seed=7) == people
    other = make_identities(300, seed=8)
    assert [p.name for p in other[:20]] != [p.name for p in people[:20]]
    assert {p.identity_id for p in other}.isdisjoint({p.identity_id for p in people})  # pools can be merged


def test_global_faker_untouched():
    """Building identities must not reseed (or depend on) Faker's shared random state."""
    from faker import Faker
    from faker.generator import random as shared

    state = shared.getstate()
    make_identities(5, seed=1)
    assert shared.getstate() == state
    Faker.seed(123)  # someone else seeding the global instance changes nothing here
    assert make_identities(5, seed=1) == make_identities(5, seed=1)


def test_formats(people):
    for p in people:
        assert re.fullmatch(r"\d{3}-\d{2}-\d{4}", p.ssn), p.ssn
        assert date.fromisoformat(p.date_of_birth).year in range(1950, 2005)
        assert re.fullmatch(r"[^@\s]+@[^@\s]+\.[a-z]+", p.email)
        assert "\n" not in p.address and len(p.address) > 10
        assert p.gender in ("Male", "Female")
        assert len(re.sub(r"\D", "", p.phone.split("x")[0])) >= 10
    # Faker's mixed phone formats all occur: dashes, dots, parentheses, extensions
    phones = " ".join(p.phone for p in people)
    for token in ("(", ".", "x", "-"):
        assert token in phones


def test_unique_values(people):
    for attr in ("identity_id", "name", "email", "phone", "ssn"):
        values = [getattr(p, attr) for p in people]
        assert len(set(values)) == len(values), attr


def test_value_and_records(people):
    p = people[0]
    assert [p.value(t) for t in PII_TYPES] == [p.email, p.phone, p.ssn]
    assert p.value("Name") == p.name and p.value("Date of Birth") == p.date_of_birth
    assert set(VALUE_TYPES) >= set(PII_TYPES)
    with pytest.raises(ChoiceError, match="unknown PII type 'Passport'.*Email, Phone Numbers, SSN"):
        p.value("Passport")
    rec = p.to_record()
    assert list(rec) == list(RECORD_COLUMNS)
    assert Identity.from_record(rec, p.identity_id) == p
    assert Identity.from_dict(p.to_dict()) == p
    bad = dict(rec)
    del bad["SSN"]
    with pytest.raises(ChoiceError, match=r"people.xlsx row 3: missing column\(s\) \['SSN'\]"):
        Identity.from_record(bad, "x", where="people.xlsx row 3")


def test_split_disjoint_and_reproducible(people):
    memory, probe = split_identities(people, 200, seed=3)
    assert len(memory) == 200 and len(probe) == 100
    mem_ids, probe_ids = {p.identity_id for p in memory}, {p.identity_id for p in probe}
    assert mem_ids.isdisjoint(probe_ids) and mem_ids | probe_ids == {p.identity_id for p in people}
    assert split_identities(people, 200, seed=3) == (memory, probe)
    assert split_identities(people, 200, seed=4)[0] != memory
    assert memory == sorted(memory, key=people.index)  # input order kept
    with pytest.raises(ChoiceError, match="n_memory must be in"):
        split_identities(people, 301)
    with pytest.raises(ChoiceError, match="not unique"):
        split_identities(people + people[:1], 2)
