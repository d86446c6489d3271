"""Tokenizers: text <-> token ids.

Two implementations behind one small interface (``Tokenizer``):

* ``ByteTokenizer`` — built in, nothing to download. Ids 0..255 are the UTF-8 bytes of the text;
  the special tokens come after them::

      id   0 .. 255   256    257    258
           bytes      <pad>  <bos>  <eos>          vocab_size = 259

* ``HFTokenizer`` — any Hugging Face ``tokenizer.json`` through the ``tokenizers`` library, with
  bos/eos/pad read from the checkpoint's config files.

``load_tokenizer(spec)`` picks one from a string or path. Neither implementation adds special
tokens unless asked (``add_bos=True``): the caller decides where a sequence starts, so packing for
training and prompting for generation see the same ids.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import operator
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

_ACCEPTED_SPECS = (
    "None or 'byte' (the built-in byte tokenizer), a tokenizer.json file, "
    "or a directory containing tokenizer.json")


class Tokenizer(abc.ABC):
    """Text <-> token ids.

    Attributes:
      vocab_size: ids are ints in ``[0, vocab_size)``; ``decode`` rejects anything else.
      bos_id, eos_id, pad_id: the special tokens' ids, or ``None`` where the tokenizer has none.
      eos_ids: every id that ends a generation (checkpoints such as Llama 3 Instruct name
        several); starts with ``eos_id``.
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return () if self.eos_id is None else (self.eos_id,)

    @abc.abstractmethod
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """The ids of ``text``, with ``bos_id`` in front when ``add_bos``; never adds eos."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """The text of ``ids``; special tokens (bos/eos/pad) are dropped when ``skip_special``.

        Never raises on ids that do not form valid UTF-8 (a cut-off multi-byte character decodes
        to U+FFFD); raises ``ValueError`` on an id outside ``[0, vocab_size)``.
        """

    def encode_batch(self, texts: Iterable[str], *, add_bos: bool = False) -> list[list[int]]:
        return [self.encode(text, add_bos=add_bos) for text in texts]

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        if not add_bos:
            return ids
        if self.bos_id is None:
            raise ValueError(f"add_bos=True but {self!r} has no bos token")
        return [self.bos_id, *ids]

    def _checked(self, ids: Sequence[int]) -> list[int]:
        # operator.index takes Python and NumPy/JAX integer scalars and rejects floats.
        ids = [operator.index(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} is outside the vocabulary [0, {self.vocab_size}) of {self!r}")
        return ids


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then ``<pad>`` = 256, ``<bos>`` = 257, ``<eos>`` = 258."""

    PAD_ID = 256
    BOS_ID = 257
    EOS_ID = 258
    SPECIAL_NAMES: ClassVar[dict[int, str]] = {PAD_ID: "<pad>", BOS_ID: "<bos>", EOS_ID: "<eos>"}

    vocab_size = 259
    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = PAD_ID

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return self._with_bos(list(text.encode("utf-8")), add_bos)

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        # A rendered special token ends the run of bytes before it, so that "<eos>" never lands
        # inside a multi-byte character; a skipped one is dropped as HFTokenizer drops it.
        parts, run = [], bytearray()
        for i in self._checked(ids):
            if i < 256:
                run.append(i)
            elif not skip_special:
                parts += [run.decode("utf-8", errors="replace"), self.SPECIAL_NAMES[i]]
                run.clear()
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``, run by the ``tokenizers`` library.

    ``path`` is the ``tokenizer.json`` file or the checkpoint directory holding it. The special
    tokens come from files next to it, the first that names each one winning:

      1. ``tokenizer_config.json``: ``bos_token`` / ``eos_token`` / ``pad_token``, a string or a
         dict with ``"content"`` (how ``transformers`` saves an ``AddedToken``);
      2. ``special_tokens_map.json``: the same keys (older checkpoints);
      3. ``config.json``: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``, an int or a list
         (a list names several eos tokens).

    ``eos_ids`` holds every eos id the files name, ``eos_id`` the first of them.

    A tokenizer.json alone has no bos/eos/pad (``None``).

    ``encode`` never applies the tokenizer.json's post-processor (``add_special_tokens=False``):
    with ``add_bos=True`` bos is prepended here, so it appears exactly once whatever template the
    checkpoint ships.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer file at {str(file)!r}: HFTokenizer expects a tokenizer.json or a "
                "Hugging Face checkpoint directory containing one (a checkpoint with only "
                "tokenizer.model or vocab.json + merges.txt gets one from "
                "transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
        # Lazy: importing fastattn must not need the tokenizers package.
        import tokenizers

        try:
            self._tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{str(file)!r} is not a valid tokenizer.json: {e}") from e
        self.path = file
        # Added tokens may leave holes in the id space, so the bound is the largest id + 1,
        # not the number of tokens (what get_vocab_size counts).
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

        tokenizer_config, special_tokens_map, model_config = (
            _read_json(file.parent / name)
            for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json"))

        def named(kind: str) -> tuple[int, ...]:  # every id the files name, by priority
            found = (*self._token_id(tokenizer_config, f"{kind}_token"),
                     *self._token_id(special_tokens_map, f"{kind}_token"),
                     *_config_ids(model_config, f"{kind}_token_id"))
            return tuple(dict.fromkeys(found))

        bos, self._eos_ids, pad = named("bos"), named("eos"), named("pad")
        self.bos_id = bos[0] if bos else None
        self.eos_id = self._eos_ids[0] if self._eos_ids else None
        self.pad_id = pad[0] if pad else None
        self._special_ids = frozenset((*bos[:1], *self._eos_ids, *pad[:1]))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    def _token_id(self, config: _Config, key: str) -> tuple[int, ...]:
        token = config.data.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if token is None:
            return ()
        token_id = self._tok.token_to_id(token) if isinstance(token, str) else None
        if token_id is None:
            raise ValueError(
                f"{key}={token!r} in {str(config.path)!r} is not a token of {str(self.path)!r}")
        return (token_id,)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return self._with_bos(self._tok.encode(text, add_special_tokens=False).ids, add_bos)

    def encode_batch(self, texts: Iterable[str], *, add_bos: bool = False) -> list[list[int]]:
        # One call: the Rust side encodes the batch in parallel.
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(e.ids, add_bos) for e in encodings]

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        ids = self._checked(ids)
        if skip_special:
            # bos/eos/pad named by the config files are dropped even where tokenizer.json does
            # not flag them special; tokenizers drops the ones it flags.
            ids = [i for i in ids if i not in self._special_ids]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r})"


@dataclasses.dataclass(frozen=True)
class _Config:
    path: Path
    data: dict[str, Any]  # empty when the file is absent


def _read_json(path: Path) -> _Config:
    if not path.is_file():
        return _Config(path, {})
    try:
        with open(path, encoding="utf-8") as f:
            return _Config(path, json.load(f))
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e


def _config_ids(config: _Config, key: str) -> tuple[int, ...]:
    value = config.data.get(key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(
            f"{key}={value!r} in {str(config.path)!r}: expected an int or a list of ints")
    return tuple(values)


def load_tokenizer(spec: str | os.PathLike | None) -> Tokenizer:
    """The tokenizer ``spec`` names.

    * ``None`` or ``"byte"``: ``ByteTokenizer`` (the string wins over a file named ``byte``);
    * a ``tokenizer.json`` file, or a directory containing one: ``HFTokenizer``.

    Nothing is downloaded: a Hub name such as ``"gpt2"`` is a ``ValueError`` (as is any string
    that is not ``"byte"`` and not an existing path); download the checkpoint and pass its
    directory. A directory without ``tokenizer.json`` is a ``FileNotFoundError``; a ``spec`` that
    is not a string or path, a ``TypeError``.
    """
    if spec is None or spec == "byte":
        return ByteTokenizer()
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"load_tokenizer got {spec!r}; expected {_ACCEPTED_SPECS}")
    if not Path(spec).expanduser().exists():
        raise ValueError(
            f"load_tokenizer got {os.fspath(spec)!r}, which is not 'byte' and no file or "
            f"directory exists there; expected {_ACCEPTED_SPECS} (Hub names are not downloaded)")
    return HFTokenizer(spec)
