"""Text front-end for English and Russian: symbol table, normalisation and encoding.

The model only ever sees ids from ``SYMBOLS``. Everything else a sentence may contain
(digits, accents, typographic quotes, currency signs, other scripts) is either spelled
out or folded onto the table here, and whatever cannot be is reported in ``unknown`` and
logged rather than vanishing silently: a corpus full of dropped characters is a corpus
whose transcripts no longer match its audio.
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Literal

from num2words import num2words
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

Language = Literal["en", "ru"]

# --- Symbol table. The order IS the id assignment: append new symbols at the end only, or
# every trained checkpoint's embedding rows stop meaning what they meant.
PAD = "_"
EOS = "~"
PUNCTUATION = " !'(),-.:;?\""
LATIN = "abcdefghijklmnopqrstuvwxyz"
CYRILLIC = "абвгдежзийклмнопрстуфхцчшщъыьэюяё"
# Lexical stress, written before the stressed vowel as Russian TTS corpora do ("вол+ос").
# Appended last: tables without it (73 symbols) are still a prefix of this one.
STRESS = "+"

SYMBOLS: tuple[str, ...] = (PAD, EOS, *PUNCTUATION, *LATIN, *CYRILLIC, STRESS)
PAD_ID = 0
EOS_ID = 1
N_SYMBOLS = len(SYMBOLS)

STRESS_ID = SYMBOLS.index(STRESS)
# The table before the stress symbol: checkpoints trained with it know no stress.
N_SYMBOLS_WITHOUT_STRESS = STRESS_ID

_SYMBOL_TO_ID: dict[str, int] = {symbol: index for index, symbol in enumerate(SYMBOLS)}
# PAD and EOS are in the table but are not text: a "~" or "_" in the input is unknown.
# STRESS is not either: a literal "+" in text is a sign, spoken ("2 + 2").
_TEXT_SYMBOLS = frozenset(PUNCTUATION + LATIN + CYRILLIC)
_CYRILLIC_LETTER = re.compile(r"[а-яё]", re.IGNORECASE)

# --- Stress marks. "+" directly before a Cyrillic vowel, or a combining acute (U+0301)
# directly after one, marks stress; both become one private-use placeholder before the
# vowel, which no later step reads as a sign, folds away or counts as unknown.
_STRESS_MARK = "\ue000"
_RU_VOWELS = "аеёиоуыэюяАЕЁИОУЫЭЮЯ"
_PLUS_STRESS = re.compile(rf"\+(?=[{_RU_VOWELS}])")
_ACUTE_STRESS = re.compile(rf"([{_RU_VOWELS}])\u0301")

# --- Character folding, applied before anything else.
# Typographic quotes and dashes map onto the table's ASCII ones.
_CHAR_MAP: dict[str, str] = {
    "«": '"', "»": '"', "“": '"', "”": '"', "„": '"', "‟": '"', "″": '"',
    "‘": "'", "’": "'", "‚": "'", "‛": "'", "′": "'", "`": "'",
    "—": "-", "–": "-", "‒": "-", "―": "-", "‐": "-", "‑": "-", "−": "-",
    "[": "(", "]": ")", "{": "(", "}": ")",
    "/": " ",
    # Letters that Unicode does not decompose but that have an obvious ASCII reading.
    "ß": "ss", "ẞ": "ss", "æ": "ae", "Æ": "ae", "œ": "oe", "Œ": "oe",
    "ø": "o", "Ø": "o", "ł": "l", "Ł": "l", "đ": "d", "Đ": "d",
}
# Signs spelled out later; NFKD would otherwise turn "№" into "No".
_SPOKEN_SIGNS = frozenset("%&+=@№$€£₽°")

# --- Number reading.
# num2words' Russian tables end at 10**36 and huge numbers are never spoken as such;
# longer digit runs (and codes with leading zeros such as "007") are read digit by digit.
_MAX_CARDINAL_DIGITS = 15
# Russian fractions past thousandths ("три целых ... стомиллионных") are not how people
# read them; longer fractions are read digit by digit after "запятая".
_MAX_RU_FRACTION_DIGITS = 3


def _number_pattern(decimal_marks: str, ordinal_suffix: str) -> re.Pattern[str]:
    return re.compile(
        r"(?P<pre>[$€£₽]\s?)?"
        r"(?P<neg>(?<![\w)])-)?"
        r"(?<![0-9])(?P<int>[0-9]+)"
        rf"(?:[{decimal_marks}](?P<frac>[0-9]+))?"
        rf"(?P<ord>{ordinal_suffix})?"
        r"(?P<post>\s?[%$€£₽°])?",
        re.IGNORECASE,
    )


# English writes "3,5" only in lists; Russian writes decimals with either mark.
_NUMBER: dict[str, re.Pattern[str]] = {
    "en": _number_pattern(".", r"(?:st|nd|rd|th)\b"),
    "ru": _number_pattern(".,", r"-?(?:й|ый|ий|ой)\b"),
}
# A hyphen between numbers is a range; left as "-" it would glue "ninety" to "two thousand".
_NUMBER_RANGE = re.compile(r"(?<=[0-9])\s?-\s?(?=[0-9])")
_RANGE_WORD = {"en": " to ", "ru": " - "}
_EN_THOUSANDS = re.compile(r"(?<![0-9.,])[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])")

# Unit words per language: singular, and plural (English) or the three Russian plural
# forms (1 / 2-4 / 5+), the second of which also follows fractions.
_UNITS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "%": ("percent", "percent"),
        "$": ("dollar", "dollars"),
        "€": ("euro", "euros"),
        "£": ("pound", "pounds"),
        "₽": ("rouble", "roubles"),
        "°": ("degree", "degrees"),
    },
    "ru": {
        "%": ("процент", "процента", "процентов"),
        "$": ("доллар", "доллара", "долларов"),
        "€": ("евро", "евро", "евро"),
        "£": ("фунт", "фунта", "фунтов"),
        "₽": ("рубль", "рубля", "рублей"),
        "°": ("градус", "градуса", "градусов"),
    },
}
# Signs standing alone, not next to a number.
_SIGN_WORDS: dict[str, dict[str, str]] = {
    "en": {"%": "percent", "&": "and", "+": "plus", "=": "equals", "@": "at",
           "№": "number", "$": "dollars", "€": "euros", "£": "pounds", "₽": "roubles",
           "°": "degrees"},
    "ru": {"%": "процентов", "&": "и", "+": "плюс", "=": "равно", "@": "собака",
           "№": "номер", "$": "долларов", "€": "евро", "£": "фунтов", "₽": "рублей",
           "°": "градусов"},
}
_DIGIT_WORDS: dict[str, tuple[str, ...]] = {
    "en": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "ru": ("ноль", "один", "два", "три", "четыре", "пять", "шесть", "семь", "восемь",
           "девять"),
}

# --- Abbreviations (matched case-insensitively, before lowercasing). Kept to the common,
# unambiguous ones: a wrong expansion is worse than none.
_ABBREVIATIONS: dict[str, list[tuple[re.Pattern[str], str]]] = {
    "en": [
        (re.compile(pattern, re.IGNORECASE), words)
        for pattern, words in [
            (r"\bmrs\.", "missus"),
            (r"\bmr\.", "mister"),
            (r"\bms\.", "miz"),
            (r"\bdr\.", "doctor"),
            (r"\bprof\.", "professor"),
            (r"\bjr\.", "junior"),
            (r"\bsr\.", "senior"),
            (r"\bvs\.", "versus"),
            (r"\betc\.", "et cetera"),
            (r"\be\.\s?g\.", "for example"),
            (r"\bi\.\s?e\.", "that is"),
        ]
    ],
    "ru": [
        (re.compile(pattern, re.IGNORECASE), words)
        for pattern, words in [
            (r"\bи\s?т\.\s?д\.", "и так далее"),
            (r"\bи\s?т\.\s?п\.", "и тому подобное"),
            (r"\bт\.\s?е\.", "то есть"),
            (r"\bт\.\s?к\.", "так как"),
            (r"\bт\.\s?н\.", "так называемый"),
            (r"\bул\.", "улица"),
            (r"\bтыс\.", "тысяч"),
            (r"\bмлн\b\.?", "миллионов"),
            (r"\bмлрд\b\.?", "миллиардов"),
            (r"\bруб\.", "рублей"),
            (r"\bкоп\.", "копеек"),
        ]
    ],
}
# "St." is "Saint" before a name ("St. Paul") and "Street" after one ("Baker St.").
_EN_SAINT = re.compile(r"\bst\.(?=\s+[A-Z])", re.IGNORECASE)
_EN_STREET = re.compile(r"\bst\.", re.IGNORECASE)

_WHITESPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.!?;:)])")

_warned_unknown: set[str] = set()
_warned_lock = threading.Lock()


class NormalizedText(BaseModel):
    """A sentence reduced to table symbols, and what could not be reduced."""

    model_config = ConfigDict(frozen=True)

    text: str
    language: Language
    # Characters removed because the table has no symbol for them: char -> count.
    unknown: dict[str, int]


class EncodedText(BaseModel):
    """Symbol ids for the model (EOS last) with the text they came from."""

    model_config = ConfigDict(frozen=True)

    ids: list[int]
    normalized: str
    language: Language
    unknown: dict[str, int]


def detect_language(text: str) -> Language:
    """``"ru"`` when the text contains any Cyrillic letter, else ``"en"``."""
    return "ru" if _CYRILLIC_LETTER.search(text) else "en"


def _fold_characters(text: str) -> str:
    """Map quotes/dashes onto the table and strip accents, keeping Cyrillic й and ё.

    NFKD would split й into и + combining breve (and ё into е + diaeresis), so letters
    the table already has are kept whole; only the others are decomposed.
    """
    out: list[str] = []
    for char in unicodedata.normalize("NFC", text):
        if char in _CHAR_MAP:
            out.append(_CHAR_MAP[char])
        elif (char in _TEXT_SYMBOLS or char.lower() in _TEXT_SYMBOLS or char in _SPOKEN_SIGNS
              or char == _STRESS_MARK):
            out.append(char)
        else:
            decomposed = unicodedata.normalize("NFKD", char)
            out.append("".join(c for c in decomposed if not unicodedata.combining(c)))
    return "".join(out)


def _expand_abbreviations(text: str, language: Language) -> str:
    def keep_final_period(words: str) -> Callable[[re.Match[str]], str]:
        # The abbreviation's period may also end the sentence: keep it there.
        def replace(match: re.Match[str]) -> str:
            at_end = not match.string[match.end():].strip()
            return words + ("." if at_end else "")

        return replace

    if language == "en":
        text = _EN_SAINT.sub("saint", text)
        text = _EN_STREET.sub(keep_final_period("street"), text)
    for pattern, words in _ABBREVIATIONS[language]:
        text = pattern.sub(keep_final_period(words), text)
    return text


def _read_digits(digits: str, language: Language) -> str:
    return " ".join(_DIGIT_WORDS[language][int(d)] for d in digits)


def _read_integer(digits: str, language: Language) -> str:
    if len(digits) > _MAX_CARDINAL_DIGITS or (len(digits) > 1 and digits.startswith("0")):
        return _read_digits(digits, language)
    return num2words(int(digits), lang=language)


def _read_decimal(whole: str, fraction: str, language: Language) -> str:
    integer = _read_integer(whole, language)
    if language == "en":
        # "three point one four": English reads the fraction digit by digit.
        return f"{integer} point {_read_digits(fraction, language)}"
    if len(whole) <= _MAX_CARDINAL_DIGITS and len(fraction) <= _MAX_RU_FRACTION_DIGITS:
        return num2words(Decimal(f"{int(whole)}.{fraction}"), lang="ru")
    return f"{integer} запятая {_read_digits(fraction, language)}"


def _unit_word(sign: str, digits: str, is_fraction: bool, language: Language) -> str:
    forms = _UNITS[language][sign]
    if language == "en":
        return forms[0] if digits.lstrip("0") == "1" and not is_fraction else forms[1]
    if is_fraction:
        return forms[1]
    last_two = int(digits[-2:])
    if last_two % 10 == 1 and last_two != 11:
        return forms[0]
    if 2 <= last_two % 10 <= 4 and not 12 <= last_two <= 14:
        return forms[1]
    return forms[2]


def _expand_numbers(text: str, language: Language) -> str:
    if language == "en":
        text = _EN_THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), text)
    text = _NUMBER_RANGE.sub(_RANGE_WORD[language], text)

    def replace(match: re.Match[str]) -> str:
        whole, fraction, suffix = match.group("int"), match.group("frac"), match.group("ord")
        is_fraction = fraction is not None
        if suffix and not is_fraction and len(whole) <= _MAX_CARDINAL_DIGITS:
            words = num2words(int(whole), lang=language, to="ordinal")
        else:
            words = (_read_decimal(whole, fraction, language) if is_fraction
                     else _read_integer(whole, language))
            # A suffix that cannot make an ordinal ("3.5th") stays as letters.
            words += f" {suffix}" if suffix else ""
        if match.group("neg"):
            words = ("minus " if language == "en" else "минус ") + words
        for sign in (match.group("pre"), match.group("post")):
            if sign:
                words += " " + _unit_word(sign.strip(), whole, is_fraction, language)
        # Space the words off only from adjacent letters ("3cats"), not from punctuation,
        # so "2nd-hand" and "(-3)" keep their shape.
        before = match.string[match.start() - 1:match.start()]
        after = match.string[match.end():match.end() + 1]
        return (" " if before.isalnum() else "") + words + (" " if after.isalnum() else "")

    return _NUMBER[language].sub(replace, text)


def _expand_signs(text: str, language: Language) -> str:
    words = _SIGN_WORDS[language]
    return "".join(f" {words[char]} " if char in words else char for char in text)


def _warn_unknown(char: str) -> None:
    with _warned_lock:
        if char in _warned_unknown:
            return
        _warned_unknown.add(char)
    log.warning("no symbol for %r (U+%04X); removing it from the text", char, ord(char))


def _mark_stress(text: str, keep: bool) -> str:
    """Turn "+" before and U+0301 after a Cyrillic vowel into the stress placeholder
    before that vowel, or drop them when ``keep`` is false; any other "+" is left alone."""
    text = unicodedata.normalize("NFC", text)
    mark = _STRESS_MARK if keep else ""
    text = _ACUTE_STRESS.sub(lambda m: mark + m.group(1), text)
    return _PLUS_STRESS.sub(mark, text)


def normalize_text(text: str, language: Literal["auto", "en", "ru"] = "auto",
                   stress: bool = True) -> NormalizedText:
    """Reduce ``text`` to the symbol table: fold accents, spell out numbers, signs and
    abbreviations in the text's language, lowercase and collapse whitespace.

    ``language="auto"`` picks Russian when the text has Cyrillic letters. Characters with
    no symbol are removed from ``text``, counted in ``unknown`` (after lowercasing) and
    logged once per process per character. Stress marks ("вол+ос", "воло\u0301с") become
    ``STRESS`` before the vowel, or are dropped with ``stress=False`` (for corpora that
    mark stress only here and there, where the model would learn it as noise).
    """
    if language not in ("auto", "en", "ru"):
        raise ValueError(f"unknown language {language!r}; use 'auto', 'en' or 'ru'")
    lang: Language = detect_language(text) if language == "auto" else language

    folded = _WHITESPACE.sub(" ", _fold_characters(_mark_stress(text, stress)))
    expanded = _expand_signs(_expand_numbers(_expand_abbreviations(folded, lang), lang), lang)
    lowered = expanded.lower()

    unknown = Counter(char for char in lowered
                      if char not in _TEXT_SYMBOLS and char != _STRESS_MARK
                      and not char.isspace())
    for char in unknown:
        _warn_unknown(char)
    kept = "".join(char if char in _TEXT_SYMBOLS else STRESS if char == _STRESS_MARK
                   else " " if char.isspace() else "" for char in lowered)
    # Expansions pad words with spaces; "five ." must read "five.".
    cleaned = _SPACE_BEFORE_PUNCT.sub(r"\1", _WHITESPACE.sub(" ", kept)).strip()
    return NormalizedText(text=cleaned, language=lang, unknown=dict(unknown))


def text_to_sequence(text: str, language: Literal["auto", "en", "ru"] = "auto",
                     stress: bool = True) -> EncodedText:
    """Normalise ``text`` and encode it as symbol ids, with ``EOS_ID`` appended."""
    normalized = normalize_text(text, language, stress)
    ids = [_SYMBOL_TO_ID[char] for char in normalized.text]
    ids.append(EOS_ID)
    return EncodedText(ids=ids, normalized=normalized.text, language=normalized.language,
                       unknown=normalized.unknown)


def sequence_to_text(ids: list[int]) -> str:
    """The text behind symbol ids, PAD and EOS dropped; raises ValueError on an id out of range."""
    chars: list[str] = []
    for symbol_id in ids:
        if not 0 <= symbol_id < N_SYMBOLS:
            raise ValueError(f"symbol id {symbol_id} out of range [0, {N_SYMBOLS})")
        if symbol_id not in (PAD_ID, EOS_ID):
            chars.append(SYMBOLS[symbol_id])
    return "".join(chars)
