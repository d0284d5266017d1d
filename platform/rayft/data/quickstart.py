"""A small instruction dataset with checkable answers, generated (no download): the quickstart
data, and sample data for users trying rayft.

Each task has short, exact answers (a capital, an antonym, a number), so "did fine-tuning help"
is a measurement: exact match on held-out prompts whose items (countries, words, numbers) never
appear in training.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Hungary": "Budapest",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "India": "New Delhi",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Cuba": "Havana",
    "Argentina": "Buenos Aires",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "Turkey": "Ankara",
    "Australia": "Canberra",
    "New Zealand": "Wellington",
    "Philippines": "Manila",
    "Indonesia": "Jakarta",
    "Czech Republic": "Prague",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Ukraine": "Kyiv",
    "Saudi Arabia": "Riyadh",
    "Morocco": "Rabat",
    "Nigeria": "Abuja",
    "Ethiopia": "Addis Ababa",
    "Switzerland": "Bern",
    "Scotland": "Edinburgh",
    "England": "London",
    "Brazil": "Brasilia",
    "Pakistan": "Islamabad",
    "Afghanistan": "Kabul",
    "Syria": "Damascus",
    "Lebanon": "Beirut",
    "Israel": "Jerusalem",
    "Jordan": "Amman",
    "Iceland": "Reykjavik",
    "Malaysia": "Kuala Lumpur",
}
ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "up": "down",
    "light": "dark",
    "open": "closed",
    "early": "late",
    "rich": "poor",
    "strong": "weak",
    "old": "young",
    "hard": "soft",
    "high": "low",
    "long": "short",
    "full": "empty",
    "wet": "dry",
    "loud": "quiet",
    "thick": "thin",
    "clean": "dirty",
    "cheap": "expensive",
    "easy": "difficult",
    "true": "false",
    "push": "pull",
    "win": "lose",
    "buy": "sell",
    "first": "last",
    "inside": "outside",
    "above": "below",
    "love": "hate",
    "friend": "enemy",
    "day": "night",
    "north": "south",
    "east": "west",
    "left": "right",
    "begin": "end",
    "asleep": "awake",
    "alive": "dead",
    "heavy": "light",
    "sweet": "sour",
    "wide": "narrow",
    "deep": "shallow",
    "brave": "cowardly",
    "polite": "rude",
    "safe": "dangerous",
    "smooth": "rough",
    "noisy": "silent",
    "arrive": "depart",
    "accept": "reject",
    "increase": "decrease",
    "entrance": "exit",
}
PLURALS = {
    "cat": "cats",
    "dog": "dogs",
    "child": "children",
    "mouse": "mice",
    "man": "men",
    "woman": "women",
    "tooth": "teeth",
    "foot": "feet",
    "goose": "geese",
    "box": "boxes",
    "bus": "buses",
    "city": "cities",
    "baby": "babies",
    "knife": "knives",
    "leaf": "leaves",
    "wolf": "wolves",
    "potato": "potatoes",
    "tomato": "tomatoes",
    "hero": "heroes",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
    "person": "people",
    "ox": "oxen",
    "cactus": "cacti",
    "church": "churches",
    "dish": "dishes",
    "glass": "glasses",
    "party": "parties",
    "story": "stories",
    "day": "days",
    "key": "keys",
    "house": "houses",
    "tree": "trees",
    "book": "books",
    "car": "cars",
    "apple": "apples",
    "life": "lives",
    "wife": "wives",
    "shelf": "shelves",
    "brush": "brushes",
    "fox": "foxes",
    "lady": "ladies",
    "toy": "toys",
    "boy": "boys",
    "girl": "girls",
    "star": "stars",
    "watch": "watches",
    "match": "matches",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
GOOD = [
    "wonderful",
    "excellent",
    "great",
    "delightful",
    "fantastic",
    "superb",
    "lovely",
    "brilliant",
    "enjoyable",
    "amazing",
    "charming",
    "outstanding",
]
BAD = [
    "terrible",
    "awful",
    "boring",
    "dreadful",
    "horrible",
    "disappointing",
    "poor",
    "dull",
    "annoying",
    "miserable",
    "bland",
    "broken",
]
THINGS = ["movie", "meal", "hotel", "book", "phone", "concert", "game", "service", "coffee", "trip"]

Example = tuple[str, str]


def _split(items: list, held_out: int, rng: random.Random) -> tuple[list, list]:
    items = list(items)
    rng.shuffle(items)
    return items[held_out:], items[:held_out]


def _tasks(rng: random.Random) -> dict[str, tuple[list[Example], list[Example]]]:
    """Per task: (train examples, held-out examples) over disjoint items."""
    tasks: dict[str, tuple[list[Example], list[Example]]] = {}

    def from_table(table: dict[str, str], held_out: int, phrasings: list[str]) -> tuple[list[Example], list[Example]]:
        train_keys, eval_keys = _split(sorted(table), held_out, rng)
        train = [(phrase.format(k), table[k]) for k in train_keys for phrase in phrasings]
        evals = [(rng.choice(phrasings).format(k), table[k]) for k in eval_keys]
        return train, evals

    tasks["capital"] = from_table(CAPITALS, 14, ["What is the capital of {}?", "Name the capital city of {}."])
    tasks["antonym"] = from_table(ANTONYMS, 12, ["What is the opposite of '{}'?", "Give an antonym of '{}'."])
    tasks["plural"] = from_table(PLURALS, 10, ["What is the plural of '{}'?", "Write the plural form of '{}'."])
    sequences = {f"the day after {d}": DAYS[(i + 1) % 7] for i, d in enumerate(DAYS)}
    sequences.update({f"the month after {m}": MONTHS[(i + 1) % 12] for i, m in enumerate(MONTHS)})
    sequences.update({f"the letter after {chr(65 + i)}": chr(66 + i) for i in range(25)})
    tasks["next"] = from_table(sequences, 10, ["What is {}?", "Which comes next: {}?"])

    def numbers(make: Callable[[], Example], n_train: int, n_eval: int) -> tuple[list[Example], list[Example]]:
        seen: set[str] = set()
        pool: list[Example] = []
        while len(pool) < n_train + n_eval:
            example = make()
            if example[0] not in seen:
                seen.add(example[0])
                pool.append(example)
        return pool[:n_train], pool[n_train:]

    def larger() -> Example:
        a, b = rng.sample(range(10, 100), 2)
        return f"Which number is larger: {a} or {b}?", str(max(a, b))

    def plus() -> Example:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return f"What is {a} plus {b}?", str(a + b)

    def review() -> Example:
        good = rng.random() < 0.5
        word = rng.choice(GOOD if good else BAD)
        return (
            f'Is this review positive or negative? "The {rng.choice(THINGS)} was {word}."',
            "positive" if good else "negative",
        )

    tasks["larger"] = numbers(larger, 120, 12)
    tasks["plus"] = numbers(plus, 150, 12)
    tasks["sentiment"] = numbers(review, 120, 12)
    return tasks


def generate(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval) records in OpenAI messages format, shuffled, deterministic for a seed."""
    rng = random.Random(seed)
    train, evals = [], []
    for task, (task_train, task_eval) in _tasks(rng).items():
        train += [_record(q, a, task) for q, a in task_train]
        evals += [_record(q, a, task) for q, a in task_eval]
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals


def _record(question: str, answer: str, task: str) -> dict:
    return {"task": task, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write(directory: str | Path, seed: int = 0) -> dict[str, int]:
    """Write train.jsonl and eval.jsonl: how data/quickstart/ was made."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, records in zip(("train", "eval"), generate(seed)):
        with open(directory / f"{name}.jsonl", "w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        counts[name] = len(records)
    return counts


if __name__ == "__main__":  # python -m rayft.data.quickstart data/quickstart
    import sys

    print(write(sys.argv[1] if len(sys.argv) > 1 else "data/quickstart"))
