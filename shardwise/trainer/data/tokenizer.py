"""Tokenizers that megatron-core's GPTDataset accepts: the built-in byte tokenizer and HF files.

`GPTDatasetConfig.tokenizer` must be a `megatron.core.tokenizers.MegatronTokenizerBase`; what
GPTDataset/MegatronDataset actually touch is `.vocab_size` (picks the token dtype code), `.eod`
(loss/position masks), `.unique_identifiers` (json-dumped into the index-cache hash, so it must
exist), and, guarded by try/except, `.pad`, `.eos` and `.special_tokens_dict`. We deliberately
define no `pad`: megatron then uses -1 as pad id, which never occurs in data, instead of masking
out the loss on a real token id.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Dict, List, Sequence

from .errors import DataError
from .megatron_compat import import_megatron

MegatronTokenizerBase = import_megatron("megatron.core.tokenizers").MegatronTokenizerBase

# Tried in order when a tokenizer.json has no sibling tokenizer_config.json naming `eos_token`.
EOD_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")


class _Base(MegatronTokenizerBase):
    """Shared plumbing: no chat templates, and `eos` is the document separator `eod`."""

    @property
    def eos(self) -> int:
        return self.eod

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no chat template")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class ByteTokenizer(_Base):
    """UTF-8 bytes: ids 0..255 are the bytes, 256 is end-of-document; vocab_size 257."""

    EOD = 256

    def __init__(self) -> None:
        super().__init__("byte", {})

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        # EOD has no byte form; drop it (and anything out of range) rather than fail mid-decode.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    @property
    def vocab(self) -> Dict[str, int]:
        vocab = {f"<0x{i:02X}>": i for i in range(256)}
        vocab["<eod>"] = self.EOD
        return vocab

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eod(self) -> int:
        return self.EOD

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", "shardwise.ByteTokenizer"), ("vocab_size", 257), ("eod", 256)])


class HFTokenizer(_Base):
    """A Hugging Face `tokenizer.json` read with the `tokenizers` package.

    Text is encoded without the post-processor's special tokens (no BOS/EOS insertion): the
    preprocessing step appends EOD itself, exactly as Megatron-LM's preprocess_data.py does.
    """

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise DataError(
                f"data.tokenizer (--tokenizer) {path!r} needs the Hugging Face `tokenizers` package: "
                "pip install tokenizers -c constraints.txt (or use data.tokenizer=byte)"
            ) from err
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise DataError(
                f"data.tokenizer (--tokenizer): no tokenizer file at {file!r}; give `byte` or the path of a "
                "Hugging Face tokenizer.json (or of the folder holding it)"
            )
        try:
            self._tok = Tokenizer.from_file(file)
        except Exception as err:  # the Rust side raises a bare Exception on bad JSON
            raise DataError(f"data.tokenizer (--tokenizer): cannot load {file!r} as a tokenizer.json: {err}") from err
        super().__init__(os.path.abspath(file), {})
        self._eod_token = self._find_eod(file)
        self._eod = self._tok.token_to_id(self._eod_token)
        # Embedding rows needed = highest id + 1, which can exceed get_vocab_size() when ids are
        # sparse (added tokens placed past the base vocab).
        self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

    def _find_eod(self, file: str) -> str:
        # tokenizer.json itself does not say which token ends a document; HF keeps that in the
        # sibling tokenizer_config.json, so prefer it and fall back to the usual names.
        candidates: List[str] = []
        config = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if os.path.isfile(config):
            try:
                with open(config, encoding="utf-8") as f:
                    eos = json.load(f).get("eos_token")
                if isinstance(eos, dict):  # serialized AddedToken
                    eos = eos.get("content")
                if isinstance(eos, str):
                    candidates.append(eos)
            except (OSError, ValueError):
                pass
        candidates.extend(EOD_CANDIDATES)
        for token in candidates:
            if self._tok.token_to_id(token) is not None:
                return token
        raise DataError(
            f"data.tokenizer (--tokenizer): {file!r} has no end-of-document token (looked for "
            f"{', '.join(candidates)}); add one of them to the tokenizer, or put its name as "
            "`eos_token` in a tokenizer_config.json next to it"
        )

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab(self) -> Dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            [("class", "shardwise.HFTokenizer"), ("tokenizer_path", self.path),
             ("vocab_size", self._vocab_size), ("eod", self._eod)]
        )


def build_tokenizer(spec: str) -> MegatronTokenizerBase:
    """`"byte"` -> ByteTokenizer; anything else is the path of a HF tokenizer.json (or its folder).

    The result has `tokenize(text) -> list[int]`, `detokenize(ids) -> str`, `.vocab_size`
    (embedding rows needed) and `.eod`, and can be used as `GPTDatasetConfig.tokenizer`.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data.tokenizer must be `byte` or a path to a tokenizer.json, got {spec!r}")
    spec = spec.strip()
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(os.path.expanduser(spec))


def token_dtype(vocab_size: int):
    """The on-disk token dtype: uint16 when every id fits (vocab <= 65536), else int32.

    Same threshold as `GPTDatasetConfig.token_dtype_code` (note that Megatron-LM's own
    preprocess_data.py uses `DType.optimal_dtype`, whose cut-off is 65500).
    """
    import numpy

    return numpy.uint16 if vocab_size <= numpy.iinfo(numpy.uint16).max + 1 else numpy.int32

