"""The offline demo task: structured person records in, English sentences out.

Deterministic for a given drop number, so a run is reproducible on any machine. Test records draw their
names and cities from pools that training never sees, so the model must copy unseen entities and scores
do not saturate. Each drop brings new records, so retraining on a later drop means something. Test rows
carry two phrasings of the same record, which exercises multi-reference scoring.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_TRAIN_FIRST = (
    "Ada Alan Anna Boris Carla Dmitri Elena Farid Greta Hugo Ines Jonas Kira Lars Maya Nadia Omar Paula "
    "Quentin Rosa Sven Tara Umar Vera Wim Yara Zoe Bruno Clara Diego Emil Freya Goran Helga Ivan Julia"
).split()
_TRAIN_LAST = (
    "Moreno Novak Okafor Petrov Quist Romero Sato Tanaka Ueda Varga Weber Xu Yilmaz Zhou Berg Costa "
    "Dubois Eriksen Fischer Garcia Horvat Ito Jensen Kowalski Lopez Meyer Nagy Olsen"
).split()
_TEST_FIRST = "Aurelio Bettina Cosimo Delphine Ezio Fiorella Gianni Henrike Ignazio Jolanda Kasimir".split()
_TEST_LAST = "Abernathy Bricklebank Castellucci Drummondsen Esterhazy Fairweather Gallowglass".split()
_TRAIN_CITIES = (
    "Lisbon Oslo Porto Riga Lyon Turin Ghent Bergen Malmo Graz Krakow Bilbao Leeds Cork Delft Basel"
).split()
_TEST_CITIES = "Timbuktu Valparaiso Yellowknife Zanzibar Ushuaia Kathmandu".split()
_JOBS = "baker plumber teacher nurse pilot chemist farmer lawyer painter engineer librarian tailor".split()
_HOBBIES = "chess hiking sailing pottery cycling gardening fishing knitting".split()
_PETS = "cat dog parrot tortoise rabbit hamster".split()

# One canonical template per combination of optional fields, so the target is a function of the input;
# the second phrasing is only ever a test reference.
_TEMPLATES = {
    (False, False): (
        "{name} is a {age}-year-old {job} from {city}.",
        "{name}, aged {age}, works as a {job} in {city}.",
    ),
    (True, False): (
        "{name}, a {job} from {city}, is {age} years old and enjoys {hobby}.",
        "{name} is a {age}-year-old {job} in {city} who enjoys {hobby}.",
    ),
    (False, True): (
        "{name} works as a {job} in {city} and, at {age}, lives with a {pet}.",
        "{name} is a {job} from {city}, {age} years old, with a {pet}.",
    ),
    (True, True): (
        "{name} is a {job} aged {age} in {city} who likes {hobby} and has a {pet}.",
        "{name}, a {age}-year-old {job} from {city}, likes {hobby} and keeps a {pet}.",
    ),
}


_SYLLABLES = "ka lo ven mi dra sel tor bu ne fa ril gon pe sha tu vi mar zo le qui".split()


def _invented(rng: random.Random, syllables: int) -> str:
    """A pronounceable made-up word: with many such names the model must learn to copy, not memorise."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def _record(rng: random.Random, held_out: bool) -> dict[str, str]:
    if held_out:
        name = f"{rng.choice(_TEST_FIRST)} {rng.choice(_TEST_LAST)}"
        city = rng.choice(_TEST_CITIES)
    else:
        first = rng.choice(_TRAIN_FIRST) if rng.random() < 0.5 else _invented(rng, rng.randint(2, 3))
        last = rng.choice(_TRAIN_LAST) if rng.random() < 0.5 else _invented(rng, rng.randint(2, 4))
        name = f"{first} {last}"
        city = rng.choice(_TRAIN_CITIES) if rng.random() < 0.5 else _invented(rng, rng.randint(2, 3))
    rec = {
        "name": name,
        "job": rng.choice(_JOBS),
        "city": city,
        "age": str(rng.randint(19, 79)),
    }
    if rng.random() < 0.5:
        rec["hobby"] = rng.choice(_HOBBIES)
    if rng.random() < 0.4:
        rec["pet"] = rng.choice(_PETS)
    return rec


def render_input(rec: dict[str, str]) -> str:
    return " | ".join(f"{key}: {value}" for key, value in rec.items())


def render_targets(rec: dict[str, str]) -> tuple[str, str]:
    canonical, paraphrase = _TEMPLATES[("hobby" in rec, "pet" in rec)]
    return canonical.format(**rec), paraphrase.format(**rec)


def generate_drop(drop: int, records: int, test_records: int) -> dict[str, list[dict[str, str]]]:
    """Rows of one data drop: train/validation pairs, and test rows with two references per input."""
    rng = random.Random(f"canaryflow-demo-drop-{drop}")
    seen: set[str] = set()

    def fresh(held_out: bool) -> dict[str, str]:
        # A duplicate input would straddle splits or inflate counts; redraw until new.
        while True:
            rec = _record(rng, held_out)
            key = render_input(rec)
            if key not in seen:
                seen.add(key)
                return rec

    n_val = max(2, records // 10)
    train = [fresh(False) for _ in range(records - n_val)]
    validation = [fresh(False) for _ in range(n_val)]
    test = [fresh(True) for _ in range(test_records)]

    def pairs(recs: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{"input": render_input(r), "target": render_targets(r)[0]} for r in recs]

    test_rows = [{"input": render_input(r), "target": target} for r in test for target in render_targets(r)]
    return {"train": pairs(train), "validation": pairs(validation), "test": test_rows}


def write_drop(root: Path, drop: int, records: int, test_records: int) -> dict[str, Path]:
    """Write drop `drop` as jsonl files under root/drop-N/ (once: a drop never changes) and return their paths."""
    folder = Path(root) / f"drop-{drop}"
    paths = {split: folder / f"{split}.jsonl" for split in ("train", "validation", "test")}
    if all(p.is_file() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in generate_drop(drop, records, test_records).items():
        tmp = paths[split].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        tmp.replace(paths[split])
    return paths
