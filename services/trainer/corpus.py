"""Demo corpus: template sentences in English and Russian, spoken by espeak-ng.

The corpus exists so that the whole pipeline (features, training, alignment, the tuner)
can run end to end on a CPU box with no downloads. Its layout is LJSpeech's, so the same
loader reads it and the real data set:

    out_dir/metadata.csv   id|text|normalized_text   (utf-8, no header)
    out_dir/wavs/<id>.wav  16-bit PCM, mono

Sentences are built from hand-written templates and word lists rather than sampled from
a language model: they must be grammatical (Russian agreement included), short, unique
and byte-identical for a given seed.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from math import gcd
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
from pydantic import BaseModel
from scipy.signal import resample_poly
from tqdm import tqdm

from services.trainer.text import Language, normalize_text

log = logging.getLogger(__name__)

ESPEAK_BINARY = "espeak-ng"
ESPEAK_PACKAGE = "espeak-ng"  # the Debian package that provides ESPEAK_BINARY
ESPEAK_VOICES: dict[str, str] = {"en": "en-us", "ru": "ru"}
ESPEAK_WORDS_PER_MINUTE = 165
ESPEAK_TIMEOUT_S = 60

MIN_WORDS = 3
MAX_WORDS = 12
# Rejection sampling gives up after this many draws per requested sentence: the template
# space is far larger than any sensible corpus, so hitting it means a bug or a huge n.
_MAX_DRAWS_PER_SENTENCE = 200
# Share of sentences drawn from templates with digits: enough to teach number reading,
# few enough that the handful of numeric templates do not dominate the corpus.
_NUMERIC_SHARE = 0.3

METADATA_NAME = "metadata.csv"
WAVS_DIR = "wavs"
_ID_DIGITS = 4


class CorpusSummary(BaseModel):
    """What ``build_demo_corpus`` produced and how long it took."""

    out_dir: Path
    n_english: int
    n_russian: int
    total_seconds: float  # audio duration over all clips
    seconds_taken: float  # wall-clock time of the build
    n_synthesized: int  # clips spoken this run; 0 on a re-run over an up-to-date corpus


class _Utterance(BaseModel):
    id: str
    text: str
    normalized: str
    language: Language

    def metadata_line(self) -> str:
        return f"{self.id}|{self.text}|{self.normalized}"


# --------------------------------------------------------------------------- English ---

_EN_SUBJECTS = [
    "the old man", "my sister", "a young doctor", "the teacher", "our neighbour",
    "the little girl", "a tired farmer", "the captain", "his brother", "the baker",
    "my grandmother", "the new student", "a quiet boy", "the driver", "her uncle",
    "the nurse", "a stranger", "the shopkeeper", "my best friend", "the gardener",
    "the pilot", "an old sailor", "the librarian", "our cook",
]
# (base form, past tense) of transitive verbs that fit every (portable) object below.
_EN_VERBS = [
    ("find", "found"), ("carry", "carried"), ("buy", "bought"), ("drop", "dropped"),
    ("borrow", "borrowed"), ("sell", "sold"), ("hide", "hid"), ("forget", "forgot"),
    ("lose", "lost"), ("bring", "brought"), ("move", "moved"), ("take", "took"),
    ("keep", "kept"), ("wrap", "wrapped"), ("pack", "packed"), ("notice", "noticed"),
]
_EN_OBJECTS = [
    "a red umbrella", "the wooden box", "an old letter", "the broken clock",
    "a basket of apples", "a blue bicycle", "a small mirror", "a pair of boots",
    "the silver key", "a warm blanket", "the map of the city", "a jar of honey",
    "the green lamp", "a leather bag", "a new camera", "the photo album",
    "a bunch of flowers", "the little radio", "a paper kite", "the brown suitcase",
]
_EN_PLACES = [
    "near the river", "in the kitchen", "behind the station", "at the market",
    "under the bridge", "on the hill", "in the garden", "by the window",
    "at the old church", "next to the bakery", "in the attic", "on the train",
    "at the harbour", "in the village square", "behind the school",
]
_EN_TIMES = [
    "yesterday", "last winter", "this morning", "after dinner", "before sunrise",
    "on Monday", "late at night", "every Sunday", "last week", "in the evening",
    "after the storm", "during the holidays",
]
_EN_PLURALS = [
    "cats", "books", "apples", "chairs", "windows", "keys", "coins", "letters", "candles",
    "cups", "shirts", "pencils", "horses", "songs", "tickets", "stamps",
]
_EN_ADJECTIVES = [
    "cold", "windy", "quiet", "bright", "warm", "foggy", "noisy", "calm", "crowded", "dark",
]
_EN_FEELINGS = ["happy", "surprised", "worried", "tired", "proud", "nervous", "glad", "calm"]
_EN_GROUPS = ["the students", "the workers", "the visitors", "the children", "the players"]
_EN_LIKES = ["tea", "coffee", "music", "long walks", "cold weather", "old films", "chess"]


def _pick(
    rng: random.Random, plain: list[Callable[[], str]], with_numbers: list[Callable[[], str]]
) -> str:
    """Fill one template, a numeric one with probability ``_NUMERIC_SHARE``, capitalised."""
    templates = with_numbers if rng.random() < _NUMERIC_SHARE else plain
    sentence = rng.choice(templates)()
    return sentence[0].upper() + sentence[1:]


def _en_ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _en_sentence(rng: random.Random) -> str:
    def c(items: list[str]) -> str:
        return rng.choice(items)

    subject, place, obj, time_ = c(_EN_SUBJECTS), c(_EN_PLACES), c(_EN_OBJECTS), c(_EN_TIMES)
    base, past = rng.choice(_EN_VERBS)
    templates: list[Callable[[], str]] = [
        lambda: f"{subject} {past} {obj} {place}.",
        lambda: f"{time_}, {subject} {past} {obj}.",
        lambda: f"why did {subject} {base} {obj}?",
        lambda: f"I think {subject} will {base} {obj} tomorrow.",
        lambda: f"{subject} {past} {obj} and looked {c(_EN_FEELINGS)}.",
        lambda: f"where did you {base} {obj}?",
        lambda: f"is {subject} still {place}?",
        lambda: f"please leave {obj} {place}.",
        lambda: f"it was very {c(_EN_ADJECTIVES)} {place} {time_}.",
        lambda: f"{subject} was {c(_EN_FEELINGS)} {time_}.",
        lambda: f"{subject} said, \"I will {base} {obj}.\"",
    ]
    with_numbers: list[Callable[[], str]] = [
        lambda: f"{subject} has {rng.randint(2, 99)} {c(_EN_PLURALS)}.",
        lambda: f"we waited {rng.randint(2, 59)} minutes {place}.",
        lambda: f"the train leaves at {rng.randint(1, 12)} o'clock.",
        lambda: f"{subject} was born in {rng.randint(1920, 2015)}.",
        lambda: f"room {rng.randint(2, 450)} is on the {_en_ordinal(rng.randint(1, 12))} floor.",
        lambda: f"{subject} paid ${rng.randint(2, 300)} for {obj}.",
        lambda: f"about {rng.randint(2, 9) * 10}% of {c(_EN_GROUPS)} like {c(_EN_LIKES)}.",
        lambda: f"the temperature fell to -{rng.randint(2, 30)} degrees {time_}.",
        lambda: f"{subject} ran {rng.randint(2, 9)}.{rng.randint(1, 9)} kilometres {time_}.",
        lambda: f"this is the {_en_ordinal(rng.randint(2, 31))} time {subject} called!",
    ]
    return _pick(rng, templates, with_numbers)


# --------------------------------------------------------------------------- Russian ---
# Every word list is in the case its slot needs, so no template has to inflect anything:
# subjects are nominative with their gender, objects are inanimate accusatives (equal to
# the nominative for masculine nouns, so no animacy trap), places are whole prepositional
# phrases. Numbers appear only before masculine nouns in the nominative/accusative, where
# the plain cardinal that normalize_text produces ("один", "два") is also the right form.

_RU_SUBJECTS: list[tuple[str, Literal["m", "f", "pl"]]] = [
    ("мой брат", "m"), ("моя сестра", "f"), ("старый учитель", "m"), ("молодая девушка", "f"),
    ("наш сосед", "m"), ("бабушка", "f"), ("маленький мальчик", "m"), ("врач", "m"),
    ("эта женщина", "f"), ("дети", "pl"), ("мои друзья", "pl"), ("соседи", "pl"),
    ("дедушка", "m"), ("новая учительница", "f"), ("почтальон", "m"), ("студенты", "pl"),
    ("моя подруга", "f"), ("капитан", "m"), ("рыбаки", "pl"), ("тётя Маша", "f"),
]
# Past tense (masculine, feminine, plural) of verbs that fit every object below.
_RU_VERBS = [
    ("нашёл", "нашла", "нашли"), ("купил", "купила", "купили"),
    ("принёс", "принесла", "принесли"), ("потерял", "потеряла", "потеряли"),
    ("оставил", "оставила", "оставили"), ("взял", "взяла", "взяли"),
    ("увидел", "увидела", "увидели"), ("спрятал", "спрятала", "спрятали"),
    ("продал", "продала", "продали"), ("забыл", "забыла", "забыли"),
    ("уронил", "уронила", "уронили"), ("показал", "показала", "показали"),
    ("получил", "получила", "получили"), ("искал", "искала", "искали"),
]
_RU_OBJECTS = [
    "новую книгу", "старый зонт", "красный мяч", "тёплый шарф", "большую коробку",
    "деревянный стул", "синюю чашку", "письмо", "ключи от дома", "старую карту",
    "маленькое зеркало", "чёрную сумку", "железный ящик", "детский велосипед",
    "кожаный портфель", "жёлтую лампу", "фотоальбом", "сломанные часы",
]
_RU_PLACES = [
    "в парке", "на кухне", "у реки", "возле вокзала", "за домом", "на рынке",
    "в саду", "на вокзале", "в школе", "на даче", "у окна", "в подъезде", "на берегу моря",
    "в библиотеке", "под мостом",
]
_RU_TIMES = [
    "вчера", "сегодня утром", "прошлой зимой", "в понедельник", "после обеда", "вечером",
    "поздно ночью", "на прошлой неделе", "в субботу", "рано утром", "летом", "после дождя",
]
# Predicative adverbs: "Вечером в парке было холодно".
_RU_WEATHER = ["холодно", "тепло", "тихо", "шумно", "светло", "темно", "ветрено", "душно"]
# Masculine nouns in the three forms that follow a numeral: 1 / 2-4 / 5-20.
_RU_COUNTED = [
    ("кот", "кота", "котов"), ("стол", "стола", "столов"), ("билет", "билета", "билетов"),
    ("карандаш", "карандаша", "карандашей"), ("стакан", "стакана", "стаканов"),
    ("ключ", "ключа", "ключей"), ("журнал", "журнала", "журналов"),
    ("апельсин", "апельсина", "апельсинов"),
]
_RU_POSSESSORS = ["У меня", "У моего брата", "У соседа", "У нас", "У бабушки", "У Ивана"]
_RU_ADJECTIVES_F = ["рада", "довольна", "удивлена", "спокойна", "занята"]
_RU_ADJECTIVES_M = ["рад", "доволен", "удивлён", "спокоен", "занят"]
_RU_ADJECTIVES_PL = ["рады", "довольны", "удивлены", "спокойны", "заняты"]


def _ru_plural(n: int, forms: tuple[str, str, str]) -> str:
    """The noun form a cardinal ``n`` takes: 1 / 2-4 / 5+ (11-14 count as 5+)."""
    if n % 10 == 1 and n % 100 != 11:
        return forms[0]
    if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14:
        return forms[1]
    return forms[2]


def _ru_sentence(rng: random.Random) -> str:
    def c(items: list[str]) -> str:
        return rng.choice(items)

    subject, gender = rng.choice(_RU_SUBJECTS)
    form = {"m": 0, "f": 1, "pl": 2}[gender]
    verb = rng.choice(_RU_VERBS)[form]
    adjective = c([_RU_ADJECTIVES_M, _RU_ADJECTIVES_F, _RU_ADJECTIVES_PL][form])
    was = ("был", "была", "были")[form]
    left = ("ушёл", "ушла", "ушли")[form]
    said = ("сказал", "сказала", "сказали")[form]
    obj, place, time_ = c(_RU_OBJECTS), c(_RU_PLACES), c(_RU_TIMES)
    count = rng.randint(1, 99)
    hours = rng.randint(1, 12)
    price = rng.randint(2, 900)
    minus = rng.randint(1, 30)
    templates: list[Callable[[], str]] = [
        lambda: f"{subject} {verb} {obj} {place}.",
        lambda: f"{time_} {subject} {verb} {obj}.",
        lambda: f"{subject} {verb} {obj} и {left} домой.",
        lambda: f"почему {subject} {verb} {obj} {place}?",
        lambda: f"где {subject} {verb} {obj}?",
        lambda: f"{time_} {subject} {was} очень {adjective}.",
        lambda: f"{time_} {place} было {c(_RU_WEATHER)}.",
        lambda: f"{subject} {verb} {obj}, т.к. {time_} было {c(_RU_WEATHER)}.",
        lambda: f"{subject} {said}: «Всё в порядке»!",
    ]
    with_numbers: list[Callable[[], str]] = [
        lambda: f"{c(_RU_POSSESSORS)} {count} {_ru_plural(count, rng.choice(_RU_COUNTED))}.",
        lambda: f"поезд отправляется в {hours} {_ru_plural(hours, ('час', 'часа', 'часов'))}.",
        lambda: f"билет стоит {price} {_ru_plural(price, ('рубль', 'рубля', 'рублей'))}.",
        lambda: f"на улице -{minus} {_ru_plural(minus, ('градус', 'градуса', 'градусов'))}.",
        lambda: f"скидка составляет {rng.randint(2, 9) * 5}%.",
        lambda: f"это уже {rng.randint(2, 9)}-й звонок за утро!",
        lambda: f"длина стола — {rng.randint(1, 3)},{rng.randint(1, 9)} метра.",
        lambda: f"{place} мы ждали {count} {_ru_plural(count, ('день', 'дня', 'дней'))}.",
    ]
    return _pick(rng, templates, with_numbers)


_GENERATORS: dict[str, Callable[[random.Random], str]] = {"en": _en_sentence, "ru": _ru_sentence}


def generate_sentences(language: Language, n: int, seed: int) -> list[str]:
    """``n`` unique template sentences of 3-12 words, the same list for the same seed.

    English and Russian draw from separate random streams, so changing one language's
    count never changes the other's sentences.
    """
    if language not in _GENERATORS:
        raise ValueError(f"unknown language {language!r}; use 'en' or 'ru'")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # A string seed is hashed with SHA-512 by random, so it is stable across processes
    # (unlike hash(), which PYTHONHASHSEED randomises).
    rng = random.Random(f"{language}:{seed}")
    generate = _GENERATORS[language]
    sentences: list[str] = []
    seen: set[str] = set()
    for _ in range(max(1, n) * _MAX_DRAWS_PER_SENTENCE):
        if len(sentences) == n:
            return sentences
        sentence = generate(rng)
        if sentence not in seen and MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
            seen.add(sentence)
            sentences.append(sentence)
    if len(sentences) == n:
        return sentences
    raise RuntimeError(f"could only make {len(sentences)} unique {language} sentences of {n}")


# ----------------------------------------------------------------------------- Audio ---


def _espeak_binary() -> str:
    binary = shutil.which(ESPEAK_BINARY)
    if binary is None:
        raise RuntimeError(
            f"{ESPEAK_BINARY} not found on PATH; the demo corpus is spoken by it. "
            f"Install the Debian package `{ESPEAK_PACKAGE}` (apt-get install {ESPEAK_PACKAGE})."
        )
    return binary


def _synthesize(binary: str, utterance: _Utterance, wav_path: Path, sample_rate: int) -> None:
    """Speak one utterance into ``wav_path`` (16-bit PCM mono), atomically."""
    # espeak speaks the normalised text, not the raw one: the model is trained on the
    # normalised symbols, so the audio must say exactly those words (espeak's own number
    # reading would say "nineteen eighty-one" where the transcript says "one thousand...").
    text = utterance.normalized
    # A leading "-" would be parsed as an option.
    text = f" {text}" if text.startswith("-") else text
    with tempfile.TemporaryDirectory(dir=wav_path.parent, prefix=".espeak-") as tmp:
        raw_path = Path(tmp) / "raw.wav"
        command = [binary, "-v", ESPEAK_VOICES[utterance.language],
                   "-s", str(ESPEAK_WORDS_PER_MINUTE), "-w", str(raw_path), text]
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=ESPEAK_TIMEOUT_S, check=False)
        if result.returncode != 0 or not raw_path.exists():
            raise RuntimeError(f"{ESPEAK_BINARY} failed on {utterance.id} "
                               f"(exit {result.returncode}): {result.stderr.strip()}")
        audio, rate = sf.read(raw_path, dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)
        if rate != sample_rate:
            divisor = gcd(sample_rate, rate)
            audio = resample_poly(audio, sample_rate // divisor, rate // divisor)
        if audio.size == 0 or float(np.max(np.abs(audio))) == 0.0:
            raise RuntimeError(f"{ESPEAK_BINARY} produced silence for {utterance.id}")
        # Resampling can overshoot full scale by a hair; clip rather than wrap around.
        audio = np.clip(audio, -1.0, 1.0)
        staged = Path(tmp) / "out.wav"
        sf.write(staged, audio, sample_rate, subtype="PCM_16")
        # Rename last, so a wav that exists is always complete (an interrupted run leaves
        # no half-written file for the next run to trust).
        os.replace(staged, wav_path)


def _read_metadata(path: Path) -> dict[str, str]:
    """Existing metadata lines by id; empty when there is no file yet."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    return {line.split("|", 1)[0]: line for line in lines if line}


def _wav_seconds(path: Path, sample_rate: int) -> float | None:
    """Duration of a usable existing wav, or None when it must be (re)made."""
    try:
        info = sf.info(path)
    except (OSError, RuntimeError):  # missing or unreadable
        return None
    if info.samplerate != sample_rate or info.channels != 1 or info.frames == 0:
        return None
    return info.frames / info.samplerate


def _utterances(n_english: int, n_russian: int, seed: int) -> list[_Utterance]:
    utterances: list[_Utterance] = []
    counts: dict[Language, int] = {"en": n_english, "ru": n_russian}
    for language, n in counts.items():
        width = max(_ID_DIGITS, len(str(n)))
        for index, text in enumerate(generate_sentences(language, n, seed), start=1):
            if "|" in text or "\n" in text:  # the metadata separators; templates never do
                raise ValueError(f"sentence {text!r} contains a metadata separator")
            utterances.append(_Utterance(
                id=f"{language}_{index:0{width}d}", text=text,
                normalized=normalize_text(text, language).text, language=language,
            ))
    return utterances


def build_demo_corpus(
    out_dir: Path,
    n_english: int = 400,
    n_russian: int = 200,
    seed: int = 0,
    sample_rate: int = 22050,
    jobs: int = 2,
    progress: bool = True,
) -> CorpusSummary:
    """Write an LJSpeech-layout corpus of template sentences spoken by espeak-ng.

    Deterministic in ``seed``. Idempotent: a wav is only (re)made when it is missing,
    unreadable, at another sample rate, or its line in the existing ``metadata.csv``
    differs, so a re-run over an up-to-date corpus only checks files. ``metadata.csv`` is
    written last, so an interrupted build never claims audio it does not have. Raises
    RuntimeError when espeak-ng is not installed.
    """
    started = time.perf_counter()
    if n_english < 0 or n_russian < 0:
        raise ValueError("sentence counts must be >= 0")
    if sample_rate <= 0 or jobs < 1:
        raise ValueError("sample_rate and jobs must be positive")
    binary = _espeak_binary()
    out_dir = Path(out_dir)
    wavs_dir = out_dir / WAVS_DIR
    wavs_dir.mkdir(parents=True, exist_ok=True)
    metadata_path = out_dir / METADATA_NAME

    utterances = _utterances(n_english, n_russian, seed)
    previous = _read_metadata(metadata_path)
    seconds: dict[str, float] = {}
    todo: list[_Utterance] = []
    for utterance in utterances:
        existing = _wav_seconds(wavs_dir / f"{utterance.id}.wav", sample_rate)
        if existing is not None and previous.get(utterance.id) == utterance.metadata_line():
            seconds[utterance.id] = existing
        else:
            todo.append(utterance)
    log.info("demo corpus in %s: %d of %d clips to synthesise",
             out_dir, len(todo), len(utterances))

    def make(utterance: _Utterance) -> None:
        _synthesize(binary, utterance, wavs_dir / f"{utterance.id}.wav", sample_rate)

    with ThreadPoolExecutor(max_workers=jobs) as pool, tqdm(
        total=len(todo), disable=not progress, desc="espeak-ng", unit="clip"
    ) as bar:
        for _ in pool.map(make, todo):
            bar.update(1)
    for utterance in todo:
        made = _wav_seconds(wavs_dir / f"{utterance.id}.wav", sample_rate)
        if made is None:  # _synthesize raises first; this guards the invariant
            raise RuntimeError(f"wav for {utterance.id} is missing after synthesis")
        seconds[utterance.id] = made

    staged = metadata_path.with_name(f".{METADATA_NAME}.tmp")
    staged.write_text("".join(u.metadata_line() + "\n" for u in utterances),
                      encoding="utf-8", newline="\n")
    os.replace(staged, metadata_path)

    return CorpusSummary(
        out_dir=out_dir, n_english=n_english, n_russian=n_russian,
        total_seconds=round(sum(seconds.values()), 3),
        seconds_taken=round(time.perf_counter() - started, 3),
        n_synthesized=len(todo),
    )
