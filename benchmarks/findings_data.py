"""Labelled English sentences for ``findings.py``: sentiment under negation, generated from templates.

Each sentence states an opinion about something with one polar word (``good``, ``awful``, ``loved``, ...),
with or without a negation (``not``, ``never``, ``n't``) in front of it. The sentiment label is the
polarity of the word flipped by the negation::

    "In my view, the soup was not awful."        -> positive (1)
    "Honestly, my sister never enjoyed the film." -> negative (0)

The four cells (positive/negative word x negated/plain) are equally frequent, so no single word predicts
the label: ``not`` appears as often in positive as in negative sentences, and every polar word appears as
often with as without a negation. A bag of words (mean-pooled embeddings at layer 0) is therefore close
to chance for a linear probe (the label is the XOR of two lexical features); a layer can only do well if
it composes the negation with the word it scopes over. ``task="negation"`` labels the same sentences by
whether they hold a negation, a lexical control that layer 0 should already solve.

Deterministic: the same ``(n, seed)`` gives the same sentences on every machine (``random.Random(seed)``,
no global state). No network, no files.

    >>> texts, labels = make_dataset(n=8, seed=0)
    >>> len(texts), sorted(set(labels))
    (8, [0, 1])
"""

from __future__ import annotations

import random

__all__ = ["TASKS", "make_dataset"]

TASKS = ("sentiment", "negation")

SUBJECT_THINGS = [
    "the film", "the movie", "the soup", "the hotel", "the concert", "the book", "the play", "the service",
    "the pasta", "the trip", "the album", "the game", "the lecture", "the coffee", "the show", "the museum",
    "the restaurant", "the new phone", "the meal", "the weekend",
]
PEOPLE = [
    "my sister", "the critic", "my father", "our teacher", "the audience", "my neighbour", "the guests",
    "my friend", "the reviewer", "everyone I asked", "my brother", "the kids",
]
OPENERS = ["", "Honestly, ", "In my view, ", "To be fair, ", "Frankly, ", "As expected, ", "Overall, ",
           "I have to say that ", "This time ", "According to my friend, "]
ADVERBS = ["", "", "really ", "very ", "quite ", "truly ", "extremely ", "rather "]

# Adjectives after a copula: "<thing> was (not) <adverb><adjective>."
POS_ADJ = ["good", "great", "wonderful", "pleasant", "delightful", "excellent", "lovely", "enjoyable",
           "impressive", "charming"]
NEG_ADJ = ["bad", "awful", "terrible", "boring", "dreadful", "disappointing", "unpleasant", "horrible",
           "dull", "poor"]
COPULAS = [("was", "was not", "wasn't"), ("is", "is not", "isn't"), ("seemed", "did not seem", "didn't seem")]

# Verbs with a person as subject: "<person> (never|did not) <verb> <thing>."
POS_VERB = [("loved", "love"), ("enjoyed", "enjoy"), ("liked", "like"), ("praised", "praise"),
            ("admired", "admire"), ("recommended", "recommend")]
NEG_VERB = [("hated", "hate"), ("disliked", "dislike"), ("despised", "despise"), ("criticised", "criticise"),
            ("regretted", "regret"), ("complained about", "complain about")]


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentence(rng: random.Random, positive_word: bool, negated: bool) -> str:
    opener = rng.choice(OPENERS)
    if rng.random() < 0.6:
        thing = rng.choice(SUBJECT_THINGS)
        plain, full_neg, short_neg = rng.choice(COPULAS)
        copula = rng.choice([full_neg, short_neg]) if negated else plain
        adjective = rng.choice(POS_ADJ if positive_word else NEG_ADJ)
        adverb = rng.choice(ADVERBS)
        body = f"{thing} {copula} {adverb}{adjective}"
    else:
        person = rng.choice(PEOPLE)
        past, base = rng.choice(POS_VERB if positive_word else NEG_VERB)
        thing = rng.choice(SUBJECT_THINGS)
        if negated:
            verb = rng.choice([f"did not {base}", f"didn't {base}", f"never {past}"])
        else:
            verb = past
        body = f"{person} {verb} {thing}"
    text = opener + body if opener else _capitalise(body)
    return _capitalise(text) + "."


def make_dataset(n: int = 256, seed: int = 0, task: str = "sentiment") -> tuple[list[str], list[int]]:
    """``n`` sentences and their labels (0/1), balanced over the four (word polarity, negation) cells.

    Args:
        n: number of sentences, a multiple of 4 (rounded down otherwise, at least 4).
        seed: fixes the sentences and their order.
        task: ``"sentiment"`` (1 = positive opinion: polar word XOR negation) or ``"negation"`` (1 = the
            sentence holds a negation; the lexical control).

    Returns:
        ``(texts, labels)``; the sentences are distinct where the templates allow it.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    per_cell = max(1, n // 4)
    rng = random.Random(seed)
    cells = [(pos, neg) for pos in (True, False) for neg in (False, True)]
    items: list[tuple[str, bool, bool]] = []
    seen: set[str] = set()
    for positive_word, negated in cells:
        made, attempts = 0, 0
        while made < per_cell:
            text = _sentence(rng, positive_word, negated)
            attempts += 1
            if text in seen and attempts < 50 * per_cell:
                continue
            seen.add(text)
            items.append((text, positive_word, negated))
            made += 1
    rng.shuffle(items)
    texts = [text for text, _, _ in items]
    if task == "sentiment":
        labels = [int(positive_word != negated) for _, positive_word, negated in items]
    else:
        labels = [int(negated) for _, _, negated in items]
    return texts, labels


if __name__ == "__main__":  # pragma: no cover - a quick look at the data
    texts, labels = make_dataset(16)
    for text, label in zip(texts, labels):
        print(label, text)
