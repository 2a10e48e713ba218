"""Text front-end: symbol table, normalisation in both languages, encoding."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.trainer.text import (
    EOS,
    EOS_ID,
    N_SYMBOLS,
    N_SYMBOLS_WITHOUT_STRESS,
    PAD,
    PAD_ID,
    STRESS_ID,
    SYMBOLS,
    detect_language,
    normalize_text,
    sequence_to_text,
    text_to_sequence,
)


def test_symbol_ids_are_stable_and_unique() -> None:
    assert len(set(SYMBOLS)) == len(SYMBOLS) == N_SYMBOLS
    assert SYMBOLS[PAD_ID] == PAD == "_"
    assert SYMBOLS[EOS_ID] == EOS == "~"
    # Pinned order: a change here invalidates every trained checkpoint's embedding rows.
    assert "".join(SYMBOLS) == (
        "_~ !'(),-.:;?\"abcdefghijklmnopqrstuvwxyz"
        "абвгдежзийклмнопрстуфхцчшщъыьэюяё+"
    )
    assert (SYMBOLS.index(" "), SYMBOLS.index("a"), SYMBOLS.index("а")) == (2, 14, 40)
    # The stress symbol was appended: the table without it is the old one, unchanged.
    assert SYMBOLS.index("ё") == 72
    assert STRESS_ID == N_SYMBOLS_WITHOUT_STRESS == N_SYMBOLS - 1 == 73
    assert all(len(symbol) == 1 for symbol in SYMBOLS)


def test_detect_language() -> None:
    assert detect_language("Hello there") == "en"
    assert detect_language("Привет") == "ru"
    assert detect_language("Ёж") == "ru"
    assert detect_language("123") == "en"


def test_cyrillic_kept_including_yo_and_short_i() -> None:
    result = normalize_text("Ёжик и Йошкар-Ола: ещё чуть-чуть!")
    assert result.text == "ёжик и йошкар-ола: ещё чуть-чуть!"
    assert result.language == "ru"
    assert result.unknown == {}


def test_decomposed_cyrillic_is_recomposed() -> None:
    # и + combining breve and е + combining diaeresis are й and ё, not и and е.
    assert normalize_text("мои\u0306 е\u0308ж").text == "мой ёж"


@pytest.mark.parametrize(("raw", "expected"), [
    ("вол+ос", "вол+ос"),
    ("+Окна", "+окна"),
    ("дом+ой", "дом+ой"),
    ("Д+Ом", "д+ом"),
    ("за\u0301мок", "з+амок"),   # acute after the vowel: moved before it
    ("зам+ок и за\u0301мок", "зам+ок и з+амок"),
    ("+ёлка", "+ёлка"),
])
def test_russian_stress_marks_are_kept_as_the_stress_symbol(raw: str, expected: str) -> None:
    result = normalize_text(raw)
    assert result.text == expected
    assert "плюс" not in result.text
    assert result.unknown == {}
    ids = text_to_sequence(raw).ids
    assert ids.count(STRESS_ID) == expected.count("+")
    assert ids[ids.index(STRESS_ID) + 1] == SYMBOLS.index(expected[expected.index("+") + 1])


@pytest.mark.parametrize(("raw", "expected"), [
    ("2 + 2", "два плюс два"),
    ("2+2", "два плюс два"),
    ("цена +", "цена плюс"),
    ("+7", "плюс семь"),
    ("C++ и Java", "c плюс плюс и java"),
])
def test_a_real_plus_is_still_spoken(raw: str, expected: str) -> None:
    assert normalize_text(raw, "ru").text == expected


def test_english_plus_is_spoken_and_latin_vowels_take_no_stress() -> None:
    assert normalize_text("2 + 2").text == "two plus two"
    assert normalize_text("a +a").text == "a plus a"


def test_stress_marks_can_be_dropped_for_partly_marked_corpora() -> None:
    assert normalize_text("вол+ос и за\u0301мок", stress=False).text == "волос и замок"
    assert STRESS_ID not in text_to_sequence("вол+ос", stress=False).ids
    # Dropping stress never turns a real plus into nothing.
    assert normalize_text("2 + 2", "ru", stress=False).text == "два плюс два"


def test_yo_is_kept_with_and_without_stress() -> None:
    assert normalize_text("ещё вс+ё").text == "ещё вс+ё"
    assert normalize_text("е\u0308ж").text == "ёж"


def test_accents_folded_to_base_letters() -> None:
    result = normalize_text("Café naïve résumé Ångström Straße")
    assert result.text == "cafe naive resume angstrom strasse"
    assert result.unknown == {}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("I have 3 cats", "i have three cats"),
        ("It costs 3.5 dollars", "it costs three point five dollars"),
        ("the 1st and 2nd and 23rd", "the first and second and twenty-third"),
        ("It was -5 degrees", "it was minus five degrees"),
        ("1,000 people", "one thousand people"),
        ("About 40% of us", "about forty percent of us"),
        ("He paid $12 and $1", "he paid twelve dollars and one dollar"),
        ("Tom & Jerry + Spike", "tom and jerry plus spike"),
        ("Mr. Smith met Dr. Brown", "mister smith met doctor brown"),
        ("Visit St. Paul on Baker St.", "visit saint paul on baker street."),
        ("pages 5-7", "pages five to seven"),
        ("It was -5° and 1°", "it was minus five degrees and one degree"),
    ],
)
def test_english_normalisation(raw: str, expected: str) -> None:
    assert normalize_text(raw).text == expected


def test_russian_numbers() -> None:
    result = normalize_text("У меня 3 кота")
    assert result.language == "ru"
    assert "три" in result.text
    assert result.text == "у меня три кота"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("На улице -5 градусов", "на улице минус пять градусов"),
        ("Рост 1,8 метра", "рост одна целая восемь десятых метра"),
        ("Это 3-й звонок", "это третий звонок"),
        ("Днём 22°", "днём двадцать два градуса"),
        ("Скидка 21%, 3% и 5%", "скидка двадцать один процент, три процента и пять процентов"),
        ("Т.е. всё, т.к. и т.д.", "то есть всё, так как и так далее."),
        ("«Да» — сказал он", '"да" - сказал он'),
    ],
)
def test_russian_normalisation(raw: str, expected: str) -> None:
    assert normalize_text(raw).text == expected


def test_explicit_language_overrides_detection() -> None:
    assert normalize_text("5", language="ru").text == "пять"
    assert normalize_text("5", language="en").text == "five"
    with pytest.raises(ValueError, match="language"):
        normalize_text("5", language="de")  # type: ignore[arg-type]


def test_typographic_quotes_and_dashes_map_into_the_table() -> None:
    assert normalize_text("“Yes” – ‘no’ — maybe…").text == "\"yes\" - 'no' - maybe..."


def test_unknown_characters_are_counted_not_silently_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="services.trainer.text"):
        result = normalize_text("abc 中中 ☃ x ☃ ☃")
    assert result.text == "abc x"
    assert result.unknown == {"中": 2, "☃": 3}
    warned = [r.getMessage() for r in caplog.records]
    assert any("中" in message for message in warned)
    # Once per distinct character per process, not once per occurrence.
    assert sum("☃" in message for message in warned) <= 1


def test_pad_and_eos_characters_in_input_are_unknown() -> None:
    result = normalize_text("a_b~c")
    assert result.text == "abc"
    assert result.unknown == {"_": 1, "~": 1}


def test_whitespace_collapsed() -> None:
    assert normalize_text("  a \t\n b\u00a0 c  ").text == "a b c"


def test_text_to_sequence_appends_eos_and_round_trips() -> None:
    encoded = text_to_sequence("Hello, мир! 2 ёжика")
    assert encoded.ids[-1] == EOS_ID
    assert EOS_ID not in encoded.ids[:-1] and PAD_ID not in encoded.ids
    assert encoded.normalized == "hello, мир! два ёжика"
    assert sequence_to_text(encoded.ids) == encoded.normalized
    assert sequence_to_text([PAD_ID, *encoded.ids, PAD_ID, PAD_ID]) == encoded.normalized


def test_sequence_to_text_rejects_out_of_range_ids() -> None:
    with pytest.raises(ValueError):
        sequence_to_text([N_SYMBOLS])
    with pytest.raises(ValueError):
        sequence_to_text([-1])


def test_empty_text_is_just_eos() -> None:
    assert text_to_sequence("").ids == [EOS_ID]


def test_huge_and_odd_numbers_do_not_raise() -> None:
    assert "nine" in normalize_text("9" * 200).text
    assert "девять" in normalize_text("число " + "9" * 60).text
    assert normalize_text("код 007").text == "код ноль ноль семь"
    assert normalize_text("3,14159", language="ru").text.startswith("три запятая один")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_unicode_encodes_into_range(text: str) -> None:
    encoded = text_to_sequence(text)
    assert encoded.ids and encoded.ids[-1] == EOS_ID
    assert all(0 <= symbol_id < N_SYMBOLS for symbol_id in encoded.ids)
    assert sequence_to_text(encoded.ids) == encoded.normalized


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789.,-+%$€₽ stndrdйаб ")), max_size=40))
def test_number_like_strings_never_raise(text: str) -> None:
    for language in ("en", "ru"):
        encoded = text_to_sequence(text, language=language)
        assert all(0 <= symbol_id < N_SYMBOLS for symbol_id in encoded.ids)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from(list("0123456789.,-+%$&№ stndrdй тек.MrDS:?!()\"«»—é")),
            max_size=30),
))
def test_normalisation_is_idempotent(text: str) -> None:
    # The trainer re-encodes metadata's normalized_text column: a second pass must not change it.
    once = normalize_text(text)
    assert normalize_text(once.text, once.language).text == once.text
