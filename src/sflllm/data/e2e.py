"""E2E NLG examples: meaning representation (MR) -> sentence.

Sources: a local CSV with columns ``mr,ref`` (the official E2E files), a local JSONL with text
``{"context", "completion"}`` rows (the Split_LoRA "formatted" files), or a Hugging Face hub
dataset (``"tuetschek/e2e_nlg"`` (formerly ``"e2e_nlg"``), ``"GEM/e2e_nlg"``, optionally ``"name:split"``), plus a built-in synthetic
E2E-style generator for offline demos and tests.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sflllm.files import local_data_file

#: The eight E2E slots, in the order the official MRs list them.
E2E_SLOTS: tuple[str, ...] = (
    "name",
    "eatType",
    "food",
    "priceRange",
    "customer rating",
    "area",
    "familyFriendly",
    "near",
)

# Slot names of the Split_LoRA "formatted" JSONL context ("name : X | Type : pub | ...").
_SPLIT_LORA_SLOTS = {
    "name": "name",
    "Type": "eatType",
    "food": "food",
    "price": "priceRange",
    "customer rating": "customer rating",
    "area": "area",
    "family friendly": "familyFriendly",
    "near": "near",
}

_MR_PAIR = re.compile(r"\s*([^,\[\]]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


@dataclass(frozen=True)
class Example:
    """One E2E row: a meaning representation and one human reference sentence."""

    mr: str
    ref: str


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace (spaces, tabs, newlines) to one space and strip the ends."""
    return " ".join(text.split())


def parse_mr(mr: str) -> dict[str, str]:
    """Slots of an E2E MR ``"name[The Vaults], eatType[pub], ..."`` as ``{slot: value}``.

    Text that is not of the form ``slot[value]`` is ignored (so a free-form MR parses to ``{}``).
    """
    return {m.group(1): m.group(2).strip() for m in _MR_PAIR.finditer(mr)}


def format_mr(slots: dict[str, str]) -> str:
    """The official E2E MR string for ``slots`` (E2E slot order first, then any others)."""
    order = [s for s in E2E_SLOTS if s in slots] + [s for s in slots if s not in E2E_SLOTS]
    return ", ".join(f"{slot}[{slots[slot]}]" for slot in order)


def _split_lora_context_to_mr(context: str) -> str:
    """``"name : Alimentum | family friendly : no"`` -> ``"name[Alimentum], familyFriendly[no]"``.

    The Split_LoRA JSONL files use this other MR syntax for the same E2E data; converting it lets
    MR grouping and attribute partitions treat both sources alike. A context that is not in that
    syntax is returned unchanged (it is still a valid prompt, only without parsed slots).
    """
    slots: dict[str, str] = {}
    for part in context.split(" | "):
        key, sep, value = part.partition(" : ")
        if not sep or key.strip() not in _SPLIT_LORA_SLOTS:
            return context
        slots[_SPLIT_LORA_SLOTS[key.strip()]] = value.strip()
    return format_mr(slots)


def _make_example(mr: object, ref: object, where: str) -> Example:
    if not isinstance(mr, str) or not isinstance(ref, str):
        raise ValueError(f"{where}: mr and ref must be text, got {type(mr).__name__} and {type(ref).__name__}")
    mr, ref = normalize_whitespace(mr), normalize_whitespace(ref)
    if not mr or not ref:
        raise ValueError(f"{where}: empty {'mr' if not mr else 'ref'}")
    return Example(mr=mr, ref=ref)


def _load_csv(path: Path) -> list[Example]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty file; an E2E CSV needs a header line 'mr,ref' and rows")
        columns = {c.strip().lower(): c for c in reader.fieldnames}
        missing = [c for c in ("mr", "ref") if c not in columns]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing} (found {reader.fieldnames}); "
                "an E2E CSV needs 'mr' and 'ref' (a file with only MRs has no references)"
            )
        return [
            _make_example(row[columns["mr"]], row[columns["ref"]], f"{path}, line {reader.line_num}")
            for row in reader
        ]


def _load_jsonl(path: Path) -> list[Example]:
    examples = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not {"context", "completion"} <= row.keys():
                raise ValueError(f"{where}: expected an object with 'context' and 'completion'")
            context, completion = row["context"], row["completion"]
            if not isinstance(context, str) or not isinstance(completion, str):
                raise ValueError(
                    f"{where}: 'context' and 'completion' must be text, got "
                    f"{type(context).__name__} and {type(completion).__name__} "
                    "(token-id files such as split_lora/valid.jsonl are tokenizer-specific; "
                    "use the *_formatted.jsonl text files)"
                )
            examples.append(_make_example(_split_lora_context_to_mr(context), completion, where))
    return examples


def _hub_rows_to_examples(rows, source: str) -> list[Example]:
    """Examples from hub rows: ``meaning_representation`` plus ``human_reference`` (e2e_nlg) or
    ``target`` (GEM/e2e_nlg)."""
    columns = set(rows.column_names)
    ref_column = next((c for c in ("human_reference", "target") if c in columns), None)
    if "meaning_representation" not in columns or ref_column is None:
        raise ValueError(
            f"hub dataset {source!r}: expected columns 'meaning_representation' and "
            f"'human_reference' or 'target', found {sorted(columns)}"
        )
    return [
        _make_example(mr, ref, f"{source}, row {i}")
        for i, (mr, ref) in enumerate(zip(rows["meaning_representation"], rows[ref_column]))
    ]


def _load_hub(source: str) -> list[Example]:  # pragma: no cover - needs the network
    import datasets

    from sflllm.model.load import hub_warnings_silenced

    name, _, split = source.partition(":")
    try:
        with hub_warnings_silenced():  # one line per failed HTTP attempt otherwise; the error says it once
            rows = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types (offline, unknown name, ...)
        raise ValueError(
            f"could not load {source!r} as a local .csv/.jsonl file or a Hugging Face hub dataset: {e}"
        ) from e
    return _hub_rows_to_examples(rows, source)


def load_examples(source: str | Path) -> list[Example]:
    """Load E2E examples, whitespace-normalised, in file order.

    ``source`` is a local ``.csv`` (columns ``mr,ref``, case-insensitive), a local ``.jsonl`` with
    text ``context``/``completion`` (Split_LoRA MR syntax is converted to the E2E syntax), or a
    Hugging Face hub dataset name with an optional split (``"e2e_nlg:validation"``; default
    ``train``). A path that ends in .csv/.jsonl or exists locally never falls back to the hub.
    """
    path = local_data_file(source)
    if path is not None:
        if not path.exists():
            raise FileNotFoundError(f"E2E data file not found: {path}")
        if not path.is_file():
            raise ValueError(f"{path}: not a file (expected an E2E .csv or .jsonl file)")
        if path.suffix.lower() == ".csv":
            examples = _load_csv(path)
        elif path.suffix.lower() == ".jsonl":
            examples = _load_jsonl(path)
        else:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r} (expected .csv or .jsonl)")
        if not examples:
            raise ValueError(f"{path}: no examples")
        return examples
    return _load_hub(str(source))


# ---------------------------------------------------------------------------------------------
# Built-in synthetic E2E-style generator
# ---------------------------------------------------------------------------------------------

SLOT_VALUES: dict[str, tuple[str, ...]] = {
    "name": (
        "The Vaults", "Blue Spice", "Alimentum", "The Eagle", "Cotto", "Zizzi", "Aromi",
        "The Wrestlers", "Fitzbillies", "Green Man", "The Phoenix", "Loch Fyne",
    ),
    "eatType": ("pub", "coffee shop", "restaurant"),
    "food": ("English", "Italian", "French", "Chinese", "Indian", "Japanese", "Fast food"),
    "priceRange": ("cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"),
    "customer rating": ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"),
    "area": ("city centre", "riverside"),
    "familyFriendly": ("yes", "no"),
    "near": (
        "Café Adriatic", "The Bakers", "Burger King", "Crowne Plaza Hotel", "Raja Indian Cuisine",
        "All Bar One", "The Portland Arms", "Clare Hall",
    ),
}

# Realisations per slot; "{v}" is the slot value. A sentence is an opening clause naming the
# venue (with eatType when present), then optional food / location phrases, then one short
# sentence per remaining slot.
_OPENINGS = (
    "{name} is a {eatType}",
    "There is a {eatType} called {name}",
    "{name} is a {eatType} venue",
)
_FOOD = ("serving {v}", "that serves {v}", "offering {v}")  # v: "Italian food", "Fast food"
_AREA = ("in the {v}", "located in the {v}", "in the {v} area")
_NEAR = ("near {v}", "close to {v}")
_PRICE = ("Its price range is {v}.", "Prices are {v}.")
_RATING = ("It has a {v} customer rating.", "Customers rate it {v}.")
_FAMILY = {
    "yes": ("It is family-friendly.", "It is kid friendly.", "Children are welcome."),
    "no": ("It is not family-friendly.", "It is not kid friendly.", "Children are not welcome."),
}


def synthetic_phrases() -> list[str]:
    """Every template string the generator uses, with ``{...}`` placeholders (for vocabularies)."""
    phrases = [*_OPENINGS, *_FOOD, *_AREA, *_NEAR, *_PRICE, *_RATING]
    return phrases + [p for options in _FAMILY.values() for p in options]


def food_phrase(food: str) -> str:
    """How a sentence names the food slot: "Italian" -> "Italian food", "Fast food" unchanged."""
    return food if food.endswith("food") else f"{food} food"


def _realise(slots: dict[str, str], rng: np.random.Generator) -> str:
    """One templated sentence for the MR ``slots``."""

    def pick(options: tuple[str, ...]) -> str:
        return options[rng.integers(len(options))]

    clause = pick(_OPENINGS).format(name=slots["name"], eatType=slots.get("eatType", "place"))
    if "food" in slots:
        clause += " " + pick(_FOOD).format(v=food_phrase(slots["food"]))
    for slot, options in (("area", _AREA), ("near", _NEAR)):
        if slot in slots:
            clause += " " + pick(options).format(v=slots[slot])
    sentences = [clause + "."]
    for slot, options in (("priceRange", _PRICE), ("customer rating", _RATING)):
        if slot in slots:
            sentences.append(pick(options).format(v=slots[slot]))
    if "familyFriendly" in slots:
        sentences.append(pick(_FAMILY[slots["familyFriendly"]]))
    return " ".join(sentences)


def synthetic_examples(n: int, seed: int) -> list[Example]:
    """``n`` E2E-style examples drawn deterministically from ``seed``.

    Each MR has ``name`` plus a random subset of 2-7 of the other seven slots (as in E2E, 3-8
    slots), written in the official ``"name[X], eatType[Y], ..."`` syntax, and gets 1-4 references,
    each an independent draw of the templates (E2E has several references per MR); rows of one MR
    are consecutive.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    others = E2E_SLOTS[1:]
    examples: list[Example] = []
    while len(examples) < n:
        chosen = rng.choice(len(others), size=rng.integers(2, len(others) + 1), replace=False)
        slots = {"name": SLOT_VALUES["name"][rng.integers(len(SLOT_VALUES["name"]))]}
        for i in sorted(chosen):
            values = SLOT_VALUES[others[i]]
            slots[others[i]] = values[rng.integers(len(values))]
        mr = format_mr(slots)
        for _ in range(rng.integers(1, 5)):
            examples.append(Example(mr=mr, ref=_realise(slots, rng)))
    return examples[:n]
