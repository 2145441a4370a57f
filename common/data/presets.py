"""Named presets: `--data olmoe|pile|moe-lens|router-study` -> (domain name, source spec) pairs; `demo` is
resolved by `common.data.domains` from what the offline corpus finds."""

from __future__ import annotations

# Hub-backed presets need Hugging Face Hub access at run time; resolving them (here) never touches the network.
# All of them stream, so only the documents actually tokenised are downloaded.

# A Pile copy whose records carry `meta.pile_set_name`. The uncopyrighted copy lacks five components (below):
# point PILE_DATASET at a full copy of the Pile to get them, or leave them out with --domains / --num_domains.
PILE_DATASET = "monology/pile-uncopyrighted"
PILE_ABSENT = frozenset({"Books3", "BookCorpus2", "OpenSubtitles", "YoutubeSubtitles", "OpenWebText2"})

# The 22 components, in the Pile paper's Table 1 order (largest first), except that the five absent from
# PILE_DATASET come last, so that `--num_domains N` picks components that have data.
PILE_COMPONENTS: tuple[tuple[str, str], ...] = (
    ("pile-cc", "Pile-CC"),
    ("pubmed-central", "PubMed Central"),
    ("arxiv", "ArXiv"),
    ("github", "Github"),
    ("freelaw", "FreeLaw"),
    ("stackexchange", "StackExchange"),
    ("uspto-backgrounds", "USPTO Backgrounds"),
    ("pubmed-abstracts", "PubMed Abstracts"),
    ("gutenberg-pg19", "Gutenberg (PG-19)"),
    ("wikipedia-en", "Wikipedia (en)"),
    ("dm-mathematics", "DM Mathematics"),
    ("ubuntu-irc", "Ubuntu IRC"),
    ("europarl", "EuroParl"),
    ("hackernews", "HackerNews"),
    ("philpapers", "PhilPapers"),
    ("nih-exporter", "NIH ExPorter"),
    ("enron-emails", "Enron Emails"),
    ("books3", "Books3"),
    ("openwebtext2", "OpenWebText2"),
    ("opensubtitles", "OpenSubtitles"),
    ("bookcorpus2", "BookCorpus2"),
    ("youtubesubtitles", "YoutubeSubtitles"),
)


def _pile(set_name: str) -> str:
    return f"hf:{PILE_DATASET}?pile_set_name={set_name}"


# name -> ((domain name, source spec), ...). "demo" is not listed: it depends on what the offline corpus finds.
PRESETS: dict[str, tuple[tuple[str, str], ...]] = {
    # The OLMoE paper's domain-specialization domains; the Pile supplies arXiv, GitHub and books (PG-19).
    "olmoe": (
        ("arxiv", _pile("ArXiv")),
        ("github", _pile("Github")),
        ("wikipedia", "hf:wikimedia/wikipedia:20231101.en"),
        ("books", _pile("Gutenberg (PG-19)")),
        ("c4", "hf:allenai/c4:en:validation"),
    ),
    "pile": tuple((name, _pile(set_name)) for name, set_name in PILE_COMPONENTS),
    # MoE Lens (DeepSeekMoE): English text, French question answering, grade-school math.
    "moe-lens": (
        ("english", "hf:wikimedia/wikipedia:20231101.en"),
        ("french-qa", "hf:AgentPublic/piaf:plain_text:train#context,question"),
        ("gsm8k", "hf:openai/gsm8k:main:train#question,answer"),
    ),
    # moe-router-study: pretraining web text, math and code.
    "router-study": (
        ("fineweb", "hf:HuggingFaceFW/fineweb:sample-10BT"),
        ("gsm8k", "hf:openai/gsm8k:main:train#question,answer"),
        ("math", "hf:DigitalLearningGmbH/MATH-lighteval#problem,solution"),
        ("aqua-rat", "hf:deepmind/aqua_rat:raw#question,options,rationale"),
        ("github-code", "hf:codeparrot/codeparrot-clean#content"),
        ("humaneval", "hf:openai/openai_humaneval::test#prompt,canonical_solution"),
    ),
}
PRESET_NAMES: tuple[str, ...] = ("demo", *PRESETS)
