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


# The five text files of the OLMoE repository that its routing analysis reads (scripts/run_routing_analysis.py
# tokenises each file whole and cuts it into 2048-token windows: --pack --seq_len 2048 reads them the same way).
_OLMOE_TEXT = "https://raw.githubusercontent.com/allenai/OLMoE/main/scripts/routing_output/text/"
# MoE Lens' English: the first five books of this Gutenberg shard; its code: the first 200 files of this shard.
_GUTENBERG_SHARD = ("https://huggingface.co/datasets/sedthh/gutenberg_english/resolve/main/data/"
                    "train-00001-of-00037-9f227d74fc154ce9.parquet")
_GITHUB_CODE_SHARD = "https://huggingface.co/datasets/codeparrot/github-code/resolve/main/data/train-00000-of-01126.parquet"
PIAF = "hf:AgentPublic/piaf:plain_text:train#squad"

# name -> ((domain name, source spec), ...). "demo" is not listed: it depends on what the offline corpus finds.
PRESETS: dict[str, tuple[tuple[str, str], ...]] = {
    # The OLMoE paper's domain-specialization texts: the files its analysis read.
    "olmoe": (
        ("arxiv", _OLMOE_TEXT + "arxiv_texts.txt"),
        ("github", _OLMOE_TEXT + "github_oss_with_stack_texts.txt"),
        ("wikipedia", _OLMOE_TEXT + "wikipedia_texts.txt"),
        ("books", _OLMOE_TEXT + "b3g_texts.txt"),
        ("c4", _OLMOE_TEXT + "c4_texts.txt"),
    ),
    # The same five domains from public corpora, streamed (the suite's `olmoe` before issue 25).
    "olmoe-pile": (
        ("arxiv", _pile("ArXiv")),
        ("github", _pile("Github")),
        ("wikipedia", "hf:wikimedia/wikipedia:20231101.en"),
        ("books", _pile("Gutenberg (PG-19)")),
        ("c4", "hf:allenai/c4:en:validation"),
    ),
    "pile": tuple((name, _pile(set_name)) for name, set_name in PILE_COMPONENTS),
    # MoE Lens (DeepSeekMoE): English books, French question answering, grade-school math, code.
    "moe-lens": (
        ("english", _GUTENBERG_SHARD + "#TEXT[:5]"),
        ("french-qa", PIAF),
        ("gsm8k", "hf:openai/gsm8k:main:test#question,answer"),
        ("code", _GITHUB_CODE_SHARD + "#path,code[:200]"),
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

# (preset, domain) -> how its texts relate to the study's: "exact: ..." (the texts the study read) or
# "stand-in: ..." (neighbouring texts; the study's own are not available as they were read). --list shows them.
PROVENANCE: dict[tuple[str, str], str] = {
    **{("olmoe", name): f"exact: {source.rsplit('/', 1)[-1]} of the OLMoE repository, read by its routing analysis"
       for name, source in PRESETS["olmoe"]},
    **{("olmoe-pile", name): "stand-in: the same kind of text from a public corpus, not OLMoE's files"
       for name, _ in PRESETS["olmoe-pile"]},
    **{("pile", name): "exact component of the Pile (the uncopyrighted copy lacks five)" for name, _ in PRESETS["pile"]},
    ("moe-lens", "english"): "exact: the first five books of gutenberg_english's shard train-00001-of-00037",
    ("moe-lens", "french-qa"): ("stand-in: PIAF, written as FQuAD is read (each context, then its questions); "
                                "FQuAD's validation set needs a manual download: --data moe-lens french-qa=PATH/valid.json"),
    ("moe-lens", "gsm8k"): "exact: openai/gsm8k main, test split, question then answer",
    ("moe-lens", "code"): "exact: the first 200 files of codeparrot/github-code's shard train-00000-of-01126, path then code",
    **{("router-study", name): "the study's datasets, as its README names them" for name, _ in PRESETS["router-study"]},
}
# A preset domain's source that a `name=PATH` of the same --data replaces, and the layout the path is then read in
STAND_INS: dict[tuple[str, str], str] = {("moe-lens", "french-qa"): "#squad"}
