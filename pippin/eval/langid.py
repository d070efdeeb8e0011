"""A small offline language identifier for IFEval's language checks (no `langdetect`, no model files).

IFEval upstream calls `langdetect.detect` (a character n-gram naive Bayes over 55 Wikipedia profiles) to check
`language:response_language` and that `change_case:*` answers are English. Here the dominant Unicode script
decides most languages outright (Kannada, Thai, Korean, ...); within a shared script we score distinctive
letters (Cyrillic, Arabic) or counts of very frequent function words (Latin, Devanagari). That covers the 30
ISO 639-1 codes IFEval can ask for plus a few neighbours it must not confuse them with. It is a detector
for whole answers, not for short phrases: a few words without a function word among them are "und"
(undetermined), which fails a language check as langdetect's guess on them mostly does; text without letters
is None, which passes as upstream does when langdetect raises. Chinese is "zh" (langdetect says "zh-cn").
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

# (first, last) code points per script; a script with one language maps straight to it.
_SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)),
    "cyrillic": ((0x400, 0x4FF),),
    "greek": ((0x370, 0x3FF),),
    "armenian": ((0x530, 0x58F),),
    "hebrew": ((0x590, 0x5FF),),
    "arabic": ((0x600, 0x6FF), (0x750, 0x77F), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "devanagari": ((0x900, 0x97F),),
    "bengali": ((0x980, 0x9FF),),
    "gurmukhi": ((0xA00, 0xA7F),),
    "gujarati": ((0xA80, 0xAFF),),
    "oriya": ((0xB00, 0xB7F),),
    "tamil": ((0xB80, 0xBFF),),
    "telugu": ((0xC00, 0xC7F),),
    "kannada": ((0xC80, 0xCFF),),
    "malayalam": ((0xD00, 0xD7F),),
    "sinhala": ((0xD80, 0xDFF),),
    "thai": ((0xE00, 0xE7F),),
    "georgian": ((0x10A0, 0x10FF),),
    "hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF)),
    "kana": ((0x3040, 0x30FF),),
    "han": ((0x4E00, 0x9FFF), (0x3400, 0x4DBF)),
}
_SINGLE_LANGUAGE = {
    "greek": "el",
    "armenian": "hy",
    "hebrew": "he",
    "bengali": "bn",
    "gurmukhi": "pa",
    "gujarati": "gu",
    "oriya": "or",
    "tamil": "ta",
    "telugu": "te",
    "kannada": "kn",
    "malayalam": "ml",
    "sinhala": "si",
    "thai": "th",
    "georgian": "ka",
    "hangul": "ko",
}

# The most frequent function words per language (lower case). Shared words count for every language that
# lists them; the distinctive ones decide.
_FUNCTION_WORDS: dict[str, str] = {
    "en": "the and of to a in is it that you for was on are with as i this be have not or but they we can your my he "
    "she his her at by from an will do if there what all so about would which their been has more when one our also "
    "how its into were them these some than then just like who out up no me him us any other",
    "es": "de la que el en y los se del las un por con no una su para es al lo como más pero sus le ha me si sin sobre "
    "este ya entre cuando todo esta ser son dos también fue había era muy hasta desde está mi porque qué han yo hay "
    "puede todos así nos ni tiene él uno donde bien ese ahora cada otro después otros aunque esa eso hace otra tan",
    "pt": "de a o que e do da em um para é com não uma os no se na por mais as dos como mas foi ao ele das tem à seu "
    "sua ou ser quando muito há nos já está eu também só pelo pela até isso ela entre era depois sem mesmo aos ter "
    "seus quem nas esse eles estão você tinha foram essa num nem suas meu às minha têm são então",
    "fr": "de la le et les des en un du une que est pour qui dans par plus pas au sur ne se ce il sont avec ou son mais "
    "nous vous je elle cette aux ses ont été leur comme y on tout bien aussi sa ces était très même fait sans être "
    "peut où donc lui tu moi",
    "de": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an werden aus er "
    "hat dass sie nach wird bei einer um am sind noch wie einem über einen so zum war haben nur oder aber vor zur bis "
    "mehr durch man sein wurde ich wir ihr du uns ihre kann wenn sehr dieser diese was",
    "it": "di e il la che è per un in del non una a le si da i con al della sono gli lo ha come ma più dei nel anche "
    "se alla o questo ci mi ti ho delle nella tra suo sua era loro essere io tu molto quando cosa tutto bene hanno "
    "fatto stato dove perché questa sul sulla nei degli sui",
    "nl": "de het een van en in is dat op te zijn voor met die niet aan er om ook als bij maar uit door wordt naar dan "
    "of nog wel over hij ze ik je wij we kan zo deze dit worden heeft hebben was geen meer",
    "sw": "na ya wa kwa ni za katika la kuwa cha au hii hiyo yake lakini pia vya kama sana kwamba huo huu wake kuna "
    "hata zaidi baada nini mimi wewe yeye sisi ninyi wao hapa tu bado kila hakuna ili ambao ambayo mtu watu siku "
    "kwenye sababu kubwa moja ndiyo hapana",
    "fi": "ja on ei se että oli hän ovat kun mutta tai joka myös niin kuin ole mitä sen olla minä sinä me te he tämä "
    "siitä jos sitä hänen vain nyt kanssa jotka mukaan voi sekä jo sitten koska vielä tässä ne kaikki mikä missä "
    "ennen jälkeen paljon hyvin",
    "pl": "i w nie na się z do to że jest o jak a po co ale od tak za są dla jego przez czy tym już być może jej ich "
    "oraz by był była było tego także tylko pod przy bardzo lub gdy ja ty my wy oni go mnie jestem które który "
    "która jako będzie",
    "vi": "và của là có không được trong cho những một các với người này đã để khi từ như thì tôi bạn chúng rất cũng "
    "nhưng đến ra làm năm về sẽ nhiều",
    "id": "yang dan di ini itu dengan untuk tidak dari dalam akan pada juga saya ke karena ada bisa mereka kita atau "
    "sudah kami oleh seperti jika lebih telah hanya anda apa orang tersebut harus saat belum",
    "tr": "ve bir bu da de için ile çok ne daha gibi o ben sen var olarak ama kadar en her değil olan şey mi sonra ki "
    "ya veya şu diye benim onun",
    "ro": "și de în la a cu să nu pe care o un din este sunt se mai pentru ce sau ca fi dar am lui după fost această "
    "acest foarte prin când cum",
    "sv": "och i att det som en på är av för med till den har de inte om ett men var jag du vi han hon så från kan "
    "eller när vid sig man här",
    "da": "og i at det en den til er som på de med han af for ikke der var mig sig men et har om vi min havde ham hun "
    "nu over da fra du ud kan jeg meget efter",
    "no": "og i det på som er en til å av for med har de ikke at den var jeg om men et seg kan han hun vi du fra så "
    "eller når meg deg også være skal vil",
    "tl": "ang ng sa na mga at ay si ko mo ako ikaw siya kami tayo sila ito iyan iyon hindi oo para kung may ni nang lang din rin po",
    "hi": "है हैं के की का में और से को यह नहीं था थे थी लिए पर भी एक हो कि तो ही जो वह इस कर किया करने गया आप मैं "
    "हम अपने अपनी साथ बहुत रहा रही सकते होता होती जाता कुछ क्या लेकिन",
    "mr": "आहे आहेत आणि या व हे ही ते की म्हणून नाही होते होता होती मध्ये ला ने तो ती त्या त्याने हा आम्ही तुम्ही मी "
    "आपण करून केले असे असते जात पण किंवा आता खूप एक काही कसे सर्व तर करत झाले तुमच्या माझ्या आपल्या",
    "ne": "छ छन् हो र को मा ले लाई पनि गर्न भएको यो थियो गर्नुहोस् हुन्छ छैन हुन् तर वा गरेको गर्ने भन्ने हुने त्यो "
    "तपाईं तपाईंको म हामी उनी उनको गरी रूपमा साथै अनि पछि बाट सँग लागि थिए",
}
_WORDS = {lang: frozenset(words.split()) for lang, words in _FUNCTION_WORDS.items()}
_LATIN = ("en", "es", "pt", "fr", "de", "it", "nl", "sw", "fi", "pl", "vi", "id", "tr", "ro", "sv", "da", "no", "tl")
_DEVANAGARI = ("hi", "mr", "ne")
# Letters that only some languages of a shared script use.
_CYRILLIC_MARKS = {"uk": "іїєґ", "ru": "ыэё", "bg": "ъ", "sr": "ђћ", "mk": "ѓќѕ"}
_URDU_MARKS = "ٹڈڑںےھ"
_PERSIAN_MARKS = "پچژگیک"
_ARABIC_MARKS = "يكةى"

# ISO 639-2 "undetermined": letters, but no evidence for any one language.
UNDETERMINED = "und"
# The ISO 639-1 codes `detect_language` can return.
SUPPORTED_LANGUAGES = frozenset(
    set(_SINGLE_LANGUAGE.values()) | set(_LATIN) | set(_DEVANAGARI) | set(_CYRILLIC_MARKS) | {"ar", "fa", "ur", "ja", "zh"}
)
_WORD = re.compile(r"[\w\u0900-\u097F']+")


def _script(ch: str) -> str | None:
    cp = ord(ch)
    for name, ranges in _SCRIPTS.items():
        if any(lo <= cp <= hi for lo, hi in ranges):
            return name
    return None


def _best_by_words(text: str, languages: tuple[str, ...]) -> str:
    """The language whose function words occur most often in `text`, or UNDETERMINED without any."""
    words = Counter(w.strip("'") for w in _WORD.findall(text.lower()))
    scores = {lang: sum(n for w, n in words.items() if w in _WORDS[lang]) for lang in languages}
    best = max(languages, key=lambda lang: scores[lang])
    return best if scores[best] > 0 else UNDETERMINED


def detect_language(text: str) -> str | None:
    """ISO 639-1 code of the language `text` is mostly written in.

    None when `text` has no letters at all; UNDETERMINED ("und") when it has letters but no evidence for any
    language, such as a short list of names: langdetect still guesses there, and its guess is seldom right.
    """
    text = unicodedata.normalize("NFC", text)
    scripts = Counter(s for s in map(_script, text) if s is not None)
    if not scripts:
        return None
    # A Hangul, kana or Han character is a syllable or a word: weigh it like the few letters it stands for.
    script = max(scripts, key=lambda s: scripts[s] * (3 if s in ("hangul", "kana", "han") else 1))
    if script in _SINGLE_LANGUAGE:
        return _SINGLE_LANGUAGE[script]
    if script in ("kana", "han"):
        return "ja" if scripts["kana"] * 10 >= scripts["han"] else "zh"
    if script == "cyrillic":
        marks = {lang: sum(text.count(c) for c in chars) for lang, chars in _CYRILLIC_MARKS.items()}
        best = max(marks, key=lambda lang: marks[lang])
        return best if marks[best] > 0 else "ru"
    if script == "arabic":
        if sum(text.count(c) for c in _URDU_MARKS) * 100 >= scripts["arabic"]:  # >= 1% Urdu-only letters
            return "ur"
        persian, arabic = (sum(text.count(c) for c in chars) for chars in (_PERSIAN_MARKS, _ARABIC_MARKS))
        return "fa" if persian > arabic else "ar"
    if script == "devanagari":
        best = _best_by_words(text, _DEVANAGARI)
        return "hi" if best == UNDETERMINED else best
    return _best_by_words(text, _LATIN)
