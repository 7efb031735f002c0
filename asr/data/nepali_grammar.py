"""A small grammar of everyday Nepali sentences, so the built-in corpus has real word order.

Nepali is subject-object-verb, postpositions follow their noun (`घरमा` "in the house"), and the
verb agrees with its subject in person, number and honorific level (म खान्छु, तिमी खान्छौ, ऊ
खान्छ, हामी खान्छौं, उनीहरू खान्छन्, उहाँ खानुहुन्छ). Each verb takes only objects it can take
(one eats food, reads books), so a word n-gram model trained on these sentences learns
something a character model does not: which words follow which.

The lexicon and the templates were written for this project (no third-party text is shipped);
they are covered by the project's own terms. Present habitual tense only; third-person singular
subjects are masculine or honorific so that no feminine agreement (-छे/-छिन्) is needed.
"""

from __future__ import annotations

import numpy as np

# subject → agreement class: 1s 2s 3s 1p 3p hon
SUBJECTS = {
    "म": "1s",
    "तिमी": "2s",
    "हामी": "1p",
    "ऊ": "3s",
    "उनीहरू": "3p",
    "उहाँ": "hon",
    "केटा": "3s",
    "भाइ": "3s",
    "छोरा": "3s",
    "किसान": "3s",
    "साथी": "3s",
    "व्यापारी": "3s",
    "केटाहरू": "3p",
    "साथीहरू": "3p",
    "विद्यार्थीहरू": "3p",
    "किसानहरू": "3p",
    "आमा": "hon",
    "बुबा": "hon",
    "हजुरआमा": "hon",
    "हजुरबुबा": "hon",
    "शिक्षक": "hon",
    "डाक्टर": "hon",
}
POSSESSIVE = {"म": "मेरो", "तिमी": "तिम्रो", "हामी": "हाम्रो", "ऊ": "उसको", "उहाँ": "उहाँको", "उनीहरू": "उनीहरूको"}
ENDINGS = {"1s": "छु", "2s": "छौ", "3s": "छ", "1p": "छौं", "3p": "छन्"}


def conjugate(stem: str, person: str) -> str:
    """Present habitual: पढ् → पढ्छु … पढ्नुहुन्छ; खा → खान्छु … खानुहुन्छ; आउ → आउँछु … आउनुहुन्छ."""
    if person == "hon":
        return stem + "नुहुन्छ"
    if stem.endswith("्"):
        return stem + ENDINGS[person]
    joint = "ँ" if stem.endswith("उ") and len(stem) > 1 else "न्"  # आउँछ, पिउँछ; but धुन्छ, खान्छ
    return stem + joint + ENDINGS[person]


FOOD = ["भात", "दाल", "तरकारी", "रोटी", "माछा", "मासु", "फलफूल", "स्याउ", "केरा", "आँप", "अण्डा"]
DRINK = ["पानी", "दूध", "चिया", "कफी", "जुस"]
READING = ["किताब", "पत्रिका", "समाचार", "चिठी", "कथा"]
WRITING = ["चिठी", "कथा", "गीत", "नाम", "उत्तर", "कविता"]
GOODS = ["किताब", "कलम", "कापी", "लुगा", "जुत्ता", "टोपी", "साइकल", "फोन", "झोला", "छाता"]
ANIMALS = ["गाई", "भैंसी", "बाख्रा", "कुखुरा", "घोडा"]
SIGHTS = ["हिमाल", "चरा", "टेलिभिजन", "नाच", "खेल", "आकाश", "तारा", "फिल्म", "तस्बिर"]
WASHING = ["लुगा", "भाँडा", "हात", "मुख", "गाडी"]
DESTINATIONS = [
    "घर",
    "गाउँ",
    "सहर",
    "बजार",
    "विद्यालय",
    "कलेज",
    "अस्पताल",
    "कार्यालय",
    "मन्दिर",
    "खेत",
    "पोखरा",
    "काठमाडौं",
    "जङ्गल",
    "पसल",
]
PLACES = [
    "घरमा",
    "गाउँमा",
    "सहरमा",
    "बजारमा",
    "भान्सामा",
    "कोठामा",
    "बगैंचामा",
    "विद्यालयमा",
    "कार्यालयमा",
    "खेतमा",
    "चौरमा",
    "पसलमा",
]
TIMES = ["आज", "भोलि", "बिहान", "दिउँसो", "साँझ", "राति", "सधैं", "कहिलेकाहीं", "अहिले", "हरेक दिन", "शनिबार", "बिदामा"]
FOOD_ADJ = ["मीठो", "तातो", "ताजा", "धेरै", "थोरै", "अलिकति"]
GOODS_ADJ = ["नयाँ", "पुरानो", "राम्रो", "सस्तो", "महँगो", "सानो", "ठूलो", "एउटा"]

# verb stem → the objects it takes, and the adjectives those objects may carry
TRANSITIVE = {
    "खा": (FOOD, FOOD_ADJ),
    "पिउ": (DRINK, FOOD_ADJ[:3] + ["चिसो"]),
    "पकाउ": (FOOD, FOOD_ADJ),
    "पढ्": (READING, ["नयाँ", "पुरानो", "राम्रो"]),
    "लेख्": (WRITING, ["छोटो", "लामो", "राम्रो"]),
    "किन्": (FOOD + GOODS + ANIMALS, GOODS_ADJ),
    "बेच्": (FOOD + GOODS + ANIMALS, GOODS_ADJ),
    "हेर्": (SIGHTS, ["राम्रो", "सुन्दर", "नयाँ"]),
    "धु": (WASHING, ["फोहोर", "मैलो"]),
    "गाउ": (["गीत", "भजन"], ["नेपाली", "पुरानो", "नयाँ"]),
    "सिक्": (["भाषा", "गीत", "नाच", "गणित", "अङ्ग्रेजी"], ["नयाँ"]),
    "खेल्": (["फुटबल", "क्रिकेट", "चेस", "लुकामारी"], []),
    "पाल्": (ANIMALS, ["धेरै", "दुईवटा", "तीनवटा"]),
}
MOTION = ["जा", "आउ", "फर्क्"]  # take a destination without a postposition: म बजार जान्छु
STAY = ["बस्", "काम गर्", "पढ्", "खेल्", "सुत्"]  # take a place with मा: हामी घरमा बस्छौं
QUESTION = ["कहाँ", "कहिले", "किन"]

DESCRIBED = {  # noun → what can be said of it (… राम्रो छ)
    "घर": ["ठूलो", "सानो", "नयाँ", "पुरानो", "सफा", "राम्रो"],
    "गाउँ": ["सुन्दर", "सानो", "टाढा", "नजिक", "शान्त"],
    "चिया": ["तातो", "चिसो", "मीठो"],
    "खाना": ["मीठो", "तातो", "पिरो"],
    "किताब": ["नयाँ", "पुरानो", "बाक्लो", "राम्रो"],
    "बाटो": ["लामो", "छोटो", "साँघुरो", "फराकिलो", "राम्रो"],
    "कोठा": ["सफा", "फोहोर", "ठूलो", "सानो"],
    "साथी": ["असल", "खुसी", "बिरामी", "व्यस्त"],
    "मौसम": ["राम्रो", "चिसो", "तातो", "सफा"],
}
COUNTED = {  # place → what there is a lot or a little of there
    "गाउँमा": ["गाई", "घर", "खेत", "मान्छे"],
    "बजारमा": ["पसल", "मान्छे", "गाडी", "फलफूल"],
    "आकाशमा": ["तारा", "बादल", "चरा"],
    "जङ्गलमा": ["रुख", "बाघ", "चरा"],
    "कोठामा": ["किताब", "कुर्सी", "मान्छे"],
    "बगैंचामा": ["फूल", "रुख", "चरा"],
    "नदीमा": ["माछा", "ढुङ्गा", "डुङ्गा"],
}


def _maybe(rng, words: list[str], p: float = 0.5) -> list[str]:
    return [str(rng.choice(words))] if words and rng.random() < p else []


def sentence(rng: np.random.Generator) -> str:
    """One sentence from a randomly chosen template; every choice comes from `rng`."""
    subject = str(rng.choice(list(SUBJECTS)))
    person = SUBJECTS[subject]
    kind = rng.choice(["transitive", "transitive", "transitive", "motion", "stay", "question", "describe", "count"])
    if kind == "transitive":
        stem = str(rng.choice(list(TRANSITIVE)))
        objects, adjectives = TRANSITIVE[stem]
        words = [
            subject,
            *_maybe(rng, TIMES),
            *_maybe(rng, PLACES, 0.3),
            *_maybe(rng, adjectives, 0.4),
            str(rng.choice(objects)),
        ]
    elif kind == "motion":
        stem = str(rng.choice(MOTION))
        words = [subject, *_maybe(rng, TIMES, 0.7), str(rng.choice(DESTINATIONS))]
    elif kind == "stay":
        stem = str(rng.choice(STAY))
        words = [subject, *_maybe(rng, TIMES, 0.7), str(rng.choice(PLACES))]
    elif kind == "question":
        stem = str(rng.choice(MOTION + STAY))
        words = [subject, *_maybe(rng, TIMES, 0.5), str(rng.choice(QUESTION))]
    elif kind == "describe":
        owner = str(rng.choice([*POSSESSIVE.values(), "यो", "त्यो"]))
        noun = str(rng.choice(list(DESCRIBED)))
        return " ".join([owner, noun, *_maybe(rng, ["धेरै", "साँच्चै", "अलि"], 0.3), str(rng.choice(DESCRIBED[noun])), "छ"])
    else:
        place = str(rng.choice(list(COUNTED)))
        return " ".join([place, str(rng.choice(["धेरै", "थोरै", "केही", "अलिकति"])), str(rng.choice(COUNTED[place])), "छन्"])
    return " ".join([*words, *(conjugate(part, person) if part == stem.split()[-1] else part for part in stem.split())])
