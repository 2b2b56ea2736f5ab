"""s2t_model.tokenizer against transformers' Speech2TextTokenizer (the reference), on spm models trained here."""

import json
import random

import pytest
from helpers import LANG_TOKENS, MUSTC, corpus, train_spm

from s2t_model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
Speech2TextTokenizer = transformers.Speech2TextTokenizer


# Text the reference must agree on: training-like text, upper case and unknown characters (the spm model is
# lowercase ASCII only), punctuation, odd whitespace, empty input, and special tokens written in the text.
SENTENCES = corpus(40, seed=1) + [
    "",
    " ",
    "  leading and trailing spaces  ",
    "double  space\ttab\nnewline",
    "Seven Hundred AND twelve",
    "THE CAT SAT ON THE MAT.",
    'Hello, world! Is it 42? Yes: it\'s (really) "quoted"...',
    "naïve café Ωmega 日本語 emoji 🙂",
    "one <s> two </s> three <pad> four <unk> five",
    "<lang:fr> the cat <lang:de>",
    "<lang:xx> is not a language token",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    return {
        "asr": train_spm(folder, "asr"),  # no language tokens (ASR checkpoints)
        "st": train_spm(folder, "st", LANG_TOKENS),  # language tokens are spm symbols (MuST-C multilingual)
    }


def hf_and_ours(tmp_path, files, **kwargs):
    """The reference tokenizer; ours loaded from the folder the reference saves (like a hub checkpoint), and ours
    built from the same files and options (where nothing pins the ids of tokens added on top of vocab.json)."""
    spm_file, vocab_file = files
    hf = Speech2TextTokenizer(vocab_file, spm_file, **kwargs)  # note: transformers takes vocab first
    hf.save_pretrained(tmp_path / "hf")
    return hf, [Tokenizer.from_pretrained(tmp_path / "hf"), Tokenizer(spm_file, vocab_file, **kwargs)]


def random_ids(hf, n=30, seed=0):
    """Id sequences mixing pieces with special/language tokens anywhere, and an id past the vocabulary."""
    rng = random.Random(seed)
    pool = list(range(len(hf))) + [len(hf) + 5]
    return [[rng.choice(pool) for _ in range(rng.randint(0, 25))] for _ in range(n)]


def assert_same(hf, ours, sentences=SENTENCES):
    for s in sentences:
        assert ours.encode(s) == hf(s).input_ids, s
    sequences = [hf(s).input_ids for s in sentences] + random_ids(hf)
    sequences.append([hf.bos_token_id, *hf(sentences[0]).input_ids, hf.pad_token_id, hf.pad_token_id])
    for ids in sequences:
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), ids
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False), ids
    assert ours.batch_decode(sequences) == hf.batch_decode(sequences, skip_special_tokens=True)


def test_special_ids_and_vocab(tmp_path, files):
    hf, both = hf_and_ours(tmp_path, files["st"], lang_codes="mustc")
    for ours in both:
        check_special_ids_and_vocab(hf, ours)


def check_special_ids_and_vocab(hf, ours):
    assert (
        (ours.bos_id, ours.pad_id, ours.eos_id, ours.unk_id)
        == (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id)
        == (0, 1, 2, 3)
    )
    assert ours.vocab_size == hf.vocab_size and len(ours) == len(hf)
    assert ours.langs == MUSTC and ours.lang_code_to_id == hf.lang_code_to_id


def test_asr_no_language_codes(tmp_path, files):
    hf, both = hf_and_ours(tmp_path, files["asr"])
    for ours in both:
        assert ours.langs == [] and ours.lang_code_to_id == {}
        assert_same(hf, ours)


@pytest.mark.parametrize("tgt_lang", [None, "fr", "de"])
def test_mustc_target_language(tmp_path, files, tgt_lang):
    hf, both = hf_and_ours(tmp_path, files["st"], lang_codes="mustc", tgt_lang=tgt_lang)
    for ours in both:
        assert ours.tgt_lang == hf.tgt_lang == (tgt_lang or "pt")  # transformers defaults to the first language
        assert_same(hf, ours)
    # Choosing the language per call equals switching the reference's tgt_lang.
    ours = both[0]
    for lang in ("fr", "de", "it"):
        hf.tgt_lang = lang
        for s in SENTENCES:
            assert ours.encode(s, tgt_lang=lang) == hf(s).input_ids
        assert ours.lang_id(lang) == hf.lang_code_to_id[lang] == hf(s).input_ids[0]


@pytest.mark.parametrize("spm_has_langs", [False, True])
def test_language_tokens_missing_from_vocab(tmp_path, files, spm_has_langs):
    # Language tokens absent from vocab.json: transformers appends them as added tokens after the vocabulary
    # (used for "<lang:xx>" written in text and for decoding) but takes the prefix id from spm (its unk id when
    # spm lacks them too). Same ids, same text.
    spm_file, vocab_file = files["st" if spm_has_langs else "asr"]
    vocab = {t: i for t, i in json.loads(open(vocab_file).read()).items() if t not in LANG_TOKENS}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    hf, both = hf_and_ours(tmp_path, (spm_file, str(tmp_path / "vocab.json")), lang_codes="mustc", tgt_lang="es")
    assert hf.lang_code_to_id["es"] == (10 if spm_has_langs else hf.unk_token_id)
    for ours in both:
        assert [ours.token_to_id(t) for t in LANG_TOKENS] == hf.convert_tokens_to_ids(LANG_TOKENS)
        assert ours.lang_code_to_id == hf.lang_code_to_id
        assert_same(hf, ours)


def test_lower_case(tmp_path, files):
    hf, both = hf_and_ours(tmp_path, files["st"], lang_codes="mustc", tgt_lang="fr", do_lower_case=True)
    # transformers 5 no longer lowercases for this slow tokenizer (4.x did, on the text between special tokens),
    # so the reference gets the lowercased text; special tokens in the text are lowercase already.
    for ours in both:
        assert ours.do_lower_case
        for s in SENTENCES:
            assert ours.encode(s) == hf(s.lower()).input_ids, s
    # Not vacuous: upper-case letters are unknown to this spm model unless lowercased.
    assert ours.encode("SEVEN") == ours.encode("seven") != Tokenizer(*files["st"], lang_codes="mustc").encode("SEVEN")


def test_upper_case_decoding(tmp_path, files):
    hf, both = hf_and_ours(tmp_path, files["asr"], do_upper_case=True)
    for ours in both:
        assert ours.decode(hf("the cat").input_ids) == "THE CAT"
        assert_same(hf, ours)


EXTRA = ["a <extra> b", "a <extra>long b<extra>longer <extra>"]


def test_our_save_loads_in_transformers(tmp_path, files):
    spm_file, vocab_file = files["st"]
    vocab = json.loads(open(vocab_file).read())
    for kwargs in (
        {},
        {"lang_codes": "mustc", "tgt_lang": "de", "do_upper_case": True},
        # overlapping extra tokens: the longest one written in the text wins
        {"lang_codes": "mustc", "additional_special_tokens": ["<extra>", "<extra>long"]},
    ):
        ours = Tokenizer(spm_file, vocab, **kwargs)
        ours.save_pretrained(tmp_path / "ours")
        hf = Speech2TextTokenizer.from_pretrained(tmp_path / "ours")
        assert hf.tgt_lang == ours.tgt_lang and hf.do_upper_case == ours.do_upper_case
        assert_same(hf, ours, SENTENCES + EXTRA)
        assert_same(hf, Tokenizer.from_pretrained(tmp_path / "ours"), SENTENCES + EXTRA)


def test_unknown_target_language(tmp_path, files):
    ours = Tokenizer(*files["st"], lang_codes="mustc")
    with pytest.raises(ValueError, match=r"'xx'.*pt, fr, ru, nl, ro, it, es, de"):
        ours.encode("one", tgt_lang="xx")
    with pytest.raises(ValueError, match="'xx'"):
        ours.lang_id("xx")
    with pytest.raises(ValueError, match="'xx'"):
        Tokenizer(*files["st"], lang_codes="mustc", tgt_lang="xx")
    with pytest.raises(ValueError, match="'fr'"):  # an ASR-only tokenizer has no target languages
        Tokenizer(*files["asr"]).encode("one", tgt_lang="fr")


def test_legacy_hub_layout(tmp_path, files):
    # 2021-era hub folders: no added_tokens_decoder; special tokens in special_tokens_map.json.
    spm_file, vocab_file = files["st"]
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "sentencepiece.bpe.model").write_bytes(open(spm_file, "rb").read())
    (folder / "vocab.json").write_text(open(vocab_file).read())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "do_upper_case": True,
                "do_lower_case": False,
                "lang_codes": "mustc",
                "tgt_lang": "it",
                "model_max_length": 1024,
                "tokenizer_class": "Speech2TextTokenizer",
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "additional_special_tokens": LANG_TOKENS,
            }
        )
    )
    hf = Speech2TextTokenizer.from_pretrained(folder)
    ours = Tokenizer.from_pretrained(folder)
    assert ours.tgt_lang == "it" and ours.do_upper_case
    assert_same(hf, ours)
