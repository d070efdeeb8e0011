"""The offline language identifier behind IFEval's language checks (pippin.eval.langid)."""

import pytest

from pippin.eval.langid import SUPPORTED_LANGUAGES, UNDETERMINED, detect_language


@pytest.mark.parametrize(
    "code, text",
    [
        ("en", "The weather is nice today and we are going to the park."),
        ("fr", "Le chat est sur la table et il dort dans le soleil."),
        ("de", "Der Hund ist nicht im Haus, er spielt mit den Kindern."),
        ("es", "El perro está en la casa y los niños juegan con él."),
        ("it", "Il gatto è sul tavolo e non vuole scendere per la cena."),
        ("pt", "O gato está em cima da mesa e não quer descer para o jantar."),
        ("sw", "Habari ya asubuhi, mimi ni mwalimu na ninafundisha katika shule."),
        ("fi", "Minä olen kotona ja hän on töissä, mutta me tapaamme illalla."),
        ("pl", "To jest bardzo dobry dzień i nie chcę iść do pracy."),
        ("vi", "Tôi là sinh viên và tôi rất thích học tiếng Việt."),
        ("ru", "Сегодня хорошая погода, и мы идём гулять в парк."),
        ("uk", "Сьогодні гарна погода, і ми йдемо гуляти в парк."),
        ("bg", "Това е много хубав ден и аз съм щастлив."),
        ("ar", "الطقس جميل اليوم ونحن ذاهبون إلى الحديقة."),
        ("fa", "هوا امروز خوب است و ما به پارک می‌رویم."),
        ("ur", "آج موسم اچھا ہے اور ہم پارک جا رہے ہیں۔"),
        ("hi", "आज मौसम अच्छा है और हम पार्क जा रहे हैं।"),
        ("mr", "आज हवामान छान आहे आणि आम्ही बागेत जात आहोत."),
        ("ne", "आज मौसम राम्रो छ र हामी पार्कमा जाँदैछौं।"),
        ("ko", "오늘 날씨가 좋아서 공원에 갑니다."),
        ("ja", "今日は天気がいいので公園に行きます。"),
        ("zh", "今天天气很好，我们去公园。"),
        ("th", "วันนี้อากาศดีมาก"),
        ("kn", "ಕನ್ನಡ ಭಾಷೆ"),
        ("ta", "தமிழ் மொழி"),
        ("te", "తెలుగు భాష"),
        ("gu", "ગુજરાતી ભાષા"),
        ("pa", "ਪੰਜਾਬੀ ਭਾਸ਼ਾ"),
        ("bn", "বাংলা ভাষা"),
        ("ml", "മലയാളം ഭാഷ"),
    ],
)
def test_detects_language(code, text):
    assert code in SUPPORTED_LANGUAGES
    assert detect_language(text) == code


def test_english_in_capitals_is_english():
    assert detect_language("THE WEATHER IS NICE TODAY AND WE ARE GOING TO THE PARK.") == "en"


def test_dominant_script_wins_over_a_few_latin_words():
    assert detect_language("SRE는 사이트 신뢰성 엔지니어(Site Reliability Engineer)의 약자입니다.") == "ko"


def test_no_letters_is_none_and_no_evidence_is_undetermined():
    assert detect_language("12345 !!! ...") is None
    assert detect_language("") is None
    assert detect_language("Xyzzy Plugh") == UNDETERMINED
