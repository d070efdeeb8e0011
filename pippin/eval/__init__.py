"""Evaluation: offline scorers, the systems and judges they grade, the runner, the suites and their reports.

Scorers (plain strings, standard library only, each reproducing a published reference): ifeval + ifeval_checks,
text (sentence/word splitting without NLTK data), langid, rouge + porter, refusal (keyword refusal detection),
rank_correlation. On top of them: systems (pippin models and OpenAI-compatible endpoints), runner (batched,
cached, resumable generation), judges + prompts (versioned judge templates and strict answer parsers), suite and
tasks/ (one module per benchmark), report (JSON, Markdown, plots). `pippin eval SUITE` drives them.
"""
