"""Speech2Text (fairseq S2T) tokenizer: sentencepiece pieces mapped through vocab.json.

Faithful to transformers' ``Speech2TextTokenizer`` (same ids, same decoded text) without importing it, and
reads/writes the same files: vocab.json, sentencepiece.bpe.model, tokenizer_config.json, special_tokens_map.json.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import sentencepiece

# Language sets known by name, as in transformers (`lang_codes="mustc"`).
LANGUAGES = {"mustc": ["pt", "fr", "ru", "nl", "ro", "it", "es", "de"]}

SPM_FILE = "sentencepiece.bpe.model"
VOCAB_FILE = "vocab.json"


def _content(token) -> str | None:
    # Saved configs hold a special token either as a string or as a serialized AddedToken dict.
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    # fairseq's dictionary puts these first; overwritten from vocab.json when the tokens are there.
    bos_id = 0
    pad_id = 1
    eos_id = 2
    unk_id = 3

    def __init__(
        self,
        spm_file: str | os.PathLike,
        vocab: dict[str, int] | str | os.PathLike,
        lang_codes: str | list[str] | None = None,
        tgt_lang: str | None = None,
        do_lower_case: bool = False,
        do_upper_case: bool = False,
        additional_special_tokens: list[str] | None = None,
        added_tokens: dict[str, int] | None = None,
        bos_token: str = "<s>",
        pad_token: str = "<pad>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        clean_up_tokenization_spaces: bool = False,
    ):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
        if not isinstance(vocab, dict):
            vocab = json.loads(Path(vocab).read_text(encoding="utf-8"))
        self.encoder: dict[str, int] = dict(vocab)
        self.decoder: dict[int, str] = {i: t for t, i in self.encoder.items()}
        self.do_lower_case = do_lower_case
        self.do_upper_case = do_upper_case
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.bos_token, self.pad_token, self.eos_token, self.unk_token = bos_token, pad_token, eos_token, unk_token

        # A named set ("mustc") like transformers, or an explicit list (for checkpoints we train ourselves;
        # transformers itself only understands the named sets).
        self.lang_codes = lang_codes
        self.langs: list[str] = (
            [] if lang_codes is None else list(LANGUAGES[lang_codes] if isinstance(lang_codes, str) else lang_codes)
        )
        lang_tokens = [f"<lang:{lang}>" for lang in self.langs]
        # transformers takes the prefix id from the spm model, not from vocab.json. In real checkpoints the
        # language tokens are spm user-defined symbols with the same id in both; if the spm model lacks them
        # transformers' prefix is spm's unk id, and we reproduce that rather than invent another id.
        self.lang_code_to_id: dict[str, int] = {
            lang: self.sp.piece_to_id(tok) for lang, tok in zip(self.langs, lang_tokens)
        }
        # Default target language: the first one, as transformers. Kept (unused) for ASR-only tokenizers.
        self.tgt_lang = tgt_lang if tgt_lang is not None or not self.langs else self.langs[0]
        if self.langs:
            self.lang_id(self.tgt_lang)  # fail early on an unknown default language

        # Special tokens in transformers' order: named ones, then language tokens, then the extra ones.
        self.special_tokens: list[str] = list(
            dict.fromkeys(
                [bos_token, eos_token, unk_token, pad_token, *lang_tokens, *(additional_special_tokens or [])]
            )
        )
        # Added tokens (never split by sentencepiece): those saved with the checkpoint, then every special token.
        # A special token missing from vocab.json gets the next id after all known tokens, as transformers does
        # (it counts tokens, not the largest id).
        self.added_tokens: dict[str, int] = dict(added_tokens or {})
        for tok in self.special_tokens:
            if tok not in self.added_tokens:
                known = self.encoder.keys() | self.added_tokens.keys()
                self.added_tokens[tok] = self.encoder[tok] if tok in self.encoder else len(known)
        self.added_decoder = {i: t for t, i in self.added_tokens.items()}
        self.special_ids = {self.token_to_id(t) for t in self.special_tokens}
        # Longest alternative first, so that the regex (leftmost match) picks the longest added token, as transformers'
        # trie does.
        alternatives = sorted(self.added_tokens, key=len, reverse=True)
        self._added_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

        self.bos_id, self.pad_id, self.eos_id, self.unk_id = (
            self.token_to_id(t) for t in (bos_token, pad_token, eos_token, unk_token)
        )

    # ----------------------------------------------------------------------------------------------- loading/saving
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "Tokenizer":
        folder = Path(folder)

        def read(name: str) -> dict:
            path = folder / name
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

        config = read("tokenizer_config.json")
        # Only a file name inside the folder: a config must not point us elsewhere.
        spm_name = os.path.basename(config.get("spm_file") or config.get("vocab_files", {}).get("spm_file") or SPM_FILE)
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if "added_tokens_decoder" in config:
            added = {_content(t): int(i) for i, t in config["added_tokens_decoder"].items()}
        else:
            # Older checkpoints: special tokens in special_tokens_map.json, extra added tokens in added_tokens.json.
            specials = read("special_tokens_map.json")
            for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                config.setdefault(key, specials.get(key))
            extra = list(extra) + [t for t in specials.get("additional_special_tokens") or [] if t not in extra]
            added = read("added_tokens.json")
        named = {k: _content(config[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k)}
        return cls(
            folder / spm_name,
            folder / VOCAB_FILE,
            lang_codes=config.get("lang_codes"),
            tgt_lang=config.get("tgt_lang"),
            do_lower_case=config.get("do_lower_case", False),
            do_upper_case=config.get("do_upper_case", False),
            additional_special_tokens=[_content(t) for t in extra],
            added_tokens=added,
            clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
            **named,
        )

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the files transformers' Speech2TextTokenizer.from_pretrained loads (giving the same ids)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / VOCAB_FILE).write_text(json.dumps(self.encoder, indent=2), encoding="utf-8")
        (folder / SPM_FILE).write_bytes(self.sp.serialized_model_proto())
        named = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }
        extra = [t for t in self.special_tokens if t not in named.values()]
        special = set(self.special_tokens)
        config = {
            # Pinning the added tokens' ids keeps them identical on reload.
            "added_tokens_decoder": {
                str(i): {
                    "content": t,
                    "lstrip": False,
                    "normalized": t not in special,
                    "rstrip": False,
                    "single_word": False,
                    "special": t in special,
                }
                for t, i in sorted(self.added_tokens.items(), key=lambda kv: kv[1])
            },
            **named,
            "additional_special_tokens": extra,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "do_lower_case": self.do_lower_case,
            "do_upper_case": self.do_upper_case,
            "lang_codes": self.lang_codes,
            "tgt_lang": self.tgt_lang,
            "sp_model_kwargs": {},
            "tokenizer_class": "Speech2TextTokenizer",
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        # Legacy file, read by older transformers versions.
        (folder / "special_tokens_map.json").write_text(
            json.dumps({**named, "additional_special_tokens": extra}, indent=2), encoding="utf-8"
        )

    # ---------------------------------------------------------------------------------------------------- mapping
    @property
    def vocab_size(self) -> int:
        return len(self.encoder)  # as transformers: vocab.json only, without tokens added on top

    def __len__(self) -> int:
        return len(self.encoder.keys() | self.added_tokens.keys())

    def token_to_id(self, token: str) -> int:
        if token in self.added_tokens:
            return self.added_tokens[token]
        if token in self.encoder:
            return self.encoder[token]
        return self.encoder.get(self.unk_token, self.added_tokens.get(self.unk_token, self.unk_id))

    def id_to_token(self, index: int) -> str:
        return self.added_decoder.get(index) or self.decoder.get(index, self.unk_token)

    def lang_id(self, lang: str) -> int:
        if lang not in self.lang_code_to_id:
            available = ", ".join(self.langs) if self.langs else "none (this tokenizer has no target languages)"
            raise ValueError(f"Unknown target language {lang!r}; available: {available}")
        return self.lang_code_to_id[lang]

    # ------------------------------------------------------------------------------------------------ encode/decode
    def tokenize(self, text: str) -> list[str]:
        # Added/special tokens written in the text are kept whole, as transformers does; the rest goes to spm.
        parts = self._added_re.split(text) if self._added_re else [text]
        tokens = []
        for i, part in enumerate(parts):
            if i % 2:  # odd parts are the regex's captured added tokens
                tokens.append(part)
            elif part:
                # transformers 4.x lowercases here (5.x silently dropped it); fairseq's spm models for
                # do_lower_case checkpoints were trained on lowercased text, so lowercasing is the faithful choice.
                tokens.extend(self.sp.encode(part.lower() if self.do_lower_case else part, out_type=str))
        return tokens

    def encode(self, text: str, tgt_lang: str | None = None) -> list[int]:
        """[language id] + piece ids + [eos]; the language prefix only when the tokenizer has languages.

        Asking an ASR-only tokenizer for a target language is an error rather than silently ignored.
        """
        if tgt_lang is not None or self.langs:
            prefix = [self.lang_id(tgt_lang if tgt_lang is not None else self.tgt_lang)]
        else:
            prefix = []
        return prefix + [self.token_to_id(t) for t in self.tokenize(text)] + [self.eos_id]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        tokens = [self.id_to_token(int(i)) for i in ids if not (skip_special_tokens and int(i) in self.special_ids)]
        # Pieces between special tokens are spm-decoded; a special token that survives (skip_special_tokens=False,
        # or "<unk>" standing for an id outside the vocabulary) is written as is, followed by a space.
        out, pieces = "", []
        for token in tokens + [None]:
            if token is None or token in self.special_tokens:
                text = self.sp.decode(pieces)
                out += (text.upper() if self.do_upper_case else text) + (token + " " if token else "")
                pieces = []
            else:
                pieces.append(token)
        out = out.strip()
        if self.clean_up_tokenization_spaces:
            for a, b in (
                (" .", "."),
                (" ?", "?"),
                (" !", "!"),
                (" ,", ","),
                (" ' ", "'"),
                (" n't", "n't"),
                (" 'm", "'m"),
                (" 's", "'s"),
                (" 've", "'ve"),
                (" 're", "'re"),
            ):
                out = out.replace(a, b)
        return out

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]
