"""The words that `pippin.data.ifprompts` builds prompts from: requests (a form of writing times a subject), word
banks for the keyword instructions, and several phrasings of each of IFEval's 25 instruction types.

All of it is written for pippin, not taken from IFEval's prompts (Zhou et al. 2023, arXiv:2311.07911): the set trains
on IFEval's instruction types while IFEval's 541 test prompts stay unseen. A request is one sentence with no comma, so
that `combination:repeat_prompt` and `punctuation:no_comma` can go together. Phrasings are `str.format` templates over
an instruction's kwargs and a few derived fields (see `ifprompts._fields`).
"""

from __future__ import annotations

# One sentence each; "{s}" is the subject. No commas (see the module docstring).
FORMS = (
    "Write a short blog post about {s}.",
    "Explain {s} to a curious ten-year-old.",
    "Write a letter to a friend describing {s}.",
    "Draft a newsletter item on {s}.",
    "Write a brief essay on {s}.",
    "Give a beginner's overview of {s}.",
    "Write a short speech for a school assembly about {s}.",
    "Write the text of a museum placard about {s}.",
    "Summarize what a newcomer should know about {s}.",
    "Write a diary entry by someone who has just learned about {s}.",
    "Write a short story in which {s} plays a central role.",
    "Write a persuasive piece arguing that everyone should learn about {s}.",
    "Write the script for a two-minute radio segment about {s}.",
    "Write a set of study notes on {s}.",
    "Write an explainer in question-and-answer style about {s}.",
    "Write the opening of a podcast episode about {s}.",
    "Compose a poem about {s}.",
    "Write an email to a colleague that summarizes {s}.",
    "Prepare talking points for a community club meeting on {s}.",
    "Write a short dialogue between two students discussing {s}.",
    "Describe {s} as a tour guide would to a group of visitors.",
    "Write a review of an imaginary documentary about {s}.",
)

SUBJECTS = (
    # nature and earth
    "how tides rise and fall",
    "why leaves change color in autumn",
    "the water cycle",
    "how volcanoes form",
    "the migration of monarch butterflies",
    "how coral reefs grow",
    "why the sky looks blue",
    "the life of a honeybee colony",
    "how glaciers carve valleys",
    "the role of fungi in a forest",
    "how lightning forms",
    "the seasons and the tilt of the earth",
    "how seeds travel far from their parent plant",
    "the night sky in winter",
    "why some birds fly south",
    "how rivers change their course",
    "the importance of wetlands",
    "how desert animals survive the heat",
    # science and technology
    "how vaccines train the immune system",
    "the basics of photosynthesis",
    "how a refrigerator keeps food cold",
    "how GPS finds your position",
    "what makes a rainbow",
    "how solar panels turn light into electricity",
    "the way sound travels through air",
    "how a compass works",
    "the invention of the printing press",
    "how bridges carry heavy loads",
    "why bread dough rises",
    "how batteries store energy",
    "the first flight of the Wright brothers",
    "how a search engine ranks pages",
    "the difference between weather and climate",
    "how the heart pumps blood",
    "why we need sleep",
    "how recycling plants sort waste",
    "the story of the telescope",
    "how airplanes stay in the air",
    "how a microwave oven heats food",
    "the basics of password security",
    "how email reaches its destination",
    "what a spreadsheet is good for",
    "how 3D printers build objects",
    "the history of the bicycle",
    "how clocks kept time before electricity",
    # everyday life
    "keeping a small vegetable garden on a balcony",
    "planning a budget for the first month in a new city",
    "learning to cook a simple weekly meal plan",
    "composting kitchen scraps at home",
    "organizing a cluttered closet",
    "preparing for a job interview",
    "choosing a first pair of running shoes",
    "training a puppy to walk on a leash",
    "making friends after moving to a new town",
    "keeping houseplants alive in winter",
    "saving energy at home",
    "packing light for a weekend trip",
    "building a reading habit",
    "fixing a flat bicycle tire",
    "hosting a board game night",
    "writing a thank-you note",
    "starting a neighborhood book club",
    "learning to swim as an adult",
    "cutting down on food waste",
    "setting up a quiet place to study",
    # history and society
    "the building of the pyramids of Giza",
    "the history of public libraries",
    "how ancient Romans built their roads",
    "the spread of tea around the world",
    "the first public railways",
    "the story of the Silk Road",
    "how the postal service began",
    "the history of the Olympic Games",
    "life in a medieval village",
    "the invention of paper money",
    "the origins of the modern calendar",
    "how lighthouses guided ships",
    "the history of chess",
    "how maps changed over the centuries",
    "the rise of the public park",
    "the story of the first vaccines",
    # arts and culture
    "the history of jazz",
    "how a symphony orchestra is organized",
    "the art of origami",
    "why people keep diaries",
    "the craft of making pottery",
    "how silent films told stories",
    "the tradition of storytelling around a fire",
    "what makes a good mystery novel",
    "the history of the guitar",
    "street murals in big cities",
    "how puppet theater works",
    "the life of a touring musician",
    "learning to draw with charcoal",
    "the joy of singing in a choir",
    # food
    "how cheese is made",
    "the history of chocolate",
    "baking sourdough bread at home",
    "the rise of food trucks",
    "where coffee beans come from",
    "why spices were once so valuable",
    "the art of making fresh pasta",
    "how honey is harvested",
    # sports and hobbies
    "the rules of volleyball",
    "training for a first five-kilometer run",
    "the appeal of rock climbing",
    "how marathons began",
    "birdwatching for beginners",
    "the basics of sailing",
    "starting a stamp collection",
    "the history of the skateboard",
    "learning to juggle",
    "keeping an aquarium",
    "the basics of photography with a phone",
    "knitting a first scarf",
    # work, money and ideas
    "how interest on savings works",
    "what a small business owner does in a day",
    "the pros and cons of working from home",
    "how a town council makes decisions",
    "the value of volunteering",
    "how to give useful feedback to a teammate",
    "the habits of good note-takers",
    "why people procrastinate",
    "the benefits of learning a second language",
    "how a public library decides what to buy",
    "the role of a lighthouse keeper",
    "the daily work of a park ranger",
    "what an architect does before a building is built",
    "how a newspaper is put together",
    "the life of a long-haul truck driver",
    "how firefighters train",
)

# keywords:existence and keywords:frequency. Long, unambiguous words: frequency counts substrings, so a short
# word would also be counted inside longer ones.
KEYWORDS = (
    "lantern", "harbor", "compass", "orchard", "velvet", "granite", "meadow", "ribbon", "puzzle", "kettle",
    "glacier", "canyon", "pepper", "violin", "ladder", "pocket", "anchor", "blanket", "candle", "feather",
    "marble", "pebble", "saddle", "tunnel", "window", "garden", "thunder", "mirror", "bridge", "rocket",
    "copper", "cotton", "maple", "falcon", "ferry", "bakery", "helmet", "lemon", "magnet", "notebook",
    "ocean", "pillow", "quilt", "river", "shadow", "ticket", "umbrella", "village", "wagon", "honey",
    "island", "jacket", "sunrise", "journey", "market", "mountain", "teacher", "library", "kitchen", "balance",
)  # fmt: skip

# keywords:forbidden_words: filler words a reply would reach for; disjoint from KEYWORDS and FIRST_WORDS.
FORBIDDEN = (
    "very", "really", "just", "thing", "things", "stuff", "basically", "actually", "important", "good",
    "great", "nice", "amazing", "interesting", "simple", "easy", "literally", "obviously", "clearly", "best",
    "many", "often", "because", "example", "people", "world", "time", "help", "make", "use",
)  # fmt: skip

# length_constraints:nth_paragraph_first_word (the checker compares lower-cased words).
FIRST_WORDS = (
    "today", "first", "meanwhile", "finally", "surprisingly", "consider", "imagine", "history", "yesterday",
    "still", "moreover", "overall", "curiously", "eventually", "later", "sometimes", "next", "notably", "picture",
    "remember", "perhaps", "together", "suddenly", "above",
)  # fmt: skip

# startend:end_checker. No commas.
END_PHRASES = (
    "That is all for now.",
    "Thanks for reading to the end.",
    "Let me know what you think.",
    "Stay curious and keep exploring.",
    "Until next time.",
    "I hope this gets you started.",
    "Questions are welcome anytime.",
    "And that is the whole story.",
    "Now you know the basics.",
    "Any other questions?",
    "Happy learning!",
    "See you at the next meeting.",
    "Write back soon.",
    "The rest is up to you.",
)

# keywords:letter_frequency: an "at least" count uses a common letter, a "less than" count a rare one.
COMMON_LETTERS = "eatoinsrl"
RARE_LETTERS = "qzxjk"

# language:response_language: ISO 639-1 codes (as langdetect returns them) and the names a prompt uses.
LANGUAGES = {
    "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese", "nl": "Dutch",
    "sv": "Swedish", "pl": "Polish", "ru": "Russian", "ja": "Japanese", "ko": "Korean", "hi": "Hindi",
    "ar": "Arabic", "tr": "Turkish", "vi": "Vietnamese", "sw": "Swahili", "fi": "Finnish", "el": "Greek",
    "id": "Indonesian", "uk": "Ukrainian", "bn": "Bengali", "ta": "Tamil", "fa": "Persian", "th": "Thai",
}  # fmt: skip

SECTION_SPLITTERS = ("SECTION", "Section", "PART", "Part", "Chapter")
POSTSCRIPT_MARKERS = ("P.S.", "P.P.S")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")

# Phrasings per instruction id; ids with a relation have one list per relation. Fields: the kwargs, plus {cmp}
# (a way to say the relation), {the_words} ('the word "x"' / 'the words "x" and "y"'), {lang}, {ordinal}.
PHRASES: dict[str, tuple[str, ...] | dict[str, tuple[str, ...]]] = {
    "keywords:existence": (
        "Mention {the_words} somewhere in your reply.",
        "Work {the_words} into your answer.",
        "Your reply should include {the_words}.",
        "Be sure to use {the_words} at least once.",
    ),
    "keywords:frequency": {
        "at least": (
            'Use the word "{keyword}" {cmp} {frequency} times.',
            'The word "{keyword}" should show up {cmp} {frequency} times in your text.',
            'Repeat the word "{keyword}" {cmp} {frequency} times over the course of the reply.',
        ),
        "less than": (
            'Use the word "{keyword}" {cmp} {frequency} times.',
            'The word "{keyword}" may appear {cmp} {frequency} times.',
        ),
    },
    "keywords:forbidden_words": (
        "Do not use {the_words} anywhere in your reply.",
        "Avoid {the_words} entirely.",
        "Your answer must not contain {the_words}.",
        "Leave out {the_words}.",
    ),
    "keywords:letter_frequency": {
        "at least": (
            'The letter "{letter}" should appear {cmp} {let_frequency} times.',
            'Make sure the letter "{letter}" is used {cmp} {let_frequency} times in total.',
        ),
        "less than": (
            'Use the letter "{letter}" {cmp} {let_frequency} times.',
            'Keep the count of the letter "{letter}" below {let_frequency}.',
        ),
    },
    "language:response_language": (
        "Reply only in {lang} and use no other language.",
        "Write your whole answer in {lang}.",
        "Every word of your response must be in {lang}.",
    ),
    "change_case:english_capital": (
        "Write your entire reply in English using only capital letters.",
        "Answer in English with every letter in uppercase.",
        "Your answer must be English in all caps with no lowercase letters at all.",
    ),
    "change_case:english_lowercase": (
        "Write everything in English and in lowercase with no capital letters anywhere.",
        "Use only lowercase letters throughout your English reply.",
        "Do not capitalize anything: the whole reply must be lowercase English.",
    ),
    "change_case:capital_word_frequency": {
        "at least": (
            "Write {cmp} {capital_frequency} words entirely in capital letters for emphasis.",
            "Emphasize key ideas by putting {cmp} {capital_frequency} words in ALL CAPS.",
        ),
        "less than": (
            "Use {cmp} {capital_frequency} fully capitalized words.",
            "Keep the words written in all capital letters to {cmp} {capital_frequency}.",
        ),
    },
    "punctuation:no_comma": (
        "Do not use a single comma in your reply.",
        "Avoid commas entirely.",
        "Your answer must contain no commas at all.",
    ),
    "length_constraints:number_sentences": {
        "at least": ("Write {cmp} {num_sentences} sentences.", "Your reply should run to {cmp} {num_sentences} sentences."),
        "less than": ("Keep it to {cmp} {num_sentences} sentences.", "Use {cmp} {num_sentences} sentences in total."),
    },
    "length_constraints:number_words": {
        "at least": ("Write {cmp} {num_words} words.", "The reply should be {cmp} {num_words} words long."),
        "less than": ("Stay under {num_words} words.", "Keep your answer shorter than {num_words} words.", "Use {cmp} {num_words} words."),
    },
    "length_constraints:number_paragraphs": (
        "Write exactly {num_paragraphs} paragraphs and put a line with only three asterisks (***) between neighboring paragraphs.",
        "Split your answer into {num_paragraphs} paragraphs divided by the markdown rule ***.",
        "Use {num_paragraphs} paragraphs in total with *** on its own line between one paragraph and the next.",
    ),
    "length_constraints:nth_paragraph_first_word": (
        'Write {num_paragraphs} paragraphs separated by blank lines and begin the {ordinal} paragraph with the word "{first_word}".',
        'Your reply needs {num_paragraphs} paragraphs (leave an empty line between them); the {ordinal} one must open with "{first_word}".',
    ),
    "detectable_content:number_placeholders": (
        "Include {num_placeholders} or more placeholders in square brackets for details to fill in later, like [date].",
        "Leave at least {num_placeholders} fill-in blanks written in square brackets, for example [city].",
        "Use {num_placeholders} or more bracketed placeholders such as [your name].",
    ),
    "detectable_content:postscript": (
        'End with a postscript that starts with "{postscript_marker}".',
        'Add a note at the very end beginning with "{postscript_marker}".',
        'After the main text add a short postscript introduced by "{postscript_marker}".',
    ),
    "detectable_format:number_bullet_lists": (
        'Include exactly {num_bullets} bullet points, each on its own line starting with "* ".',
        "Present the key points as a markdown list of exactly {num_bullets} items with each line starting with an asterisk and a space.",
        'Use exactly {num_bullets} markdown bullets (lines that begin with "* ") and no other list items.',
    ),
    "detectable_format:constrained_response": (
        "Finish with your verdict on whether this topic deserves more attention in exactly one of these sentences:"
        ' "My answer is yes." / "My answer is no." / "My answer is maybe."',
        'Close by saying whether you would recommend learning more about it: "My answer is yes." if you would,'
        ' "My answer is no." if not and "My answer is maybe." if you are unsure.',
    ),
    "detectable_format:number_highlighted_sections": (
        "Highlight at least {num_highlights} key phrases with markdown italics, for example *a key phrase*.",
        "Mark {num_highlights} or more important parts by wrapping them in single asterisks like *this*.",
    ),
    "detectable_format:multiple_sections": (
        "Divide the reply into {num_sections} sections, each introduced by a heading of the form"
        ' "{section_spliter} N" (e.g. {section_spliter} 1).',
        "Organize it as {num_sections} parts and label each with {section_spliter} and its number ({section_spliter} 1 first).",
    ),
    "detectable_format:json_format": (
        "Format your entire output as valid JSON (a ```json code fence around it is fine).",
        "Return the whole answer as a JSON object and nothing else.",
        "Give your reply as JSON only.",
    ),
    "detectable_format:title": (
        "Put a title inside double angle brackets, for example <<Notes on the Topic>>.",
        "Give the piece a title written between << and >>.",
    ),
    "combination:two_responses": (
        "Give two different answers and separate them with a line of six asterisks (******).",
        "Write two distinct versions and put ****** between them.",
    ),
    "combination:repeat_prompt": (
        "Before you answer repeat the first sentence of this message word for word and add nothing before it.",
        "Start your reply by copying my first sentence exactly as written; then continue with your answer.",
    ),
    "startend:end_checker": (
        'Finish your reply with the exact sentence "{end_phrase}" and write nothing after it.',
        "The last words of your answer must be: {end_phrase}",
        'End with "{end_phrase}" and nothing else after it.',
    ),
    "startend:quotation": (
        "Wrap your entire reply in double quotation marks.",
        "Put the whole answer inside a pair of double quotes.",
    ),
}

# Ways to say a relation, for {cmp}.
CMP = {"at least": ("at least", "no fewer than", "a minimum of"), "less than": ("fewer than", "less than")}
